"""Small builders shared by the tests: tiny bundles and simple synthetic CTs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmct.bundle import BundleMeta, Task, save_bundle
from fmct.models import FMCTClassifier, preset
from fmct.preprocess import PreprocessSpec
from fmct.volume import Volume

SMALL_SPEC = PreprocessSpec(spacing_mm=(6.0, 6.0, 6.0), size=(32, 32, 32))


def tiny_meta(tasks=("bleed", "fracture"), spec: PreprocessSpec = SMALL_SPEC) -> BundleMeta:
    cfg = preset("tiny", img_size=spec.tensor_shape, embed_dim=48, depth=2, num_heads=2)
    return BundleMeta(
        name="test-tiny", encoder=cfg, preprocessing=spec,
        tasks=[Task(t, f"test task {t}", threshold=0.5, temperature=1.5) for t in tasks],
        provenance={"recipe": "random init for tests"},
    )


def tiny_bundle(path: Path, seed: int = 0, **kw) -> tuple[Path, FMCTClassifier, BundleMeta]:
    torch.manual_seed(seed)
    meta = tiny_meta(**kw)
    model = FMCTClassifier(meta.encoder, len(meta.tasks)).eval()
    return save_bundle(model, meta, path), model, meta


def oblique_direction(degrees: float = 20.0) -> np.ndarray:
    """Rotation about the S axis then the L axis: a non-trivial, orthonormal direction."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def ball_ct(shape_zyx=(40, 96, 96), spacing=(2.0, 2.0, 4.0), direction=None, origin=(-90.0, -100.0, -80.0),
            ball_center_ijk=None, ball_radius_mm=15.0) -> tuple[Volume, np.ndarray]:
    """A head-like ellipsoid (40 HU) in air with a bright ball; returns the CT and the ball mask."""
    direction = np.eye(3) if direction is None else direction
    k, j, i = np.indices(shape_zyx)
    cz, cy, cx = (np.array(shape_zyx) - 1) / 2
    sx, sy, sz = spacing
    head = ((i - cx) * sx / 70) ** 2 + ((j - cy) * sy / 85) ** 2 + ((k - cz) * sz / 70) ** 2 < 1
    bc = ball_center_ijk or (cx + 12 / sx, cy - 15 / sy, cz + 8 / sz)
    ball = ((i - bc[0]) * sx) ** 2 + ((j - bc[1]) * sy) ** 2 + ((k - bc[2]) * sz) ** 2 < ball_radius_mm**2
    arr = np.full(shape_zyx, -1000.0, np.float32)
    arr[head] = 40.0
    arr[ball] = 300.0
    return Volume(arr, spacing, origin, direction), ball
