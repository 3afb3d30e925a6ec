"""The render grid (head-local, isotropic) and boxes of it.

Fields are rasterised in z-chunks that stay in cache, and each structure only inside its bounding
box: a `_Chunk` holds one chunk's coordinates, image views and shared fields, a `_Sub` the part of
it inside one structure's box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fmct.phantom.anatomy import _Anatomy
from fmct.phantom.common import _f3
from fmct.phantom.scan import _Scan


@dataclass
class _Grid:
    origin: tuple[float, float, float]      # local (x, y, z) of voxel [0, 0, 0]
    h: float
    shape: tuple[int, int, int]             # (nz, ny, nx)

    def coords(self, axis: int, start: int, stop: int) -> np.ndarray:
        return (self.origin[axis] + self.h * np.arange(start, stop)).astype(np.float32)

    def index_range(self, axis: int, lo: float, hi: float) -> tuple[int, int]:
        n = self.shape[2 - axis]
        i0 = max(0, int(math.ceil((lo - self.origin[axis]) / self.h)))
        i1 = min(n, int(math.floor((hi - self.origin[axis]) / self.h)) + 1)
        return i0, i1


def _render_spacing(pixel_mm: float) -> float:
    """Finer than 0.75 mm costs time without visible gain once the kernel blurs; coarser than 1.6 mm
    loses sulci, unless the output pixels are so coarse that they are lost anyway."""
    return float(min(max(pixel_mm, 0.75), max(1.6, 0.67 * pixel_mm)))


def _render_grid(anat: _Anatomy, scan: _Scan) -> _Grid:
    h = _render_spacing(scan.pixel)
    ax = anat.a * (1 + anat.egg + abs(anat.asym)) + 2.0
    by = anat.b + 2.0
    r = scan.rotation
    # lowest local z that still reaches the first slice anywhere in the head's x/y extent
    z_lo = (-anat.below - abs(r[2, 0]) * ax - abs(r[2, 1]) * by) / max(r[2, 2], 0.2) - 2.0
    z_lo = max(z_lo, -anat.c_down)
    lo = (-ax, -by, z_lo)
    hi = (ax, by, anat.c + 2.0)
    shape = tuple(int(math.floor((hi[i] - lo[i]) / h)) + 1 for i in (2, 1, 0))
    return _Grid(_f3(lo), h, shape)


class _Chunk:
    """A box of the render grid with its coordinates, image views and shared fields."""

    def __init__(self, grid: _Grid, zr: tuple[int, int], yr: tuple[int, int], xr: tuple[int, int],
                 hu: np.ndarray, bits: np.ndarray):
        self.z = grid.coords(2, *zr)[:, None, None]
        self.y = grid.coords(1, *yr)[None, :, None]
        self.x = grid.coords(0, *xr)[None, None, :]
        self.hu = hu[zr[0]:zr[1], yr[0]:yr[1], xr[0]:xr[1]]
        self.bits = bits[zr[0]:zr[1], yr[0]:yr[1], xr[0]:xr[1]]
        self.f: dict[str, np.ndarray] = {}

    def sub(self, lo, hi) -> "_Sub | None":
        """The part of this chunk inside the local box [lo, hi] (x, y, z mm), or None."""
        sl = []
        for axis, coord in ((2, self.z), (1, self.y), (0, self.x)):
            c = coord.ravel()
            i0 = int(np.searchsorted(c, lo[axis], side="left"))
            i1 = int(np.searchsorted(c, hi[axis], side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return _Sub(self, tuple(sl))


class _Sub:
    """A structure's bounding box within a chunk: coordinates and views of everything there."""

    def __init__(self, chunk: _Chunk, sl: tuple[slice, slice, slice]):
        self.sl = sl
        self.z = chunk.z[sl[0]]
        self.y = chunk.y[:, sl[1]]
        self.x = chunk.x[:, :, sl[2]]
        self.hu = chunk.hu[sl]
        self.bits = chunk.bits[sl]
        self._chunk = chunk

    def __getattr__(self, name: str) -> np.ndarray:
        """A shared field of the chunk (d, a_in, b, di, e, bd, sulcus, xd, ...) cut to this box."""
        fields = self.__dict__["_chunk"].f if "_chunk" in self.__dict__ else {}
        if name not in fields:
            raise AttributeError(name)
        arr = fields[name]
        return arr[tuple(s if n > 1 else slice(None) for s, n in zip(self.sl, arr.shape))]
