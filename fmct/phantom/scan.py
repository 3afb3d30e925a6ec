"""Scan geometry: slice thickness, pixel size, field of view, the head's pose and centre in the
scanner (pulled into the reconstruction circle), and the head rest behind it.

Sampled once per phantom; the render grid, the resampling into slices and the noise all read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fmct.phantom.anatomy import _Anatomy, _head_outline_local
from fmct.phantom.common import _u
from fmct.phantom.settings import AnatomySettings

_THICK_MM = (4.0, 4.5, 5.0)
_THIN_MM = (0.5, 0.625, 0.75, 1.0)


@dataclass
class _Scan:
    thickness: float
    pixel: float
    size: int
    fov: float
    n_slices: int
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    rotation: np.ndarray        # head-local axes -> scanner LPS
    centre: np.ndarray          # brain centre in scanner LPS
    sub_slices: int             # sub-slices averaged per slice (partial volume)
    noise_hu: float
    kernel_fwhm: float
    background: float
    headrest: dict | None


def _sample_scan(rng: np.random.Generator, s: AnatomySettings, anat: _Anatomy, slices: str,
                 size: int, fov: float) -> _Scan:
    kind = slices if slices != "random" else ("thick" if rng.random() < 0.5 else "thin")
    thickness = float(rng.choice(_THICK_MM if kind == "thick" else _THIN_MM))
    rot = _rotation(*anat.rotation)
    centre = _fit_in_fov(anat, rot, np.asarray(anat.offset, dtype=np.float64), fov)
    semi = np.array([anat.a * (1 + anat.egg), anat.b, anat.c])
    top = centre[2] + math.sqrt(float(np.sum((rot[2] * semi) ** 2))) + _u(rng, (3.0, 10.0))
    bottom = centre[2] - anat.below
    n_slices = int(math.ceil((top - bottom) / thickness))
    pixel = fov / size
    origin = (-fov / 2 + pixel / 2, -fov / 2 + pixel / 2, bottom + thickness / 2)
    sub = max(1, int(math.ceil(thickness / 1.7))) if thickness > 1.5 else 1
    noise = min(25.0, anat.noise5 * math.sqrt(5.0 / thickness))
    headrest = _sample_headrest(rng, anat, rot, centre) if anat.headrest else None
    return _Scan(thickness, pixel, size, fov, n_slices, (pixel, pixel, thickness), origin, rot, centre, sub,
                 noise, anat.kernel_fwhm, anat.background, headrest)


def _fit_in_fov(anat: _Anatomy, rot: np.ndarray, centre: np.ndarray, fov: float) -> np.ndarray:
    """Pull the head towards the isocentre until its skin is inside the reconstruction circle
    (technologists centre the head; a clipped skull would be a different, rarer problem)."""
    local = _head_outline_local(anat, margin=2.0)
    scanned = local[:, 2] > -anat.below - 10.0
    for t in np.linspace(1.0, 0.0, 11):
        moved = np.array([centre[0] * t, centre[1] * t, centre[2]])
        pts = moved + local[scanned] @ rot.T
        if np.hypot(pts[:, 0], pts[:, 1]).max() <= fov / 2 - 5.0:
            return moved
    return np.array([0.0, 0.0, centre[2]])


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-local -> scanner. Yaw about S, pitch about L (positive tips the chin down), roll about P."""
    y, p, r = np.radians([yaw, pitch, roll])
    rz = np.array([[math.cos(y), -math.sin(y), 0], [math.sin(y), math.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(r), 0, math.sin(r)], [0, 1, 0], [-math.sin(r), 0, math.cos(r)]])
    return rz @ rx @ ry


def _sample_headrest(rng: np.random.Generator, anat: _Anatomy, rot: np.ndarray, centre: np.ndarray) -> dict:
    """A curved head holder behind the occiput: a real-scanner object the model must ignore."""
    semi = np.array([anat.a * (1 + anat.egg), anat.b, anat.c_down])      # the neck may reach further back
    back = centre[1] + math.sqrt(float(np.sum((rot[1] * semi) ** 2)))
    radius = _u(rng, (110.0, 150.0))
    thick = _u(rng, (3.0, 6.0))
    gap = _u(rng, (3.0, 15.0))
    return {"x": float(centre[0]), "y": back + gap + thick / 2 - radius, "radius": radius,
            "thickness": thick, "hu": _u(rng, (50.0, 300.0))}
