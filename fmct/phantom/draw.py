"""Drawing primitives: soft edges, compositing, signed-distance shapes (ellipsoids, tubes).

Every structure is a signed-distance-like field drawn with a soft edge one voxel wide, so thin
things (sulci, falx, a fracture gap) keep their partial volume instead of aliasing away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fmct.phantom.common import _f3


def _inside(sd: np.ndarray, ew: float) -> np.ndarray:
    """Soft indicator of sd > 0 (sd in mm, positive inside), ramping over one edge width."""
    t = sd * (1.0 / ew)
    t += 0.5
    return np.clip(t, 0.0, 1.0, out=t)


def _paint(hu: np.ndarray, value, alpha: np.ndarray) -> None:
    """hu <- hu + alpha (value - hu), in place: partial volume of a structure over what is there."""
    t = value - hu
    t *= alpha
    hu += t


def _mark(bits: np.ndarray, bit: int, alpha: np.ndarray, threshold: float = 0.5) -> None:
    bits |= np.where(alpha > threshold, np.uint8(bit), np.uint8(0))


def _ellipsoid_sd(x, y, z, centre, semi) -> np.ndarray:
    """Approximate signed distance, positive inside (exact along the axes of a sphere)."""
    q = ((x - centre[0]) * (1.0 / semi[0])) ** 2 + ((y - centre[1]) * (1.0 / semi[1])) ** 2
    q = q + ((z - centre[2]) * (1.0 / semi[2])) ** 2
    np.sqrt(q, out=q)
    return (1.0 - q) * min(semi)


@dataclass
class _Ellipsoid:
    centre: tuple[float, float, float]
    semi: tuple[float, float, float]

    def box(self, margin: float, dx: float = 0.0):
        lo = tuple(self.centre[i] - self.semi[i] - margin - (dx if i == 0 else 0.0) for i in range(3))
        hi = tuple(self.centre[i] + self.semi[i] + margin + (dx if i == 0 else 0.0) for i in range(3))
        return lo, hi

    def sd(self, x, y, z) -> np.ndarray:
        return _ellipsoid_sd(x, y, z, self.centre, self.semi)

    def lowest_along(self, g: np.ndarray) -> float:
        """max over the ellipsoid of p.g: its most dependent point along gravity g."""
        return float(np.dot(self.centre, g) + math.sqrt(float(np.sum((np.asarray(self.semi) * g) ** 2))))


@dataclass
class _Tube:
    """Capsules through control points with linearly varying radius, stretched by `aniso`."""

    points: list[tuple[float, float, float]]
    radii: list[float]
    aniso: tuple[float, float, float]

    def box(self, margin: float, dx: float = 0.0):
        p = np.asarray(self.points)
        r = max(self.radii) * np.asarray(self.aniso)
        lo = p.min(0) - r - margin
        hi = p.max(0) + r + margin
        lo[0] -= dx
        hi[0] += dx
        return _f3(lo), _f3(hi)

    def sd(self, x, y, z) -> np.ndarray:
        """Signed distance (positive inside), in mm of the unstretched shape, union of the segments."""
        kx, ky, kz = (1.0 / s for s in self.aniso)
        xs, ys, zs = x * kx, y * ky, z * kz
        best = None
        for (p0, r0), (p1, r1) in zip(zip(self.points, self.radii), zip(self.points[1:], self.radii[1:])):
            a = (p0[0] * kx, p0[1] * ky, p0[2] * kz)
            u = (p1[0] * kx - a[0], p1[1] * ky - a[1], p1[2] * kz - a[2])
            uu = u[0] ** 2 + u[1] ** 2 + u[2] ** 2
            dx, dy, dz = xs - a[0], ys - a[1], zs - a[2]
            t = dx * (u[0] / uu) + dy * (u[1] / uu)
            t = t + dz * (u[2] / uu)
            np.clip(t, 0.0, 1.0, out=t)
            q = (dx - t * u[0]) ** 2 + (dy - t * u[1]) ** 2
            q += (dz - t * u[2]) ** 2
            np.sqrt(q, out=q)
            sd = (r0 + (r1 - r0) * t) - q
            best = sd if best is None else np.maximum(best, sd, out=best)
        return best

    def lowest_along(self, g: np.ndarray) -> float:
        return max(float(np.dot(p, g)) + r * float(np.linalg.norm(np.asarray(self.aniso) * g))
                   for p, r in zip(self.points, self.radii))
