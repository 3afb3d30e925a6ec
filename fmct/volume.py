"""The one in-memory CT representation every part of fmct speaks.

Geometry follows ITK/DICOM (LPS physical space), so a Volume converts to and from SimpleITK
without loss; Slicer's RAS is handled only at the Slicer boundary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk


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
