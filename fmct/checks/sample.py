"""The one small copy of the CT every check reads: the voxels in the header's patient frame (LPS), strided.

Checks need anatomy at ~3 mm, not the CT's own resolution: a strided copy (no averaging, so cortical
bone keeps its HU) of the canonical view costs a few hundred thousand voxels whatever the CT's size,
keeps every check well under a second, and puts x = patient left, y = posterior, z = superior as the
header claims them, which is what the orientation check tests against anatomy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmct.preprocessing.preprocessor import canonical_view, orientation_direction
from fmct.reading.volume import Volume

TARGET_MM = 3.0  # sampling step: finer than a skull's thickness (5-8 mm), coarse enough to be cheap
PADDING_BELOW_HU = -1500.0  # a constant this low is padding outside the reconstruction, not air


@dataclass
class Sample:
    """array [z, y, x] float32 in the LPS-canonical frame; spacing (x, y, z) mm; origin of voxel 0 (LPS mm)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: np.ndarray
    steps: tuple[int, int, int]  # stride along canonical (x, y, z) in the CT's own voxels
    padding: float | None  # the value outside the reconstruction circle, None when there is none

    @property
    def outside(self) -> np.ndarray:
        """Voxels outside the reconstructed field of view (padding)."""
        if self.padding is None:
            return np.zeros(self.array.shape, bool)
        return self.array <= self.padding

    def z_mm(self, k: np.ndarray | float) -> np.ndarray:
        return self.origin[2] + np.asarray(k, dtype=np.float64) * self.spacing[2]


def sample(volume: Volume) -> Sample:
    """The strided LPS-canonical copy of a Volume (see module docstring)."""
    view = canonical_view(volume, orientation_direction("LPS"))
    steps = tuple(max(1, int(round(TARGET_MM / s))) for s in view.spacing)
    array = np.ascontiguousarray(view.array[:: steps[2], :: steps[1], :: steps[0]], dtype=np.float32)
    low = float(array.min())
    padding = low if low <= PADDING_BELOW_HU and np.mean(array == low) > 0.001 else None
    spacing = tuple(float(s * n) for s, n in zip(view.spacing, steps))
    return Sample(array, spacing, np.asarray(view.origin, float), steps, padding)
