"""Checks of FMCTTrainingLogic, shared by the module's self-test (FMCTTrainingTest, in Slicer) and
pytest (Testing/test_slicer_training.py). Runs real engine commands in real subprocesses."""
from __future__ import annotations

import tempfile
from pathlib import Path

from FMCTTrainingLib.logic import TASKS, FMCTTrainingLogic, TrainingError


def checkCommand(logic: FMCTTrainingLogic) -> None:
    """The command is the engine's CLI with the same config file, in the logic's Python."""
    command = logic.command("pretrain", "configs/pretrain.yaml", ["--device", "cuda", "--out", "runs/a b"])
    expected = [logic.python, "-u", "-m", "fmct.cli", "pretrain", "--config", str(Path("configs/pretrain.yaml")),
                "--device", "cuda", "--out", "runs/a b"]
    assert command == expected, command
    assert logic.command("phantom", None, ["out"]) == [logic.python, "-u", "-m", "fmct.cli", "phantom", "out"]


def checkPhantomRunStreamsLogAndProgress(logic: FMCTTrainingLogic) -> None:
    """`fmct phantom` through the same path a training run takes: real process, streamed log,
    progress from the engine's progress bar, files written, exit code 0."""
    with tempfile.TemporaryDirectory(prefix="fmct-training-selftest-") as work:
        lines, fractions = [], []
        result = logic.run("phantom", None, [str(Path(work) / "set"), "--n", "2", "--size", "48", "--slices", "thick"],
                           log=lines.append, progress=lambda f, m: fractions.append(f))
        assert result.succeeded, result.tail
        assert any("Wrote 2 phantom(s)" in line for line in lines), lines
        assert not any("%|" in line for line in lines), "progress bars must not be logged as lines"
        assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions), fractions
        assert (Path(work) / "set" / "labels.csv").is_file()


def checkFailureIsReported(logic: FMCTTrainingLogic) -> None:
    """An engine error ends the run with the engine's exit code and its message in the log."""
    lines = []
    result = logic.run("analyze", None, ["/no/such/ct.nii.gz"], log=lines.append)
    assert result.returncode == 2, result
    assert any("error" in line.lower() for line in result.tail), result.tail


def checkMissingCommandIsRefused(logic: FMCTTrainingLogic) -> None:
    """A training command the installed engine lacks is refused before anything starts, saying so."""
    available = logic.availableCommands()
    missing = [task for task in TASKS if task not in available]
    for task in missing:
        try:
            logic.run(task, "config.yaml", log=lambda line: None)
        except TrainingError as error:
            assert f"no '{task}' command" in str(error) and "update the fmct engine" in str(error), error
        else:
            raise AssertionError(f"'{task}' is not in the engine, yet it ran")
    try:
        logic.run("no-such-command", None, log=lambda line: None)
    except TrainingError as error:
        assert "no 'no-such-command' command" in str(error)
    else:
        raise AssertionError("an unknown command ran")


def checkCancelStopsTheProcess(logic: FMCTTrainingLogic) -> None:
    """Cancel terminates the engine process and raises, leaving no process behind."""
    with tempfile.TemporaryDirectory(prefix="fmct-training-selftest-") as work:
        seen = []
        try:
            logic.run("phantom", None, [str(Path(work) / "set"), "--n", "50", "--size", "256"],
                      log=lambda line: None, progress=lambda f, m: seen.append(f), cancel=lambda: bool(seen))
        except TrainingError as error:
            assert "cancelled" in str(error)
        else:
            raise AssertionError("the run was not cancelled")
        assert len(list((Path(work) / "set").glob("phantom_*"))) < 50


def checkStopEndsTheProcessTree(logic: FMCTTrainingLogic) -> None:
    """The panel's Stop: an interrupt, then (polled, never blocking) a kill of the whole process group."""
    from FMCTLib.process import processGroupAlive, waitUntil

    with tempfile.TemporaryDirectory(prefix="fmct-training-selftest-") as work:
        run = logic.start("phantom", None, [str(Path(work) / "set"), "--n", "50", "--size", "256"])
        assert waitUntil(lambda: any(e.line is None for e in run.poll()), 120), "no progress from the run"
        run.requestStop(graceSeconds=10)
        assert waitUntil(lambda: (run.poll() or True) and not run.running, 30), "the run did not stop"
        assert run.stopped and run.returncode != 0
        assert waitUntil(lambda: not processGroupAlive(run.pid), 5), "processes of the run are still alive"


def runAll(log=print) -> None:
    logic = FMCTTrainingLogic()
    for check in (checkCommand, checkPhantomRunStreamsLogAndProgress, checkFailureIsReported,
                  checkMissingCommandIsRefused, checkCancelStopsTheProcess, checkStopEndsTheProcessTree):
        log(check.__doc__.splitlines()[0])
        check(logic)
