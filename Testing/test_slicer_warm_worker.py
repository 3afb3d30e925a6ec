"""The FMCT Slicer module's analysis worker stays warm between clicks (issue 27 item 6).

Real slicer-core nodes, the module's real logic and the real worker process (FMCTLib/worker.py
--serve, started with this interpreter as Slicer starts it with PythonSlicer). Which process
served an analysis, and whether it loaded the model for it, is what the worker reports in its
"done" line (FMCTResult.worker: pid, model_loads, requests, model_loaded).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from slicer_testing import REPO, headless_slicer  # noqa: E402

from FMCTLib import outputs, selftest  # noqa: E402
from FMCTLib.logic import FMCTLogic  # noqa: E402
from FMCTLib.process import processGroupAlive, waitUntil  # noqa: E402
from fmct.conventions.runtime import read_json_line  # noqa: E402
from fmct.inference.bundle import read_meta  # noqa: E402

pytestmark = pytest.mark.slow  # each starts the real worker process (torch import: seconds)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return selftest.tinyBundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def ph():
    return selftest.phantom(seed=3, findings=["subdural"], inPlaneSize=64)


@pytest.fixture
def scene(tmp_path, ph):
    """A headless Slicer with the phantom CT loaded from NRRD, and a logic whose worker is stopped afterwards."""
    with headless_slicer() as app:
        ct = selftest.loadAsNRRD(app.scene, ph.volume, tmp_path / "ct", volumes=app.volumesLogic)
        logic = FMCTLogic()
        try:
            yield app, ct, logic
        finally:
            pid = logic.worker.pid
            logic.stopWorker()
            assert pid is None or waitUntil(lambda: not processGroupAlive(pid), 5.0)


def test_a_second_click_is_served_by_the_same_process_without_loading_the_model(scene, bundle):
    app, ct, logic = scene
    first = logic.analyze(ct, bundlePath=bundle, device="CPU", explain="attention")
    negative = next(f["name"] for f in first.findings if not f["positive"])
    job = logic.explainFinding(ct, negative, bundlePath=bundle, device="CPU", explain="occlusion")  # the panel's button
    selftest.waitFor(job)
    second = logic.finishAnalysis(job)
    assert first.worker["pid"] == second.worker["pid"] == logic.worker.pid
    assert (first.worker["model_loads"], first.worker["model_loaded"]) == (1, True)
    assert (second.worker["model_loads"], second.worker["model_loaded"], second.worker["requests"]) == (1, False, 2)
    assert set(outputs.saliencyNodes(ct)) == {outputs.ATTENTION, negative}  # the explained map joined the first
    assert logic.worker.started == 1


def test_another_bundle_reloads_the_model_in_the_same_process(scene, bundle, tmp_path):
    app, ct, logic = scene
    other = selftest.tinyBundle(tmp_path / "other")
    first = logic.analyze(ct, bundlePath=bundle, device="CPU", explain=None)
    second = logic.analyze(ct, bundlePath=other, device="CPU", explain=None)
    third = logic.analyze(ct, bundlePath=other, device="CPU", explain=None)
    assert first.worker["pid"] == second.worker["pid"] == third.worker["pid"]
    assert [r.worker["model_loads"] for r in (first, second, third)] == [1, 2, 2]
    assert [r.worker["model_loaded"] for r in (first, second, third)] == [True, True, False]
    assert [f["name"] for f in third.findings] == read_meta(other).task_names


def test_cancel_mid_run_then_a_new_analysis_starts_a_fresh_worker(scene, bundle):
    app, ct, logic = scene
    first = logic.analyze(ct, bundlePath=bundle, device="CPU", explain=None)
    selftest.checkCancelKillsTheWorker(app.scene, ct, logic, bundle)  # kills the warm worker's whole group
    assert not processGroupAlive(first.worker["pid"]) and logic.worker.pid is None
    again = logic.analyze(ct, bundlePath=bundle, device="CPU", explain=None)
    assert again.worker["pid"] != first.worker["pid"] and again.worker["model_loads"] == 1
    assert [f["name"] for f in again.findings] == [f["name"] for f in first.findings]


def test_a_killed_worker_is_restarted_on_the_next_click(scene, bundle):
    app, ct, logic = scene
    first = logic.analyze(ct, bundlePath=bundle, device="CPU", explain=None)
    os.kill(first.worker["pid"], signal.SIGKILL)  # as the kernel kills a process out of memory, between clicks
    assert waitUntil(lambda: logic.worker.pid is None, 10.0)
    again = logic.analyze(ct, bundlePath=bundle, device="CPU", explain=None)
    assert again.worker["pid"] != first.worker["pid"] and again.worker["requests"] == 1
    assert again.findings == first.findings
    assert logic.worker.started == 2


def test_a_second_analysis_started_while_one_runs_gets_a_worker_of_its_own(scene, bundle, tmp_path, ph):
    app, ct, logic = scene
    other = selftest.loadAsNRRD(app.scene, ph.volume, tmp_path / "other", name="other", volumes=app.volumesLogic)
    a = logic.startAnalysis(ct, bundlePath=bundle, device="CPU", explain=None)
    a.wait()
    b = logic.startAnalysis(other, bundlePath=bundle, device="CPU", explain=None)
    b.wait()
    assert a.pid != b.pid and a.pid == logic.worker.pid
    selftest.waitFor(a)
    selftest.waitFor(b)
    ra, rb = logic.finishAnalysis(a), logic.finishAnalysis(b)
    assert ra.findings == rb.findings
    assert waitUntil(lambda: not processGroupAlive(b.pid), 10.0)  # the one-off ends with its request
    assert processGroupAlive(a.pid)  # the warm one waits for the next click


def test_the_serving_worker_answers_a_bad_request_and_keeps_serving(tmp_path, bundle):
    """A request it cannot read is one error line; the worker goes on, and ends when stdin closes."""
    worker = REPO / "FMCT" / "FMCTLib" / "worker.py"
    requests = [json.dumps({"colour": "red"}), "not json", json.dumps({"input": str(tmp_path / "missing.nrrd"),
                                                                       "out": str(tmp_path / "out"), "bundle": str(bundle)})]
    done = subprocess.run([sys.executable, str(worker), "--serve", "--engine-source", str(REPO)],
                          input="\n".join(requests) + "\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [e for e in map(read_json_line, done.stdout.splitlines()) if e is not None]
    errors = [e for e in events if e["event"] == "error"]
    assert [e["type"] for e in errors[:2]] == ["ValueError", "JSONDecodeError"] and len(errors) == 3
    assert "missing.nrrd" in errors[2]["message"] and errors[2]["traceback"] is None  # a user mistake (FMCTError)
    assert not any(e["event"] == "done" for e in events)
