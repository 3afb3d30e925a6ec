"""FMCTTrainingLogic: pretrain, fine-tune and evaluate through the fmct engine's command line.

Training runs for hours, may use every GPU of the machine, and must not freeze Slicer or die with
it, so it runs in a separate process: `python -m fmct.cli <task> --config <file> ...`, exactly the
command and config files of the CLI (`fmct pretrain --config ...`). This logic builds that
command, streams its log, turns the engine's progress bars into progress(fraction, message) and
stops it on cancel. It is a thin dispatcher on purpose: it knows no training option, so whatever
subcommands and options the engine's CLI has are available here unchanged.

Used by the FMCTTraining widget (through QProcess, with the same command and output parsing), by
the batch scripts (`Slicer --no-main-window --python-script FMCTTraining/scripts/pretrain.py
--config ...`), and by tests (with plain Python).
"""
from __future__ import annotations

import codecs
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core from PyPI, or plain Python: no application base classes
    ScriptedLoadableModuleLogic = object

TASKS = ("pretrain", "finetune", "evaluate")
TASK_TITLES = {"pretrain": "Pretrain (self-supervised)", "finetune": "Fine-tune", "evaluate": "Evaluate"}

Log = Callable[[str], None]
Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

# A tqdm bar as the engine's CLI prints it: "<desc>:  42%|####      | <postfix>"
_PROGRESS = re.compile(r"^\s*(?P<desc>[^:|]*?):?\s*(?P<percent>\d{1,3})%\|[^|]*\|\s*(?P<postfix>.*)$")


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

    tqdm redraws its bar as "\\r<bar>" with no terminator until the next redraw; logging those
    redraws would fill the log with copies of a bar, so they become progress updates (shown as
    soon as a whole bar is in, not at the next redraw) and only real lines are logged. Text may
    arrive in arbitrary chunks (a pipe, QProcess), hence the buffer.
    """

    buffer: str = ""
    shown: str = ""  # the bar already reported from the buffer, not to be reported twice

    def feed(self, text: str) -> Iterator[OutputEvent]:
        self.buffer += text
        while True:
            match = re.search(r"[\r\n]", self.buffer)
            if match is None:
                break
            piece, self.buffer = self.buffer[:match.start()], self.buffer[match.end():]
            yield from self._piece(piece, isLine=match.group() == "\n")
        progress = parseProgress(self.buffer)
        if progress is not None and self.buffer != self.shown:
            self.shown = self.buffer
            yield OutputEvent(fraction=progress[0], message=progress[1])

    def flush(self) -> Iterator[OutputEvent]:
        piece, self.buffer = self.buffer, ""
        yield from self._piece(piece, isLine=True)

    def _piece(self, piece: str, isLine: bool) -> Iterator[OutputEvent]:
        shown, self.shown = self.shown, ""
        if not piece.strip():
            return
        progress = parseProgress(piece)
        if progress is not None:
            if piece != shown:
                yield OutputEvent(fraction=progress[0], message=progress[1])
        elif isLine:
            yield OutputEvent(line=piece.rstrip())


def parseProgress(text: str) -> tuple[float, str] | None:
    """(fraction, message) from one tqdm bar rendering, or None if the text is not one."""
    match = _PROGRESS.match(text)
    if match is None:
        return None
    fraction = min(max(int(match.group("percent")) / 100.0, 0.0), 1.0)
    desc, postfix = match.group("desc").strip(), match.group("postfix").strip().lstrip(",").strip()
    return fraction, f"{desc}: {postfix}" if desc and postfix else desc or postfix


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
        parser = fmct.cli.build_parser()
        for action in parser._subparsers._group_actions:  # argparse keeps subcommands here
            return tuple(action.choices)
        return ()

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
        """Unbuffered UTF-8 output, so the log and progress stream as they happen."""
        return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}

    # -- running it (headless) -------------------------------------------------------------------

    def run(self, task: str, config: str | Path | None = None, extraArgs: Sequence[str] = (),
            log: Log = print, progress: Progress | None = None, cancel: CancelCheck | None = None,
            cwd: str | Path | None = None) -> RunResult:
        """Run one engine command to the end, streaming its log and progress.

        Raises TrainingError when the command does not exist in the engine or when cancelled
        (the process is terminated); otherwise returns its exit code and last lines.
        """
        self.checkCommand(task)
        command = self.command(task, config, extraArgs)
        log(f"Running: {' '.join(command)}")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=self.environment(), cwd=cwd)
        tail: list[str] = []
        parser = OutputParser()
        try:
            for chunk in _chunks(process, cancel):
                for event in parser.feed(chunk):
                    _dispatch(event, log, progress, tail)
            for event in parser.flush():
                _dispatch(event, log, progress, tail)
        except _CancelRequested:
            _stop(process)
            raise TrainingError(f"'{task}' was cancelled.") from None
        returncode = process.wait()
        log(f"fmct {task} finished with exit code {returncode}")
        return RunResult(returncode, command, tail)


def pythonExecutable() -> str:
    """Slicer's own Python (PythonSlicer) inside Slicer, else this interpreter."""
    try:
        import slicer

        slicer.app  # noqa: B018 -- only the application has it
        found = shutil.which("PythonSlicer")
        if found:
            return found
    except (ImportError, AttributeError):
        pass
    return sys.executable


class _CancelRequested(Exception):
    pass


def _chunks(process: subprocess.Popen, cancel: CancelCheck | None, poll_s: float = 0.2) -> Iterator[str]:
    """Decoded output as it arrives; a reader thread lets cancel be checked while the run is silent."""
    chunks: queue.Queue = queue.Queue()

    def read() -> None:
        while True:
            data = process.stdout.read1(65536)
            chunks.put(data)
            if not data:
                return

    threading.Thread(target=read, daemon=True).start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        if cancel is not None and cancel():
            raise _CancelRequested()
        try:
            data = chunks.get(timeout=poll_s)
        except queue.Empty:
            continue
        if not data:
            return
        yield decoder.decode(data)


def _dispatch(event: OutputEvent, log: Log, progress: Progress | None, tail: list[str]) -> None:
    if event.line is not None:
        log(event.line)
        tail.append(event.line)
        del tail[:-20]
    elif progress is not None:
        progress(event.fraction, event.message)


def _stop(process: subprocess.Popen) -> None:
    """Terminate, and kill if it does not stop within 10 s (a GPU job may take a moment)."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
