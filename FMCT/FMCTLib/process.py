"""Child processes of the FMCT modules: start one in its own process group, read its JSON lines,
stop it and everything it started.

Long work (an analysis, a training run) runs outside Slicer's process so that the GUI keeps
repainting and a stuck or cancelled job can be ended for sure. Two details make "ended" true:

- In Slicer, ``PythonSlicer`` is a launcher that starts the real interpreter as its child, and
  torch may start workers of its own; killing the launcher's PID would leave the interpreter
  running. So every child is started as the leader of a new process group (POSIX session;
  a new process group on Windows) and stopped as a tree: with psutil when Slicer has it, else
  ``os.killpg`` (POSIX) or ``taskkill /T`` (Windows).
- Its stdout is read by a thread into a queue, so the GUI thread polls without ever blocking
  on a pipe; stderr goes to a file (a full, unread stderr pipe would stall the child).

Used by FMCTLib.logic (the analysis worker) and FMCTTrainingLib.logic (training runs).
"""
from __future__ import annotations

import codecs
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Sequence

WINDOWS = os.name == "nt"


def pythonExecutable() -> str:
    """Slicer's own Python launcher (PythonSlicer) inside the Slicer application, else this interpreter.

    Inside Slicer, sys.executable is the application itself, not a Python that runs a script.
    """
    try:
        import slicer

        slicer.app  # noqa: B018 -- only the application has it
        found = shutil.which("PythonSlicer")
        if found:
            return found
    except (ImportError, AttributeError):
        pass
    return sys.executable


class ChildProcess:
    """A process in its own group, whose output is collected by a reader thread.

    mergeStderr=True sends stderr to the same pipe (a training log, where the engine's progress
    bars and log lines both belong); otherwise stderr goes to stderrPath (or nowhere).
    inputPipe=True opens its stdin as a pipe for send() (a long-lived worker that takes requests);
    otherwise stdin is empty.
    Read it either as text() (everything since the last call, as it came, carriage returns
    included) or as lines() (complete lines only), not both.
    """

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 stderrPath: str | Path | None = None, mergeStderr: bool = False, inputPipe: bool = False) -> None:
        self.command = [str(c) for c in command]
        self.stderrPath = Path(stderrPath) if stderrPath and not mergeStderr else None
        self._stderr: IO[bytes] | None = open(self.stderrPath, "wb") if self.stderrPath else None  # noqa: SIM115
        stderr = subprocess.STDOUT if mergeStderr else (self._stderr or subprocess.DEVNULL)
        groupOptions: dict = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if WINDOWS
                              else {"start_new_session": True})
        self.started = time.time()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=stderr,
                                        stdin=subprocess.PIPE if inputPipe else subprocess.DEVNULL,
                                        env=env, cwd=cwd, **groupOptions)
        self._chunks: queue.Queue = queue.Queue()
        self._buffer = ""
        self._outputClosed = False
        self._reader = threading.Thread(target=self._read, name=f"fmct-reader-{self.process.pid}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            data = self.process.stdout.read1(65536)
            if not data:
                break
            self._chunks.put(decoder.decode(data))
        self._chunks.put(decoder.decode(b"", final=True))
        self._chunks.put(None)  # end of output

    def send(self, line: str) -> None:
        """Write one line to the child's stdin (opened with inputPipe=True) and flush it.

        Raises OSError (BrokenPipeError) when the child has gone: the caller starts another."""
        self.process.stdin.write(line.rstrip("\n").encode("utf-8") + b"\n")
        self.process.stdin.flush()

    def closeInput(self) -> None:
        """Close the child's stdin: a worker reading requests from it ends after the one it is serving."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:  # the child has gone; its pipe is broken
                pass

    @property
    def inputClosed(self) -> bool:
        """Whether its stdin is closed or was never a pipe (a one-off worker, or one that was stopped)."""
        return self.process.stdin is None or self.process.stdin.closed

    def text(self) -> str:
        """The output that arrived since the last call; never blocks."""
        pieces = []
        while True:
            try:
                piece = self._chunks.get_nowait()
            except queue.Empty:
                break
            if piece is None:
                self._outputClosed = True
            else:
                pieces.append(piece)
        return "".join(pieces)

    def lines(self) -> list[str]:
        """The complete lines that arrived since the last call (and the last one once output ends)."""
        self._buffer += self.text()
        *lines, self._buffer = self._buffer.split("\n")
        if self._outputClosed and self._buffer:
            lines.append(self._buffer)
            self._buffer = ""
        return [line + "\n" for line in lines]

    @property
    def outputClosed(self) -> bool:
        """True once the child's stdout is closed and every piece of it has been handed out."""
        return self._outputClosed and self._chunks.empty() and not self._buffer

    def running(self) -> bool:
        return self.process.poll() is None

    def returncode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def stderrTail(self, lines: int = 30) -> str:
        """The last lines the child wrote to stderr (for an error message)."""
        if self._stderr is not None and not self._stderr.closed:  # close() may have come first (a dead worker)
            self._stderr.flush()
        if self.stderrPath is None or not self.stderrPath.exists():
            return ""
        text = self.stderrPath.read_bytes()[-20000:].decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def interrupt(self) -> None:
        """Ask the process group to stop cleanly (SIGINT: a training run saves a checkpoint and exits).

        On Windows there is no SIGINT for a process group without a console; stop() kills it."""
        if self.running() and not WINDOWS:
            try:
                os.killpg(self.process.pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, graceSeconds: float = 0.0) -> None:
        """End the process and everything it started; after interrupt() wait up to graceSeconds first."""
        if graceSeconds > 0 and self.running():
            self.interrupt()
            try:
                self.process.wait(graceSeconds)
            except subprocess.TimeoutExpired:
                pass
        killProcessTree(self.process)
        self.close()

    def close(self) -> None:
        self.closeInput()
        if self._stderr is not None and not self._stderr.closed:
            self._stderr.close()


def killProcessTree(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Kill a process started by ChildProcess and all of its descendants, and reap it.

    The group is killed as well as the tree psutil sees: a grandchild whose parent already died
    is no longer anyone's child, but it is still in the group.
    """
    # The group is killed even when its leader has just exited: what it started may still run, and
    # while any member lives the group ID cannot be reused. Callers stop a process only while they
    # follow it (not long after it ended, when its PID could name another process).
    try:
        import psutil
    except ImportError:
        psutil = None
    victims = []
    if psutil is not None:
        try:
            parent = psutil.Process(process.pid)
            victims = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            victims = []
    if WINDOWS:
        if process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the child is its group's leader: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass
    for victim in victims:
        try:
            victim.kill()
        except Exception:  # already gone
            pass
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
    if psutil is not None and victims:
        psutil.wait_procs(victims, timeout=timeout)


def processGroupAlive(pid: int) -> bool:
    """Whether any process of the group led by pid is still running (POSIX; tests use it)."""
    if WINDOWS:
        return False
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def waitUntil(condition, timeout: float, interval: float = 0.05) -> bool:
    """Poll condition() until it is true or timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
