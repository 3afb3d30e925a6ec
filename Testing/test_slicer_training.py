"""The FMCTTraining module's logic and batch scripts: real engine commands in real subprocesses.

pretrain / finetune / evaluate are dispatched to the engine's CLI; until the engine has them,
the logic must refuse them clearly, and everything else is exercised with `fmct phantom` and
`fmct analyze`, which run through exactly the same path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slicer_testing import REPO  # noqa: F401  (puts FMCTTraining/ on sys.path)

from FMCTTrainingLib import selftest  # noqa: E402
from FMCTLib.process import ChildProcess, processGroupAlive, waitUntil  # noqa: E402
from FMCTTrainingLib.logic import TASKS, FMCTTrainingLogic, OutputParser, RunLogFollower, parseProgress  # noqa: E402


def engine_env() -> dict:
    """The environment of a script run: the engine importable as if pip-installed (CI installs it;
    a bare checkout has it only on the test's sys.path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def logic():
    return FMCTTrainingLogic()


def test_command_is_the_engine_cli_with_the_same_config(logic):
    selftest.checkCommand(logic)
    assert logic.environment()["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)  # the engine that came with the module
    assert {"pretrain", "finetune", "evaluate", "analyze", "phantom"} <= set(logic.availableCommands())
    assert logic.splitOptions('--out "runs/my run" --device cuda') == ["--out", "runs/my run", "--device", "cuda"]


def test_phantom_run_streams_log_and_progress(logic):
    selftest.checkPhantomRunStreamsLogAndProgress(logic)


@pytest.mark.slow
def test_engine_failure_is_reported_with_its_exit_code(logic):
    selftest.checkFailureIsReported(logic)


def test_missing_training_command_is_refused_clearly(logic):
    selftest.checkMissingCommandIsRefused(logic)


@pytest.mark.slow
def test_cancel_terminates_the_run(logic):
    selftest.checkCancelStopsTheProcess(logic)


@pytest.mark.slow
def test_stop_ends_the_process_tree(logic):
    selftest.checkStopEndsTheProcessTree(logic)


def test_stop_kills_a_grandchild_that_ignores_the_interrupt(tmp_path):
    """What PythonSlicer (a launcher) and torch workers look like: the process we started is not the
    one doing the work. Stop must reach all of them, even one that ignores SIGINT."""
    code = textwrap.dedent("""
        import signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    process = ChildProcess([sys.executable, "-c", code])
    lines = []
    assert waitUntil(lambda: lines.extend(process.lines()) or lines, 60)
    grandchild = int(lines[0])
    process.stop(graceSeconds=1.0)
    assert waitUntil(lambda: not processGroupAlive(process.pid), 5)
    assert waitUntil(lambda: not _alive(grandchild), 5), "the grandchild survived Stop"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by init) is not running
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return True


def _pretrain_config(folder: Path, steps: int) -> Path:
    """A tiny pretraining run on a dozen preprocessed phantoms (the settings of Testing/test_pretrain.py)."""
    import yaml
    from safetensors.torch import save_file

    from fmct.train.pretrain import make_phantom_tensors

    data = folder / "phantoms.safetensors"
    save_file({"x": make_phantom_tensors(12, 0, (6, 6, 6), (32, 32, 32), in_plane_size=64)}, str(data))
    cfg = {
        "encoder": {"preset": "tiny", "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2,
                                                    "img_size": [32, 32, 32], "patch_size": [8, 8, 8]}},
        "data": {"source": "tensors", "path": str(data), "spacing_mm": [6, 6, 6], "size": [32, 32, 32]},
        "crops": {"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 2},
        "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "warmup_teacher_temp_steps": 4},
        "optim": {"batch_size": 2, "steps": steps, "warmup_steps": 2},
        "run": {"seed": 3, "checkpoint_every": 100, "num_threads": 1},
    }
    path = folder / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_pretraining_progress_is_read_from_its_losses_log_and_stop_saves_a_checkpoint(logic, tmp_path, monkeypatch):
    """A real `fmct pretrain` run from the panel's logic, with its progress bar switched off: the
    progress can only come from losses.jsonl. Stop interrupts it; it saves a checkpoint and exits 130.
    The run is far longer than the test waits (400 steps, stopped after the second), so Stop lands mid-run."""
    steps = 400
    config = _pretrain_config(tmp_path, steps)
    out = tmp_path / "run"
    run = logic.start("pretrain", config, ["--out", str(out), "--no-progress"])
    assert logic.runFolder("pretrain", config, ["--out", str(out)]) == out
    progress = []

    def some_steps():
        progress.extend(e for e in run.poll() if e.line is None)
        return progress and progress[-1].fraction >= 2 / steps or not run.running

    assert waitUntil(some_steps, 240), [e.line for e in run.poll()]
    assert run.running, f"the run ended early: {run.tail}"
    assert all(e.message.startswith("step ") and f"/{steps} loss " in e.message for e in progress), progress
    assert [e.fraction for e in progress] == sorted(e.fraction for e in progress)
    run.requestStop(graceSeconds=60)
    assert waitUntil(lambda: (run.poll() or True) and not run.running, 90)
    assert run.returncode == 130, run.returncode
    assert not processGroupAlive(run.pid)
    saved = json.loads((out / "checkpoints" / "last.json").read_text())["step"]
    assert 1 <= saved < steps


def test_run_log_follower_reads_only_new_complete_records(tmp_path):
    follower = RunLogFollower(tmp_path, startedAt=0.0)
    assert list(follower.poll()) == []
    (tmp_path / "config.json").write_text(json.dumps({"optim": {"steps": 10}}))
    log = tmp_path / "losses.jsonl"
    log.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n{"step": 3, "lo')
    assert [(e.fraction, e.message) for e in follower.poll()] == [(0.2, "step 2/10 loss 2.2500")]
    assert list(follower.poll()) == []
    with open(log, "a") as f:
        f.write('ss": 2.0}\n')
    assert [(e.fraction, e.message) for e in follower.poll()] == [(0.3, "step 3/10 loss 2.0000")]
    log.write_text('{"step": 1, "loss": 9.0}\n')  # rewritten by a new run
    assert [e.fraction for e in follower.poll()] == [0.1]


def test_json_progress_lines_become_progress_not_log_lines():
    parser = OutputParser()
    events = list(parser.feed('loading data\n{"event": "progress", "fraction": 0.4, "message": "finetune: epoch 2"}\n{"event": "pro'))
    events += list(parser.feed('gress", "fraction": 1.0, "message": "finetune: done"}\nsaved runs/a\n{"not": "progress"}\n'))
    assert [e.line for e in events if e.line] == ["loading data", "saved runs/a", '{"not": "progress"}']
    assert [(e.fraction, e.message) for e in events if e.line is None] == [(0.4, "finetune: epoch 2"), (1.0, "finetune: done")]
    assert parseProgress("2024-01-01 epoch 3 done") is None and parseProgress("{broken") is None


def test_the_engine_reports_progress_as_json_lines_the_module_reads(logic, tmp_path):
    """The real engine with the module's environment: its progress arrives as JSON lines, no bar."""
    run = subprocess.run([sys.executable, "-m", "fmct.cli", "phantom", str(tmp_path / "p"), "--n", "2",
                          "--size", "96", "--slices", "thick"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**engine_env(), **logic.environment()})
    assert run.returncode == 0, run.stderr
    parser = OutputParser()
    events = list(parser.feed(run.stderr)) + list(parser.flush())
    progress = [(e.fraction, e.message) for e in events if e.line is None]
    assert progress and progress[-1][0] == 1.0 and progress[-1][1].startswith("phantom")
    assert "%|" not in run.stderr  # no tqdm bar drawn


@pytest.mark.slow
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
