"""Small builders shared by the tests: tiny bundles, simple synthetic CTs, one CT stored another way.

The one home for helpers of more than one test module (fixtures are in conftest.py); test modules never import
from each other."""
from __future__ import annotations

import numpy as np

from fmct.phantom.fixtures import oblique_direction, small_spec, tiny_bundle, tiny_meta  # noqa: F401  (one definition, shared with the Slicer self-tests)
from fmct.reading.volume import Volume

SMALL_SPEC = small_spec()


def ball_ct(shape_zyx=(40, 96, 96), spacing=(2.0, 2.0, 4.0), direction=None, origin=(-90.0, -100.0, -80.0),
            ball_center_ijk=None, ball_radius_mm=15.0, skull_mm=6.0) -> tuple[Volume, np.ndarray]:
    """A head-like ellipsoid (40 HU) inside a skull shell (1200 HU, skull_mm thick) in air with a bright ball;
    returns the CT and the ball mask. The skull makes it pass fmct.checks' head checks (skull_mm=0: none)."""
    direction = np.eye(3) if direction is None else direction
    k, j, i = np.indices(shape_zyx)
    cz, cy, cx = (np.array(shape_zyx) - 1) / 2
    sx, sy, sz = spacing
    head = ((i - cx) * sx / 70) ** 2 + ((j - cy) * sy / 85) ** 2 + ((k - cz) * sz / 70) ** 2 < 1
    inner = (((i - cx) * sx / (70 - skull_mm)) ** 2 + ((j - cy) * sy / (85 - skull_mm)) ** 2
             + ((k - cz) * sz / (70 - skull_mm)) ** 2 < 1)
    bc = ball_center_ijk or (cx + 12 / sx, cy - 15 / sy, cz + 8 / sz)
    ball = ((i - bc[0]) * sx) ** 2 + ((j - bc[1]) * sy) ** 2 + ((k - bc[2]) * sz) ** 2 < ball_radius_mm**2
    arr = np.full(shape_zyx, -1000.0, np.float32)
    arr[head] = 1200.0
    arr[inner] = 40.0
    arr[ball] = 300.0
    return Volume(arr, spacing, origin, direction), ball


def stored(volume: Volume, axes: tuple[int, int, int], signs: tuple[int, int, int]) -> Volume:
    """The same voxels at the same physical places, with ITK axis a of the new grid = input axis axes[a]."""
    size = np.asarray(volume.size)
    first = np.array([0 if signs[a] > 0 else size[axes[a]] - 1 for a in range(3)])
    index0 = np.zeros(3)
    index0[list(axes)] = first
    origin = np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * index0)
    array = np.transpose(volume.array, [2 - axes[2], 2 - axes[1], 2 - axes[0]])
    flips = tuple(2 - a for a in range(3) if signs[a] < 0)
    array = np.ascontiguousarray(np.flip(array, axis=flips) if flips else array)
    direction = volume.direction[:, list(axes)] * np.asarray(signs)
    spacing = tuple(np.asarray(volume.spacing)[list(axes)])
    return Volume(array, spacing, origin, direction, dict(volume.meta))
