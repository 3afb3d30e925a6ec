"""FMCTTrainingLogic: pretrain, fine-tune and evaluate through the fmct engine's command line.

Training runs for hours, may use every GPU of the machine, and must not freeze Slicer or die with
it, so it runs in a separate process: `python -m fmct.cli <task> --config <file> ...`, exactly the
command and config files of the CLI (`fmct pretrain --config ...`). This logic builds that
command, streams its log, reports progress(fraction, message) and stops it on cancel. It is a thin
dispatcher on purpose: it knows no training option, so whatever subcommands and options the
engine's CLI has are available here unchanged.

Progress comes from the structured log the engine writes where it writes one: a pretraining run
appends one JSON object per step to <run folder>/losses.jsonl (with the step count in its
config.json), which RunLogFollower reads. The other commands report progress as JSON lines on
their output (the engine runs with FMCT_PROGRESS=json), which OutputParser reads.

Stop ends the whole process tree (FMCTLib.process): first an interrupt, on which a pretraining
run saves a checkpoint and exits (so --resume continues from there), then, if it is still
running after a grace period, a kill of every process it started. Terminating the PID of
PythonSlicer, which is a launcher, would leave the real interpreter running.

Used by the FMCTTraining widget (polling with a QTimer), by the batch scripts (`Slicer
--no-main-window --python-script <module folder>/scripts/pretrain.py --config ...`), and by tests
(with plain Python).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from FMCTLib.process import ChildProcess, pythonExecutable

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core from PyPI, or plain Python: no application base classes
    ScriptedLoadableModuleLogic = object

TASKS = ("pretrain", "finetune", "evaluate")
TASK_TITLES = {"pretrain": "Pretrain (self-supervised)", "finetune": "Fine-tune", "evaluate": "Evaluate"}

Log = Callable[[str], None]
STOP_GRACE_SECONDS = 30.0  # a pretraining step and its checkpoint can take this long on a big model

PROGRESS_ENV = "FMCT_PROGRESS"  # = fmct.cli.PROGRESS_ENV: "json" makes the engine print progress as JSON lines
PROGRESS_EVENT = "progress"  # = fmct.conventions.runtime.PROGRESS_EVENT (the module must not need the engine to parse it)


class TrainingError(RuntimeError):
    """A run cannot start (no such subcommand in this engine, no engine) or was cancelled."""


@dataclass
class OutputEvent:
    """One thing seen in the engine's output: a log line, or a progress update."""

    line: str | None = None
    fraction: float | None = None
    message: str = ""


@dataclass
class OutputParser:
    """Splits the engine's output into log lines and progress updates.

    The engine is run with FMCT_PROGRESS=json, so its progress arrives as JSON lines
    ({"event": "progress", "fraction": ..., "message": ...}, fmct.conventions.runtime.JsonLinesProgress) among
    its ordinary log lines; nothing parses a drawn progress bar. Text may arrive in arbitrary chunks
    (a pipe, QProcess), hence the buffer.
    """

    buffer: str = ""

    def feed(self, text: str) -> Iterator[OutputEvent]:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            yield from self._line(line)

    def flush(self) -> Iterator[OutputEvent]:
        line, self.buffer = self.buffer, ""
        yield from self._line(line)

    def _line(self, line: str) -> Iterator[OutputEvent]:
        line = line.rstrip("\r")
        if not line.strip():
            return
        progress = parseProgress(line)
        yield OutputEvent(fraction=progress[0], message=progress[1]) if progress else OutputEvent(line=line.rstrip())


def parseProgress(line: str) -> tuple[float, str] | None:
    """(fraction, message) from one of the engine's JSON progress lines, or None for any other line."""
    if not line.lstrip().startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("event") != PROGRESS_EVENT:
        return None
    try:
        return min(max(float(record.get("fraction", 0.0)), 0.0), 1.0), str(record.get("message", ""))
    except (TypeError, ValueError):
        return None


@dataclass
class RunResult:
    """How a run ended: the process' exit code and its last log lines (for an error message)."""

    returncode: int
    command: list[str]
    tail: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0


class FMCTTrainingLogic(ScriptedLoadableModuleLogic):
    """Builds and runs engine commands; decides nothing about training itself."""

    def __init__(self, python: str | None = None) -> None:
        super().__init__()
        self.python = python or pythonExecutable()

    # -- what can run ---------------------------------------------------------------------------

    def availableCommands(self) -> tuple[str, ...]:
        """The subcommands of the installed engine's CLI (asked from the engine, not assumed)."""
        try:
            import fmct.cli
        except ImportError as error:
            raise TrainingError(
                "The fmct engine is not installed in this Python. In Slicer, open the FMCT module and click "
                "Analyze once to install it; elsewhere: pip install <path to the FMCT repository>.") from error
        usage = fmct.cli.build_parser().format_usage()  # "usage: fmct [-h] ... {demo,analyze,...} ..."
        match = re.search(r"\{([^{}]+)\}", usage)
        return tuple(name.strip() for name in match.group(1).split(",")) if match else ()

    def checkCommand(self, task: str) -> None:
        """Refuse, with what to do, a subcommand the installed engine does not have."""
        available = self.availableCommands()
        if task in available:
            return
        import fmct

        waiting = " It comes with the engine's training part (fmct.train), which this engine does not " \
                  "have yet: update the fmct engine." if task in TASKS else ""
        raise TrainingError(f"This fmct engine ({fmct.__version__}) has no '{task}' command.{waiting} "
                            f"Its commands are: {', '.join(available)}.")

    def canStart(self, task: str, config: str | Path | None, running: bool) -> tuple[bool, str]:
        """Whether the widget's Start button is enabled, and why (not)."""
        if running:
            return False, "A run is in progress."
        if task in TASKS and str(config or "").strip() in ("", "."):
            return False, "Choose a config file (the same YAML the fmct command line takes)."
        return True, f"Run: {' '.join(self.command(task, config)[2:])}"

    # -- the command ------------------------------------------------------------------------------

    def command(self, task: str, config: str | Path | None = None, extraArgs: Sequence[str] = ()) -> list[str]:
        """`python -u -m fmct.cli <task> [--config <file>] [extra args]`: the CLI, in a new process."""
        args = [self.python, "-u", "-m", "fmct.cli", task]
        if config is not None and str(config).strip() not in ("", "."):
            args += ["--config", str(Path(config).expanduser())]
        return args + [str(a) for a in extraArgs]

    @staticmethod
    def splitOptions(text: str) -> list[str]:
        """The widget's free-text options as arguments, quoted as in the platform's shell."""
        import shlex

        return shlex.split(text or "", posix=os.name != "nt")

    def environment(self) -> dict[str, str]:
        """Unbuffered UTF-8 output, so the log and progress stream as they happen; the engine source
        that came with the module first on PYTHONPATH, so the engine that trains is that copy."""
        from FMCTLib.dependencies import engineSourceDir

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", PROGRESS_ENV: "json"}
        source = engineSourceDir()
        if source is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
        return env

    def runFolder(self, task: str, config: str | Path | None, extraArgs: Sequence[str]) -> Path | None:
        """Where the run writes its structured log: --out of a pretraining run (the command line wins
        over the config file, as in the engine)."""
        if task != "pretrain":
            return None
        args = [str(a) for a in extraArgs]
        for i, arg in enumerate(args):
            if arg == "--out" and i + 1 < len(args):
                return Path(args[i + 1]).expanduser()
            if arg.startswith("--out="):
                return Path(arg[len("--out="):]).expanduser()
        return None

    def start(self, task: str, config: str | Path | None = None, extraArgs: Sequence[str] = (),
              cwd: str | Path | None = None) -> TrainingRun:
        """Start one engine command in its own process group; returns at once (the widget polls it)."""
        self.checkCommand(task)
        command = self.command(task, config, extraArgs)
        folder = self.runFolder(task, config, extraArgs)
        if folder is not None and cwd is not None and not folder.is_absolute():
            folder = Path(cwd) / folder
        child = ChildProcess(command, env=self.environment(), cwd=cwd, mergeStderr=True)
        return TrainingRun(task, command, child, RunLogFollower(folder, child.started) if folder else None)

    def run(self, task: str, config: str | Path | None = None, extraArgs: Sequence[str] = (),
            log: Log = print, progress: Callable[[float, str], None] | None = None,
            cancel: Callable[[], bool] | None = None, cwd: str | Path | None = None,
            pollSeconds: float = 0.2) -> RunResult:
        """Run one engine command to the end, streaming its log and progress (scripts, tests).

        Raises TrainingError when the command does not exist in the engine or when cancelled (the
        process tree is stopped); otherwise returns its exit code and last lines.
        """
        run = self.start(task, config, extraArgs, cwd)
        log(f"Running: {' '.join(run.command)}")
        try:
            while True:
                for event in run.poll():
                    _dispatch(event, log, progress, run.tail)
                if not run.running:
                    break
                if cancel is not None and cancel():
                    run.stop()
                    raise TrainingError(f"'{task}' was cancelled.")
                time.sleep(pollSeconds)
        finally:
            if run.running:
                run.stop()
        log(f"fmct {task} finished with exit code {run.returncode}")
        return RunResult(run.returncode, run.command, run.tail)


class RunLogFollower:
    """Progress of a pretraining run from its structured log: <run>/losses.jsonl, one JSON record
    per step ({"step": 12, "loss": 0.41, ...}), and the step count in <run>/config.json.

    Reads only what was appended since the last call; starts over when the file is rewritten
    (a new run, or a resumed one that truncated it), and ignores files from before this run.
    """

    def __init__(self, folder: Path, startedAt: float) -> None:
        self.folder = Path(folder)
        self.startedAt = startedAt
        self.offset = 0
        self.total: int | None = None
        self.last: dict | None = None

    def poll(self) -> Iterator[OutputEvent]:
        log, config = self.folder / "losses.jsonl", self.folder / "config.json"
        if self.total is None and config.exists() and config.stat().st_mtime >= self.startedAt - 1:
            try:
                self.total = int(json.loads(config.read_text())["optim"]["steps"])
            except (ValueError, KeyError, TypeError, OSError):
                self.total = None
        if self.total is None or not log.exists():
            return
        size = log.stat().st_size
        if size < self.offset:
            self.offset = 0
        if size == self.offset:
            return
        with open(log, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(size - self.offset)
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        record = None
        for line in data[:complete].splitlines():
            try:
                candidate = json.loads(line)
            except ValueError:
                continue
            if isinstance(candidate, dict) and "step" in candidate:
                record = candidate
        if record is not None:
            self.last = record
            loss = record.get("loss")
            message = f"step {record['step']}/{self.total}" + (f" loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
            yield OutputEvent(fraction=min(max(record["step"] / self.total, 0.0), 1.0), message=message)


class TrainingRun:
    """One engine command running in its own process group: poll() for log lines and progress."""

    def __init__(self, task: str, command: list[str], child: ChildProcess, follower: RunLogFollower | None) -> None:
        self.task, self.command, self.child, self.follower = task, command, child, follower
        self.parser = OutputParser()
        self.tail: list[str] = []
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def running(self) -> bool:
        return not (self.child.returncode() is not None and self.child.outputClosed)

    @property
    def returncode(self) -> int | None:
        return self.child.returncode()

    def poll(self) -> list[OutputEvent]:
        """Log lines and progress since the last call (never blocks). Progress comes from the run's
        structured log when it has one; the progress bar in its output is the fallback."""
        killAt = getattr(self, "_killAt", None)
        if killAt is not None and time.monotonic() >= killAt and self.child.running():
            self.child.stop()  # did not stop on the interrupt: kill the tree
        events = []
        text = self.child.text()
        parsed = list(self.parser.feed(text)) if text else []
        if self.child.outputClosed:
            parsed += list(self.parser.flush())
        for event in parsed:
            if event.line is not None or self.follower is None or self.follower.last is None:
                events.append(event)
        if self.follower is not None:
            events += list(self.follower.poll())
        return events

    def requestStop(self, graceSeconds: float = STOP_GRACE_SECONDS) -> None:
        """Interrupt the run now (a pretraining run saves a checkpoint and exits) and have poll()
        kill its whole process tree if it is still running graceSeconds later. Never blocks, so
        the panel's Stop button does not freeze Slicer while a checkpoint is written."""
        from FMCTLib.process import WINDOWS

        self.stopped = True
        if WINDOWS:  # no interrupt for a process group without a console: end it now
            self.child.stop()
            return
        self.child.interrupt()
        self._killAt = time.monotonic() + graceSeconds

    def stop(self, graceSeconds: float = STOP_GRACE_SECONDS) -> None:
        """Interrupt the run, wait up to graceSeconds, then kill its whole process tree (blocking: scripts)."""
        self.stopped = True
        self.child.stop(graceSeconds)


def _dispatch(event: OutputEvent, log: Log, progress: Callable[[float, str], None] | None, tail: list[str]) -> None:
    if event.line is not None:
        log(event.line)
        tail.append(event.line)
        del tail[:-20]
    elif progress is not None:
        progress(event.fraction, event.message)
