"""The MRML side of a result: the findings table, saliency volumes, overlays and 3D rendering.

Outputs are found again through node references from the input CT (one table, one saliency
volume per explained finding), so running again on the same CT updates the same nodes instead
of piling up new ones, and the links survive saving and reloading the scene. Each output also
points back at its CT, so selecting a row of a findings table is enough to show its overlay.

Saliency volumes hold the engine's uint8 maps (0-255, 255 = the strongest attribution in that
CT, as fmct.inference.study_folder writes them), a quarter of float32's memory: seven maps of a 512x512x165 CT
take 300 MB instead of 1.2 GB. They are displayed over 0-255 with the heat colour table.

Nothing here does numerical work: the saliency maps arrive finished from the engine's worker.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np

from FMCTLib import geometry

# Node reference roles and attributes (no ':' or ';', which the scene file uses as separators).
TABLE_ROLE = "FMCTFindingsTable"      # input CT -> its findings table
SALIENCY_ROLE = "FMCTSaliency"        # input CT -> its saliency volumes (one per explained finding)
INPUT_ROLE = "FMCTInputVolume"        # any output -> the CT it describes
FINDING_ATTRIBUTE = "FMCT.Finding"    # on a saliency volume: the finding it explains
SHOWN_ATTRIBUTE = "FMCT.ShownFinding"  # on the input CT: the finding whose overlay is shown
WARNING_ATTRIBUTE = "FMCT.Warning"  # on a findings table: the engine's out-of-distribution warning, or empty
CHECKS_ATTRIBUTE = "FMCT.Checks"  # on a findings table: the plausibility checks of the CT (JSON list of records)
BANNER_ATTRIBUTE = "FMCT.Banner"  # on a findings table: the model's one-line banner (e.g. synthetic training only)
SCALE_ATTRIBUTE = "FMCT.SaliencyScale"  # on a saliency volume: what its grey levels mean (findings.json's saliency_scale)
MAPS_NOTE_ATTRIBUTE = "FMCT.MapsNote"  # on a findings table: how its maps relate to its rows (attention: one for all)
ATTENTION = "attention"  # = fmct.inference.saliency.ATTENTION_KEY: the one finding-agnostic map of a CT

COLUMNS = ("name", "description", "probability", "threshold", "positive")
COLUMN_TITLES = {"name": "Finding", "description": "Description", "probability": "Probability",
                 "threshold": "Threshold", "positive": "Positive"}

HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
SALIENCY_MAX = 255  # = fmct.inference.study_folder.SALIENCY_MAX (a test checks it): the stored value of a map's peak
# Below 0.2 of the peak a map is mostly diffuse background, which would tint the whole brain:
# those voxels are transparent.
DISPLAY_THRESHOLD = 0.2
OVERLAY_OPACITY = 0.5       # the CT must stay readable under the heat map
RENDERING_MAX_OPACITY = 0.6  # in 3D the peak stays see-through, so the inside of a blob shows


# ----------------------------------------------------------------------------------------------
# Finding the outputs of a CT again
# ----------------------------------------------------------------------------------------------

def findingsTableNode(inputNode):
    """The findings table of this CT, or None before its first analysis."""
    return inputNode.GetNodeReference(TABLE_ROLE)


def saliencyNodes(inputNode) -> dict:
    """Finding name -> saliency volume node, for this CT's current outputs."""
    nodes = {}
    for i in range(inputNode.GetNumberOfNodeReferences(SALIENCY_ROLE)):
        node = inputNode.GetNthNodeReference(SALIENCY_ROLE, i)
        if node is not None and node.GetAttribute(FINDING_ATTRIBUTE):
            nodes[node.GetAttribute(FINDING_ATTRIBUTE)] = node
    return nodes


def inputNodeOf(outputNode):
    """The CT an output node (table or saliency volume) was computed from."""
    return outputNode.GetNodeReference(INPUT_ROLE) if outputNode is not None else None


# ----------------------------------------------------------------------------------------------
# Findings table
# ----------------------------------------------------------------------------------------------

def updateFindingsTable(inputNode, findings: Sequence[dict]):
    """Write the findings into this CT's table node (created on the first run) and return it."""
    scene = inputNode.GetScene()
    tableNode = findingsTableNode(inputNode)
    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{inputNode.GetName()} FMCT findings")
        inputNode.SetNodeReferenceID(TABLE_ROLE, tableNode.GetID())
        tableNode.SetNodeReferenceID(INPUT_ROLE, inputNode.GetID())
        _placeNextTo(inputNode, tableNode)
    tableNode.SetAndObserveTable(_findingsTable(findings))
    for column in COLUMNS:
        tableNode.SetColumnTitle(column, COLUMN_TITLES[column])
    tableNode.SetColumnDescription("probability", "Calibrated probability of the finding")
    tableNode.SetColumnDescription("threshold", "Decision threshold of the model for this finding")
    tableNode.SetUseColumnTitleAsColumnHeader(True)
    tableNode.SetLocked(True)  # results, not inputs: the table view must not offer to edit them
    return tableNode


def _findingsTable(findings: Sequence[dict]):
    import vtk

    arrays = {
        "name": vtk.vtkStringArray(), "description": vtk.vtkStringArray(),
        "probability": vtk.vtkDoubleArray(), "threshold": vtk.vtkDoubleArray(), "positive": vtk.vtkBitArray(),
    }
    from fmct.conventions.names import printable  # a bundle's text never forges a row or drives the view

    for column, array in arrays.items():
        array.SetName(column)
    for f in findings:
        arrays["name"].InsertNextValue(printable(f["name"]))
        arrays["description"].InsertNextValue(printable(f.get("description", "")))
        arrays["probability"].InsertNextValue(float(f["probability"]))
        arrays["threshold"].InsertNextValue(float(f["threshold"]))
        arrays["positive"].InsertNextValue(int(bool(f["positive"])))
    table = vtk.vtkTable()
    for column in COLUMNS:
        table.AddColumn(arrays[column])
    return table


def findingAtRow(tableNode, row: int) -> str | None:
    """The finding named in a row of a findings table (None outside the table)."""
    if tableNode is None or not 0 <= row < tableNode.GetNumberOfRows():
        return None
    return tableNode.GetCellText(row, tableNode.GetColumnIndex("name")) or None


# ----------------------------------------------------------------------------------------------
# Saliency volumes
# ----------------------------------------------------------------------------------------------

def _fileIJKToRAS(image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = geometry.LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = geometry.LPS_TO_RAS @ np.array(image.GetOrigin())
    return matrix


def checkSaliencyFile(path: str | Path, inputNode=None, grid: tuple | None = None) -> None:
    """Refuse a saliency file that is not on this CT's voxel grid (reads the header only).

    grid: (dimensions, IJK-to-RAS) of the CT, for callers off the GUI thread (no VTK calls there).
    """
    import SimpleITK as sitk

    dims, ijkToRAS = grid if grid is not None else ctGrid(inputNode)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if tuple(reader.GetSize()) != tuple(dims):
        raise ValueError(f"{Path(path).name}: {reader.GetSize()} voxels, but the CT has {dims}")
    if not np.allclose(_fileIJKToRAS(reader), ijkToRAS, atol=1e-3, rtol=1e-4):
        raise ValueError(f"{Path(path).name} is not on the CT's voxel grid")


def ctGrid(inputNode) -> tuple:
    """(dimensions, IJK-to-RAS) of a volume node: what a saliency file must match."""
    return tuple(inputNode.GetImageData().GetDimensions()), geometry.nodeIJKToRAS(inputNode)


def readSaliencyFile(path: str | Path, inputNode=None, grid: tuple | None = None) -> np.ndarray:
    """The uint8 voxels [k, j, i] of a saliency file the worker wrote on this CT's grid.

    The file's geometry is checked against the CT node (so a map can never be shown on a grid it
    was not computed for) but not used: the node gets the CT's own IJK-to-RAS, exactly, rather
    than the float32 copy a NIfTI header holds.
    """
    import SimpleITK as sitk

    checkSaliencyFile(path, inputNode, grid)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return array if array.dtype == np.uint8 else np.clip(array, 0, SALIENCY_MAX).astype(np.uint8)


class SaliencyFiles(Mapping):
    """finding -> uint8 map, read from the worker's files as they are iterated.

    updateSaliencyNodes iterates items(): a reader thread reads (and decompresses) the next file
    while the GUI thread copies the current one into its node, and no further ahead, so at most
    two maps are in numpy memory at a time next to the nodes (seven 512x512x165 maps
    would otherwise be held twice: 300 MB more at the peak). SimpleITK releases the GIL while it
    reads, so the GUI thread keeps running. check() reads every header first, so a bad file is
    refused before any node is touched.
    """

    def __init__(self, folder: str | Path, files: dict[str, str], inputNode) -> None:
        self.paths = {name: Path(folder) / file for name, file in files.items()}
        self.grid = ctGrid(inputNode)  # read here, on the GUI thread: the reader thread makes no VTK calls

    def check(self) -> "SaliencyFiles":
        for path in self.paths.values():
            checkSaliencyFile(path, grid=self.grid)
        return self

    def __getitem__(self, name: str) -> np.ndarray:
        return readSaliencyFile(self.paths[name], grid=self.grid)

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def items(self):
        import queue
        import threading

        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        tokens = threading.Semaphore(2)  # maps in numpy memory: the one being copied and the next one

        def read() -> None:
            for name in self.paths:
                while not tokens.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                try:
                    item = (name, self[name])
                except Exception as error:  # handed to the GUI thread, raised there
                    item = (name, error)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set() or isinstance(item[1], Exception):
                    return

        reader = threading.Thread(target=read, name="fmct-saliency-reader", daemon=True)
        reader.start()
        try:
            for _ in self.paths:
                name, value = ready.get()
                if isinstance(value, Exception):
                    raise value
                yield name, value
                del value
                tokens.release()
        finally:
            stop.set()


def updateSaliencyNodes(inputNode, maps: Mapping, replace: bool = True, between=None) -> dict:
    """Give this CT a saliency volume per map (uint8 [k, j, i] on the CT's grid): update or add them.

    replace=True makes the CT's maps exactly these (the maps of another run would describe
    another run, so they are removed); replace=False adds to the maps already there (a finding
    explained on demand). between(), if given, is called after each map (the panel lets Qt
    repaint there). Returns the finding -> node of the maps given.
    """
    existing = saliencyNodes(inputNode)
    if replace:
        for name, node in existing.items():
            if name not in maps:
                removeOutputNode(node)
    nodes = {}
    for name, array in maps.items():
        node = existing.get(name) or _newSaliencyNode(inputNode, name)
        _writeSaliency(node, array, inputNode)
        del array
        configureSaliencyDisplay(node)
        nodes[name] = node
        if between is not None:
            between()
    return nodes


def saliencyNodeName(inputNode, finding: str) -> str:
    """A map's node name: the finding it explains, or the attention map, which is the same for every finding."""
    if finding == ATTENTION:
        return f"{inputNode.GetName()} FMCT attention (finding-agnostic)"
    return f"{inputNode.GetName()} FMCT {finding} saliency"


def mapsNote(maps: Mapping, scale: str | None) -> str:
    """What the findings table says about its maps: attention is one map for every finding; other maps
    of one analysis share one scale, while a map added later by "Explain selected finding" has its own."""
    if ATTENTION in maps:
        return ("The attention map is finding-agnostic: one map, the same whichever finding is selected; "
                "normalised on its own.")
    if not maps:
        return ""
    return ("The maps computed together share one scale (255 = the strongest attribution among them); a map added "
            "later with 'Explain selected finding' is normalised on its own. " + (scale or "")).strip()


def _newSaliencyNode(inputNode, finding: str):
    scene = inputNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", saliencyNodeName(inputNode, finding))
    node.SetAttribute(FINDING_ATTRIBUTE, finding)
    node.SetNodeReferenceID(INPUT_ROLE, inputNode.GetID())
    inputNode.AddNodeReferenceID(SALIENCY_ROLE, node.GetID())
    _placeNextTo(inputNode, node)
    return node


def _writeSaliency(node, array: np.ndarray, inputNode) -> None:
    """Voxels (uint8) and the CT's exact geometry; the map follows the CT's parent transform, as the CT does."""
    import slicer.util
    import vtk

    if array.shape != tuple(inputNode.GetImageData().GetDimensions())[::-1]:
        raise ValueError(f"saliency map of shape {array.shape} is not on the CT's grid")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.uint8))
    matrix = vtk.vtkMatrix4x4()
    inputNode.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())


def removeOutputNode(node) -> None:
    """Remove an output and the display, storage and rendering nodes that only it used."""
    scene = node.GetScene()
    if scene is None:
        return
    owned = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    for display in list(owned):
        if display is not None and display.IsA("vtkMRMLVolumeRenderingDisplayNode"):
            owned += [display.GetVolumePropertyNode(), display.GetROINode()]
    owned.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for other in owned:
        if other is not None and other.GetScene() is scene:
            scene.RemoveNode(other)


# ----------------------------------------------------------------------------------------------
# 2D display: heat map over the CT
# ----------------------------------------------------------------------------------------------

def heatColorNode(scene):
    """Slicer's PET heat colour map (black, red, yellow, white); added if the scene lacks it.

    The application's Colors module adds it at startup; a bare scene (scripts, tests) gets the
    same procedural node under the same ID.
    """
    node = scene.GetNodeByID(HEAT_COLOR_NODE_ID)
    if node is None:
        import slicer

        node = slicer.vtkMRMLPETProceduralColorNode()
        node.SetTypeToHeat()
        node.SetSingletonTag(node.GetTypeAsString())
        node.SetAttribute("Category", "PET")
        node.SaveWithSceneOff()
        node = scene.AddNode(node)
    return node


def configureSaliencyDisplay(node) -> None:
    """Heat colours over the map's 0..255 range; weak saliency is transparent, not dark red."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    wasModifying = display.StartModify()
    display.SetAndObserveColorNodeID(heatColorNode(node.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, SALIENCY_MAX)
    display.AutoThresholdOff()
    display.SetThreshold(DISPLAY_THRESHOLD * SALIENCY_MAX, SALIENCY_MAX)
    display.ApplyThresholdOn()
    display.SetInterpolate(True)
    display.EndModify(wasModifying)


def showInSliceViews(scene, backgroundNode, foregroundNode) -> None:
    """CT as background and the map (or nothing) as foreground, in every slice view."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        wasModifying = composite.StartModify()
        composite.SetBackgroundVolumeID(backgroundNode.GetID())
        composite.SetForegroundVolumeID(foregroundNode.GetID() if foregroundNode is not None else None)
        composite.SetForegroundOpacity(OVERLAY_OPACITY)
        composite.EndModify(wasModifying)


# ----------------------------------------------------------------------------------------------
# 3D display: volume rendering of the map
# ----------------------------------------------------------------------------------------------

def volumeRenderingDisplayNode(vrLogic, node):
    """The map's volume rendering display node, made (with the heat transfer functions) if missing."""
    display = vrLogic.GetFirstVolumeRenderingDisplayNode(node)
    if display is None:
        # Made here rather than by CreateDefaultVolumeRenderingNodes, which would first look up a
        # preset for a uint8 volume only to have the heat transfer functions replace it.
        scene = node.GetScene()
        display = scene.AddNewNodeByClass(vrLogic.GetDefaultRenderingMethod()
                                          or "vtkMRMLGPURayCastVolumeRenderingDisplayNode")
        propertyNode = scene.AddNewNodeByClass("vtkMRMLVolumePropertyNode", f"{node.GetName()} rendering")
        display.SetAndObserveVolumePropertyNodeID(propertyNode.GetID())
        node.AddAndObserveDisplayNodeID(display.GetID())
    setHeatTransferFunctions(display.GetVolumePropertyNode(), heatColorNode(node.GetScene()))
    return display


def setHeatTransferFunctions(volumePropertyNode, colorNode) -> None:
    """Same colours as the slice overlay; transparent below the display threshold."""
    prop = volumePropertyNode.GetVolumeProperty()
    colors = prop.GetRGBTransferFunction()
    colors.RemoveAllPoints()
    lut = colorNode.GetScalarsToColors()
    low, high = lut.GetRange()
    for value in np.linspace(0.0, 1.0, 11):
        r, g, b = lut.GetColor(low + value * (high - low))
        colors.AddRGBPoint(float(value) * SALIENCY_MAX, r, g, b)
    opacity = prop.GetScalarOpacity()
    opacity.RemoveAllPoints()
    opacity.AddPoint(0.0, 0.0)
    opacity.AddPoint(DISPLAY_THRESHOLD * SALIENCY_MAX, 0.0)
    opacity.AddPoint(SALIENCY_MAX, RENDERING_MAX_OPACITY)
    prop.SetInterpolationTypeToLinear()
    prop.ShadeOff()
    volumePropertyNode.Modified()


def showIn3D(vrLogic, nodes: dict, shownFinding: str | None) -> None:
    """Volume-render the shown finding's map and hide the others.

    Rendering nodes are made only for a map when it is first shown: making them for every map
    up front was most of the seconds the results took to appear.
    """
    for name, node in nodes.items():
        if name == shownFinding:
            volumeRenderingDisplayNode(vrLogic, node).SetVisibility(True)
        else:
            display = vrLogic.GetFirstVolumeRenderingDisplayNode(node)
            if display is not None:
                display.SetVisibility(False)


# ----------------------------------------------------------------------------------------------
# Export: saliency thresholded to a segmentation
# ----------------------------------------------------------------------------------------------

SEGMENTATION_ROLE = "FMCTSaliencySegmentation"  # saliency volume -> its thresholded segmentation


def thresholdToSegmentation(saliencyNode, fraction: float = DISPLAY_THRESHOLD):
    """A segmentation (one segment) of the voxels at or above fraction of the map's peak.

    For export (the segmentation saves as NRRD/NIfTI/DICOM SEG and STL), for measuring its
    volume in Segment Statistics, or for editing in Segment Editor. Made on the first call,
    updated in place on the next ones, and placed next to the CT.
    """
    import slicer
    import slicer.util

    scene = saliencyNode.GetScene()
    finding = saliencyNode.GetAttribute(FINDING_ATTRIBUTE) or "saliency"
    inputNode = inputNodeOf(saliencyNode)
    array = slicer.util.arrayFromVolume(saliencyNode)
    mask = (array >= max(1, int(np.ceil(fraction * SALIENCY_MAX)))).astype(np.uint8)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "FMCT saliency labelmap (temporary)")
    try:
        slicer.util.updateVolumeFromArray(labelmap, mask)
        import vtk

        matrix = vtk.vtkMatrix4x4()
        saliencyNode.GetIJKToRASMatrix(matrix)
        labelmap.SetIJKToRASMatrix(matrix)
        segmentation = saliencyNode.GetNodeReference(SEGMENTATION_ROLE)
        if segmentation is None:
            name = f"{inputNode.GetName() if inputNode else ''} FMCT {finding} saliency segmentation".strip()
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            segmentation.SetNodeReferenceID(INPUT_ROLE, inputNode.GetID() if inputNode else None)
            saliencyNode.SetNodeReferenceID(SEGMENTATION_ROLE, segmentation.GetID())
            if inputNode is not None:
                _placeNextTo(inputNode, segmentation)
        segmentation.GetSegmentation().RemoveAllSegments()
        if inputNode is not None:
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
        segmentation.SetAndObserveTransformNodeID(saliencyNode.GetTransformNodeID())
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            raise RuntimeError("could not convert the thresholded saliency to a segmentation")
        segment = segmentation.GetSegmentation().GetNthSegment(0)
        if segment is not None:
            segment.SetName(f"{finding} saliency >= {fraction:.0%} of peak")
            segment.SetColor(1.0, 0.55, 0.0)
    finally:
        scene.RemoveNode(labelmap)
    return segmentation


# ----------------------------------------------------------------------------------------------
# Subject hierarchy
# ----------------------------------------------------------------------------------------------

def _placeNextTo(inputNode, outputNode) -> None:
    """Put an output in the CT's study folder, so a DICOM study keeps its results together."""
    import slicer

    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(inputNode.GetScene())
    if shNode is None:
        return
    inputItem = shNode.GetItemByDataNode(inputNode)
    outputItem = shNode.GetItemByDataNode(outputNode)
    if inputItem and outputItem:
        shNode.SetItemParent(outputItem, shNode.GetItemParent(inputItem))
