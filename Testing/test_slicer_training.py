"""The FMCTTraining module's logic and batch scripts: real engine commands in real subprocesses.

pretrain / finetune / evaluate are dispatched to the engine's CLI; until the engine has them,
the logic must refuse them clearly, and everything else is exercised with `fmct phantom` and
`fmct analyze`, which run through exactly the same path.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slicer_testing import REPO  # noqa: F401  (puts FMCTTraining/ on sys.path)

from FMCTTrainingLib import selftest  # noqa: E402
from FMCTTrainingLib.logic import TASKS, FMCTTrainingLogic, OutputParser, parseProgress  # noqa: E402


def engine_env() -> dict:
    """The environment of a script run: the engine importable as if pip-installed (CI installs it;
    a bare checkout has it only on the test's sys.path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def logic():
    return FMCTTrainingLogic()


def test_command_is_the_engine_cli_with_the_same_config(logic):
    selftest.checkCommand(logic)
    assert logic.splitOptions('--out "runs/my run" --device cuda') == ["--out", "runs/my run", "--device", "cuda"]


def test_phantom_run_streams_log_and_progress(logic):
    selftest.checkPhantomRunStreamsLogAndProgress(logic)


def test_engine_failure_is_reported_with_its_exit_code(logic):
    selftest.checkFailureIsReported(logic)


def test_missing_training_command_is_refused_clearly(logic):
    selftest.checkMissingCommandIsRefused(logic)


def test_cancel_terminates_the_run(logic):
    selftest.checkCancelStopsTheProcess(logic)


def test_progress_bars_become_progress_not_log_lines():
    parser = OutputParser()
    events = list(parser.feed("loading data\nepoch:   0%|          | \repoch:  40%|####      | loss 0.52\r"))
    events += list(parser.feed("epoch: 100%|##########| loss 0.31\nsaved runs/a\n"))
    assert [e.line for e in events if e.line] == ["loading data", "saved runs/a"]
    assert [(e.fraction, e.message) for e in events if e.line is None] == [
        (0.0, "epoch"), (0.4, "epoch: loss 0.52"), (1.0, "epoch: loss 0.31")]
    # A bar is reported as soon as it is complete, before the next redraw, and only once.
    parser = OutputParser()
    first = list(parser.feed("\rphantom:   0%|          | "))
    assert [(e.fraction, e.message) for e in first] == [(0.0, "phantom")]
    later = list(parser.feed("\rphantom:  50%|#####     | , phantom 1/2"))
    assert [(e.fraction, e.message) for e in later] == [(0.5, "phantom: phantom 1/2")]
    assert parseProgress("2024-01-01 epoch 3 done") is None


@pytest.mark.parametrize("task", TASKS)
def test_batch_script_runs_the_task_or_says_what_is_missing(task, logic, tmp_path):
    """The script as Slicer would run it (here with plain Python): exit code 2 and a one-line reason
    for a config that does not exist, or for a command the engine does not have yet."""
    missing_config = tmp_path / "missing.yaml"
    run = subprocess.run([sys.executable, str(REPO / "FMCTTraining" / "scripts" / f"{task}.py"),
                          "--config", str(missing_config)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=engine_env())
    assert run.returncode == 2, run.stdout + run.stderr
    if task in logic.availableCommands():
        assert "missing.yaml" in run.stdout + run.stderr
    else:
        assert f"no '{task}' command" in run.stderr and "update the fmct engine" in run.stderr


def test_batch_script_needs_a_config(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "FMCTTraining" / "scripts" / "pretrain.py")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=engine_env())
    assert run.returncode == 2 and "--config" in run.stderr
