"""A calibrated CT: air near -1000 HU, soft tissue (brain, CSF, muscle) near 0-80 HU, bone above ~700 HU.

Values stored x10, an MR, inverted or rescale-broken pixels can pass the readers' range checks;
these three landmarks of any head CT cannot all be right by chance. Measured on the strided copy,
so padding outside the reconstruction circle (a constant far below air) is left out.
"""
from __future__ import annotations

import numpy as np

from fmct.checks.result import Check
from fmct.checks.sample import Sample

AIR_RANGE_HU = (-1150.0, -850.0)  # the median of everything below -500 HU (outside the head, sinuses)
MIN_AIR_SHARE = 0.01
TISSUE_WINDOW_HU = (-100.0, 250.0)  # where the soft-tissue peak is looked for
TISSUE_RANGE_HU = (0.0, 80.0)  # brain 20-45, CSF 0-15, muscle 40-60: the peak lies here
BONE_MIN_HU = 700.0  # the densest 0.5% of the body's voxels: cortical bone is 1000-2000 HU
BONE_QUANTILE = 0.995
NAME = "calibrated CT"
TODO = " Export the original CT in Hounsfield units (rescale slope and intercept applied once)."


def check_calibration(sample: Sample) -> Check:
    """Air, soft tissue and bone where a CT in Hounsfield units has them; refuses otherwise."""
    values = sample.array[~sample.outside] if sample.padding is not None else sample.array.ravel()
    low = values[values < -500.0]
    air = float(np.median(low)) if low.size >= MIN_AIR_SHARE * values.size else None
    body = values[values > -300.0]
    bone = float(np.quantile(body, BONE_QUANTILE)) if body.size else None
    window = values[(values >= TISSUE_WINDOW_HU[0]) & (values <= TISSUE_WINDOW_HU[1])]
    tissue = None
    if window.size:
        counts, edges = np.histogram(window, bins=70, range=TISSUE_WINDOW_HU)
        tissue = float(edges[np.argmax(counts)] + (edges[1] - edges[0]) / 2)
    value = {"air_hu": _round(air), "soft_tissue_peak_hu": _round(tissue), "bone_hu": _round(bone)}
    limit = {"air_hu": list(AIR_RANGE_HU), "soft_tissue_peak_hu": list(TISSUE_RANGE_HU), "bone_hu": f">= {BONE_MIN_HU:g}"}
    problems = []
    if air is None:
        problems.append("almost no voxel is below -500 HU (no air around the head)")
    elif not AIR_RANGE_HU[0] <= air <= AIR_RANGE_HU[1]:
        problems.append(f"air lies at {air:.0f} HU (expected about -1000)")
    if tissue is None or not TISSUE_RANGE_HU[0] <= tissue <= TISSUE_RANGE_HU[1]:
        shown = "no soft tissue between -100 and 250 HU" if tissue is None else f"soft tissue peaks at {tissue:.0f} HU"
        problems.append(f"{shown} (expected brain and CSF at 0-80)")
    if bone is None or bone < BONE_MIN_HU:
        problems.append(f"no bone above {BONE_MIN_HU:g} HU (densest 0.5%: {bone if bone is None else round(bone)} HU)")
    if problems:
        return Check(NAME, False, value, limit, "not a calibrated CT: " + "; ".join(problems) + "." + TODO)
    return Check(NAME, True, value, limit, f"air {air:.0f} HU, soft tissue {tissue:.0f} HU, bone {bone:.0f} HU")


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 1)
