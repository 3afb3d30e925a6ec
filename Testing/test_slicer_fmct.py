"""The FMCT Slicer module's logic on a real MRML scene (slicer-core from PyPI, headless).

CTs are synthetic head CTs loaded through Slicer's own readers (NRRD, and a DICOM series the
way the DICOM module loads it); the engine runs for real, in the module's worker process
(FMCTLib/worker.py, started here with this interpreter as Slicer starts it with PythonSlicer).
The checks themselves live in FMCT/FMCTLib/selftest.py, so that the module's self-test in
Slicer runs the same ones.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from slicer_testing import REPO, headless_slicer  # noqa: E402

from FMCTLib import outputs, selftest  # noqa: E402
from FMCTLib.logic import EXPLAIN_METHODS, FMCTLogic, engineDevice  # noqa: E402
from FMCTLib.process import processGroupAlive, waitUntil  # noqa: E402
from fmct.conventions.errors import BundleError, Cancelled, ConfigError, InputVolumeError  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The Slicer self-test's bundle (its own tasks and thresholds), in place of conftest's engine bundle."""
    return selftest.tinyBundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def ph():
    return selftest.phantom(seed=3, findings=["subdural"])


@pytest.fixture(scope="module")
def analyzed(bundle, ph, tmp_path_factory):
    """One scene, one CT loaded from NRRD, analyzed once (integrated gradients); read-only for the tests."""
    with headless_slicer() as app:
        ct = selftest.loadAsNRRD(app.scene, ph.volume, tmp_path_factory.mktemp("ct"), volumes=app.volumesLogic)
        logic = FMCTLogic()
        seen = []
        result = logic.analyze(ct, bundlePath=bundle, device="CPU", explainFindings="positive",
                               progress=lambda f, m: seen.append((f, m)))
        yield app, ct, logic, result, seen


@pytest.fixture
def app():
    with headless_slicer() as headless:
        yield headless


def load_ct(app, tmp_path, volume, dicom=False, name="CT"):
    load = selftest.loadAsDICOM if dicom else selftest.loadAsNRRD
    return load(app.scene, volume, tmp_path, name=name, volumes=app.volumesLogic)


# -- outputs of one analysis ------------------------------------------------------------------------

def test_findings_table_lists_every_finding_with_its_decision(analyzed, bundle):
    _, _, _, result, _ = analyzed
    selftest.checkFindings(result, bundle)
    selftest.checkOutOfDistributionIsReported(result, bundle)
    assert result.positive == ["any_hemorrhage", "subdural"]  # thresholds 0.01, 0.01, 0.99
    assert result.tableNode.GetName().endswith("FMCT findings")


def test_saliency_nodes_have_exactly_the_ct_grid(analyzed):
    _, ct, _, result, _ = analyzed
    selftest.checkSaliencyGeometry(ct, result)
    assert sorted(result.saliencyNodes) == sorted(result.positive) == ["any_hemorrhage", "subdural"]


def test_saliency_voxels_are_the_engine_maps(analyzed, ph, bundle):
    _, _, _, result, _ = analyzed
    selftest.checkSaliencyValues(result, selftest.engineSaliency(ph.volume, bundle))


def test_overlay_heat_map_and_volume_rendering(analyzed):
    app, ct, logic, result, _ = analyzed
    selftest.checkDisplay(app.scene, ct, result, logic)
    assert result.shownFinding in ("any_hemorrhage", "subdural")


def test_selecting_a_finding_in_the_table_switches_the_overlay(analyzed):
    app, ct, logic, result, _ = analyzed
    try:
        selftest.checkSelectingRowsSwitchesOverlay(app.scene, ct, result, logic)
    finally:
        logic.showFinding(ct, result.shownFinding)


def test_slice_view_shows_heat_colours_over_the_ct(analyzed):
    """What the Red slice view draws (the slice logic's blended layers, as Slicer renders them):
    heat colours where the shown map is moderately strong, the plain grey CT where it is weak."""
    app, ct, logic, result, _ = analyzed
    saliency = slicer.util.arrayFromVolume(result.saliencyNodes[result.shownFinding]) / outputs.SALIENCY_MAX
    mid = np.argwhere((saliency > 0.45) & (saliency < 0.6))  # PET heat at ~0.5 is yellow-orange
    weak = np.argwhere(saliency < 0.5 * outputs.DISPLAY_THRESHOLD)
    assert len(mid) and len(weak)
    ijk_to_ras = selftest.geometry.nodeIJKToRAS(ct)
    red = app.sliceLogics["Red"]
    red.FitSliceToBackground()  # as the application does when a volume is first shown
    for (k, j, i), expect_heat in ((mid[len(mid) // 2], True), (weak[len(weak) // 2], False)):
        ras = ijk_to_ras @ np.array([i, j, k, 1.0])
        red.SetSliceOffset(ras[2])
        with_overlay, xy_to_ras = slice_view_image(red)
        x, y = np.round(np.linalg.solve(xy_to_ras, ras)[:2]).astype(int)
        logic.showFinding(ct, None)
        without_overlay, _ = slice_view_image(red)
        logic.showFinding(ct, result.shownFinding)
        r, g, b = with_overlay[y, x, :3].astype(int)
        r0, g0, b0 = without_overlay[y, x, :3].astype(int)
        assert abs(r0 - b0) <= 2, "the CT alone is grey"
        if expect_heat:
            assert r > b + 40 and g > b, f"expected heat colours at saliency ~0.5, got {(r, g, b)}"
        else:
            assert (r, g, b) == (r0, g0, b0), "weak saliency must leave the CT untouched"


def slice_view_image(slice_logic):
    """The slice view's composited RGBA image [y, x, 4] and its XY-to-RAS matrix."""
    from vtk.util.numpy_support import vtk_to_numpy

    slice_logic.GetImageDataConnection().GetProducer().Update()
    image = slice_logic.GetImageDataConnection().GetProducer().GetOutputDataObject(0)
    nx, ny, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)
    matrix = slice_logic.GetSliceNode().GetXYToRAS()
    xy_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return rgba, xy_to_ras


def test_progress_is_monotonic_from_zero_to_one(analyzed):
    *_, seen = analyzed
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert any("explaining" in m for _, m in seen)


# -- geometry of other inputs -----------------------------------------------------------------------

@pytest.mark.slow
def test_oblique_anisotropic_dicom_series_keeps_its_geometry(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, selftest.obliqueVolume(ph.volume), dicom=True)
    direction = np.zeros((3, 3))
    ct.GetIJKToRASDirections(direction)
    assert not np.allclose(np.abs(direction), np.eye(3)), "the test CT must be oblique"
    assert np.allclose(ct.GetSpacing(), (0.9, 1.1, 4.5))
    assert selftest.geometry.volumeFromNode(ct).same_grid(selftest.obliqueVolume(ph.volume), atol=1e-6)
    result = FMCTLogic().analyze(ct, bundlePath=bundle, device="CPU", explain="attention")
    selftest.checkSaliencyGeometry(ct, result)


@pytest.mark.slow
def test_saliency_follows_the_ct_parent_transform(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    ct.SetAndObserveTransformNodeID(transform.GetID())
    result = FMCTLogic().analyze(ct, bundlePath=bundle, device="CPU", explain="attention")
    selftest.checkSaliencyGeometry(ct, result)
    assert all(n.GetTransformNodeID() == transform.GetID() for n in result.saliencyNodes.values())


# -- re-runs, cancel, bad input ---------------------------------------------------------------------

@pytest.mark.slow
def test_running_again_reuses_the_output_nodes(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    logic = FMCTLogic()
    first = logic.analyze(ct, bundlePath=bundle, device="CPU", explain="attention")
    selftest.checkRerunReusesNodes(app.scene, ct, first, logic, bundle)


@pytest.mark.slow
def test_two_cts_keep_separate_outputs(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    other = load_ct(app, tmp_path, ph.volume, name="other")
    logic = FMCTLogic()
    a = logic.analyze(ct, bundlePath=bundle, device="CPU", explain="attention")
    b = logic.analyze(other, bundlePath=bundle, device="CPU", explain="attention")
    assert a.tableNode.GetID() != b.tableNode.GetID()
    assert not {n.GetID() for n in a.saliencyNodes.values()} & {n.GetID() for n in b.saliencyNodes.values()}
    assert outputs.inputNodeOf(a.tableNode) is ct and outputs.inputNodeOf(b.tableNode) is other


def test_bad_input_is_refused_with_a_clear_message(app, bundle):
    selftest.checkBadInput(app.scene, FMCTLogic(), bundle)


@pytest.mark.slow
def test_cancel_stops_and_keeps_the_previous_outputs(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    logic = FMCTLogic()
    first = logic.analyze(ct, bundlePath=bundle, device="CPU", explain="occlusion")  # per finding (attention is one map)
    before = slicer.util.arrayFromVolume(first.saliencyNodes["subdural"]).copy()

    def cancel_when_explaining(fraction, message):
        if "explaining" in message:
            logic.requestCancel()  # what the widget's Cancel button does

    with pytest.raises(Cancelled):
        logic.analyze(ct, bundlePath=bundle, device="CPU", explain="occlusion", progress=cancel_when_explaining)
    assert logic.saliencyNodes(ct).keys() == first.saliencyNodes.keys()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(first.saliencyNodes["subdural"]), before)
    with pytest.raises(Cancelled):
        logic.analyze(ct, bundlePath=bundle, device="CPU", cancel=lambda: True)
    logic.analyze(ct, bundlePath=bundle, device="CPU", explain="attention")  # a later run is not cancelled


def test_bad_options_are_config_or_bundle_errors(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    logic = FMCTLogic()
    with pytest.raises(ConfigError, match="device"):
        logic.analyze(ct, bundlePath=bundle, device="TPU")
    with pytest.raises(ConfigError, match="explanation method"):
        logic.analyze(ct, bundlePath=bundle, explain="magic")
    with pytest.raises(BundleError, match="not found"):
        logic.analyze(ct, bundlePath=tmp_path / "no-such-bundle")
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


# -- the trained demo model -------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_model_saliency_lands_in_the_lesion(app, tmp_path):
    demo = selftest.demoBundle()
    if demo is None:
        pytest.skip("Resources/DemoModel is not built yet (python -m fmct.train.demo_model)")
    stats = selftest.checkSaliencyInLesion(app.scene, FMCTLogic(), demo, tmp_path, volumes=app.volumesLogic)
    assert stats["share_in_mask"] > stats["mask_share_of_head"]


@pytest.mark.slow
def test_explaining_chosen_findings_only(app, ph, bundle, tmp_path):
    other = load_ct(app, tmp_path, ph.volume, name="chosen")
    result = FMCTLogic().analyze(other, bundlePath=bundle, device="CPU", explain="occlusion",
                                 explainFindings=["fracture"])  # negative, explained on request (attention: one map for all)
    assert list(result.saliencyNodes) == ["fracture"] and "fracture" not in result.positive
    assert result.shownFinding == "fracture"
    with pytest.raises(ConfigError, match="unknown finding"):
        FMCTLogic().analyze(other, bundlePath=bundle, device="CPU", explainFindings=["tumour"])


# -- the worker process: CPU default, on demand, cancel, responsiveness ---------------------------------

@pytest.mark.slow
def test_cpu_first_click_explains_only_the_top_finding(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    logic = FMCTLogic()
    result = logic.analyze(ct, bundlePath=bundle, device="CPU")  # the panel's defaults: integrated gradients, auto
    selftest.checkCPUExplainsTheTopFindingFirst(result)
    assert result.shownFinding == max(
        (f for f in result.findings if f["positive"]), key=lambda f: f["probability"] - f["threshold"])["name"]
    selftest.checkSaliencyGeometry(ct, result)
    added = selftest.checkExplainOnDemand(app.scene, ct, result, logic, bundle)
    assert added.findings == result.findings


@pytest.mark.slow
def test_cancel_mid_run_kills_the_worker_and_adds_nothing(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    logic = FMCTLogic()
    logic.analyze(ct, bundlePath=bundle, device="CPU", explain="attention")
    selftest.checkCancelKillsTheWorker(app.scene, ct, logic, bundle)
    # and on a CT that was never analyzed: no table, no maps
    fresh = load_ct(app, tmp_path, ph.volume, name="fresh")
    tables = app.scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    selftest.checkCancelKillsTheWorker(app.scene, fresh, logic, bundle)
    assert outputs.findingsTableNode(fresh) is None and outputs.saliencyNodes(fresh) == {}
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == tables


@pytest.mark.slow
def test_worker_progress_arrives_while_the_gui_thread_stays_free(app, ph, bundle, tmp_path):
    """The GUI thread's share of an analysis: starting the job, each poll, loading the results.
    None of them waits on the model, so Slicer can repaint between timer ticks."""
    import time

    ct = load_ct(app, tmp_path, ph.volume)
    logic = FMCTLogic()
    t0 = time.perf_counter()
    job = logic.startAnalysis(ct, bundlePath=bundle, device="CPU", explain="integrated_gradients",
                              explainFindings="positive")
    start_s = time.perf_counter() - t0
    polls, events = [], []
    while job.running:
        t0 = time.perf_counter()
        events += job.poll()
        polls.append(time.perf_counter() - t0)
        time.sleep(0.02)
    t0 = time.perf_counter()
    result = logic.finishAnalysis(job)
    load_s = time.perf_counter() - t0
    progress = [e["fraction"] for e in events if e["event"] == "progress"]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    assert [e["event"] for e in events if e["event"] != "progress"] == ["device", "done"]
    assert any("explaining" in e.get("message", "") for e in events)
    assert start_s < 2.0 and max(polls) < 0.2 and load_s < 2.0, (start_s, max(polls), load_s)
    assert not job.workDir.exists()
    assert processGroupAlive(job.pid) and job.pid == logic.worker.pid  # warm, waiting for the next click
    logic.stopWorker()  # module cleanup
    assert waitUntil(lambda: not processGroupAlive(job.pid), 5.0)
    selftest.checkSaliencyGeometry(ct, result)


@pytest.mark.slow
def test_a_ct_removed_during_the_analysis_gets_no_outputs(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    logic = FMCTLogic()
    job = logic.startAnalysis(ct, bundlePath=bundle, device="CPU", explain="attention")
    app.scene.RemoveNode(ct)
    selftest.waitFor(job)
    with pytest.raises(InputVolumeError, match="removed"):
        logic.finishAnalysis(job)
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


def test_saliency_maps_are_uint8_on_the_ct_grid(analyzed):
    _, ct, _, result, _ = analyzed
    for node in result.saliencyNodes.values():
        assert slicer.util.arrayFromVolume(node).dtype == np.uint8
        assert node.GetImageData().GetScalarSize() == 1
        assert node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()


@pytest.mark.slow
def test_saliency_to_segmentation(app, ph, bundle, tmp_path):
    ct = load_ct(app, tmp_path, ph.volume)
    logic = FMCTLogic()
    result = logic.analyze(ct, bundlePath=bundle, device="CPU", explain="attention")
    shown = result.shownFinding
    segmentation = logic.saliencyToSegmentation(ct, shown)
    assert segmentation.IsA("vtkMRMLSegmentationNode") and shown in segmentation.GetName()
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(segmentation, labelmap)
    voxels = int(np.count_nonzero(slicer.util.arrayFromVolume(labelmap)))
    saliency = slicer.util.arrayFromVolume(result.saliencyNodes[shown])
    assert voxels == int(np.count_nonzero(saliency >= np.ceil(outputs.DISPLAY_THRESHOLD * outputs.SALIENCY_MAX)))
    assert logic.saliencyToSegmentation(ct, shown) is segmentation  # updated in place
    with pytest.raises(KeyError):
        logic.saliencyToSegmentation(ct, "fracture")


# -- module wiring ----------------------------------------------------------------------------------

def test_module_choices_match_the_engine():
    from fmct.inference.study_folder import SALIENCY_MAX
    from fmct.conventions.runtime import EXPLAIN_METHODS as METHODS

    assert EXPLAIN_METHODS == (*METHODS, "none")
    assert outputs.SALIENCY_MAX == SALIENCY_MAX
    assert [engineDevice(d) for d in ("auto", "CPU", "GPU", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]


def test_logic_imports_without_torch_or_the_engine():
    """Slicer loads the module before its dependencies are installed: importing the logic must not need them."""
    code = ("import sys; sys.path.insert(0, 'FMCT'); import FMCTLib.logic, FMCTLib.selftest, FMCTLib.worker, "
            "FMCTLib.process, FMCTLib.slicerversion; "
            "bad = [m for m in ('torch', 'fmct') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_sample_data_synthetic_head_ct_is_analyzable(app, tmp_path):
    """What Sample Data's "FMCT synthetic head CT" button loads: a real CT node, through Slicer's reader."""
    logic = FMCTLogic()
    ct = logic.loadSyntheticHeadCT(app.scene, tmp_path, inPlaneSize=128)
    assert ct.GetName() == "FMCT synthetic head CT" and ct.GetStorageNode() is not None
    volume = selftest.geometry.volumeFromNode(ct)
    from fmct.reading.volume import validate_ct

    validate_ct(volume, "sample")
    assert volume.array.min() <= -900 and volume.array.max() >= 40
