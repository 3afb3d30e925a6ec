"""Into the scanner: the head-frame render resampled once onto the tilted, offset axial slices.

Thick slices average several sub-slices (partial volume) and masks take the union over them;
slab by slab, each cropped to the head's outline, so there is less to resample and buffers stay
small.
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from fmct.phantom.anatomy import _Anatomy, _head_outline_local
from fmct.phantom.common import _AIR, _f3
from fmct.phantom.grid import _Grid
from fmct.phantom.scan import _Scan


def _place_in_scanner(hu: np.ndarray, bits: np.ndarray, grid: _Grid, scan: _Scan,
                      anat: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Resample the head-frame render onto the axial slices: HU averaged over the sub-slices of
    each slice (partial volume), lesion bits OR-ed over them (a lesion in any part of a thick slice
    is in that slice). Slab by slab, each cropped to the head's outline there: less to resample,
    and buffers small enough to be reused."""
    out = np.full((scan.n_slices, scan.size, scan.size), _AIR, dtype=np.float32)
    out_bits = np.zeros(out.shape, dtype=np.uint8)
    hu_image = _grid_image(hu, grid, scan)
    lesion_box = _nonzero_box(bits, grid)
    bits_image = _grid_image(bits, grid, scan) if lesion_box is not None else None
    lesion_rows = _output_box(*lesion_box, scan) if lesion_box is not None else None
    outline = _head_outline(anat, scan)
    per_slab = max(1, int(4e6 // (scan.sub_slices * scan.size * scan.size * 0.5)))
    for k0 in range(0, scan.n_slices, per_slab):
        k1 = min(scan.n_slices, k0 + per_slab)
        box = _slab_box(outline, scan, k0, k1)
        if box is None:
            continue
        _resample_into(out, hu_image, scan, (k0, k1), box, sitk.sitkLinear, _AIR, _mean_of_sub_slices)
        if lesion_rows is not None:
            both = _intersect(box, lesion_rows)
            if both is not None:
                _resample_into(out_bits, bits_image, scan, (k0, k1), both, sitk.sitkNearestNeighbor, 0,
                               _or_of_sub_slices)
    return out, out_bits


def _head_outline(anat: _Anatomy, scan: _Scan) -> np.ndarray:
    """Points on (just outside) the skin, in scanner mm: bounds the head in any slab."""
    return scan.centre + _head_outline_local(anat, margin=3.0) @ scan.rotation.T


def _slab_box(outline: np.ndarray, scan: _Scan, k0: int, k1: int):
    """Row and column ranges of slices k0..k1-1 that the head can reach, or None."""
    z0 = scan.origin[2] + (k0 - 0.5) * scan.thickness - 8.0
    z1 = scan.origin[2] + (k1 - 0.5) * scan.thickness + 8.0
    pts = outline[(outline[:, 2] >= z0) & (outline[:, 2] <= z1)]
    if len(pts) == 0:
        return None
    return _pixel_ranges(pts, scan)


def _pixel_ranges(pts: np.ndarray, scan: _Scan):
    ranges = []
    for axis in (1, 0):
        a0 = int(math.floor((pts[:, axis].min() - scan.origin[axis]) / scan.pixel)) - 1
        a1 = int(math.ceil((pts[:, axis].max() - scan.origin[axis]) / scan.pixel)) + 2
        a0, a1 = max(0, a0), min(scan.size, a1)
        if a1 <= a0:
            return None
        ranges.append((a0, a1))
    return tuple(ranges)


def _intersect(a, b):
    out = tuple((max(p[0], q[0]), min(p[1], q[1])) for p, q in zip(a, b))
    return out if all(r[1] > r[0] for r in out) else None


def _resample_into(out: np.ndarray, src: sitk.Image, scan: _Scan, slices: tuple[int, int], box, interp,
                   default, reduce) -> None:
    (j0, j1), (i0, i1) = box
    k0, k1 = slices
    image = _resample(src, scan, (i0, j0, k0), (i1 - i0, j1 - j0, k1 - k0), interp, default)
    fine = sitk.GetArrayViewFromImage(image)            # valid while `image` lives
    out[k0:k1, j0:j1, i0:i1] = reduce(fine.reshape(k1 - k0, scan.sub_slices, j1 - j0, i1 - i0))


def _mean_of_sub_slices(fine: np.ndarray) -> np.ndarray:
    if fine.shape[1] == 1:
        return fine[:, 0]
    acc = fine[:, 0].copy()
    for i in range(1, fine.shape[1]):
        acc += fine[:, i]
    acc *= 1.0 / fine.shape[1]
    return acc


def _or_of_sub_slices(fine: np.ndarray) -> np.ndarray:
    return fine[:, 0] if fine.shape[1] == 1 else np.bitwise_or.reduce(fine, axis=1)


def _nonzero_box(bits: np.ndarray, grid: _Grid):
    """Local (lo, hi) corners of the voxels where any lesion bit is set, or None."""
    idx = [np.nonzero(bits.any(axis=axes))[0] for axes in ((0, 1), (0, 2), (1, 2))]   # x, y, z
    if idx[0].size == 0:
        return None
    lo = np.asarray(grid.origin) + grid.h * (np.array([i[0] for i in idx]) - 1)
    hi = np.asarray(grid.origin) + grid.h * (np.array([i[-1] for i in idx]) + 1)
    return lo, hi


def _grid_image(arr: np.ndarray, grid: _Grid, scan: _Scan) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((grid.h,) * 3)
    img.SetOrigin(_f3(scan.centre + scan.rotation @ np.asarray(grid.origin)))
    img.SetDirection(scan.rotation.flatten().tolist())
    return img


def _output_box(lo: np.ndarray, hi: np.ndarray, scan: _Scan):
    """Row and column ranges of the output slices that the local box [lo, hi] can reach."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return _pixel_ranges(scan.centre + corners @ scan.rotation.T, scan)


def _resample(src: sitk.Image, scan: _Scan, start: tuple[int, int, int], size: tuple[int, int, int], interp,
              default) -> sitk.Image:
    """Onto output columns/rows/slices [start, start + size), every slice as its sub-slices."""
    m = scan.sub_slices
    dz = scan.thickness / m
    f = sitk.ResampleImageFilter()
    f.SetSize((int(size[0]), int(size[1]), int(size[2]) * m))
    f.SetOutputSpacing((scan.pixel, scan.pixel, dz))
    f.SetOutputOrigin((scan.origin[0] + start[0] * scan.pixel, scan.origin[1] + start[1] * scan.pixel,
                       scan.origin[2] + start[2] * scan.thickness - scan.thickness / 2 + dz / 2))
    f.SetInterpolator(interp)
    f.SetDefaultPixelValue(float(default))
    return f.Execute(src)
