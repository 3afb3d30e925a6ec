"""The one in-memory CT representation every part of fmct speaks, and what makes one a head CT.

Geometry follows ITK/DICOM (LPS physical space), so a Volume converts to and from SimpleITK
without loss; Slicer's RAS is handled only at the Slicer boundary. `validate_ct` holds the sanity
checks every reader (and every caller of the Analyzer) ends in, whatever the format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fmct.errors import AbsurdSpacingError, NotCTError, NotVolumeError

FORMATS = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}
MAX_SPACING_MM = 20.0
AIR_HU = -500.0
MIN_SLICES = 3


@dataclass
class Volume:
    """A 3D image with physical geometry.

    array: voxel values indexed [k, j, i] = [z, y, x] (numpy/SimpleITK order), float32 HU for CTs.
    spacing, origin: (x, y, z) in mm, LPS.
    direction: 3x3 matrix whose columns are the physical directions of the i, j, k axes.
    meta: non-identifying facts about the source (path, series description); never patient data.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D, got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def size(self) -> tuple[int, int, int]:
        """Size in (x, y, z) voxels, ITK order."""
        return tuple(int(s) for s in self.array.shape[::-1])

    @property
    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k) indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction.flatten().tolist())
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, meta: dict[str, Any] | None = None) -> "Volume":
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            meta=dict(meta or {}),
        )

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """Same geometry, other voxels (e.g. a mask or a saliency map on this grid)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match volume {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(), {**self.meta, **meta})

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


def format_suffix(path: Path) -> str:
    """The extension that decides the format ('.nii.gz' counts as one)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def validate_ct(volume: Volume, source: str) -> None:
    """Refuse what cannot be a head CT in HU, whatever format it came from."""
    _check_spacing(volume.spacing, source)
    _check_is_3d(volume.array.shape, source)
    _check_hounsfield(volume.array, source)


# --------------------------------------------------------------------------------------------
# Checks shared by all formats
# --------------------------------------------------------------------------------------------

def _check_spacing(spacing: tuple[float, ...], source: str) -> None:
    if all(math.isfinite(s) and 0 < s <= MAX_SPACING_MM for s in spacing):
        return
    shown = " x ".join(f"{s:g}" for s in spacing)
    raise AbsurdSpacingError(
        f"{source}: voxel spacing {shown} mm is not plausible for a head CT (each axis must be above 0 and at most "
        f"{MAX_SPACING_MM:g} mm). The file header is probably broken: re-export the CT, or fix the spacing in the header.")


def _check_is_3d(shape_zyx: tuple[int, ...], source: str) -> None:
    if min(shape_zyx) >= MIN_SLICES:
        return
    size = " x ".join(str(n) for n in shape_zyx[::-1])
    raise NotVolumeError(
        f"{source}: {size} voxels is a single slice or too thin to be a 3D head CT (at least {MIN_SLICES} voxels "
        "are needed along every axis). Export the complete axial series, not a single image.")


def _check_hounsfield(array: np.ndarray, source: str) -> None:
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise NotCTError(f"{source}: the image contains no finite values. Re-export the CT in Hounsfield units.")
    if 0.0 <= low and high <= 1.0:
        raise NotCTError(
            f"{source}: all values lie in [0, 1]: this looks like a normalised image, a probability map or a mask, "
            "not a CT in Hounsfield units. Give the original CT.")
    if low > AIR_HU:
        raise NotCTError(
            f"{source}: no voxel is below {AIR_HU:g} HU (lowest {low:g}), but every head CT contains air at about "
            "-1000 HU. Is this an MR, or a CT exported without rescale intercept? Export the original CT in "
            "Hounsfield units.")
