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

import gzip
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fmct.conventions.version import code_version
from fmct.conventions.atomic import disk_full_error, fsync_dir, is_disk_full, write_text_atomic
from fmct.conventions.errors import BundleError, OutputFolderError, OutputWriteError
from fmct.conventions.locks import FileLock
from fmct.inference.results import SALIENCY_MAX  # noqa: F401 (re-exported: the Slicer module's tests read it here)
from fmct.reading.volume import Volume

FINDINGS_FILE = "findings.json"
FMCT_FILES = ("ct.nii.gz", "report.png", "saliency_*.nii.gz", "attention.nii.gz")  # what FMCT writes beside findings.json
ATTENTION_FILE = "attention.nii.gz"  # the one finding-agnostic attention map (fmct.inference.saliency.ATTENTION_KEY)


def saliency_file(key: str) -> str:
    """The file of a map: saliency_<finding>.nii.gz, or attention.nii.gz for the finding-agnostic attention map."""
    return ATTENTION_FILE if key == "attention" else f"saliency_{key}.nii.gz"


def saliency_scale_text(result: Any) -> str:
    """What a map's grey levels mean, as findings.json and the report say it."""
    if result.method and str(result.method).startswith("attention"):
        return (f"uint8, 0 = none, {SALIENCY_MAX} = the strongest attention in this CT; one finding-agnostic map, "
                "normalised on its own")
    return (f"uint8, 0 = none, {SALIENCY_MAX} = the strongest attribution among this CT's maps: one scale shared by "
            "all of them (explanation.scale.attribution_per_grey_level)")
FINGERPRINT_SAMPLES = 1 << 16
LOCK_DIR = ".fmct-locks"  # beside the study folders: out/.fmct-locks/<study folder name>.lock


NAME_MAX = 255  # bytes in one path component on every file system fmct writes to (ext4, XFS, APFS, NTFS)


def study_lock(folder: str | Path) -> FileLock:
    """The lock a process holds while it analyzes into a study folder (a batch's out/<study_id>/ or
    `fmct analyze --out`): the same file whichever command writes there. Its folder must exist.
    A study name too long for "<name>.lock" gets a shortened name with a hash of the whole."""
    folder = Path(folder)
    name = folder.name or "root"
    if len(os.fsencode(name)) + len(".lock") > NAME_MAX:  # fsencode: a Latin-1 file name's bytes too
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        name = os.fsdecode(os.fsencode(name)[:150]) + "-" + digest
    return FileLock(folder.parent / LOCK_DIR / f"{name}.lock")


@contextmanager
def locked_study_folder(out: str | Path) -> Iterator[None]:
    """Hold out's study lock (the one a batch takes for out/<study_id>/) while a single analysis runs:
    a second `fmct analyze` on the same --out, or a batch doing that study, is refused instead of
    mixing two studies' files in one folder."""
    out = Path(os.path.abspath(out))
    try:
        (out.parent / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(f"cannot create {out.parent / LOCK_DIR} for the output folder's lock ({e.strerror}). "
                                "Give an --out whose parent folder you may write to.") from None
    lock = study_lock(out)
    if not lock.acquire():
        raise OutputFolderError(f"another fmct process is writing into {out} now. Wait for it to finish, or give "
                                "another --out.")
    try:
        yield
    finally:
        lock.release()


def output_options(backend: str, explain_method: str | None, explain_findings: str | Sequence[str], save_ct: bool,
                   report: bool) -> dict[str, Any]:
    """The options that change what a study folder holds (recorded in findings.json; a resumed batch compares them)."""
    findings = explain_findings if isinstance(explain_findings, str) else ",".join(explain_findings)
    return {"backend": backend, "explain_method": explain_method, "explain_findings": findings,
            "save_ct": bool(save_ct), "report": bool(report)}


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
    return hashlib.sha256(os.fsencode(Path(path).resolve())).hexdigest()


def check_output_folder(out: str | Path, flag: str = "--out") -> None:
    """Refuse, before any CT is read, an output folder that cannot be created or written."""
    out = Path(out)
    long = [part for part in out.parts if len(os.fsencode(part)) > NAME_MAX]
    if long:
        raise OutputFolderError(f"{flag} {out} has a folder name of {len(os.fsencode(long[0]))} bytes ({long[0][:40]}...); "
                                f"file systems allow at most {NAME_MAX}. Give a shorter name.")
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
    in_the_way = [p.name for pattern in (FINDINGS_FILE, *FMCT_FILES) for p in out.glob(pattern) if p.is_dir()]
    if in_the_way:
        raise OutputFolderError(f"{out / in_the_way[0]} is a folder (or a link to one) where FMCT writes a file. Move "
                                "it away, or give another --out.")
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
            if p.is_file() or p.is_symlink() and not p.is_dir():  # a link is removed, never written through
                p.unlink()
    for p in out.glob(f"{_TMP_PREFIX}*"):  # what a killed run left half-written
        if p.is_file() and not p.is_symlink():
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


def _write_saliency(maps: Any, name: str, path: Path) -> Path:
    """Write one map, fetched from the result only now: a result whose maps are mapped back on demand
    (fmct.inference.saliency.SaliencyOnCTGrid) then holds one full-size map per writing thread, whatever
    the number of maps, and each is freed once written."""
    from fmct.reading.files import write_volume

    return write_volume(quantize_saliency(maps[name]), path)


# --------------------------------------------------------------------------------------------
# Verified writes: SimpleITK's NIfTI writer does not report a full disk (it leaves a truncated
# .nii.gz and returns), so every file is written under a hidden temp name, read back (the gzip
# stream to its end, which checks its CRC-32 and length; the NIfTI header's voxel count; a PNG's
# chunk CRCs and its end chunk), and only then renamed to its own name.
# --------------------------------------------------------------------------------------------
_TMP_PREFIX = ".fmct-partial-"
_NIFTI_HEADER = 348


class _Incomplete(Exception):
    """A written file did not read back whole."""


def _write_verified(path: Path, write: Callable[[Path], object], needed_bytes: int) -> Path:
    """write(tmp) beside path, verify tmp, fsync, rename to path; a file under its own name is whole."""
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(tmp)
        verify_written(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) or isinstance(e, _Incomplete) and _short_of_space(path.parent, needed_bytes):
            raise disk_full_error(path.parent, f"this study's files ({path.name} and the rest)", needed_bytes) from None
        if isinstance(e, _Incomplete):
            raise OutputWriteError(f"{path} was not written completely ({e}); nothing of it was kept. Check the disk "
                                   "holding it, or give another --out.") from None
        raise
    return path


def _short_of_space(folder: Path, needed_bytes: int) -> bool:
    try:
        return shutil.disk_usage(folder).free < max(needed_bytes, 1 << 20)
    except OSError:
        return True


def verify_written(path: Path) -> None:
    """Read a just-written .nii.gz, .nii or .png back; raise _Incomplete when it is not whole."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(_NIFTI_HEADER + 4)
                total = len(head)
                while chunk := f.read(1 << 22):
                    total += len(chunk)
        except (OSError, EOFError, zlib.error) as e:
            raise _Incomplete(f"its gzip stream does not read back: {e}") from None
        _check_nifti_length(head, total)
    elif name.endswith(".nii"):
        with open(path, "rb") as f:
            head = f.read(_NIFTI_HEADER + 4)
        _check_nifti_length(head, path.stat().st_size)
    elif name.endswith(".png"):
        _check_png(path.read_bytes())
    elif path.stat().st_size == 0:
        raise _Incomplete("it is empty")


def _check_nifti_length(head: bytes, total: int) -> None:
    if len(head) < _NIFTI_HEADER:
        raise _Incomplete(f"{total} bytes, shorter than a NIfTI header")
    endian = "<" if struct.unpack("<i", head[:4])[0] == _NIFTI_HEADER else ">"
    dims = struct.unpack(endian + "8h", head[40:56])
    bitpix = struct.unpack(endian + "h", head[72:74])[0]
    vox_offset = struct.unpack(endian + "f", head[108:112])[0]
    n = math.prod(max(1, d) for d in dims[1:1 + max(0, min(dims[0], 7))])
    expected = int(vox_offset) + n * max(bitpix, 8) // 8
    if total < expected:
        raise _Incomplete(f"{total} bytes of the {expected} its header announces")


def _check_png(data: bytes) -> None:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise _Incomplete("no PNG signature")
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        end = pos + 12 + length
        if end > len(data):
            break
        if zlib.crc32(data[pos + 4:end - 4]) != struct.unpack(">I", data[end - 4:end])[0]:
            raise _Incomplete(f"PNG chunk {data[pos + 4:pos + 8]!r} fails its CRC")
        if data[pos + 4:pos + 8] == b"IEND":
            return
        pos = end
    raise _Incomplete(f"the PNG ends after {len(data)} bytes, without its end chunk")


def _study_bytes(volume: Volume, save_ct: bool, n_maps: int, report: bool) -> int:
    """About what a study's files take at most (uncompressed): for the message when the disk is full."""
    n = int(volume.array.size)
    return (n * volume.array.dtype.itemsize if save_ct else 0) + n * n_maps + (256 << 10 if report else 0) + (64 << 10)


def _run_writes(jobs: list[Callable[[], Path]], threads: int | None, voxels: int) -> list[Path]:
    """Run the file writes, several at once when asked: SimpleITK releases the GIL while it compresses,
    so on 2 cores four gzipped maps of a thin CT take 0.55x the time (benchmarks/RESULTS.md#map-back)."""
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
    needed = _study_bytes(volume, save_ct, len(result.saliency), report)
    jobs: list[Callable[[], Path]] = []
    if save_ct:
        jobs.append(partial(_write_verified, out / "ct.nii.gz", partial(write_volume, volume), needed))
    for name in result.saliency:
        jobs.append(partial(_write_verified, out / saliency_file(name), partial(_write_saliency, result.saliency, name), needed))
    if report:
        from fmct.inference.report_png import write_report

        def png(tmp: Path) -> object:
            return write_report(volume, result, tmp, model_name)
        jobs.append(partial(_write_verified, out / "report.png", png, needed))
    try:
        written = _run_writes(jobs, threads, volume.array.size)
        fsync_dir(out)
        payload = _findings_payload(volume, result, model_name, device, backend, fingerprint, source, model_id,
                                    options, timings)
        # last, and only once every file above read back whole: its presence means the folder is complete
        target = write_text_atomic(out / FINDINGS_FILE, json.dumps(payload, indent=2, allow_nan=False))
    except BaseException:
        clear_study_outputs(out)  # nothing of a failed write is left looking like a result
        raise
    written.insert(0, target)
    return payload, written


def _findings_payload(volume: Volume, result: Any, model_name: str, device: str, backend: str, fingerprint: str,
                      source: str | None, model_id: dict[str, Any] | None, options: dict[str, Any] | None,
                      timings: dict[str, float] | None) -> dict[str, Any]:
    return {
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
        "banner": getattr(result, "banner", "") or None,
        "out_of_distribution": result.ood,
        "warning": result.warning,
        "checks": result.checks.to_list() if getattr(result, "checks", None) is not None else None,
        "cropped_to_head": (result.checks.crop.to_dict() if getattr(result, "checks", None) is not None
                            and result.checks.crop is not None else None),
        "saliency_files": {n: saliency_file(n) for n in result.saliency},
        "saliency_scale": saliency_scale_text(result),
        "explanation": getattr(result, "explanation", None),
        "timings": {k: round(v, 3) for k, v in (timings if timings is not None else result.timings).items()},
    }


def read_findings(folder: str | Path) -> dict[str, Any] | None:
    """The findings.json payload of a finished study folder, or None when there is none (or it is unreadable)."""
    path = Path(folder) / FINDINGS_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and isinstance(payload.get("findings"), list) else None
