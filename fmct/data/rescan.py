"""CT-level training augmentation: one random, label-preserving rescan of a CT (issue #12 item 2).

The one place where a variation is chosen at random; the demo recipe (`fmct.train.demo_model`,
training phantoms) and `fmct finetune` (training studies, before preprocessing) both call
`random_variation`. The variations themselves are `fmct.phantom.variations` (they apply to any CT).

Only changes that keep every label true are drawn: the head moved by at most 5 mm and turned by
at most 5 degrees, at most 2 cm cut from the vertex or 1.5 cm from the neck (only when the slices
run foot to head, k pointing superior, so "top" means the vertex; a lesion lying wholly in the top
2 cm of the head could lose all of itself, which the labels cannot know: rare, but possible), a
smoother or sharper kernel, a little more noise, thicker slices (up to 5 mm, only from thin ones).
Never a head-size change, contrast, or a crop to the vertex: those make another patient or another
study, which the labels would no longer describe.
"""
from __future__ import annotations

import math

import numpy as np

from fmct.phantom import variations
from fmct.reading.volume import Volume

KINDS = ("rigid", "cut", "kernel", "noise", "thicker_slices")
MAX_ANGLE_DEG = 5.0
MAX_SHIFT_MM = 5.0
MAX_VERTEX_CUT_MM = 20.0
MAX_NECK_CUT_MM = 15.0
MAX_SLICE_MM = 5.0


def random_variation(volume: Volume, rng: np.random.Generator) -> tuple[Volume, dict]:
    """`volume` rescanned with one variation drawn from `rng`, and a record of what was drawn.

    Deterministic given the generator's state: seed it from (seed, epoch, index) or from the case
    seed and training repeats exactly.
    """
    axial_up = float(volume.direction[2, 2]) > 0.9  # LPS: the k axis points superior
    kinds = [k for k in KINDS if (k != "thicker_slices" or 2 * volume.spacing[2] <= MAX_SLICE_MM + 1e-6)
             and (k != "cut" or axial_up)]
    kind = str(rng.choice(kinds))
    if kind == "rigid":
        axis = rng.normal(size=3)
        angle = float(rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG))
        shift = rng.normal(size=3)
        shift *= float(rng.uniform(0.0, MAX_SHIFT_MM)) / float(np.linalg.norm(shift))
        return variations.rigid(volume, angle, axis, shift), {"kind": kind, "angle_deg": angle, "shift_mm": shift.tolist()}
    if kind == "cut":
        if rng.random() < 0.5:
            mm = float(rng.uniform(0.0, MAX_VERTEX_CUT_MM))
            return variations.cut(volume, superior_mm=mm), {"kind": kind, "vertex_mm": mm}
        mm = float(rng.uniform(0.0, MAX_NECK_CUT_MM))
        return variations.cut(volume, inferior_mm=mm), {"kind": kind, "neck_mm": mm}
    if kind == "kernel":
        if rng.random() < 0.5:
            sigma = float(rng.uniform(0.3, 0.9))
            return variations.kernel(volume, sigma), {"kind": kind, "smooth_sigma_mm": sigma}
        amount = float(rng.uniform(0.3, 1.0))
        return variations.kernel(volume, 0.7, sharpen=amount), {"kind": kind, "sharpen": amount}
    if kind == "noise":
        sigma = float(rng.uniform(2.0, 8.0))
        return variations.noise(volume, sigma, rng), {"kind": kind, "sigma_hu": sigma}
    top = max(2, int(math.floor(MAX_SLICE_MM / volume.spacing[2] + 1e-6)))
    factor = int(rng.integers(2, top + 1))
    return variations.thicker_slices(volume, factor), {"kind": kind, "factor": factor}
