"""Batch analysis throughput (studies per hour) and how much of the time the model waits for data.

--n copies (hard links) of the 5 mm DICOM study (512x512x40) are analyzed with Integrated Gradients
for each positive finding, writing findings.json and saliency NIfTIs (no report.png, the batch
default). fmct.inference.batch.run_batch decodes in DataLoader workers and writes in threads; the baseline in
the same run is the plain loop a script would write (read -> Analyzer.analyze -> write, one study
after another, same process, same model). Ratio = batch studies/h / loop studies/h.
"model busy" is the share of wall time the main loop spends in predict + explain (on a GPU: the
GPU is working); "waiting for data" is the share spent waiting for the next decoded study.

    python benchmarks/bench_batch.py --device cpu --threads 2 --n 8
    python benchmarks/bench_batch.py --device cuda --n 64 --workers 12 --json out/batch_gpu.json

--cpu-arms (the CPU question: threads vs processes, and oversubscription): the demo model on CPU,
findings only and with IG maps, each run with 0 or 1 decoding processes and SimpleITK (decoding in
this process, mapping back in the writer thread) on every core or on one, rounds interleaved; ratio
= studies/h against today's default (0 workers, SimpleITK on every core) in the same round.

    python benchmarks/bench_batch.py --device cpu --threads 2 --cpu-arms --n 12 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import demo_bundle, dicom_study, emit, machine, set_threads


def base_bundle(work: Path) -> Path:
    """A random ViT-B/16 on 128^3 at 1.5 mm: what a GPU-bound model looks like (pretraining target size)."""
    import torch

    from fmct.inference.bundle import BundleMeta, Task, save_bundle
    from fmct.models import FMCTClassifier, preset
    from fmct.conventions.tasks import TASKS
    from fmct.preprocessing.spec import PreprocessSpec

    target = work / "bundle_base"
    if target.exists():
        return target
    torch.manual_seed(0)
    spec = PreprocessSpec(spacing_mm=(1.5, 1.5, 1.5), size=(128, 128, 128))
    cfg = preset("base", img_size=spec.tensor_shape, in_chans=spec.in_channels)
    meta = BundleMeta("benchmark-base", cfg, spec, [Task(t, t) for t in TASKS],
                      description="random weights")
    model = FMCTClassifier(cfg, len(TASKS)).eval()
    with torch.no_grad():  # exactly one positive finding, so each CT gets one saliency map
        model.head.fc.bias.fill_(-10.0)
        model.head.fc.bias[0] = 10.0
    return save_bundle(model, meta, target)


def make_studies(work: Path, n: int) -> Path:
    src = dicom_study("thick", work / "thick")
    root = work / f"batch_{n}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        for i in range(n):
            d = root / f"study_{i:04d}"
            d.mkdir(parents=True)
            for f in src.iterdir():
                if not f.name.startswith("."):
                    os.link(f, d / f.name)
        (root / ".complete").write_text("ok")
    return root


def sequential(analyzer, root: Path, out: Path, n: int) -> float:
    """The baseline: one study after another in this process; returns wall seconds for n studies."""
    from fmct.reading.files import read_volume
    from fmct.inference.study_folder import write_study_outputs

    studies = sorted(p for p in root.iterdir() if p.is_dir())[:n]
    t0 = time.perf_counter()
    for s in studies:
        volume = read_volume(s)
        result = analyzer.analyze(volume, "integrated_gradients", "positive")
        write_study_outputs(out / s.name, volume, result, analyzer.bundle.meta.name, str(analyzer.device), report=False)
    return time.perf_counter() - t0


def cpu_arms(args, work: Path, root: Path) -> dict:
    """Studies/h of run_batch on CPU per (explain, decoding workers, SimpleITK threads), interleaved."""
    import SimpleITK as sitk

    from fmct.inference.analyze import Analyzer
    from fmct.inference.batch import run_batch
    from fmct.reading.files import read_volume

    analyzer = Analyzer(demo_bundle(work), device="cpu")
    analyzer.analyze(read_volume(root / "study_0000"))  # warm-up
    cores = args.threads or os.cpu_count() or 1
    arms = [(explain, workers, st) for explain in ("none", "integrated_gradients") for workers in (0, 1)
            for st in (cores, 1)]
    rates: dict[tuple, list[float]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm in arms:
            explain, workers, st = arm
            if explain != "none" and r >= args.ig_rounds:
                continue
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(st)
            out = work / "out_batch_arms"
            shutil.rmtree(out, ignore_errors=True)
            rep = run_batch(analyzer, root, out, explain_method=None if explain == "none" else explain,
                            num_workers=workers)
            assert rep.counts.get("ok") == args.n, rep.counts
            rates[arm].append(rep.studies_per_hour)
            print(f"  round {r + 1}: {explain}, {workers} decoding process(es), SimpleITK {st} thread(s): "
                  f"{rep.studies_per_hour:.0f} studies/h", flush=True)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cores)
    rows = []
    for explain in ("none", "integrated_gradients"):
        if not rates[(explain, 0, cores)]:
            continue
        base = statistics.median(rates[(explain, 0, cores)])
        for arm in [a for a in arms if a[0] == explain]:
            med = statistics.median(rates[arm])
            rows.append({"explain": explain, "workers": arm[1], "sitk_threads": arm[2], "studies_per_h": med,
                         "ratio_vs_default": med / base, "rounds": rates[arm]})
            print(f"{explain:>22}, {arm[1]} decoding process(es), SimpleITK {arm[2]} thread(s): {med:.0f} studies/h "
                  f"= {med / base:.2f}x today's default", flush=True)
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n", type=int, default=8, help="studies in the batch")
    ap.add_argument("--n-baseline", type=int, default=None, help="studies for the sequential baseline (default n/4, >= 2)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default min(4, CPUs))")
    ap.add_argument("--models", default="demo", help="comma list: demo (the demo model's size), base (ViT-B/16, 128^3)")
    ap.add_argument("--compile", action="store_true", help="Analyzer(compile=True) for the batch")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fmct_bench"))
    ap.add_argument("--cpu-arms", action="store_true", help="CPU: decoding processes x SimpleITK threads, see above")
    ap.add_argument("--rounds", type=int, default=3, help="--cpu-arms: interleaved rounds")
    ap.add_argument("--ig-rounds", type=int, default=1, help="--cpu-arms: rounds that include the IG arms")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    import logging

    logging.getLogger("fmct").setLevel(logging.WARNING)
    from fmct.inference.analyze import Analyzer
    from fmct.inference.batch import run_batch
    from fmct.reading.files import read_volume

    work = Path(args.work)
    root = make_studies(work, args.n)
    n_base = args.n_baseline or max(2, args.n // 4)
    results = {"benchmark": "batch", "machine": machine(args.device, threads), "n": args.n, "rows": []}
    if args.cpu_arms:
        results["cpu_arms"] = cpu_arms(args, work, root)
        emit(results, args.json)
        return
    for name in args.models.split(","):
        bundle = demo_bundle(work) if name == "demo" else base_bundle(work)
        analyzer = Analyzer(bundle, device=args.device, compile=args.compile)
        analyzer.analyze(read_volume(root / "study_0000"))  # warm-up
        out = work / f"out_batch_{name}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / f"out_seq_{name}", ignore_errors=True)
        seq_s = sequential(analyzer, root, work / f"out_seq_{name}", n_base)
        rep = run_batch(analyzer, root, out, explain_method="integrated_gradients", num_workers=args.workers)
        assert rep.counts.get("ok") == args.n, rep.counts
        seq_per_h = 3600 * n_base / seq_s
        row = {"model": name, "bundle": str(bundle), "workers": args.workers, "compiled": args.compile,
               "batch_studies_per_h": rep.studies_per_hour, "sequential_studies_per_h": seq_per_h,
               "ratio_batch_over_sequential": rep.studies_per_hour / seq_per_h,
               "model_busy_share": rep.model_busy_share, "data_wait_share": rep.data_wait_share,
               "pipeline_fill_s": rep.first_wait_s, "write_wait_s": rep.write_wait_s, "wall_s": rep.wall_s,
               "model_s_per_study": rep.model_s / args.n}
        results["rows"].append(row)
        print(f"[{args.device}] {name}: batch {rep.studies_per_hour:.0f} studies/h vs loop {seq_per_h:.0f} studies/h "
              f"= {row['ratio_batch_over_sequential']:.2f}x | model busy {100 * rep.model_busy_share:.0f}%, waiting "
              f"for data {100 * rep.data_wait_share:.0f}% (fill {rep.first_wait_s:.1f} s), back-pressure from "
              f"writers {rep.write_wait_s:.1f} s, model {1000 * row['model_s_per_study']:.0f} ms/study", flush=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
