"""`fmct prepare` (issue 30): per-study cost with 1 vs 2 worker processes, bytes per study of the old
and the new cache, start-up cost of opening the cache, and the loader's samples/s against the
model's consumption on this machine; then a plan on paper for an archive of 361,663 studies.

    python benchmarks/bench_prepare.py --n 8 --json benchmarks/results/prepare_issue30.json

Input: one thick-slice DICOM series (512 x 512 x 40, as a scanner writes it) listed --n times in a
manifest CSV under different study ids, so every row is decoded and resampled in full. Baselines
in the same run: 1 worker (vs 2); today's float16 three-window per-study .npy (vs int16 HU shards);
per-sample crops in the loader (vs batched crops, here on CPU tensors).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import dicom_study, emit, machine, set_threads

ARCHIVE = 361_663
GRIDS = {"tiny": ((3.0, 3.0, 3.0), (64, 64, 64)), "base": ((1.5, 1.5, 1.5), (128, 128, 128))}


def manifest(folder: Path, series: Path, n: int) -> Path:
    path = folder / "manifest.csv"
    path.write_text("study_id,path\n" + "".join(f"s{i:04d},{series}\n" for i in range(n)))
    return path


def prepare_run(data: Path, out: Path, grid: str, workers: int) -> tuple[float, float]:
    """(wall seconds of prepare() with this many worker processes, their start-up included; seconds the
    workers spent on the units: decoding, resampling, writing)."""
    from fmct.data.manifests import load_manifest
    from fmct.data.prepare import prepare
    from fmct.preprocessing.spec import PreprocessSpec

    spacing, size = GRIDS[grid]
    result = prepare(load_manifest(data), PreprocessSpec(spacing_mm=spacing, size=size), out, workers=workers, unit_size=2)
    return result.seconds, result.worker_seconds


def bytes_per_study(work: Path, series: Path, grid: str, cache: Path) -> dict:
    """The old cache's .npy for one study against the new cache's shard + index bytes per study."""
    from fmct.data.datasets import CachedVolumeDataset
    from fmct.data.manifests import Study
    from fmct.preprocessing.spec import PreprocessSpec

    spacing, size = GRIDS[grid]
    old = CachedVolumeDataset([Study("s", series)], PreprocessSpec(spacing_mm=spacing, size=size), work / f"old-{grid}",
                              tasks=[]).prepare()
    old_bytes = old.index[0][1].stat().st_size
    n = len(list((cache / "shards").glob("*.json")))
    studies = sum(len(json.loads(p.read_text())["studies"]) for p in (cache / "shards").glob("*.json"))
    new_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / studies
    return {"old_float16_3win_bytes": old_bytes, "new_int16_hu_bytes": round(new_bytes), "units": n,
            "ratio_old_over_new": round(old_bytes / new_bytes, 2)}


def loader_vs_model(cache: Path, steps: int) -> dict:
    """Samples/s on this CPU (1 thread): reading int16 volumes, per-sample crops, batched crops, and the
    tiny model's pretraining step (what the GPU-side consumer would be)."""
    import torch

    from fmct.data.cache import PreparedVolumes, open_for
    from fmct.ssl.augment import MultiCropAugmentation, collate_crops, sample_generator
    from fmct.ssl.batched_crops import BatchedMultiCrop
    from fmct.ssl.config import SSLConfig, recipe
    from fmct.train import pretrain as pt

    raw = recipe("tiny")
    raw["optim"]["batch_size"] = 4
    raw["run"].update({"device": "cpu", "workers": 0, "num_threads": 1, "checkpoint_every": 10_000})
    cfg = SSLConfig.from_dict(raw)
    spec = pt.preprocess_spec(cfg)
    ds = PreparedVolumes(open_for(cache, spec), spec.windows)
    b, keys = cfg.optim.batch_size, [(0, 0, i % len(ds)) for i in range(cfg.optim.batch_size)]
    n_local = cfg.crops.n_local

    def rate(fn, reps: int) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return round(reps * b / (time.perf_counter() - t0), 2)

    per_sample = MultiCropAugmentation(cfg.crops)
    batched = BatchedMultiCrop(cfg.crops, spec.windows)
    read = rate(lambda: [ds.hu(k[2]) for k in keys], 5)
    loader = rate(lambda: collate_crops([per_sample(ds[k[2]]["image"], sample_generator(*k), n_local) for k in keys]), 2)
    device = rate(lambda: batched(torch.stack([ds.hu(k[2]) for k in keys]), keys, n_local, (0, 1, 0)), 2)
    with tempfile.TemporaryDirectory() as run_dir:
        run = pt._open_run(cfg, Path(run_dir), ds)
        batch = run.batches(max(cfg.crops.local_start_step, 0))
        model = rate(lambda: pt._train_step(run, batch, cfg.crops.local_start_step), steps)
    return {"preset": "tiny", "batch": b, "n_local": n_local, "read_int16_samples_per_s": read,
            "loader_per_sample_crops_samples_per_s": loader, "batched_crops_cpu_samples_per_s": device,
            "model_step_samples_per_s": model, "loader_over_model": round(loader / model, 2)}


def plan(per_study_s: float, per_study_bytes: int, old_bytes: int, index_open_s_per_study: float) -> dict:
    """361,663 studies on one 8-GPU node and on four, from this run's per-study costs (paper arithmetic:
    assumed cores per node stated; CPU speeds differ from this machine's)."""
    cpu_h = ARCHIVE * per_study_s / 3600
    out = {"studies": ARCHIVE, "prepare_cpu_hours": round(cpu_h, 1),
           "cache_TB_new": round(ARCHIVE * per_study_bytes / 1e12, 3), "cache_TB_old": round(ARCHIVE * old_bytes / 1e12, 3),
           "open_index_s": round(ARCHIVE * index_open_s_per_study, 1)}
    for nodes in (1, 4):
        cores = 96 * nodes  # assumed: an 8-GPU node with ~112 cores, ~96 free for prepare workers
        out[f"{nodes}_node"] = {"prepare_workers": cores, "prepare_hours": round(cpu_h / cores, 2),
                                "array_jobs_of_1000_studies": -(-ARCHIVE // 1000),
                                "local_disk_TB_per_node": round(ARCHIVE * per_study_bytes / 1e12, 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="studies (rows of one series) to prepare")
    p.add_argument("--steps", type=int, default=2, help="timed model steps")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    set_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        series = dicom_study("thick", work / "thick")
        data = manifest(work, series, args.n)
        results = {"machine": machine("cpu", 1), "n_studies": args.n, "input": "DICOM 512x512x40, 5 mm slices"}
        for grid in ("base", "tiny"):
            (one, busy1), (two, busy2) = (prepare_run(data, work / f"{grid}-{w}", grid, w) for w in (1, 2))
            same = subprocess.run(["diff", "-r", str(work / f"{grid}-1"), str(work / f"{grid}-2")]).returncode == 0
            results[grid] = {"workers_1_wall_s": round(one, 2), "workers_2_wall_s": round(two, 2),
                             "speedup_2_over_1": round(one / two, 2), "workers_1_busy_s": round(busy1, 2),
                             "workers_2_busy_s": round(busy2, 2), "per_study_s_1_worker": round(busy1 / args.n, 3),
                             "caches_identical": same,
                             **bytes_per_study(work, series, grid, work / f"{grid}-1")}
            print(grid, json.dumps(results[grid]))
        from fmct.data.cache import PreparedCache

        t0 = time.perf_counter()
        PreparedCache.open(work / "base-1")
        results["index_open_s_per_study"] = round((time.perf_counter() - t0) / args.n, 6)
        results["loader_vs_model"] = loader_vs_model(work / "tiny-1", args.steps)
        print(json.dumps(results["loader_vs_model"]))
        base = results["base"]
        results["plan_361k"] = plan(base["per_study_s_1_worker"], base["new_int16_hu_bytes"], base["old_float16_3win_bytes"],
                                    results["index_open_s_per_study"])
        emit(results, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
