"""The MRML side of a result: the findings table, saliency volumes, overlays and 3D rendering.

Outputs are found again through node references from the input CT (one table, one saliency
volume per explained finding), so running again on the same CT updates the same nodes instead
of piling up new ones, and the links survive saving and reloading the scene. Each output also
points back at its CT, so selecting a row of a findings table is enough to show its overlay.

Nothing here does numerical work: the saliency arrays arrive finished from the engine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from FMCTLib import geometry

if TYPE_CHECKING:
    from fmct.volume import Volume

# Node reference roles and attributes (no ':' or ';', which the scene file uses as separators).
TABLE_ROLE = "FMCTFindingsTable"      # input CT -> its findings table
SALIENCY_ROLE = "FMCTSaliency"        # input CT -> its saliency volumes (one per explained finding)
INPUT_ROLE = "FMCTInputVolume"        # any output -> the CT it describes
FINDING_ATTRIBUTE = "FMCT.Finding"    # on a saliency volume: the finding it explains
SHOWN_ATTRIBUTE = "FMCT.ShownFinding"  # on the input CT: the finding whose overlay is shown

COLUMNS = ("name", "description", "probability", "threshold", "positive")
COLUMN_TITLES = {"name": "Finding", "description": "Description", "probability": "Probability",
                 "threshold": "Threshold", "positive": "Positive"}

HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
# Saliency maps are scaled by the engine to a maximum of 1. Below 0.2 of the peak they are
# mostly diffuse background, which would tint the whole brain: those voxels are transparent.
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
    for column, array in arrays.items():
        array.SetName(column)
    for f in findings:
        arrays["name"].InsertNextValue(f["name"])
        arrays["description"].InsertNextValue(f.get("description", ""))
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

def updateSaliencyNodes(inputNode, saliency: dict[str, "Volume"]) -> dict:
    """Make this CT's saliency volumes exactly the given maps: update, add, remove stale ones."""
    existing = saliencyNodes(inputNode)
    for name, node in existing.items():
        if name not in saliency:
            removeOutputNode(node)
    nodes = {}
    for name, volume in saliency.items():
        node = existing.get(name) or _newSaliencyNode(inputNode, name)
        _writeSaliency(node, volume, inputNode)
        configureSaliencyDisplay(node)
        nodes[name] = node
    return nodes


def _newSaliencyNode(inputNode, finding: str):
    scene = inputNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{inputNode.GetName()} FMCT {finding} saliency")
    node.SetAttribute(FINDING_ATTRIBUTE, finding)
    node.SetNodeReferenceID(INPUT_ROLE, inputNode.GetID())
    inputNode.AddNodeReferenceID(SALIENCY_ROLE, node.GetID())
    _placeNextTo(inputNode, node)
    return node


def _writeSaliency(node, volume: "Volume", inputNode) -> None:
    """Voxels and geometry of the map; it follows the CT's parent transform, as the CT does."""
    import slicer.util

    geometry.setNodeGeometry(node, volume)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array, dtype=np.float32))
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
    """Heat colours over the map's 0..1 range; weak saliency is transparent, not dark red."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    wasModifying = display.StartModify()
    display.SetAndObserveColorNodeID(heatColorNode(node.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetThreshold(DISPLAY_THRESHOLD, 1.0)
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
        display = vrLogic.CreateDefaultVolumeRenderingNodes(node)
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
        colors.AddRGBPoint(float(value), r, g, b)
    opacity = prop.GetScalarOpacity()
    opacity.RemoveAllPoints()
    opacity.AddPoint(0.0, 0.0)
    opacity.AddPoint(DISPLAY_THRESHOLD, 0.0)
    opacity.AddPoint(1.0, RENDERING_MAX_OPACITY)
    prop.SetInterpolationTypeToLinear()
    prop.ShadeOff()
    volumePropertyNode.Modified()


def showIn3D(vrLogic, nodes: dict, shownFinding: str | None) -> None:
    """Volume-render the shown finding's map and hide the others."""
    for name, node in nodes.items():
        display = volumeRenderingDisplayNode(vrLogic, node)
        display.SetVisibility(name == shownFinding)


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
