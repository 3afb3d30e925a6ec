"""The gyral pattern: where the sulci are and how deep they go, and the V-shaped cleft they cut.

Evaluating waves on every voxel would dominate the cost of a phantom, so the pattern is tabulated
over directions, looked up on a coarse grid and interpolated onto each chunk (SimpleITK, C++).
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from fmct.phantom.anatomy import _Anatomy
from fmct.phantom.common import _f3
from fmct.phantom.grid import _Grid


class _SulcalPattern:
    """Where the sulci are: distance (mm) to the nearest sulcus, and how deep sulci go there.

    Sulci are radial clefts, so a random gyral pattern over directions (the zero set of a band-
    limited random field on the sphere) is extruded along rays from the centre. Its signed angular
    distance f / |grad f| is tabulated on a latitude-longitude map, looked up on a coarse grid
    (times the radius gives mm), and interpolated onto each chunk by SimpleITK (C++): far cheaper
    than evaluating waves on every voxel.
    """

    def __init__(self, anat: _Anatomy, grid: _Grid, hc: float = 2.5):
        self.grid = grid
        self.depth_mm = anat.sulc_depth
        lo = np.asarray(grid.origin) - hc
        n = np.floor((np.asarray(grid.shape[::-1]) - 1) * grid.h / hc).astype(int) + 3
        x = (lo[0] + hc * np.arange(n[0], dtype=np.float32))[None, None, :]
        y = (lo[1] + hc * np.arange(n[1], dtype=np.float32))[None, :, None]
        z = (lo[2] + hc * np.arange(n[2], dtype=np.float32))[:, None, None]
        r = np.sqrt(x * x + y * y + z * z) + 1e-3
        theta = np.arccos(np.clip(z / r, -1.0, 1.0))
        phi = np.arctan2(y, x) + np.zeros_like(theta)
        angular, depth = _sulcal_maps(anat)
        lookup = _SphereLookup(theta, phi)
        self.images = [self._image(lookup(angular) * r, lo, hc), self._image(lookup(depth), lo, hc)]

    @staticmethod
    def _image(arr: np.ndarray, lo: np.ndarray, hc: float) -> sitk.Image:
        img = sitk.GetImageFromArray(arr.astype(np.float32, copy=False))
        img.SetSpacing((hc, hc, hc))
        img.SetOrigin(_f3(lo))
        return img

    def sample(self, zr: tuple[int, int], yr: tuple[int, int], xr: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(distance to sulcus, sulcal depth) in mm on a box of the render grid."""
        g = self.grid
        f = sitk.ResampleImageFilter()
        f.SetSize((xr[1] - xr[0], yr[1] - yr[0], zr[1] - zr[0]))
        f.SetOutputSpacing((g.h,) * 3)
        f.SetOutputOrigin(tuple(g.origin[i] + g.h * start for i, start in enumerate((xr[0], yr[0], zr[0]))))
        f.SetInterpolator(sitk.sitkLinear)
        f.SetDefaultPixelValue(1.0)
        distance, depth = (sitk.GetArrayFromImage(f.Execute(img)) for img in self.images)
        np.abs(distance, out=distance)
        depth *= self.depth_mm
        return distance, depth


_MAP_STEPS = (90, 180)      # latitude, longitude samples of the maps over directions (2 degrees)


def _sulcal_maps(anat: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Signed angular distance (radians) to the nearest sulcus, and relative sulcal depth, over directions.

    Signed, so interpolation keeps the zero crossing; the absolute value is taken on the fine grid.
    """
    nt, nph = _MAP_STEPS
    r0 = 70.0 * anat.sc[1]
    f = _random_sphere_field(anat.sulc_waves, anat.sulc_kappa * r0)
    sin_t = np.maximum(np.sin(np.linspace(0.0, math.pi, nt + 1)), math.sin(math.radians(1.0)))[:, None]
    f_t = np.gradient(f, math.pi / nt, axis=0)
    f_p = np.gradient(f, 2 * math.pi / nph, axis=1) / sin_t
    grad = np.sqrt(f_t * f_t + f_p * f_p)
    angular = f / np.maximum(grad, 0.3 * anat.sulc_kappa * r0)        # signed: smooth through the sulcus
    g = _random_sphere_field(anat.depth_waves, 0.5 * anat.sulc_kappa * r0)
    depth = np.clip(1.0 + 0.4 * g, 0.4, 1.8)
    return angular.astype(np.float32), depth.astype(np.float32)


def _random_sphere_field(waves: tuple[list, list, list], kappa_r: float) -> np.ndarray:
    """A unit-variance random field over directions (sum of waves), on the latitude-longitude grid."""
    nt, nph = _MAP_STEPS
    theta = np.linspace(0.0, math.pi, nt + 1)[:, None]
    phi = np.linspace(-math.pi, math.pi, nph + 1)[None, :]
    u = np.stack(np.broadcast_arrays(np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)), -1)
    dirs, scales, phases = (np.asarray(w, dtype=np.float32) for w in waves)
    arg = (u.astype(np.float32) @ dirs.T) * (kappa_r * scales) + phases
    return np.cos(arg).sum(-1) * np.float32(math.sqrt(2.0 / len(dirs)))


class _SphereLookup:
    """Bilinear lookups of latitude-longitude tables at fixed directions (indices computed once)."""

    def __init__(self, theta: np.ndarray, phi: np.ndarray):
        nt, nph = _MAP_STEPS
        ti = theta * (nt / math.pi)
        pj = (phi + math.pi) * (nph / (2 * math.pi))
        i0 = np.clip(np.floor(ti).astype(np.int64), 0, nt - 1)
        j0 = np.clip(np.floor(pj).astype(np.int64), 0, nph - 1)
        self.wi = (ti - i0).astype(np.float32)
        self.wj = (pj - j0).astype(np.float32)
        self.base = i0 * (nph + 1) + j0
        self.row = nph + 1

    def __call__(self, table: np.ndarray) -> np.ndarray:
        flat = table.ravel()
        b, w = self.base, self.row
        top = flat[b] * (1 - self.wj) + flat[b + 1] * self.wj
        bottom = flat[b + w] * (1 - self.wj) + flat[b + w + 1] * self.wj
        return top * (1 - self.wi) + bottom * self.wi


def _sulcal_cleft(s: np.ndarray, depth: np.ndarray, bd: np.ndarray, width) -> np.ndarray:
    """Distance into brain from the sulcal clefts: a V-shaped cleft, widest at the surface, to a varying depth."""
    taper = np.clip(bd / depth, 0.0, 1.0)
    taper *= -0.6
    taper += 1.0
    taper *= -0.5 * width
    taper += s
    return np.maximum(taper, bd - depth, out=taper)
