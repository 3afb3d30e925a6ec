"""`fmct prepare DATA --out CACHE`: decode and resample every study once, before training, in parallel.

Why a separate step: decoding DICOM and resampling costs ~0.84 s a study at the base grid, 84
CPU-hours for 361k studies. Done inside training it runs serially before step 1 and every
torchrun rank repeats it. Here the studies are cut into fixed work units (``--unit-size``
studies each, in manifest order); a unit is the unit of parallelism, of resume and of storage
(one shard, fmct.data.cache). Units are dealt out round-robin:

- ``--shard K/M`` (array job K of M, 1-based) takes units u with u % M == K - 1;
- under torchrun, rank r of W takes its share of that, so no rank repeats another's work;
- ``--workers N`` worker processes on this machine split what is left.

A unit whose index exists is done and skipped, so a killed or failed run is simply run again.
A study that cannot be read is recorded with its reason (errors.jsonl) and the step goes on; a
failed write (full disk, lost mount) stops the step with exit 2 and a message, and leaves every
finished unit in place. The cache's bytes depend only on the data and the grid, never on N, K/M
or the rank count.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fmct.conventions.errors import ConfigError

log = logging.getLogger("fmct.data.prepare")

DEFAULT_UNIT_SIZE = 64


@dataclass
class PrepareResult:
    root: Path
    units_total: int
    units_mine: list[int]
    units_done_now: list[int] = field(default_factory=list)
    units_skipped: list[int] = field(default_factory=list)
    studies_written: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this call
    worker_seconds: float = 0.0  # summed over units: decoding, resampling, writing (no process start-up)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/M' (1-based K) -> (K, M); None -> (1, 1)."""
    if not text:
        return 1, 1
    k, sep, m = str(text).partition("/")
    try:
        k_i, m_i = int(k), int(m)
    except ValueError:
        k_i = m_i = 0
    if not sep or m_i < 1 or not 1 <= k_i <= m_i:
        raise ConfigError(f"--shard {text}: give K/M with 1 <= K <= M, e.g. --shard 3/10 (job 3 of 10)")
    return k_i, m_i


def share(n_units: int, shard: tuple[int, int] = (1, 1), rank: int = 0, world: int = 1) -> list[int]:
    """The units array job K of M, rank r of W takes: every (M*W)-th unit from (K-1)*W + r."""
    k, m = shard
    slot, slots = (k - 1) * world + rank, m * world
    return [u for u in range(n_units) if u % slots == slot]


def manifest_digest(studies: Sequence[Any]) -> str:
    """What the units are cut from: ids, paths, series and files in order (no stat of any file)."""
    h = hashlib.sha256()
    for s in studies:
        files = [str(f) for f in s.files] if s.files is not None else None
        h.update(json.dumps([s.study_id, str(s.path), s.series_uid, files]).encode() + b"\n")
    return h.hexdigest()[:32]


def _study_record(study: Any) -> dict[str, Any]:
    """A Study as JSON (what a worker process receives and what the index keeps)."""
    return {"study_id": study.study_id, "path": str(study.path), "labels": dict(study.labels),
            "series_uid": study.series_uid, "files": [str(f) for f in study.files] if study.files is not None else None}


def init_cache(root: Path, spec: Any, studies: Sequence[Any], unit_size: int) -> dict[str, Any]:
    """Write CACHE/cache.json, or check that the one there describes the same grid and study list.

    Its content depends only on its inputs (no time stamp), so array jobs starting at once write
    the same bytes and any of them may win."""
    from fmct.conventions.atomic import write_bytes_atomic
    from fmct.data.cache import CACHE_JSON, FORMAT, SHARDS, VERSION, CacheMismatchError, grid_differences, grid_record

    n_units = max(1, -(-len(studies) // unit_size))
    meta = {"format": FORMAT, "version": VERSION, "grid": grid_record(spec), "studies": len(studies),
            "manifest_sha": manifest_digest(studies), "unit_size": unit_size, "units": n_units}
    path = root / CACHE_JSON
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = grid_differences(old.get("grid", {}), meta["grid"])
        if diff:
            raise CacheMismatchError(f"{root} holds a cache made with other preprocessing ({'; '.join(diff)}); "
                                     "prepare into another --out")
        if (old.get("manifest_sha"), old.get("unit_size")) != (meta["manifest_sha"], unit_size):
            raise CacheMismatchError(f"{root} was prepared from another study list or --unit-size ({old.get('studies')} "
                                     f"studies, units of {old.get('unit_size')}); prepare into another --out")
        return old
    write_bytes_atomic(path, json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta


def prepare_unit(root: str, spec_dict: dict[str, Any], unit: int, studies: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode, resample and store one unit (a worker process runs this): .bin first, then its index.

    A study that fails to read or preprocess becomes an error entry; a failed write raises
    CacheWriteError (nothing of the unit is left behind, so a rerun redoes it)."""
    from fmct.conventions.atomic import AtomicWriter, write_bytes_atomic
    from fmct.data.cache import SHARDS, CacheWriteError, hu_to_int16, source_digest, unit_name
    from fmct.data.sources import read_study, source_files
    from fmct.data.manifests import Study
    from fmct.preprocessing.preprocessor import Preprocessor, PreprocessSpec

    start = time.perf_counter()
    pre = Preprocessor(PreprocessSpec.from_dict(spec_dict))
    shards = Path(root) / SHARDS
    entries, errors, offset = [], [], 0
    bin_path = shards / f"{unit_name(unit)}.bin"
    try:
        with AtomicWriter(bin_path) as out:
            for rec in studies:
                study = Study(rec["study_id"], Path(rec["path"]), rec["labels"], rec["series_uid"],
                              tuple(Path(f) for f in rec["files"]) if rec["files"] is not None else None)
                try:
                    source = source_digest(source_files(study))
                    hu = hu_to_int16(pre.model_hu(read_study(study))[0])
                except Exception as e:  # noqa: BLE001 - one unreadable study must not stop the step
                    errors.append({"study_id": study.study_id, "path": str(study.path),
                                   "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
                    continue
                data = hu.tobytes()
                out.write(data)
                entries.append({**rec, "offset": offset, "shape": list(hu.shape), "source": source,
                                "sha256": hashlib.sha256(data).hexdigest()})
                offset += len(data)
        index = {"unit": unit, "studies": entries, "errors": errors}
        write_bytes_atomic(shards / f"{unit_name(unit)}.json", json.dumps(index, indent=1, sort_keys=True).encode())
    except OSError as e:
        raise CacheWriteError(f"cannot write {bin_path.parent} ({e.strerror or e}); free space or choose another --out, "
                              "then run `fmct prepare` again (finished units are kept)") from e
    return {"unit": unit, "written": len(entries), "errors": errors, "seconds": time.perf_counter() - start}


def _clean_stale(root: Path, units: Sequence[int]) -> None:
    """Remove the temp files a killed run left for these units (only ours: other jobs may be writing)."""
    from fmct.data.cache import SHARDS, unit_name

    for u in units:
        for tmp in (root / SHARDS).glob(f".{unit_name(u)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _run_units(root: Path, spec_dict: dict, todo: list[int], chunks: list[list[dict]], workers: int,
               result: PrepareResult, progress) -> None:
    """Prepare the units todo, in this process (workers <= 1) or in a spawn pool; stop at the first write failure."""
    def done(r: dict[str, Any]) -> None:
        result.units_done_now.append(r["unit"])
        result.studies_written += r["written"]
        result.worker_seconds += r["seconds"]
        if progress is not None:
            progress(len(result.units_done_now) / max(len(todo), 1), f"unit {r['unit']} ({len(result.units_done_now)}/{len(todo)})")

    if workers <= 1 or len(todo) <= 1:
        for u in todo:
            done(prepare_unit(str(root), spec_dict, u, chunks[u]))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(prepare_unit, str(root), spec_dict, u, chunks[u]) for u in todo]
        try:
            for f in futures:
                done(f.result())  # re-raises a worker's CacheWriteError here
        finally:
            for f in futures:
                f.cancel()


def write_errors(root: Path) -> list[dict[str, str]]:
    """CACHE/errors.jsonl from the indexes of every finished unit (atomically; any job may rewrite it)."""
    from fmct.conventions.atomic import write_bytes_atomic
    from fmct.data.cache import ERRORS, SHARDS

    errors = []
    for index in sorted((root / SHARDS).glob("unit-*.json")):
        errors += json.loads(index.read_text()).get("errors", [])
    write_bytes_atomic(root / ERRORS, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    return errors


@contextlib.contextmanager
def _writing(root: Path):
    """An OSError while writing the cache's own files is a CacheWriteError (exit 2, one line)."""
    from fmct.data.cache import CacheWriteError

    try:
        yield
    except OSError as e:
        raise CacheWriteError(f"cannot write {root} ({e.strerror or e}); free space or choose another --out, then run "
                              "`fmct prepare` again (finished units are kept)") from e


def prepare(studies: Sequence[Any], spec: Any, out: str | Path, workers: int = 1, shard: tuple[int, int] = (1, 1),
            rank: int = 0, world: int = 1, unit_size: int = DEFAULT_UNIT_SIZE, progress=None) -> PrepareResult:
    """Prepare this process's share of studies (a manifest) into the cache folder out. See the module docstring."""
    from fmct.data.cache import SHARDS, unit_name

    if unit_size < 1:
        raise ConfigError(f"--unit-size {unit_size}: give 1 or more studies per unit")
    if not studies:
        raise ConfigError("no studies to prepare")
    start, root = time.perf_counter(), Path(out)
    with _writing(root):
        root.mkdir(parents=True, exist_ok=True)
        meta = init_cache(root, spec, studies, unit_size)
    records = [_study_record(s) for s in studies]
    chunks = [records[u * unit_size:(u + 1) * unit_size] for u in range(meta["units"])]
    mine = share(meta["units"], shard, rank, world)
    result = PrepareResult(root, meta["units"], mine)
    result.units_skipped = [u for u in mine if (root / SHARDS / f"{unit_name(u)}.json").is_file()]
    todo = [u for u in mine if u not in set(result.units_skipped)]
    _clean_stale(root, todo)
    log.info("prepare: %d unit(s) of %d studies for this process, %d already done, %d worker(s)",
             len(mine), unit_size, len(result.units_skipped), workers)
    _run_units(root, spec.to_dict(), todo, chunks, workers, result, progress)
    with _writing(root):
        result.errors = write_errors(root)
    result.seconds = time.perf_counter() - start
    return result


# ============================================================================ command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fmct prepare`'s options (torch-free: the fmct parser is built before any command imports torch)."""
    parser.add_argument("data", help="CTs: a folder of DICOM/NIfTI studies, a manifest CSV, the RSNA or CQ500 layout")
    parser.add_argument("--out", required=True, help="cache folder (cache.json, shards/, errors.jsonl); rerun to resume")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    parser.add_argument("--shard", default=None, metavar="K/M",
                        help="array job K of M (1-based): prepare only every M-th unit from K (e.g. $SLURM_ARRAY_TASK_ID/M)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "base"),
                        help="the grid of a pretraining recipe: tiny (default), small, base")
    parser.add_argument("--config", default=None, help="take the grid (data.spacing_mm, data.size) from this pretraining config")
    parser.add_argument("--model", default=None, help="take the grid from this bundle's preprocessing (to fine-tune or embed it)")
    parser.add_argument("--unit-size", type=int, default=DEFAULT_UNIT_SIZE,
                        help=f"studies per work unit and shard (default {DEFAULT_UNIT_SIZE}); fixed for a cache")
    return parser


def spec_from_args(args: argparse.Namespace) -> Any:
    """The PreprocessSpec to prepare for: --model's, else --config's data grid, else the --size recipe's."""
    from fmct.preprocessing.spec import PreprocessSpec

    if args.model:
        from fmct.inference.bundle import load_bundle

        return load_bundle(args.model, load_model=False).meta.preprocessing
    from fmct.ssl.config import apply_size, recipe

    if args.config:
        from fmct.conventions.config_file import read_config_file

        raw = read_config_file(args.config)
    else:
        raw = apply_size(recipe("tiny"), args.size)
    data = raw.get("data", {})
    return PreprocessSpec(spacing_mm=tuple(float(v) for v in data.get("spacing_mm", (3, 3, 3))),
                          size=tuple(int(v) for v in data.get("size", (64, 64, 64))))


def check_args(args: argparse.Namespace) -> None:
    """The option mistakes found before anything starts (exit 2, one line)."""
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give 1 or more")
    if args.unit_size < 1:
        raise ConfigError(f"--unit-size {args.unit_size}: give 1 or more studies per unit")
    parse_shard(args.shard)
    if not Path(args.data).exists():
        raise ConfigError(f"{args.data} does not exist; give a folder of CTs or a manifest CSV")


def run_from_args(args: argparse.Namespace, progress=None) -> int:
    """`fmct prepare` once parsed: prints what was done; errors (FMCTError) go to the CLI's exit 2."""
    from fmct.data.cache import ERRORS
    from fmct.data.manifests import load_manifest
    from fmct.conventions.runtime import torchrun_rank

    check_args(args)
    shard, place = parse_shard(args.shard), torchrun_rank()
    result = prepare(load_manifest(args.data), spec_from_args(args), args.out, workers=args.workers, shard=shard,
                     rank=place.rank, world=place.world, unit_size=args.unit_size, progress=progress)
    print(f"prepared {result.studies_written} studies in {len(result.units_done_now)} unit(s) in {result.seconds:.1f} s; "
          f"{len(result.units_skipped)} unit(s) already done; {len(result.units_mine)} of {result.units_total} unit(s) "
          "are this process's share")
    if result.errors:
        print(f"{len(result.errors)} unreadable studies so far, listed with reasons in {Path(args.out) / ERRORS}")
    print(f"train from it: fmct pretrain {args.out} --out RUN")
    return 0
