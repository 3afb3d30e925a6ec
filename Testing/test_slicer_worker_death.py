"""The FMCT Slicer module when its worker process dies or misbehaves (issue 25 item 21).

Real slicer-core nodes and the module's real logic; the worker is the real FMCTLib/worker.py,
started through a small launcher given as the module's Python (as Slicer gives PythonSlicer):
the launcher writes a line to stderr, or a malformed progress line, or makes the interpreter
crash with SIGSEGV after the worker finished, and a test kills the worker as the kernel kills a
process out of memory. Each asserts what the user gets.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from slicer_testing import headless_slicer  # noqa: E402

from FMCTLib import selftest  # noqa: E402
from FMCTLib.logic import FMCTLogic  # noqa: E402
from FMCTLib.process import waitUntil  # noqa: E402
from fmct.conventions.runtime import read_json_line  # noqa: E402
from fmct.inference.bundle import read_meta  # noqa: E402

pytestmark = [pytest.mark.skipif(os.name != "posix", reason="the launcher is a POSIX shell script"),
              pytest.mark.slow]  # each starts the real worker process (torch import: seconds)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return selftest.tinyBundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def ph():
    return selftest.phantom(seed=3, findings=["subdural"], inPlaneSize=64)


def launcher(folder: Path, before: str = "", after: str = "") -> str:
    """A 'python' for the logic: runs the real worker script with this interpreter, with code before and after it."""
    script = folder / "launch.py"
    script.write_text(textwrap.dedent('''\
        import os, runpy, signal, sys
        worker = sys.argv[1]
        sys.argv = sys.argv[1:]
        sys.path[0] = os.path.dirname(worker)
        {before}
        try:
            runpy.run_path(worker, run_name="__main__")
        finally:
            {after}
        ''').format(before=before or "pass", after=after or "pass"))
    shell = folder / "python"
    shell.write_text(f'#!/bin/sh\necho "launcher: starting the worker" >&2\nexec "{sys.executable}" "{script}" "$@"\n')
    shell.chmod(0o755)
    return str(shell)


def start(app, tmp_path, ph, bundle, python: str):
    ct = selftest.loadAsNRRD(app.scene, ph.volume, tmp_path / "ct", volumes=app.volumesLogic)
    logic = FMCTLogic(python=python)
    job = logic.startAnalysis(ct, bundlePath=bundle, device="CPU", explain=None)
    job.wait()
    return logic, job, ct


def test_a_killed_worker_gives_the_intended_message_with_its_stderr(tmp_path, ph, bundle):
    """Killed as the kernel kills a process out of memory: not 'ValueError: flush of closed file'."""
    with headless_slicer() as app:
        logic, job, _ = start(app, tmp_path, ph, bundle, launcher(tmp_path, before="import time; time.sleep(60)"))
        assert job.pid is not None
        time.sleep(0.5)  # the launcher has written its stderr line and is waiting
        os.kill(job.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while job.running and time.monotonic() < deadline:
            job.poll()
            time.sleep(0.05)
        assert job.state == "failed"
        with pytest.raises(RuntimeError) as raised:
            logic.finishAnalysis(job)
    message = str(raised.value)
    assert "ended with exit code -9 before finishing" in message
    assert "launcher: starting the worker" in message  # the worker's stderr tail


def test_a_malformed_progress_line_is_ignored(tmp_path, ph, bundle):
    bad = '{"event": "progress", "fraction": "half", "message": "x"}'
    with headless_slicer() as app:
        ct = selftest.loadAsNRRD(app.scene, ph.volume, tmp_path / "ct", volumes=app.volumesLogic)
        logic = FMCTLogic(python=launcher(tmp_path, before=f"print({bad!r}, flush=True)"))
        seen = []
        result = logic.analyze(ct, bundlePath=bundle, device="CPU", explain=None, progress=lambda f, m: seen.append(f))
    assert [f["name"] for f in result.findings] == read_meta(bundle).task_names
    assert all(isinstance(f, float) for f in seen)
    assert read_json_line(bad) is None and read_json_line('{"event": "progress", "fraction": NaN}') is None
    assert read_json_line('{"event": "progress", "fraction": 0.5}') == {"event": "progress", "fraction": 0.5}


def test_a_finished_analysis_is_kept_when_the_interpreter_crashes_at_exit(tmp_path, ph, bundle):
    """The warm worker crashes when it ends (after the results it delivered): they are kept, and
    the next click starts a fresh worker."""
    crash = "sys.stdout.flush(); os.kill(os.getpid(), signal.SIGSEGV)"
    with headless_slicer() as app:
        logic, job, ct = start(app, tmp_path, ph, bundle, launcher(tmp_path, after=crash))
        deadline = time.monotonic() + 300
        while job.running and time.monotonic() < deadline:
            job.poll()
            time.sleep(0.05)
        assert job.state == "done"
        result = logic.finishAnalysis(job)
        tasks = read_meta(bundle).task_names
        assert [f["name"] for f in result.findings] == tasks and result.tableNode.GetNumberOfRows() == len(tasks)
        first = job.child  # the warm worker: it ends when its stdin closes, and its interpreter then crashes
        first.closeInput()
        assert waitUntil(lambda: first.returncode() is not None, 60)
        assert first.returncode() == -signal.SIGSEGV  # it did crash
        again = logic.analyze(ct, bundlePath=bundle, device="CPU", explain=None)  # the next click: a fresh worker
        assert again.worker["pid"] != first.pid and again.worker["model_loads"] == 1
        assert [f["name"] for f in again.findings] == tasks
        logic.stopWorker()


def test_a_crash_before_the_results_is_still_a_failure(tmp_path, ph, bundle):
    """The result is kept only when the worker delivered it: a crash before that fails, with its stderr."""
    crash = "sys.stdout.flush(); os.kill(os.getpid(), signal.SIGSEGV)"
    with headless_slicer() as app:
        logic, job, _ = start(app, tmp_path, ph, bundle, launcher(tmp_path, before=crash))
        deadline = time.monotonic() + 60
        while job.running and time.monotonic() < deadline:
            job.poll()
            time.sleep(0.05)
        assert job.state == "failed"
        with pytest.raises(RuntimeError, match="exit code -11 before finishing"):
            logic.finishAnalysis(job)
