"""One study's result folder: findings.json, a saliency NIfTI per explained finding, report.png.

Shared by `fmct analyze` on one CT and on a batch, so both write exactly the same thing.
Saliency maps are stored as uint8 (0-255, 255 = the strongest attribution in that CT): on a
512x512x40 CT that writes in 0.1 s and 0.3 MB instead of 1.2 s and 16 MB as gzipped float32,
which is what kept a GPU batch waiting on its writers, and looks the same on screen.
findings.json is written last and atomically: its presence means the folder is complete,
which is what a resumed batch relies on to skip a study.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fmct import __version__
from fmct.atomic import write_text_atomic
from fmct.volume import Volume

FINDINGS_FILE = "findings.json"
SALIENCY_MAX = 255  # stored value of the strongest attribution; divide by it for the [0, 1] map


def quantize_saliency(saliency: Volume) -> Volume:
    """A [0, 1] saliency map as uint8 0..SALIENCY_MAX on the same grid (error at most 1/510)."""
    levels = np.clip(saliency.array, 0.0, 1.0) * np.float32(SALIENCY_MAX) + np.float32(0.5)  # round half up
    return saliency.with_array(levels.astype(np.uint8))


def write_study_outputs(
    out: str | Path,
    volume: Volume,
    result: Any,
    model_name: str,
    device: str,
    backend: str = "torch",
    save_ct: bool = False,
    report: bool = True,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Write the folder for one analysed CT; returns the findings.json payload and the files written.

    result is an fmct.analyze.AnalysisResult whose saliency maps are already on the CT's grid.
    """
    from fmct.io import write_volume

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if save_ct:
        written.append(write_volume(volume, out / "ct.nii.gz"))
    for name, sal in result.saliency.items():
        written.append(write_volume(quantize_saliency(sal), out / f"saliency_{name}.nii.gz"))
    if report:
        from fmct.report import write_report

        written.append(write_report(volume, result, out / "report.png", model_name))
    payload = {
        "model": model_name,
        "fmct_version": __version__,
        "device": device,
        "backend": backend,
        "explain_method": result.method,
        "input": {
            "size_xyz": list(volume.size),
            "spacing_mm_xyz": [round(s, 4) for s in volume.spacing],
            "series_description": volume.meta.get("series_description"),
            "gantry_tilt_deg": volume.meta.get("gantry_tilt_deg"),
        },
        "findings": [f.to_dict() for f in result.findings],
        "saliency_files": {n: f"saliency_{n}.nii.gz" for n in result.saliency},
        "saliency_scale": f"uint8, 0 = none, {SALIENCY_MAX} = the strongest attribution in this CT",
        "timings": {k: round(v, 3) for k, v in (timings if timings is not None else result.timings).items()},
    }
    target = write_text_atomic(out / FINDINGS_FILE, json.dumps(payload, indent=2))
    written.insert(0, target)
    return payload, written


def read_findings(folder: str | Path) -> dict[str, Any] | None:
    """The findings.json payload of a finished study folder, or None when there is none (or it is unreadable)."""
    path = Path(folder) / FINDINGS_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and isinstance(payload.get("findings"), list) else None
