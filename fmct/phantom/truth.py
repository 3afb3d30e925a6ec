"""Ground truth and records: labels from the plan, masks decoded from the lesion bits, and the
JSON-serialisable info (seed, geometry, lesion centres in scanner LPS mm, ...).
"""
from __future__ import annotations

import numpy as np

from fmct.phantom.anatomy import _Anatomy
from fmct.phantom.findings import _LESION_BIT, _MIDLINE_BIT
from fmct.phantom.scan import _Scan
from fmct.phantom.scene import _Scene
from fmct.conventions.tasks import HEMORRHAGE_TYPES, TASKS


def _masks_and_labels(out_bits: np.ndarray, scene: _Scene) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Labels from the plan; masks decoded from the lesion bits (only inside their bounding box)."""
    plan = scene.plan
    labels = {t: 0 for t in TASKS}
    selections: dict[str, int] = {}
    for name, bit in _LESION_BIT.items():
        if name in plan.findings:
            labels[name] = 1
            selections[name] = bit
    hemorrhages = [t for t in HEMORRHAGE_TYPES if labels[t]]
    if hemorrhages:
        labels["any_hemorrhage"] = 1
        selections["any_hemorrhage"] = sum(_LESION_BIT[t] for t in hemorrhages)
    if plan.cause is not None:
        labels["mass_effect"] = 1
        selections["mass_effect"] = _MIDLINE_BIT | _LESION_BIT[plan.cause]
        if plan.shift_mm >= 5.0:
            labels["midline_shift"] = 1
            selections["midline_shift"] = selections["mass_effect"]
    where = np.flatnonzero(out_bits)            # lesions are a few percent of the volume
    values = out_bits.ravel()[where]
    masks = {}
    for name, bits in selections.items():
        mask = np.zeros(out_bits.shape, dtype=bool)
        mask.ravel()[where[(values & bits) != 0]] = True
        masks[name] = mask
    return masks, labels


def _info(seed: int, anatomy_name: str, anat: _Anatomy, scan: _Scan, scene: _Scene, labels: dict[str, int]) -> dict:
    lesions = {}
    for name, info in scene.lesion_info.items():
        entry = dict(info)
        local = entry.pop("centre_local_mm", None)
        if local is not None:
            entry["centre_mm"] = [round(float(v), 2) for v in scan.centre + scan.rotation @ np.asarray(local)]
        lesions[name] = _jsonable(entry, ndigits=2)
    return _jsonable({
        "seed": int(seed), "anatomy": anatomy_name, "findings": sorted(t for t, v in labels.items() if v),
        "slice_thickness_mm": scan.thickness, "spacing_mm": list(scan.spacing), "shape_zyx": [scan.n_slices, scan.size, scan.size],
        "in_plane_size": scan.size, "fov_mm": scan.fov, "shift_mm": round(scene.plan.shift_mm, 2),
        "shift_direction": "right" if scene.shift < 0 else "left" if scene.shift > 0 else None,
        "mass_effect_cause": scene.plan.cause, "noise_hu": round(scan.noise_hu, 2), "kernel_fwhm_mm": round(scan.kernel_fwhm, 2),
        "rotation_deg": [round(v, 2) for v in anat.rotation], "head_centre_mm": [round(float(v), 2) for v in scan.centre],
        "head_semi_axes_mm": [round(v, 1) for v in (anat.a, anat.b, anat.c)], "atrophy": round(anat.atrophy, 3),
        "ventricle_scale": round(anat.vent_scale, 3), "skull_thickness_mm": round(anat.skull_t, 2),
        "grey_white_hu": [round(anat.hu["gm"], 1), round(anat.hu["wm"], 1)], "headrest": scan.headrest is not None,
        "tissue_hu": {k: round(anat.hu[k], 1) for k in ("gm", "wm", "csf", "nuclei", "bone", "diploe", "fat", "muscle")},
        "mastoid_air_cells": anat.mastoid is not None, "sutures": anat.sutures is not None,
        "lesions": lesions,
    })


def _jsonable(obj, ndigits: int | None = None):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, ndigits) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if ndigits is None else round(float(obj), ndigits)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj
