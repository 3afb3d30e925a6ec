"""The analysis worker that stays warm between clicks (issue 27 item 6).

Importing torch and loading the model cost about a third of a 13 s first click on a CPU. So the
logic keeps one worker process (FMCTLib/worker.py --serve) alive between analyses and sends it
one JSON request per line on stdin; it answers each with progress lines and one "done" or
"error" line, and keeps the model loaded (a different bundle or device reloads it inside the
worker). This class only holds that process and hands it to jobs; FMCTLogic decides when:

- started on first use, from the job's starting thread (never the GUI thread);
- started again when it died (killed by the kernel, crashed) or when the command changed (the
  module was reloaded with another engine source); a dead worker's job reports it as before
  (AnalysisJob.raiseError: exit code and stderr tail);
- killed, with everything it started, by a cancel (AnalysisJob.cancel stops the job's process;
  the next click finds it dead and starts a fresh one) and by stop() (module cleanup, or the
  logic being garbage-collected);
- while it serves a running job, a second job (a script starting two at once; the panel does
  not) gets a worker of its own whose stdin is closed after its request, so it ends with it.

Each worker's stderr goes to a file in a folder of its own, kept until stop() so a dead worker's
message can still quote it.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from FMCTLib.process import ChildProcess

log = logging.getLogger("FMCT")


class WarmWorker:
    """The long-lived worker process of one FMCTLogic, and the job it is serving."""

    def __init__(self) -> None:
        self.child: ChildProcess | None = None
        self.command: list[str] | None = None
        self.job = None  # the AnalysisJob the warm process serves (or last served)
        self.started = 0  # how many worker processes were started (warm ones and one-off ones)
        self._folders: list[Path] = []
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        child = self.child
        return child.pid if child is not None and child.running() else None

    def serve(self, job, command: Sequence[str], environment: dict[str, str], request: dict) -> ChildProcess:
        """Send one request to the warm worker (started if needed) and return the process serving it."""
        command = [str(c) for c in command]
        line = json.dumps(request)
        with self._lock:
            busy = self.job is not None and self.job is not job and self.job.running and self.child is not None
            if busy and self.child.running() and self.command == command:
                child = self._start(command, environment)  # a one-off: the warm one is serving another job
                child.send(line)
                child.closeInput()  # it ends after this request
                return child
            for attempt in range(2):
                if self.child is not None and (not self.child.running() or self.command != command):
                    log.info("FMCT: analysis process %d has ended or is outdated; starting a new one", self.child.pid)
                    _end(self.child)
                    self.child = None
                if self.child is None:
                    self.child, self.command = self._start(command, environment), command
                try:
                    self.child.send(line)
                    break
                except OSError:  # it died between the check and the request: once more with a fresh one
                    if attempt:
                        raise
            self.job = job
            return self.child

    def _start(self, command: list[str], environment: dict[str, str]) -> ChildProcess:
        folder = Path(tempfile.mkdtemp(prefix="fmct-worker-"))
        self._folders.append(folder)
        child = ChildProcess(command, env=environment, stderrPath=folder / "worker.log", inputPipe=True)
        self.started += 1
        log.info("FMCT: analysis process %d started", child.pid)
        return child

    def stop(self) -> None:
        """Kill the warm worker and everything it started, and delete the workers' logs."""
        with self._lock:
            child, self.child, self.job = self.child, None, None
            folders, self._folders = self._folders, []
        if child is not None:
            _end(child)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def _end(child: ChildProcess) -> None:
    """Kill a worker that still runs; one that has ended (and is reaped now) is only closed, so that its
    process ID, free again, is never signalled."""
    if child.running():
        child.stop()
    else:
        child.close()
