"""Integrated-Gradients baselines: the input an attribution is measured against.

IG explains logit(CT) - logit(baseline). With an all-air (zero) baseline that is "why this CT
differs from an empty volume", and the demo model calls the empty volume a bleed (any_hemorrhage
0.98): the map then explains the difference between two positives, through path points no CT
looks like. The baseline here is the same head made normal: its intracranial content replaced by
uniform normal brain density (30 HU: no blood, no CSF spaces, no shift), its skull closed (a
fracture's gap filled with the head's own bone density); scalp, air and everything outside the
skull are the CT's own. Chosen by measurement (benchmarks/bench_saliency.py --part baseline):
the demo model scores it below every task's threshold on the benchmark's cases, where the zero
baseline is above threshold for the bleeds and mass effect.

It is computed on the model grid from the windowed channels alone (an HU estimate is read back
from the windows), so it works for any bundle's windows. numpy and SimpleITK only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BASELINES = ("normal_head", "zero")
DEFAULT_BASELINE = "normal_head"
NORMAL_BRAIN_HU = 30.0  # grey/white matter average: what the intracranial space holds in the baseline
BONE_HU = 300.0  # above this a voxel is skull


def hu_from_channels(x: np.ndarray, windows: Sequence) -> np.ndarray:
    """An HU estimate [D, H, W] from windowed channels [C, D, H, W] (each (hu - low) / width, clipped to [0, 1]).

    Each voxel is read from the narrowest window that does not clip it (the finest resolution);
    a voxel clipped in every window takes the widest window's end.
    """
    order = sorted(range(len(windows)), key=lambda i: windows[i].width, reverse=True)
    widest = windows[order[0]]
    hu = (widest.center - widest.width / 2.0) + x[order[0]].astype(np.float32) * widest.width
    for i in order[1:]:  # narrower windows overwrite where they see the voxel unclipped
        w, v = windows[i], x[i]
        inside = (v > 0.0) & (v < 1.0)
        hu = np.where(inside, (w.center - w.width / 2.0) + v * w.width, hu)
    return hu.astype(np.float32)


def channels_from_hu(hu: np.ndarray, windows: Sequence) -> np.ndarray:
    return np.stack([w.apply(hu) for w in windows]).astype(np.float32)


def skull_and_intracranial(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The closed skull (gaps of a fracture bridged) and the space it encloses, slice by slice, as bool [D, H, W]."""
    import SimpleITK as sitk

    bone = sitk.GetImageFromArray((hu > BONE_HU).astype(np.uint8))
    closed = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(bone, [2, 2, 2])).astype(bool)
    closed |= hu > BONE_HU
    inside = np.zeros_like(closed)
    for k in range(closed.shape[0]):  # axial slices: the skull is a ring in each, the foramen magnum below
        if closed[k].any():
            filled = sitk.BinaryFillhole(sitk.GetImageFromArray(closed[k].astype(np.uint8)))
            inside[k] = sitk.GetArrayFromImage(filled).astype(bool) & ~closed[k]
    return closed, inside


def normal_head_baseline(x: np.ndarray, windows: Sequence) -> np.ndarray:
    """The CT's own head made normal, as channels [C, D, H, W] like x: intracranial space at NORMAL_BRAIN_HU,
    the skull closed at the head's median bone density, the rest of x unchanged."""
    hu = hu_from_channels(x, windows)
    skull, inside = skull_and_intracranial(hu)
    if not inside.any():  # no closed skull on any slice (not a head CT, or cut too tight): air is all there is
        return np.zeros_like(x, dtype=np.float32)
    base = hu.copy()
    base[inside] = NORMAL_BRAIN_HU
    bone = hu[hu > BONE_HU]
    base[skull] = np.maximum(hu[skull], float(np.median(bone))) if bone.size else hu[skull]
    out = channels_from_hu(base, windows)
    keep = ~(skull | inside)
    out[:, keep] = x[:, keep]
    return out


def make_baseline(name: str, x: np.ndarray, windows: Sequence) -> np.ndarray:
    """The named baseline for x [C, D, H, W] (see BASELINES)."""
    if name == "zero":
        return np.zeros_like(x, dtype=np.float32)
    if name == "normal_head":
        return normal_head_baseline(x, windows)
    raise ValueError(f"unknown IG baseline '{name}'; choose one of {', '.join(BASELINES)}")
