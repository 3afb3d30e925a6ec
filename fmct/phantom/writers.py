"""`write_phantom_set`: a folder of phantoms as a dataset (NIfTI or DICOM per case, masks,
info.json, labels.csv) that `fmct.data.manifests.load_manifest` reads like any other labelled folder.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np

from fmct.conventions.errors import Cancelled, ConfigError
from fmct.phantom.generate import Phantom, make_phantom
from fmct.phantom.settings import AnatomySettings
from fmct.conventions.tasks import TASKS


def write_phantom_set(
    out_dir: str | Path,
    n: int,
    seed: int,
    *,
    fmt: str = "nifti",
    slices: str = "random",
    in_plane_size: int = 512,
    anatomy: str | AnatomySettings = "default",
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Path:
    """A folder of phantoms as a dataset: one case folder each, masks, and labels.csv.

    Each case gets <case_id>/ct.nii.gz (or a DICOM series in <case_id>/ct/), mask_<task>.nii.gz
    for every positive task (uint8, same grid) and info.json; labels.csv lists case_id, path
    (relative to out_dir), one 0/1 column per task, slice_thickness_mm and anatomy. Case seeds
    are derived from `seed`, so the set is reproducible and cases differ.
    """
    if fmt not in ("nifti", "dicom"):
        raise ConfigError(f"Unknown phantom format {fmt!r}: use 'nifti' or 'dicom'.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(int(n)):
        if cancel is not None and cancel():
            raise Cancelled("Writing phantoms was cancelled.")
        case_id = f"phantom_{i:05d}"
        case_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        ph = make_phantom(case_seed, slices=slices, in_plane_size=in_plane_size, anatomy=anatomy)
        rel = _write_case(out / case_id, case_id, ph, fmt, case_seed)
        rows.append({"case_id": case_id, "path": f"{case_id}/{rel}", **ph.labels,
                     "slice_thickness_mm": ph.info["slice_thickness_mm"], "anatomy": ph.info["anatomy"]})
        if progress is not None:
            progress((i + 1) / n, f"phantom {i + 1}/{n}")
    _write_labels_csv(out / "labels.csv", rows)
    return out


def _write_case(case_dir: Path, case_id: str, ph: Phantom, fmt: str, case_seed: int) -> str:
    from fmct.reading.files import write_volume

    case_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "dicom":
        from fmct.reading.dicom import write_dicom_series

        write_dicom_series(ph.volume, case_dir / "ct", series_description=f"FMCT phantom {case_id}",
                           shuffle_names_seed=case_seed)
        rel = "ct"
    else:
        write_volume(ph.volume, case_dir / "ct.nii.gz")
        rel = "ct.nii.gz"
    for task, mask in ph.masks.items():
        write_volume(ph.volume.with_array(mask.astype(np.uint8)), case_dir / f"mask_{task}.nii.gz")
    (case_dir / "info.json").write_text(json.dumps(ph.info, indent=1))
    return rel


def _write_labels_csv(path: Path, rows: list[dict]) -> None:
    columns = ["case_id", "path", *TASKS, "slice_thickness_mm", "anatomy"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
