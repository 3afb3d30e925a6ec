"""Small builders for tests and self-tests: a random-weights bundle that runs in a fraction of a
second, and an oblique direction matrix.

They live in the engine, not in a test folder, because two test runners use them: the pytest
suite (Testing/) and the Slicer modules' self-tests (FMCT/FMCTLib/selftest.py), which run inside
an installed extension where Testing/ does not exist. torch is imported only by the functions
that build models, so importing this module stays cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from fmct.inference.bundle import BundleMeta
    from fmct.models import FMCTClassifier
    from fmct.preprocessing.spec import PreprocessSpec

# A task is a name (threshold 0.5) or a (name, decision threshold) pair.
TaskSpec = Union[str, "tuple[str, float]"]


def small_spec() -> "PreprocessSpec":
    """6 mm voxels on a 32^3 grid: the smallest input the tiny encoder takes."""
    from fmct.preprocessing.spec import PreprocessSpec

    return PreprocessSpec(spacing_mm=(6.0, 6.0, 6.0), size=(32, 32, 32))


def tiny_meta(tasks: Sequence[TaskSpec] = ("bleed", "fracture"), spec: "PreprocessSpec | None" = None,
              temperature: float = 1.5, name: str = "test-tiny",
              recipe: str = "random init for tests") -> "BundleMeta":
    """The metadata of a 2-block, 48-wide encoder with the given task heads."""
    from fmct.inference.bundle import BundleMeta, Task
    from fmct.models import preset

    spec = spec if spec is not None else small_spec()
    cfg = preset("tiny", img_size=spec.tensor_shape, in_chans=spec.in_channels, embed_dim=48, depth=2, num_heads=2)
    parsed = [(t, 0.5) if isinstance(t, str) else (str(t[0]), float(t[1])) for t in tasks]
    return BundleMeta(
        name=name, encoder=cfg, preprocessing=spec,
        tasks=[Task(task, f"test task {task}", threshold=threshold, temperature=temperature)
               for task, threshold in parsed],
        provenance={"recipe": recipe},
    )


def tiny_bundle(path: str | Path, seed: int = 0, **meta_options) -> "tuple[Path, FMCTClassifier, BundleMeta]":
    """Save a random-weights bundle at path (a folder, or a .zip); returns (path, model, meta).

    meta_options go to tiny_meta (tasks, spec, temperature, name, recipe). With thresholds near
    0 or 1 the decisions are certain whatever the random logits, which is what tests of the
    plumbing (not of the model) want.
    """
    import torch

    from fmct.inference.bundle import save_bundle
    from fmct.models import FMCTClassifier

    torch.manual_seed(seed)
    meta = tiny_meta(**meta_options)
    model = FMCTClassifier(meta.encoder, len(meta.tasks)).eval()
    return save_bundle(model, meta, Path(path)), model, meta


def oblique_direction(degrees: float = 20.0) -> np.ndarray:
    """An orthonormal direction rotated about S then L: no axis is aligned with the scanner's."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx
