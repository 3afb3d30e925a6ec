"""The regular grid that slice positions describe, or a refusal that says why there is none.

Shared by per-slice series (fmct.reading.dicom) and multi-frame files (fmct.reading.multiframe):
the same rules for duplicates, gaps, uneven spacing and gantry tilt, whatever the storage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from fmct.conventions.errors import GantryTiltError, MissingSlicesError, NonUniformSpacingError
from fmct.reading.volume import Volume

TILT_MIN_DEG = 0.5
TILT_TOLERANCE_DEG = 0.5
NONUNIFORM_TOLERANCE = 0.10
DRIFT_TOLERANCE = 0.5  # of a slice: how far any slice may sit from the regular grid the series claims
GAP_MIN_RATIO = 1.5
GAP_ROUNDING = 0.2
DUPLICATE_RATIO = 0.05


@dataclass
class Grid:
    """The regular grid that the slice positions describe."""

    origin: np.ndarray
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]
    step: np.ndarray  # mean vector from one slice position to the next
    tilt_deg: float

    @property
    def slice_spacing(self) -> float:
        return float(self.step @ self.normal)


def check_duplicates(along: np.ndarray) -> None:
    steps = np.diff(along)
    typical = float(np.median(np.abs(steps)))
    duplicate = np.abs(steps) <= max(DUPLICATE_RATIO * typical, 1e-3)
    if duplicate.any():
        where = ", ".join(f"{along[i]:.2f} mm" for i in np.flatnonzero(duplicate)[:5])
        raise MissingSlicesError(
            f"{int(duplicate.sum())} slice(s) repeat the position of another slice (at {where} along the slice "
            "normal). The folder may hold the same series twice, or several acquisitions or time points under one "
            "series UID. Remove the duplicate files or export one acquisition.")


def check_gaps_and_spacing(along: np.ndarray) -> None:
    steps = np.diff(along)
    typical = float(np.median(steps))
    ratios = steps / typical
    gaps = np.flatnonzero((ratios >= GAP_MIN_RATIO) & (np.abs(ratios - np.round(ratios)) <= GAP_ROUNDING))
    if gaps.size:
        missing = int(sum(round(ratios[i]) - 1 for i in gaps))
        where = "; ".join(f"between {along[i]:.2f} and {along[i + 1]:.2f} mm (step {steps[i]:.2f} mm)" for i in gaps[:5])
        raise MissingSlicesError(
            f"About {missing} slice(s) are missing: slice positions jump {where} along the slice normal, where the "
            f"usual step is {typical:.2f} mm. Re-export the complete series from PACS.")
    off = np.flatnonzero(np.abs(ratios - 1) > NONUNIFORM_TOLERANCE)
    regular = along[0] + np.arange(len(along)) * (along[-1] - along[0]) / (len(along) - 1)
    drift = np.abs(along - regular)
    if not off.size and drift.max() > DRIFT_TOLERANCE * abs(typical):
        k = int(np.argmax(drift))
        raise NonUniformSpacingError(
            f"Slice positions drift from a regular grid: slice {k + 1} sits {drift[k]:.2f} mm from where a uniform "
            f"{(along[-1] - along[0]) / (len(along) - 1):.2f} mm spacing puts it (more than half a slice), although "
            "each step is close to the usual one. Export a uniformly spaced reconstruction, or resample it first.")
    if off.size:
        i = off[0]
        raise NonUniformSpacingError(
            f"Slices are unevenly spaced: steps range from {steps.min():.2f} to {steps.max():.2f} mm (usual "
            f"{typical:.2f} mm; e.g. {steps[i]:.2f} mm between {along[i]:.2f} and {along[i + 1]:.2f} mm). "
            "The series may combine acquisitions with different slice spacing. Export a uniformly spaced "
            "reconstruction, or resample it to one slice spacing first.")


def tilt_deg(positions: np.ndarray, normal: np.ndarray) -> float:
    """Angle between the slice stacking direction and the slice normal; refuses a varying one."""
    steps = np.diff(positions, axis=0)
    heights = steps @ normal
    shear = (steps - np.outer(heights, normal)) / heights[:, None]  # in-plane shift per mm along the normal
    mean = shear.mean(axis=0)
    if np.max(np.linalg.norm(shear - mean, axis=1)) > math.tan(math.radians(TILT_TOLERANCE_DEG)):
        raise GantryTiltError(
            "The slice positions are not stacked along one direction (the gantry tilt or table path varies "
            "from slice to slice), so no single grid describes the series. Export an axial reconstruction "
            "without tilt (most scanners can reformat to a non-tilted axial series).")
    return math.degrees(math.atan(float(np.linalg.norm(mean))))


def resample_tilted(array: np.ndarray, grid: Grid) -> Volume:
    """Resample a sheared (tilted) stack onto the orthogonal grid [row, col, normal] that covers it.

    The source image is given identity geometry so that its physical space is its index space;
    the transform then maps output LPS points through the inverse of the true index->LPS affine.
    """
    dx, dy = grid.pixel_spacing
    affine = np.column_stack([dx * grid.row, dy * grid.col, grid.step])
    direction = np.column_stack([grid.row, grid.col, grid.normal])
    spacing = np.array([dx, dy, grid.slice_spacing])
    nz, ny, nx = array.shape
    corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], dtype=float)
    local = (affine @ corners.T).T @ direction  # corner offsets from the origin in the output frame
    low, high = local.min(axis=0), local.max(axis=0)
    size = [int(n) for n in np.floor((high - low) / spacing + 1e-6) + 1]
    origin = grid.origin + direction @ low

    inverse = np.linalg.inv(affine)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(inverse.ravel().tolist())
    transform.SetTranslation((-inverse @ grid.origin).tolist())
    resampled = sitk.Resample(
        sitk.GetImageFromArray(array), size, transform, sitk.sitkLinear, origin.tolist(), spacing.tolist(),
        direction.ravel().tolist(), -1024.0, sitk.sitkFloat32)
    return Volume.from_sitk(resampled)
