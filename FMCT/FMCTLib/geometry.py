"""The Slicer boundary of the geometry: a volume node (RAS) <-> an engine Volume (LPS).

Slicer stores a volume's geometry as IJK-to-RAS (spacing, origin and the directions of the
i, j, k axes in RAS millimetres); the engine, like ITK and DICOM, speaks LPS. The two differ
only by the sign of the first two physical axes, RAS = diag(-1, -1, 1) @ LPS, so the
conversion is a pair of exact sign flips: a saliency map that comes back on the engine's input
grid gets exactly the CT node's IJK-to-RAS matrix, not an approximation of it.

The voxel array of a node is indexed [k, j, i], as the engine's Volume.array is [z, y, x].
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the engine is imported only when an analysis runs, never at module import
    from fmct.reading.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def nodeIJKToRAS(node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volumeIJKToRAS(volume: "Volume") -> np.ndarray:
    """The IJK-to-RAS matrix a node needs to hold this LPS Volume."""
    ras = np.eye(4)
    ras[:3, :3] = LPS_TO_RAS @ volume.direction @ np.diag(volume.spacing)
    ras[:3, 3] = LPS_TO_RAS @ np.asarray(volume.origin)
    return ras


def checkInputNode(node) -> None:
    """Refuse what cannot hold a CT, with a message that says what to select instead.

    Checked before any voxel is copied, so a wrong selection fails at once and cheaply.
    """
    from fmct.conventions.errors import InputVolumeError, NotCTError

    if node is None:
        raise InputVolumeError("No input volume is selected. Load a head CT and select it as the input volume.")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputVolumeError(f"The input is a {node.GetClassName()}, not a scalar volume. Select the CT volume.")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise NotCTError("The input is a label map (a segmentation), not a CT. Select the CT volume.")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputVolumeError("The input volume node has no voxels. Load the CT again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise NotCTError(
            f"The input has {image.GetNumberOfScalarComponents()} values per voxel (a colour or vector image), "
            "not a CT. Select the original grey-scale CT.")


def volumeFromNode(node, copy: bool = True) -> "Volume":
    """The node's voxels and geometry as an LPS Volume for the engine.

    copy=True: a float32 copy (the engine's in-memory convention). copy=False: a view of the
    node's own voxels in their own type (int16 for most CTs), to export the CT to a file for the
    analysis worker without a 4-byte-per-voxel copy in Slicer's memory.
    Only geometry and voxels cross the boundary: the node's name (which may come from DICOM
    tags) is not put into meta, so it can never reach an engine log.
    """
    from fmct.reading.volume import Volume

    checkInputNode(node)
    import slicer.util

    array = slicer.util.arrayFromVolume(node)
    if copy:
        array = np.array(array, dtype=np.float32, copy=True)
    directions = np.zeros((3, 3))
    node.GetIJKToRASDirections(directions)
    return Volume(
        array=array,
        spacing=tuple(node.GetSpacing()),
        origin=tuple(LPS_TO_RAS @ np.asarray(node.GetOrigin())),
        direction=LPS_TO_RAS @ directions,
        meta={"source": "Slicer volume node"},
    )


def setNodeGeometry(node, volume: "Volume") -> None:
    """Give a node the geometry of an LPS Volume (spacing, origin, axis directions in RAS)."""
    node.SetSpacing(*volume.spacing)
    node.SetOrigin(*(LPS_TO_RAS @ np.asarray(volume.origin)))
    node.SetIJKToRASDirections(LPS_TO_RAS @ volume.direction)


def sameGeometry(nodeA, nodeB, atol: float = 1e-6) -> bool:
    """Whether two volume nodes have the same voxel grid (dimensions and IJK-to-RAS)."""
    dimsA = nodeA.GetImageData().GetDimensions() if nodeA.GetImageData() else None
    dimsB = nodeB.GetImageData().GetDimensions() if nodeB.GetImageData() else None
    return dimsA == dimsB and np.allclose(nodeIJKToRAS(nodeA), nodeIJKToRAS(nodeB), atol=atol, rtol=0)
