"""One study's result folder: findings.json, a saliency NIfTI per explained finding, report.png.

Shared by `fmct analyze` on one CT and on a batch, so both write exactly the same thing.
Saliency maps are stored as uint8 (0-255, 255 = the strongest attribution in that CT): on a
512x512x40 CT that writes in 0.1 s and 0.3 MB instead of 1.2 s and 16 MB as gzipped float32,
which is what kept a GPU batch waiting on its writers, and looks the same on screen.
findings.json is written last and atomically: its presence means the folder is complete,
which is what a resumed batch relies on to skip a study.

A result folder never mixes two studies: findings.json records a fingerprint of the CT (a hash of
its grid and of a fixed sample of its voxels, nothing identifying), and a folder holding another
study's results is refused unless overwrite=True (`--overwrite`). Before a study is written, every
file FMCT writes there (findings.json first, so the folder reads as incomplete meanwhile) is removed;
files of other programs are left alone. findings.json also records the model (name, weights and
config hashes) and the output options, so a resumed batch redoes a study analyzed otherwise.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fmct.conventions.version import code_version
from fmct.conventions.atomic import write_text_atomic
from fmct.conventions.errors import BundleError, OutputFolderError
from fmct.reading.volume import Volume

FINDINGS_FILE = "findings.json"
SALIENCY_MAX = 255  # stored value of the strongest attribution; divide by it for the [0, 1] map
FMCT_FILES = ("ct.nii.gz", "report.png", "saliency_*.nii.gz")  # what FMCT writes beside findings.json
FINGERPRINT_SAMPLES = 1 << 16


def study_fingerprint(volume: Volume) -> str:
    """A hash of the CT's grid and of a fixed sample of its voxels: the same CT, however often it is
    read, gives the same value; another CT practically never does. Reveals nothing about the patient."""
    a = volume.array
    h = hashlib.sha256()
    h.update(json.dumps([list(a.shape), [round(v, 3) for v in volume.spacing], [round(v, 3) for v in volume.origin],
                         np.round(volume.direction, 4).ravel().tolist()]).encode())
    if a.size:
        idx = np.unique(np.linspace(0, a.size - 1, min(a.size, FINGERPRINT_SAMPLES)).astype(np.int64))
        h.update(np.round(np.asarray(a.flat[idx], np.float64), 2).tobytes())
    return h.hexdigest()


def source_key(path: str | Path) -> str:
    """A hash of where a study was read from (its resolved path), so a resumed batch notices another input."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()


def check_output_folder(out: str | Path, flag: str = "--out") -> None:
    """Refuse, before any CT is read, an output folder that cannot be created or written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{flag} {out} is a file, not a folder. Give a folder (it is created if needed).")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise OutputFolderError(f"{flag} {out} cannot be created: {existing} is a file, not a folder. Give another "
                                "output folder.")
    if existing == out:
        try:  # the only sure test (ACLs, read-only mounts): write a file
            with tempfile.TemporaryFile(dir=out, prefix=".fmct-write-test-"):
                pass
        except OSError as e:
            raise OutputFolderError(f"cannot write into the output folder {out} ({e.strerror}). Give a folder you "
                                    "may write to, or fix its permissions.") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"cannot write into {existing}, so the output folder {out} cannot be created. Give a "
                                "folder you may write to, or fix its permissions.")


def check_study_folder(out: str | Path, fingerprint: str, overwrite: bool = False) -> None:
    """Refuse a folder holding the results of another study (unless overwrite): results never mix."""
    out = Path(out)
    done = read_findings(out)
    if done is None and (out / FINDINGS_FILE).exists():
        done = {}
    if done is None or overwrite:
        return
    if (done.get("input") or {}).get("fingerprint") != fingerprint:
        raise OutputFolderError(
            f"{out} holds the results of another study (its findings.json is of a different CT). Give another "
            "--out folder, or add --overwrite to replace those results.")


def clear_study_outputs(out: Path) -> None:
    """Remove what FMCT wrote into a study folder (findings.json first); leave anything else alone."""
    (out / FINDINGS_FILE).unlink(missing_ok=True)
    for pattern in FMCT_FILES:
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()


def quantize_saliency(saliency: Volume) -> Volume:
    """A [0, 1] saliency map as uint8 0..SALIENCY_MAX on the same grid (error at most 1/510); uint8 is kept."""
    if saliency.array.dtype == np.uint8:  # already quantised (Analyzer.map_back writes uint8 directly)
        return saliency
    levels = np.clip(saliency.array, 0.0, 1.0) * np.float32(SALIENCY_MAX) + np.float32(0.5)  # round half up
    return saliency.with_array(levels.astype(np.uint8))


# A CT above this many voxels has its files written one at a time: SimpleITK copies each map to
# write it (1 GB for a 1024 x 1024 x 1000 CT), and memory, not time, is then what to spare.
PARALLEL_WRITE_MAX_VOXELS = 256 << 20


def _write_saliency(saliency: Volume, path: Path) -> Path:
    from fmct.reading.files import write_volume

    return write_volume(quantize_saliency(saliency), path)


def _run_writes(jobs: list[Callable[[], Path]], threads: int | None, voxels: int) -> list[Path]:
    """Run the file writes, several at once when asked: SimpleITK releases the GIL while it compresses,
    so on 2 cores four gzipped maps of a thin CT take 0.55x the time (benchmarks/RESULTS.md, section 19)."""
    if threads is None:
        threads = min(len(jobs), os.cpu_count() or 1) if voxels <= PARALLEL_WRITE_MAX_VOXELS else 1
    if threads <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fmct-write") as pool:
        return list(pool.map(lambda job: job(), jobs))  # in order; the first failure is raised after all end


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
    overwrite: bool = False,
    model_id: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    source: str | None = None,
    threads: int | None = 1,
) -> tuple[dict[str, Any], list[Path]]:
    """Write the folder for one analysed CT; returns the findings.json payload and the files written.

    result is an fmct.inference.analyze.AnalysisResult whose saliency maps are already on the CT's grid.
    A folder holding another study's results is refused unless overwrite; FMCT's earlier files in
    it are removed first. A probability that is not finite is an error, never written.
    threads: files written at once (None: as many as there are cores and files, see _run_writes);
    a batch keeps 1, since its writer threads already run beside the model.
    """
    from fmct.reading.files import write_volume

    for f in result.findings:
        if not (isinstance(f.probability, (int, float)) and math.isfinite(f.probability)):
            raise BundleError(f"the model gave {f.probability!r} for '{f.name}', not a finite probability: its weights "
                              "or its ONNX graph are broken. No result was written; use another bundle.")
    out = Path(out)
    fingerprint = study_fingerprint(volume)
    check_study_folder(out, fingerprint, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(f"cannot create the output folder {out} ({e.strerror}).") from None
    clear_study_outputs(out)
    jobs: list[Callable[[], Path]] = []
    if save_ct:
        jobs.append(partial(write_volume, volume, out / "ct.nii.gz"))
    for name, sal in result.saliency.items():
        jobs.append(partial(_write_saliency, sal, out / f"saliency_{name}.nii.gz"))
    if report:
        from fmct.inference.report_png import write_report

        jobs.append(partial(write_report, volume, result, out / "report.png", model_name))
    written = _run_writes(jobs, threads, volume.array.size)
    payload = {
        "model": model_name,
        "fmct_version": code_version(),
        "device": device,
        "backend": backend,
        "explain_method": result.method,
        "input": {
            "size_xyz": list(volume.size),
            "spacing_mm_xyz": [round(s, 4) for s in volume.spacing],
            "series_description": volume.meta.get("series_description"),
            "gantry_tilt_deg": volume.meta.get("gantry_tilt_deg"),
            "fingerprint": fingerprint,
            "source_sha256": source,
        },
        "model_id": model_id,
        "options": options,
        "findings": [f.to_dict() for f in result.findings],
        "out_of_distribution": result.ood,
        "warning": result.warning,
        "saliency_files": {n: f"saliency_{n}.nii.gz" for n in result.saliency},
        "saliency_scale": f"uint8, 0 = none, {SALIENCY_MAX} = the strongest attribution in this CT",
        "timings": {k: round(v, 3) for k, v in (timings if timings is not None else result.timings).items()},
    }
    target = write_text_atomic(out / FINDINGS_FILE, json.dumps(payload, indent=2, allow_nan=False))
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
