"""The geometry that links a model tensor to its CT: a voxel grid, and the model input with its two grids.

Shared by every crop mode (fmct.preprocessing.preprocessor's head crop, fmct.preprocessing.foreground's
MONAI pipeline), so a map computed on the model grid goes back onto the CT the same way whichever made it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from fmct.reading.volume import Volume


@dataclass
class Grid:
    """Geometry of a voxel grid, enough to resample onto it."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    @classmethod
    def of(cls, volume: Volume) -> "Grid":
        return cls(volume.size, volume.spacing, volume.origin, volume.direction.copy())

    def resample(self, image: sitk.Image, interpolator: int, default: float, pixel_type: int = sitk.sitkFloat32) -> np.ndarray:
        out = sitk.Resample(
            image, list(self.size), sitk.Transform(), interpolator, list(self.origin), list(self.spacing),
            self.direction.flatten().tolist(), float(default), pixel_type,
        )
        return sitk.GetArrayFromImage(out)

    def image(self, array: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction.flatten().tolist())
        return img


@dataclass
class ModelInput:
    """The model's input and the two grids that link it to the CT.

    Kept as numpy so reading and preprocessing never import torch (the ONNX path runs without it).
    """

    array: np.ndarray  # [1, C, D, H, W] float32
    model_grid: Grid
    input_grid: Grid
    head_center_mm: tuple[float, float, float]
    head_extent_mm: float | None = None  # the largest object from bottom to top (for the record; fmct.checks.size judges the head)
    input_warnings: tuple[str, ...] = ()  # what the reader noticed about the file (volume.meta["warnings"])

    @property
    def tensor(self) -> "torch.Tensor":  # noqa: F821
        import torch

        return torch.from_numpy(self.array)
