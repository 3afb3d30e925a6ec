"""Batch analysis: many studies through one loaded model, streamed, resumable and sharded.

Decoding a DICOM series and preprocessing it costs far more CPU time than the model costs GPU
time, so it runs ahead in worker processes (a torch DataLoader; a process pool on the
onnxruntime path, which must not import torch) while the main process runs the model.
Mapping saliency back onto the CT and writing files run in writer threads for the same reason.
Each study gets the result folder a single `fmct analyze` writes; summary.csv has one row per
study. A study whose findings.json records the same model (name, weights and config hashes), the
same output options and the same input path is skipped, so re-running a batch resumes it; one
analyzed with another model or options is redone (its folder cleared of FMCT's files first). A
bad study becomes an error row and the batch goes on. Each study is analyzed under an exclusive
lock (out/.fmct-locks/<study_id>.lock, fmct.inference.study_folder.study_lock), so a second batch process on the same --out skips the
studies the first one is doing and waits for them only to fill its summary. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK)
each process takes studies[rank::world] and writes summary_rank<r>.csv; the last to finish
merges them into summary.csv.
"""
from __future__ import annotations

import csv
import functools
import io
import logging
import os
import re
import time
import traceback
import unicodedata
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fmct.conventions.atomic import write_text_atomic
from fmct.conventions.csv_table import read_csv_table
from fmct.conventions.errors import ConfigError, FMCTError, OutputFolderError
from fmct.reading.volume import FORMATS
from fmct.conventions.locks import FileLock
from fmct.conventions.names import check_utf8_path, printable
from fmct.inference.saliency import SaliencyOnCTGrid
from fmct.inference.study_folder import (LOCK_DIR, NAME_MAX, output_options, read_findings, source_key, study_lock,
                                         write_study_outputs)
from fmct.preprocessing.preprocessor import ModelInput, Preprocessor, PreprocessSpec
from fmct.reading.volume import Volume
from fmct.conventions.runtime import Progress, Rank, torchrun_rank

log = logging.getLogger("fmct.inference.batch")
SUMMARY_FILE = "summary.csv"
RESERVED_NAMES = {SUMMARY_FILE, LOCK_DIR, ".summary.lock"}  # what the batch itself writes into --out
MAX_PENDING_WRITES = 4  # studies waiting for their files to be written (bounds memory)


# --------------------------------------------------------------------------------------------
# Which studies
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Study:
    study_id: str
    path: Path


MANIFEST_ID_COLUMNS = ("study_id", "case_id")  # accepted alike (`fmct phantom` writes case_id)


def is_manifest(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".csv" and Path(path).is_file()


def discover_studies(source: str | Path, exclude: Sequence[str | Path] = ()) -> list[Study]:
    """The studies of a manifest CSV (columns study_id or case_id, and path) or of a folder of studies.

    A folder follows the one rule the training commands use too (fmct.data.manifests.studies_in_folder):
    its labels.csv when that has a path column (what `fmct phantom` writes), else every subfolder
    (its ct.* image, or a DICOM study) and every image file (.nii.gz, .nrrd, .mha, ...), named after
    it; other files are ignored. Relative paths in a manifest are relative to the manifest's folder.
    """
    source = Path(source)
    if is_manifest(source):
        studies = _read_manifest(source)
    elif source.is_dir():
        from fmct.data.manifests import studies_in_folder

        studies = [Study(s.study_id, s.path) for s in studies_in_folder(source, exclude=exclude)]
    else:
        raise ConfigError(f"{source} is neither a folder of studies nor a manifest .csv (columns study_id,path)")
    if not studies:
        raise ConfigError(f"{source} holds no studies: expected subfolders (DICOM series) or image files "
                          f"({', '.join(FORMATS)}), or manifest rows")
    ids = [s.study_id for s in studies]
    for sid in ids:
        check_study_id(sid, source)
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{source}: study id(s) {dupes[:5]} occur more than once; each study needs its own id")
    return studies


def check_study_id(sid: str, source: Path) -> None:
    """A study id names the study's folder in out/: refuse one that cannot, or that is a file the batch writes."""
    if sid.lower() in RESERVED_NAMES or re.fullmatch(r"summary_rank\d+\.csv", sid.lower()):
        raise ConfigError(f"{source}: a study is named {sid!r}, which is the name of a file the batch writes into "
                          "--out; rename that study (its file or folder, or its manifest study_id)")
    if len(os.fsencode(sid)) > NAME_MAX:
        raise ConfigError(f"{source}: study id {printable(sid[:40])}... is {len(os.fsencode(sid))} bytes long; a folder "
                          f"name may have at most {NAME_MAX}. Give it a shorter id.")
    if any(unicodedata.category(c) == "Cc" for c in sid):
        raise ConfigError(f"{source}: study id {printable(repr(sid))} holds control characters; rename that study")


def _read_manifest(path: Path) -> list[Study]:
    rows, columns = read_csv_table(path)  # BOMs, tabs and spaces after commas read; ';' and Latin-1 refused
    id_column = next((c for c in MANIFEST_ID_COLUMNS if c in columns), None)
    if id_column is None or "path" not in columns:
        missing = ([] if id_column else ["study_id (or case_id)"]) + ([] if "path" in columns else ["path"])
        raise ConfigError(f"manifest {path} lacks column(s) {missing} (it has {columns[:6]}); it needs study_id,path "
                          "(case_id,path alike)")
    studies = []
    for n, row in enumerate(rows, start=2):
        sid, p = (row.get(id_column) or "").strip(), (row.get("path") or "").strip()
        if not sid or not p:
            raise ConfigError(f"manifest {path}, line {n}: study_id and path must both be filled in")
        if sid in (".", "..") or any(c in sid for c in '/\\:*?"<>|') or sid.startswith("."):
            raise ConfigError(f"manifest {path}, line {n}: study_id {sid!r} cannot be a folder name; "
                              "use letters, digits, '-', '_' or '.' (not first)")
        studies.append(Study(sid, (path.parent / p) if not Path(p).is_absolute() else Path(p)))
    return studies


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------

def rank_device(device: str, backend: str, rank: Rank) -> str:
    """Under torchrun, give each local process its own GPU (cuda:LOCAL_RANK); otherwise the device as given."""
    if rank.world == 1 or device not in ("auto", "cuda"):
        return device
    if backend == "onnx":
        import onnxruntime as ort

        return f"cuda:{rank.local_rank}" if "CUDAExecutionProvider" in ort.get_available_providers() else device
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        return device
    torch.cuda.set_device(rank.local_rank % n)
    return f"cuda:{rank.local_rank % n}"


# --------------------------------------------------------------------------------------------
# Decoding + preprocessing in workers
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """One study read and preprocessed by a worker, or the reason it could not be."""

    index: int
    study: Study
    volume: Volume | None = None
    model_input: ModelInput | None = None
    error: str | None = None
    checks: Any = None  # fmct.checks.runner.CheckReport
    seconds: float = 0.0


class StudyPreparer:
    """Reads and preprocesses study i; never raises for a bad study (the error travels in the result).

    share=True hands the big arrays over as torch tensors, which a DataLoader passes through shared
    memory instead of pickling hundreds of megabytes through a pipe.
    """

    def __init__(self, studies: Sequence[Study], spec: PreprocessSpec, share: bool = False) -> None:
        self.studies = list(studies)
        self.spec = spec
        self.share = share

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> Prepared:
        from fmct.reading.files import read_volume

        study = self.studies[i]
        t0 = time.perf_counter()
        try:
            from fmct.inference.analyze import check_and_preprocess

            check_utf8_path(study.path)  # SimpleITK aborts the process (the whole batch) on a non-UTF-8 file name
            volume = read_volume(study.path)
            checks, model_input = check_and_preprocess(Preprocessor(self.spec), volume)
        except FMCTError as e:
            return Prepared(i, study, error=str(e), seconds=time.perf_counter() - t0)
        except Exception as e:  # a library choking on a corrupt file must not stop the batch
            log.debug("study %s failed:\n%s", study.study_id, traceback.format_exc())
            return Prepared(i, study, error=f"unexpected {type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
        prepared = Prepared(i, study, volume, model_input, seconds=time.perf_counter() - t0, checks=checks)
        if self.share:
            import torch

            volume.array = torch.from_numpy(np.ascontiguousarray(volume.array))
            model_input.array = torch.from_numpy(model_input.array)
        return prepared


def _unshare(p: Prepared) -> Prepared:
    if p.volume is not None and not isinstance(p.volume.array, np.ndarray):
        p.volume.array = p.volume.array.numpy()
    if p.model_input is not None and not isinstance(p.model_input.array, np.ndarray):
        p.model_input.array = p.model_input.array.numpy()
    return p


def _first(batch: list[Prepared]) -> Prepared:
    return batch[0]


def _init_worker(sitk_threads: int, *_: Any) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, sitk_threads))
    for name in ("fmct.reading.files", "fmct.reading.dicom"):  # one "Read ..." line per study would drown the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)


def default_workers(gpu: bool) -> int:
    """Decoding processes: min(4, CPUs) beside a GPU; on CPU the model needs the cores itself.

    With the model on the CPU, decoding ahead only moves work between cores the model already
    uses (and oversubscribed OpenMP threads slow it down), so a worker is added per 4 cores only.
    """
    cpus = os.cpu_count() or 1
    return min(4, cpus) if gpu else min(4, cpus // 4)


def iter_prepared(preparer: StudyPreparer, num_workers: int, use_torch: bool) -> Iterator[Prepared]:
    """Prepared studies in order, decoded ahead by num_workers processes (0: in this process)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, num_workers))
    if num_workers == 0:
        for i in range(len(preparer)):
            yield preparer[i]
        return
    if use_torch:
        from torch.utils.data import DataLoader

        preparer.share = True
        loader = DataLoader(preparer, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_first,
                            worker_init_fn=functools.partial(_init_worker, threads), prefetch_factor=2)
        for p in loader:
            yield _unshare(p)
        return
    yield from _pool_prepared(preparer, num_workers, threads)


def _pool_prepared(preparer: StudyPreparer, num_workers: int, threads: int) -> Iterator[Prepared]:
    """The torch-free prefetcher: a process pool with at most 2 studies per worker in flight."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(num_workers, initializer=_init_worker, initargs=(threads,)) as pool:
        pending: deque[Future] = deque()
        next_index = 0
        while next_index < len(preparer) or pending:
            while next_index < len(preparer) and len(pending) < 2 * num_workers:
                pending.append(pool.submit(preparer.__getitem__, next_index))
                next_index += 1
            yield pending.popleft().result()


# --------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------

@dataclass
class BatchReport:
    """What a batch did, and where the time went (for `fmct analyze` and the benchmarks)."""

    rows: list[dict[str, Any]]
    summary_path: Path
    wall_s: float = 0.0
    wait_s: float = 0.0          # the main loop waiting for the next decoded study
    first_wait_s: float = 0.0    # of which: filling the pipeline (worker start-up, first study)
    model_s: float = 0.0         # predict + explain
    write_wait_s: float = 0.0    # the main loop waiting for writer threads (back-pressure)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def processed(self) -> int:
        return self.counts.get("ok", 0) + self.counts.get("error", 0)

    @property
    def data_wait_share(self) -> float:
        return self.wait_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def model_busy_share(self) -> float:
        return self.model_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def studies_per_hour(self) -> float:
        return 3600.0 * self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def failed(self) -> bool:
        """Whether any study of this run failed (the command then exits 1)."""
        return self.counts.get("error", 0) > 0

    def line(self) -> str:
        """One line of counts; throughput and where the time went only when some study was analyzed
        (a rate over failures or skipped studies would say nothing)."""
        c = self.counts
        counts = f"{c.get('ok', 0)} ok, {c.get('error', 0)} error, {c.get('skipped', 0)} skipped in {self.wall_s:.1f} s"
        if not c.get("ok", 0):
            return counts
        return (f"{counts} ({self.studies_per_hour:.0f} studies/h); model busy {100 * self.model_busy_share:.0f}%, "
                f"waiting for data {100 * self.data_wait_share:.0f}% (pipeline fill {self.first_wait_s:.1f} s)")


def summary_columns(task_names: Sequence[str]) -> list[str]:
    return ["study_id", "path", "status", "error", *[f"p_{t}" for t in task_names], "positive", "in_distribution",
            "ood_score", "checks", "seconds"]


def run_batch(
    analyzer: Any,
    source: str | Path,
    out: str | Path,
    explain_method: str | None = "integrated_gradients",
    explain_findings: str | Sequence[str] = "positive",
    save_ct: bool = False,
    report: bool = False,
    num_workers: int | None = None,
    rank: Rank | None = None,
    progress: Progress | None = None,
    studies: Sequence[Study] | None = None,
    writers: int | None = None,
    options: dict[str, Any] | None = None,
) -> BatchReport:
    """Analyze every study of a folder or manifest into out/<study_id>/ and write out/summary.csv.

    report=True adds report.png per study (about a CPU second each, so off by default at scale).
    num_workers decode ahead of the model (default: see default_workers); writers (default 2 to 8
    threads beside a GPU, 1 on CPU) map saliency back and write files while the model moves on.
    """
    from fmct.inference.bundle import model_identity

    t_start = time.perf_counter()
    analyzer.check_explain_method(explain_method)
    out = Path(out)
    try:
        (out / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(f"cannot create the batch output folder {out} ({e.strerror}). Give a folder you may "
                                "write to.") from None
    rank = rank or torchrun_rank()
    every = list(studies) if studies is not None else discover_studies(source, exclude=[out])
    mine = every[rank.rank::rank.world]
    if options is None:
        options = output_options(analyzer.backend, explain_method, explain_findings, save_ct, report)
    b = _Batch(analyzer, out, {"model_id": model_identity(analyzer.bundle), "options": options},
               list(analyzer.bundle.meta.task_names), explain_method, explain_findings, bool(save_ct), bool(report))
    report_progress = progress or (lambda f, m: None)
    todo = _sort_studies(b, mine)
    n_skipped = len(b.rows) + len(b.busy)
    report_progress(n_skipped / max(1, len(mine)), f"{n_skipped} already done")
    result = BatchReport([], out / SUMMARY_FILE)

    def tick(n: int) -> None:
        report_progress((n_skipped + n) / max(1, len(mine)), f"{n_skipped + n}/{len(mine)} studies")

    _analyze_studies(b, todo, {s.study_id: i for i, s in enumerate(mine)}, result, num_workers, writers, tick)
    _wait_for_busy(b)
    result.rows = [b.rows[i] for i in range(len(mine))]
    result.counts = {s: sum(r["status"] == s for r in result.rows) for s in ("ok", "error", "skipped")}
    result.wall_s = time.perf_counter() - t_start
    result.summary_path = _write_summary(out, result.rows, b.tasks, rank, [s.study_id for s in every])
    report_progress(1.0, "done")
    return result


@dataclass
class _Batch:
    """What the steps of one run_batch call share: the model, the output folder and options, the rows so far."""

    analyzer: Any
    out: Path
    run: dict[str, Any]  # model_id and options: recorded in findings.json, compared when a batch resumes
    tasks: list[str]
    explain_method: str | None
    explain_findings: str | Sequence[str]
    save_ct: bool
    report: bool
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # by the study's index in this rank's list
    busy: list[tuple[int, Study]] = field(default_factory=list)  # studies another process is analyzing

    def lock(self, study: Study) -> FileLock:
        return study_lock(self.out / study.study_id)


def _sort_studies(b: _Batch, mine: Sequence[Study]) -> list[Study]:
    """Rows for the studies already done, b.busy for those another process is doing; returns the rest."""
    todo = []
    for i, study in enumerate(mine):
        done = _done(b.out / study.study_id, b.run, study)
        if done is not None:
            b.rows[i] = _row_from_findings(study, done, b.tasks)
        elif b.lock(study).busy():
            b.busy.append((i, study))  # another process is analyzing it now
        else:
            todo.append(study)
    return todo


def _analyze_studies(b: _Batch, todo: Sequence[Study], index_of: dict[str, int], result: BatchReport,
                     num_workers: int | None, writers: int | None, tick: Any) -> None:
    """The pipeline: workers decode ahead, this thread runs the model, writer threads write each study's folder."""
    gpu = str(b.analyzer.device).startswith("cuda")
    workers = default_workers(gpu) if num_workers is None else max(0, int(num_workers))
    preparer = StudyPreparer(todo, b.analyzer.bundle.meta.preprocessing)
    pending: deque[tuple[int, Future]] = deque()
    # Writing gzipped float32 saliency NIfTIs is the slowest step beside a GPU (benchmarks/RESULTS.md#batch);
    # SimpleITK releases the GIL while it compresses, so writer threads scale with cores.
    n_writers = writers or (min(8, max(2, (os.cpu_count() or 1) // 2)) if gpu else 1)
    with ThreadPoolExecutor(max_workers=n_writers, thread_name_prefix="fmct-writer") as writer:
        stream = iter_prepared(preparer, workers, use_torch=b.analyzer.backend == "torch")
        for n in range(len(todo)):
            t0 = time.perf_counter()
            prepared = next(stream)
            waited = time.perf_counter() - t0
            result.wait_s += waited
            if n == 0:
                result.first_wait_s = waited
            i = index_of[prepared.study.study_id]
            job = _take_study(b, i, prepared, result)
            if job is not None:
                while len(pending) >= MAX_PENDING_WRITES + n_writers:
                    t0 = time.perf_counter()
                    j, fut = pending.popleft()
                    b.rows[j] = fut.result()
                    result.write_wait_s += time.perf_counter() - t0
                lock, res = job
                pending.append((i, writer.submit(_finish, b.analyzer, prepared, res, b.out, b.save_ct, b.report,
                                                 b.tasks, b.run, lock)))
            tick(n + 1)
        for j, fut in pending:
            b.rows[j] = fut.result()


def _take_study(b: _Batch, i: int, prepared: Prepared, result: BatchReport) -> tuple[FileLock, Any] | None:
    """Lock study i and run the model on it; None when it needs no writing (done, busy, or an error row)."""
    study = prepared.study
    lock = b.lock(study)
    if not lock.acquire():
        b.busy.append((i, study))  # another process took it meanwhile
        return None
    if (done := _done(b.out / study.study_id, b.run, study)) is not None:
        lock.release()  # another process finished it meanwhile
        b.rows[i] = _row_from_findings(study, done, b.tasks)
        return None
    if prepared.error is not None:
        lock.release()
        b.rows[i] = _row(study, "error", prepared.error, None, b.tasks, prepared.seconds)
        return None
    t0 = time.perf_counter()
    try:
        res = b.analyzer.analyze_prepared(prepared.model_input, b.explain_method, b.explain_findings, map_back=False)
        from fmct.inference.analyze import attach_checks

        attach_checks(res, prepared.checks)
    except FMCTError as e:
        b.rows[i] = _row(study, "error", str(e), None, b.tasks, prepared.seconds)
        res = None
    except Exception as e:  # e.g. out of GPU memory on one huge study: report it, go on
        log.debug("study %s failed:\n%s", study.study_id, traceback.format_exc())
        b.rows[i] = _row(study, "error", f"unexpected {type(e).__name__}: {e}", None, b.tasks, prepared.seconds)
        res = None
    result.model_s += time.perf_counter() - t0
    if res is None:
        lock.release()
        return None
    return lock, res


def _wait_for_busy(b: _Batch) -> None:
    """Wait for the other process to finish the studies it was doing, then report what it wrote."""
    for i, study in b.busy:
        with b.lock(study):
            pass
        done = _done(b.out / study.study_id, b.run, study)
        b.rows[i] = (_row_from_findings(study, done, b.tasks) if done is not None else
                     _row(study, "error", "another fmct process was analyzing this study and did not finish it; "
                          "run the batch again", None, b.tasks, None))


def _finish(analyzer: Any, prepared: Prepared, res: Any, out: Path, save_ct: bool, report: bool,
            tasks: Sequence[str], run: dict[str, Any] | None = None, lock: FileLock | None = None) -> dict[str, Any]:
    """Writer thread: saliency onto the CT's grid, the study's folder, its summary row; then the study's lock is released."""
    try:
        return _write_study(analyzer, prepared, res, out, save_ct, report, tasks, run or {})
    finally:
        if lock is not None:
            lock.release()


def _write_study(analyzer: Any, prepared: Prepared, res: Any, out: Path, save_ct: bool, report: bool,
                 tasks: Sequence[str], run: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        # Mapped back onto the CT's grid inside the writer, one map at a time, each freed once written (as the
        # CLI does): a study holds one full-size map per writing thread, not all of its maps at once.
        res.saliency = SaliencyOnCTGrid(analyzer, res)
        timings = {"decode_preprocess_s": prepared.seconds, **res.timings}
        timings["total_s"] = sum(timings.values())  # mapping back and writing the files are not included (after)
        # The folder is this study's own (named by its id): an earlier run's results in it are replaced.
        write_study_outputs(out / prepared.study.study_id, prepared.volume, res, analyzer.bundle.meta.name,
                            str(analyzer.device), analyzer.backend, save_ct=save_ct, report=report, timings=timings,
                            overwrite=True, model_id=run.get("model_id"), options=run.get("options"),
                            source=source_key(prepared.study.path))
    except FMCTError as e:  # e.g. the model gave a non-finite probability: an error row, nothing written
        return _row(prepared.study, "error", str(e), None, tasks, prepared.seconds + sum(res.timings.values()))
    except Exception as e:  # a full disk or an unwritable name: this study fails, the batch goes on
        log.debug("writing study %s failed:\n%s", prepared.study.study_id, traceback.format_exc())
        return _row(prepared.study, "error", f"writing results failed: {type(e).__name__}: {e}", None, tasks,
                    prepared.seconds + sum(res.timings.values()) + time.perf_counter() - t0)
    probs = {f.name: f.probability for f in res.findings}
    positive = [f.name for f in res.findings if f.positive]
    seconds = prepared.seconds + sum(res.timings.values()) + time.perf_counter() - t0  # with writing
    return _row(prepared.study, "ok", "", probs, tasks, seconds, positive, res.ood,
                res.checks.to_list() if res.checks is not None else None)


def _row(study: Study, status: str, error: str, probs: dict[str, float] | None, tasks: Sequence[str],
         seconds: float | None, positive: Sequence[str] = (), ood: dict[str, Any] | None = None,
         checks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One summary.csv row; in_distribution is 'no' when the findings are flagged unreliable, '' when not judged;
    checks: 'passed', or the failed checks' names (a refused study is an error row naming its check)."""
    row: dict[str, Any] = {"study_id": study.study_id, "path": str(study.path), "status": status,
                           "error": " ".join(error.split())}
    for t in tasks:
        row[f"p_{t}"] = "" if probs is None or t not in probs else f"{probs[t]:.6f}"
    row["positive"] = ";".join(positive)
    row["in_distribution"] = "" if not ood else ("yes" if ood.get("in_distribution") else "no")
    row["ood_score"] = "" if not ood else f"{float(ood['score']):.4f}"
    failed = [str(c.get("name")) for c in checks or [] if isinstance(c, dict) and not c.get("passed")]
    row["checks"] = "" if not checks else ("flagged: " + "; ".join(failed) if failed else "passed")
    row["seconds"] = "" if seconds is None else f"{seconds:.3f}"
    return row


def _done(folder: Path, run: dict[str, Any], study: Study) -> dict[str, Any] | None:
    """The findings.json of a study finished by the same model and options from the same input, else None."""
    payload = read_findings(folder)
    if payload is None:
        return None
    same = (payload.get("model_id") == run["model_id"] and _covers(payload.get("options"), run["options"])
            and (payload.get("input") or {}).get("source_sha256") == source_key(study.path))
    return payload if same else None


_EXTRA_FILES = ("save_ct", "report")  # options that only add a file: a folder that has it also serves a run without


def _covers(stored: Any, asked: dict[str, Any]) -> bool:
    """Whether a study written with the stored options is what a run with the asked ones would write."""
    if not isinstance(stored, dict) or set(stored) != set(asked):
        return False
    return all(stored[k] == v or (k in _EXTRA_FILES and stored[k] is True and v is False) for k, v in asked.items())


def _row_from_findings(study: Study, payload: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    findings = [f for f in payload["findings"] if isinstance(f, dict)]
    probs = {f["name"]: float(f["probability"]) for f in findings if "name" in f and "probability" in f}
    positive = [f["name"] for f in findings if f.get("positive")]
    ood = payload.get("out_of_distribution")
    checks = payload.get("checks")
    return _row(study, "skipped", "", probs, tasks, None, positive, ood if isinstance(ood, dict) else None,
                checks if isinstance(checks, list) else None)


# --------------------------------------------------------------------------------------------
# summary.csv
# --------------------------------------------------------------------------------------------

def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue(), errors="backslashreplace")  # a Latin-1 file name stays readable


def _write_summary(out: Path, rows: list[dict[str, Any]], tasks: Sequence[str], rank: Rank,
                   order: Sequence[str]) -> Path:
    """One process: summary.csv. Several: this rank's part, then a merge of all parts under a lock.

    Every rank writes its part before it merges and merges are serialised, so the last merge sees
    every rank's final part, whatever order the ranks finish in.
    """
    columns = summary_columns(tasks)
    target = out / SUMMARY_FILE
    if rank.world == 1:
        _write_csv(target, rows, columns)
        return target
    _write_csv(out / f"summary_rank{rank.rank}.csv", rows, columns)
    if _distributed_barrier():
        if rank.rank == 0:
            _merge_parts(out, rank.world, columns, order)
        return target
    with FileLock(out / ".summary.lock"):
        _merge_parts(out, rank.world, columns, order)
    return target


def _merge_parts(out: Path, world: int, columns: Sequence[str], order: Sequence[str]) -> None:
    merged: dict[str, dict[str, Any]] = {}
    for r in range(world):
        part = out / f"summary_rank{r}.csv"
        if part.is_file():
            with open(part, newline="", encoding="utf-8") as f:
                merged.update({row["study_id"]: row for row in csv.DictReader(f)})
    position = {sid: n for n, sid in enumerate(order)}
    rows = sorted(merged.values(), key=lambda row: position.get(row["study_id"], len(position)))
    _write_csv(out / SUMMARY_FILE, rows, columns)


def _distributed_barrier() -> bool:
    """When torch.distributed is initialised (a torchrun job that set up a process group), wait for all ranks."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    dist.barrier()
    return True
