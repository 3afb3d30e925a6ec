"""Linear resampling between two grids whose axes are parallel, as three 1-D passes.

Mapping a saliency map from the 64^3 model grid back onto a CT's own grid is the one step whose
cost grows with the CT rather than with the model. When the two grids' axes are parallel (every
CT that is not oblique, whatever its axis order and flips), trilinear interpolation is a tensor
product of 1-D interpolations, one per axis: first along the CT array's slice axis on the model-sized
side, then each CT slice on its own as two small matrix products into one float plane, cast
straight into the uint8 result. No float32 copy of the CT-sized map is ever made (one slice at a
time), and the work is dense matrix products instead of ITK's per-voxel point transform and
neighbourhood fetch (benchmarks/RESULTS.md#map-back). Oblique grids return None and go to ITK.

The sampling rule is ITK's (sitk.Resample with sitkLinear and default 0), so either path gives
the same map to within one grey level: a point is inside the source when its continuous index
lies in [-0.5, size - 0.5] on every axis, the neighbours are clamped to the edge there, and
outside the value is 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# An off-axis coupling smaller than this, in source voxels across the whole destination axis, is
# rounding in the direction cosines, not obliqueness.
PARALLEL_TOLERANCE_VOXELS = 1e-3


def index_map(src: Any, dst: Any) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with continuous source index = A @ destination index + b, in ITK (x, y, z) order."""
    src_frame = np.asarray(src.direction, np.float64) @ np.diag(np.asarray(src.spacing, np.float64))
    dst_frame = np.asarray(dst.direction, np.float64) @ np.diag(np.asarray(dst.spacing, np.float64))
    a = np.linalg.solve(src_frame, dst_frame)
    b = np.linalg.solve(src_frame, np.asarray(dst.origin, np.float64) - np.asarray(src.origin, np.float64))
    return a, b


def axis_pairing(a: np.ndarray, dst_size: tuple[int, int, int]) -> list[int] | None:
    """For each destination ITK axis, the one source axis it moves along; None when the grids are oblique."""
    pairing = [int(np.argmax(np.abs(a[:, q]))) for q in range(3)]
    if sorted(pairing) != [0, 1, 2]:
        return None
    for q, r in enumerate(pairing):
        off = np.abs(np.delete(a[:, q], r)).max() * max(int(dst_size[q]) - 1, 1)
        if off > PARALLEL_TOLERANCE_VOXELS:
            return None
    return pairing


def taps(coords: np.ndarray, n_src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ITK's linear interpolation along one axis: two source indices and their weights per point."""
    inside = (coords >= -0.5) & (coords <= n_src - 0.5)
    base = np.floor(coords)
    frac = coords - base
    i0 = np.clip(base, 0, n_src - 1).astype(np.intp)
    i1 = np.clip(base + 1, 0, n_src - 1).astype(np.intp)
    return i0, i1, np.where(inside, 1.0 - frac, 0.0), np.where(inside, frac, 0.0)


def weight_matrix(coords: np.ndarray, n_src: int) -> np.ndarray:
    """The same interpolation as a dense [n_dst, n_src] float32 matrix (for the model-sized passes)."""
    i0, i1, w0, w1 = taps(coords, n_src)
    w = np.zeros((len(coords), n_src), np.float32)
    rows = np.arange(len(coords))
    np.add.at(w, (rows, i0), w0)
    np.add.at(w, (rows, i1), w1)
    return w


def resample_parallel(array: np.ndarray, src: Any, dst: Any, levels: int | None = None) -> np.ndarray | None:
    """`array` [z, y, x] on grid src, linearly resampled onto grid dst (0 outside); None if oblique.

    levels=None gives float32; levels=L maps a [0, 1] map to uint8 0..L rounded half up, as
    Preprocessor.to_input_grid does with ITK.
    """
    a, b = index_map(src, dst)
    dst_size = tuple(int(s) for s in dst.size)
    pairing = axis_pairing(a, dst_size)
    if pairing is None:
        return None
    # numpy axis d of the destination is ITK axis 2 - d; move the paired source axes into that order.
    src_np = np.asarray(array, np.float32).transpose([2 - pairing[2 - d] for d in range(3)])
    coords = [a[pairing[q], q] * np.arange(dst_size[q]) + b[pairing[q]] for q in range(3)]  # per ITK axis q
    n_src = [src_np.shape[2 - q] for q in range(3)]
    if levels is not None:
        src_np = np.clip(src_np, 0.0, 1.0) * np.float32(levels)
    # Along the destination's slice axis (its numpy axis 0) on the model-sized side: [n0_dst, n1_src, n2_src], small.
    slabs = np.tensordot(weight_matrix(coords[2], n_src[2]), src_np, axes=(1, 0))
    wy, wx_t = weight_matrix(coords[1], n_src[1]), np.ascontiguousarray(weight_matrix(coords[0], n_src[0]).T)
    # Then each CT slice on its own: two small matrix products into one float plane, cast into the result.
    dtype = np.uint8 if levels is not None else np.float32
    out = np.zeros((dst_size[2], dst_size[1], dst_size[0]), dtype)
    rows = np.empty((n_src[1], dst_size[0]), np.float32)
    plane = np.empty((dst_size[1], dst_size[0]), np.float32)
    filled = np.flatnonzero(np.abs(slabs).reshape(len(slabs), -1).max(axis=1) > 0)
    if levels is not None:
        # The y and x weights sum to 1 inside the source grid and to 0 outside, so this adds 0.5
        # exactly where the map is defined: truncation into uint8 then rounds half up (ITK's cast),
        # and the values stay below levels + 1 (the input is clipped to [0, 1], the weights convex).
        slabs += np.float32(0.5)
    for k in filled:
        np.matmul(slabs[k], wx_t, out=rows)
        np.matmul(wy, rows, out=plane)
        np.copyto(out[k], plane, casting="unsafe")
    return out
