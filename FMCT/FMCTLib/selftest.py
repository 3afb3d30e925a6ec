"""Checks of FMCTLogic on a real MRML scene, shared by two runners:

- FMCTTest in FMCT.py: Slicer's self-test, on the application's scene and views;
- Testing/test_slicer_fmct.py: pytest on `slicer-core` from PyPI, on a headless scene that has
  the application's slice views and logics (Testing/slicer_testing.py).

Each check takes the scene objects it needs and raises AssertionError with a message; nothing is
mocked: CTs are synthetic head CTs (fmct.phantom) loaded through Slicer's own readers, and the
engine runs for real, with the bundled demo model or a small random bundle.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from FMCTLib import geometry, outputs
from FMCTLib.logic import FMCTLogic, FMCTResult

TINY_TASKS = (("any_hemorrhage", 0.01), ("subdural", 0.01), ("fracture", 0.99))  # (name, threshold)


# ----------------------------------------------------------------------------------------------
# Test data: bundles and CTs
# ----------------------------------------------------------------------------------------------

def tinyBundle(folder: str | Path, seed: int = 0) -> Path:
    """A random-weights bundle that runs in a fraction of a second (the engine's test fixture).

    Its thresholds make the outcome certain whatever the random logits: two findings are
    always positive (threshold 0.01), one always negative (0.99).
    """
    from fmct.phantom.fixtures import tiny_bundle

    return tiny_bundle(Path(folder) / "tiny-bundle", seed=seed, tasks=TINY_TASKS, temperature=1.0,
                       name="fmct-selftest-random", recipe="random weights, for testing the Slicer module")[0]


def demoBundle() -> Path | None:
    """The bundled demo model, if it has been built (the only bundle whose saliency means anything)."""
    from FMCTLib.logic import defaultBundlePath

    path = defaultBundlePath()
    return path if (path / "fmct.json").exists() else None


def phantom(seed: int = 3, findings: Sequence[str] = ("subdural",), inPlaneSize: int = 128):
    """A synthetic thick-slice head CT with lesion masks."""
    from fmct.phantom import make_phantom

    return make_phantom(seed, findings=list(findings), slices="thick", in_plane_size=inPlaneSize)


def volumesLogic(scene):
    """The Volumes module logic, which loads files and DICOM series into volume nodes."""
    from FMCTLib.logic import volumesLogic as logicOf

    return logicOf(scene)


def loadAsNRRD(scene, volume, folder: str | Path, name: str = "CT", volumes=None):
    """Load a Volume the way Slicer loads a file: write NRRD, read it with Slicer's reader.

    Slicer's reader does its own LPS-to-RAS conversion, so the node's geometry is independent
    of FMCTLib.geometry, which the checks then test against it.
    """
    from fmct.reading.files import write_volume

    path = write_volume(volume, Path(folder) / f"{name}.nrrd")
    node = (volumes if volumes is not None else volumesLogic(scene)).AddArchetypeScalarVolume(str(path), name, 0, None)
    assert node is not None, f"Slicer could not load {path}"
    return node


def loadAsDICOM(scene, volume, folder: str | Path, name: str = "DICOM CT", volumes=None):
    """Write a DICOM series and load it as Slicer's DICOM module does (DICOMScalarVolumePlugin:
    the archetype reader over the series' files)."""
    import vtk

    from fmct.reading.dicom import write_dicom_series

    files = write_dicom_series(volume, Path(folder) / name.replace(" ", "_"))
    fileList = vtk.vtkStringArray()
    for f in files:
        fileList.InsertNextValue(str(f))
    node = (volumes if volumes is not None else volumesLogic(scene)).AddArchetypeScalarVolume(str(files[0]), name, 0, fileList)
    assert node is not None, "Slicer could not load the DICOM series"
    return node


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def checkFindings(result, bundlePath) -> None:
    """One row per task of the bundle, in order; table and result agree; decisions follow thresholds."""
    from fmct.inference.bundle import load_bundle

    tasks = load_bundle(bundlePath).meta.tasks
    assert [f["name"] for f in result.findings] == [t.name for t in tasks], "findings must follow the bundle's tasks"
    table = result.tableNode
    assert table is not None and table.IsA("vtkMRMLTableNode")
    for column in ("name", "probability", "threshold", "positive"):
        assert table.GetColumnIndex(column) >= 0, f"findings table has no '{column}' column"
    assert table.GetNumberOfRows() == len(tasks)
    for row, (f, task) in enumerate(zip(result.findings, tasks)):
        assert set(f) >= {"name", "probability", "threshold", "positive"}
        assert 0.0 <= f["probability"] <= 1.0
        assert f["threshold"] == task.threshold
        assert f["positive"] == (f["probability"] >= f["threshold"])
        assert table.GetCellText(row, table.GetColumnIndex("name")) == f["name"]
        assert abs(float(table.GetCellText(row, table.GetColumnIndex("probability"))) - f["probability"]) < 1e-6
        assert abs(float(table.GetCellText(row, table.GetColumnIndex("threshold"))) - f["threshold"]) < 1e-9
        assert table.GetCellText(row, table.GetColumnIndex("positive")) == str(int(f["positive"]))


def checkSaliencyGeometry(ctNode, result) -> None:
    """Each saliency node has exactly the CT node's grid: dimensions and IJK-to-RAS (to 1e-6)."""
    assert result.saliencyNodes, "no saliency volume was made"
    expected = geometry.nodeIJKToRAS(ctNode)
    for name, node in result.saliencyNodes.items():
        assert node.GetImageData().GetDimensions() == ctNode.GetImageData().GetDimensions(), name
        difference = np.abs(geometry.nodeIJKToRAS(node) - expected).max()
        assert difference <= 1e-6, f"{name}: IJK-to-RAS differs from the CT's by {difference}"
        assert node.GetTransformNodeID() == ctNode.GetTransformNodeID(), f"{name} must follow the CT's transform"


def checkSaliencyValues(result, engineSaliency: dict) -> None:
    """Node voxels are the engine's maps on the CT grid as the engine stores them (uint8 0-255),
    unchanged."""
    import slicer.util

    from fmct.inference.study_folder import quantize_saliency

    for name, node in result.saliencyNodes.items():
        array = slicer.util.arrayFromVolume(node)
        assert array.dtype == np.uint8, f"{name}: saliency is {array.dtype}, not uint8"
        assert int(array.max()) > 0, f"{name} saliency is empty"
        expected = quantize_saliency(engineSaliency[name]).array
        difference = np.abs(array.astype(np.int16) - expected.astype(np.int16)).max()
        assert difference <= 1, f"{name}: node voxels differ from the engine's map by {difference} of 255"


def checkDisplay(scene, ctNode, result, logic: FMCTLogic) -> None:
    """The shown finding is the foreground over the CT in every slice view, in heat colours with a
    threshold, and volume-rendered in 3D; the other maps are not rendered."""
    shown = result.shownFinding
    assert shown in result.saliencyNodes, "an explained finding's map is shown after the analysis"
    assert logic.shownFinding(ctNode) == shown
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    assert composites, "the scene has no slice views"
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == ctNode.GetID()
        assert composite.GetForegroundVolumeID() == result.saliencyNodes[shown].GetID()
        assert 0.2 <= composite.GetForegroundOpacity() <= 0.8
    vrLogic = logic.volumeRenderingLogic(scene)
    for name, node in result.saliencyNodes.items():
        display = node.GetDisplayNode()
        assert display.GetColorNodeID() == outputs.HEAT_COLOR_NODE_ID
        assert display.GetApplyThreshold() and 0.0 < display.GetLowerThreshold() < outputs.SALIENCY_MAX
        assert not display.GetAutoWindowLevel() and display.GetWindow() == outputs.SALIENCY_MAX
        rendering = vrLogic.GetFirstVolumeRenderingDisplayNode(node)
        assert isRendered(vrLogic, node) == (name == shown), f"{name} rendered: {isRendered(vrLogic, node)}"
        if name == shown:
            opacity = rendering.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
            assert opacity.GetValue(0.05 * outputs.SALIENCY_MAX) == 0.0 and opacity.GetValue(outputs.SALIENCY_MAX) > 0.0


def isRendered(vrLogic, node) -> bool:
    """Whether a map is volume-rendered (rendering nodes are made only when a map is first shown)."""
    rendering = vrLogic.GetFirstVolumeRenderingDisplayNode(node)
    return rendering is not None and bool(rendering.GetVisibility())


def checkSelectingRowsSwitchesOverlay(scene, ctNode, result, logic: FMCTLogic) -> None:
    """Selecting a finding in the table shows its map; a finding without a map clears the overlay."""
    table = result.tableNode
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    vrLogic = logic.volumeRenderingLogic(scene)
    for row, f in enumerate(result.findings):
        assert logic.showFindingAtRow(table, row) == f["name"]
        node = result.saliencyNodes.get(f["name"])
        assert composite.GetForegroundVolumeID() == (node.GetID() if node else None), f["name"]
        for name, other in result.saliencyNodes.items():
            assert isRendered(vrLogic, other) == (name == f["name"])
    assert logic.showFindingAtRow(table, len(result.findings)) is None


def primaryFinding(findings: list, explained) -> str | None:
    """The finding the engine shows first (fmct.inference.analyze.AnalysisResult.primary_finding), from findings dicts."""
    from fmct.inference.analyze import AnalysisResult, Finding

    result = AnalysisResult([Finding.from_dict(f) for f in findings])
    result.model_saliency = {name: None for name in explained}
    primary = result.primary_finding()
    return primary.name if primary is not None else None


def checkRerunReusesNodes(scene, ctNode, first, logic: FMCTLogic, bundlePath) -> None:
    """A second run on the same CT updates the same nodes; nothing new piles up."""
    classes = ("vtkMRMLTableNode", "vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeDisplayNode",
               "vtkMRMLVolumeRenderingDisplayNode", "vtkMRMLVolumePropertyNode")
    before = {c: scene.GetNumberOfNodesByClass(c) for c in classes}
    firstIDs = {name: node.GetID() for name, node in first.saliencyNodes.items()}
    second = logic.analyze(ctNode, bundlePath=bundlePath, device="CPU", explain="attention")
    assert {c: scene.GetNumberOfNodesByClass(c) for c in classes} == before
    assert second.tableNode.GetID() == first.tableNode.GetID()
    assert {name: node.GetID() for name, node in second.saliencyNodes.items()} == firstIDs
    # Without explanations the maps of the previous run would describe another run: they go.
    third = logic.analyze(ctNode, bundlePath=bundlePath, device="CPU", explain="none")
    assert third.saliencyNodes == {} and logic.saliencyNodes(ctNode) == {}
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before["vtkMRMLScalarVolumeNode"] - len(firstIDs)
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode") == \
        before["vtkMRMLVolumeRenderingDisplayNode"] - len(firstIDs)
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() is None


def checkBadInput(scene, logic: FMCTLogic, bundlePath) -> None:
    """No input, a single slice, a label map: clear InputVolumeErrors, and no output nodes."""
    from fmct.conventions.errors import InputVolumeError, NotVolumeError

    tablesBefore = scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    for bad, expected, words in _badInputs(scene):
        try:
            logic.analyze(bad, bundlePath=bundlePath, device="CPU")
        except expected as error:
            assert words in str(error).lower(), f"unexpected message: {error}"
        else:
            raise AssertionError(f"analyze accepted {bad.GetClassName() if bad else None}")
    assert issubclass(NotVolumeError, InputVolumeError)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == tablesBefore, "a refused input made outputs"


def _badInputs(scene):
    import slicer.util

    from fmct.conventions.errors import InputVolumeError, NotCTError, NotVolumeError

    ct = np.full((1, 64, 64), -1000.0, np.float32)
    ct[0, 16:48, 16:48] = 40.0
    singleSlice = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "single slice")
    singleSlice.SetSpacing(0.5, 0.5, 5.0)
    slicer.util.updateVolumeFromArray(singleSlice, ct)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "label map")
    slicer.util.updateVolumeFromArray(labelmap, np.zeros((8, 8, 8), np.uint8))
    return [(None, InputVolumeError, "no input volume"),
            (singleSlice, NotVolumeError, "single slice"),
            (labelmap, NotCTError, "label map")]


def checkOutOfDistributionIsReported(result, bundlePath) -> None:
    """The engine's out-of-distribution record and warning reach the result and the table (None
    for a bundle without reference statistics)."""
    from FMCTLib import outputs as out

    hasStatistics = (Path(bundlePath) / "ood.safetensors").exists()
    assert (result.outOfDistribution is not None) == hasStatistics, result.outOfDistribution
    if result.outOfDistribution is not None:
        assert {"score", "threshold", "in_distribution"} <= set(result.outOfDistribution)
        assert (result.warning is not None) == (not result.outOfDistribution["in_distribution"])
    assert result.tableNode.GetAttribute(out.WARNING_ATTRIBUTE) == (result.warning or "")


def checkCPUExplainsTheTopFindingFirst(result) -> None:
    """On a CPU the default explains only the finding shown first (the engine's margin rule); the
    panel says that no GPU is used."""
    from FMCTLib.logic import CPU_NOTICE, deviceNotice

    assert result.device == "cpu" and not result.gpu
    top = primaryFinding(result.findings, [])
    assert top is not None and result.explained == [top] and list(result.saliencyNodes) == [top], result.explained
    assert result.shownFinding == top
    assert deviceNotice(result.gpu, "integrated_gradients") == CPU_NOTICE and "No GPU" in CPU_NOTICE
    assert deviceNotice(True, "integrated_gradients") == ""


def checkExplainOnDemand(scene, ctNode, result, logic: FMCTLogic, bundlePath) -> FMCTResult:
    """Explaining a finding without a map adds its map (next to the others) and shows it."""
    from FMCTLib.logic import canExplain

    missing = [f["name"] for f in result.findings if f["name"] not in result.saliencyNodes]
    assert missing, "every finding is explained already"
    row = [f["name"] for f in result.findings].index(missing[0])
    assert canExplain(result.tableNode, row, running=False)[0]
    before = {name: node.GetID() for name, node in outputs.saliencyNodes(ctNode).items()}
    job = logic.explainFinding(ctNode, missing[0], bundlePath=bundlePath, device="CPU", explain="occlusion")
    waitFor(job)
    added = logic.finishAnalysis(job)
    now = outputs.saliencyNodes(ctNode)
    assert set(now) == set(before) | {missing[0]}, sorted(now)
    assert {name: now[name].GetID() for name in before} == before, "the maps already there are kept"
    assert logic.shownFinding(ctNode) == missing[0] and added.shownFinding == missing[0]
    assert not canExplain(result.tableNode, row, running=False)[0]
    checkSaliencyGeometry(ctNode, added)
    # served by the worker that made the first result, without loading the model again (it stays warm)
    assert added.worker.get("pid") == result.worker.get("pid") and added.worker.get("model_loaded") is False, \
        (result.worker, added.worker)
    return added


def waitFor(job, timeout: float = 300.0) -> list:
    """Poll a job as the panel's timer does, until it ends; returns every event it printed."""
    import time

    events, deadline = [], time.monotonic() + timeout
    while job.running and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.02)
    assert not job.running, "the analysis did not finish in time"
    return events


def checkCancelKillsTheWorker(scene, ctNode, logic: FMCTLogic, bundlePath) -> None:
    """Cancel mid-run: the worker's whole process group is gone at once, nothing is added to the
    scene, and the CT's previous outputs are unchanged."""
    import time

    from FMCTLib.process import processGroupAlive, waitUntil
    from fmct.conventions.errors import Cancelled

    classes = ("vtkMRMLTableNode", "vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeDisplayNode",
               "vtkMRMLVolumeRenderingDisplayNode")
    before = {c: scene.GetNumberOfNodesByClass(c) for c in classes}
    maps = {name: node.GetImageData().GetScalarRange() for name, node in outputs.saliencyNodes(ctNode).items()}
    job = logic.startAnalysis(ctNode, bundlePath=bundlePath, device="CPU", explain="occlusion", explainFindings="all")
    deadline = time.monotonic() + 300
    seen = []
    while job.running and time.monotonic() < deadline and not any("explaining" in e.get("message", "") for e in seen):
        seen += job.poll()
        time.sleep(0.02)
    assert job.running, f"the worker ended before it could be cancelled: {seen[-3:]}"
    pid = job.pid
    logic.requestCancel()
    assert job.state == "cancelled"
    assert waitUntil(lambda: not processGroupAlive(pid), 5.0), "the worker's processes are still running"
    assert not job.workDir.exists(), "the worker's files are left behind"
    try:
        logic.finishAnalysis(job)
    except Cancelled:
        pass
    else:
        raise AssertionError("a cancelled analysis was loaded")
    assert {c: scene.GetNumberOfNodesByClass(c) for c in classes} == before, "cancel left partial nodes"
    assert {name: node.GetImageData().GetScalarRange() for name, node in outputs.saliencyNodes(ctNode).items()} == maps


LESION_SEED = 7  # a subdural phantom; the demo model's saliency enrichment on it is ~5 (2.4 to 5.3 on seeds 1-7)


def checkSaliencyInLesion(scene, logic: FMCTLogic, bundlePath, folder, finding: str = "subdural",
                          minimumEnrichment: float = 2.0, volumes=None) -> dict:
    """With the trained demo model, a finding's saliency concentrates in its lesion: the share of
    saliency mass inside the lesion is several times the lesion's share of the head, and the
    saliency peak lies in (or within 5 mm of) the lesion. Only that finding is explained, to
    keep the check fast on a CPU."""
    import slicer.util

    from fmct.features.metrics import pointing_game, saliency_in_mask

    ph = phantom(seed=LESION_SEED, findings=(finding,))
    ct = loadAsNRRD(scene, ph.volume, folder, name="lesion CT", volumes=volumes)
    result = logic.analyze(ct, bundlePath=bundlePath, device="CPU", explainFindings=[finding])
    assert finding in result.positive, f"the demo model misses the {finding}: {result.findings}"
    checkOutOfDistributionIsReported(result, bundlePath)
    assert list(result.saliencyNodes) == [finding] and result.shownFinding == finding
    checkSaliencyGeometry(ct, result)
    array = slicer.util.arrayFromVolume(result.saliencyNodes[finding])
    stats = saliency_in_mask(array, ph.masks[finding], ph.volume.array > -300)
    stats["hit"] = pointing_game(array, ph.masks[finding], ph.volume.spacing[::-1])
    assert stats["enrichment"] >= minimumEnrichment, f"saliency of {finding} is not in the lesion: {stats}"
    assert stats["hit"], f"the saliency peak of {finding} is not at the lesion: {stats}"
    return stats


# ----------------------------------------------------------------------------------------------
# All of it, for Slicer's self-test
# ----------------------------------------------------------------------------------------------

def obliqueDirection(degrees: float = 20.0) -> np.ndarray:
    """An orthonormal direction rotated about S then L (the engine's test fixture)."""
    from fmct.phantom.fixtures import oblique_direction

    return oblique_direction(degrees)


def obliqueVolume(volume):
    """The same head on an oblique grid with anisotropic spacing (as from a tilted DICOM series).

    The voxels are repeated in-plane to about 0.9 mm, so the head keeps about its physical size
    (the engine's plausibility checks refuse a head half an adult's size).
    """
    import numpy as np

    from fmct.reading.volume import Volume

    repeat = max(1, int(round(volume.spacing[0] / 0.9)))
    array = np.repeat(np.repeat(volume.array, repeat, axis=1), repeat, axis=2)
    return Volume(array, (0.9, 1.1, 4.5), (-100.0, 80.0, -40.0), obliqueDirection(20.0))


def engineSaliency(volume, bundlePath, explain: str = "integrated_gradients") -> dict:
    """The engine's own maps for a Volume, computed without Slicer, to compare the nodes with."""
    from fmct.inference.analyze import Analyzer

    return Analyzer(bundlePath, device="cpu").analyze(volume, explain_method=explain).saliency


def runAll(scene, log=print) -> None:
    """Every check above on the given scene (the module's self-test calls this in Slicer).

    The plumbing is checked with a small random bundle (fast, and its decisions are certain);
    where the demo model is built, saliency must also land in the lesion. Runs on the CPU so that
    the nodes can be compared with the engine's own maps exactly.
    """
    with tempfile.TemporaryDirectory(prefix="fmct-selftest-") as work:
        bundle = tinyBundle(work)
        logic = FMCTLogic()
        ph = phantom()
        ct = loadAsNRRD(scene, ph.volume, work)
        log("Analyzing a synthetic head CT in the worker process")
        result = logic.analyze(ct, bundlePath=bundle, device="CPU", explainFindings="positive")
        checkFindings(result, bundle)
        checkOutOfDistributionIsReported(result, bundle)
        assert set(result.saliencyNodes) == set(result.positive), "one saliency volume per positive finding"
        checkSaliencyGeometry(ct, result)
        checkSaliencyValues(result, engineSaliency(ph.volume, bundle))
        checkDisplay(scene, ct, result, logic)
        checkSelectingRowsSwitchesOverlay(scene, ct, result, logic)
        log("On a CPU the first click explains the top finding; others on demand")
        top = logic.analyze(ct, bundlePath=bundle, device="CPU", explain="occlusion")  # per finding: attention is one map
        checkCPUExplainsTheTopFindingFirst(top)
        checkExplainOnDemand(scene, ct, top, logic, bundle)
        log("Cancel kills the worker")
        checkCancelKillsTheWorker(scene, ct, logic, bundle)
        if demoBundle() is not None:
            log("Demo model: saliency in the lesion")
            log(str(checkSaliencyInLesion(scene, FMCTLogic(), demoBundle(), work)))
        log("Oblique, anisotropic DICOM series")
        dicomCT = loadAsDICOM(scene, obliqueVolume(ph.volume), work)
        checkSaliencyGeometry(dicomCT, logic.analyze(dicomCT, bundlePath=bundle, device="CPU", explain="attention"))
        log("Running again reuses the output nodes")
        checkRerunReusesNodes(scene, ct, logic.analyze(ct, bundlePath=bundle, device="CPU", explain="attention"),
                              logic, bundle)
        log("Bad input")
        checkBadInput(scene, logic, bundle)
