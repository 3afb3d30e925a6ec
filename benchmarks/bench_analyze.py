"""Analyze end to end: read a DICOM series -> findings + one saliency map, with a breakdown by stage.

Two head CTs are written as DICOM series once: 512x512x40 at 5 mm (thick) and 512x512x300 at
0.625 mm (thin). Each stage is timed on the real code path (Analyzer.preprocessor,
Analyzer.analyze_prepared, Analyzer.map_back; exactly what Analyzer.analyze runs), warm (model
loaded, one analysis done), median of --repeat runs. Integrated Gradients explains the most
probable finding. Writing the result folder is timed separately (it is not part of "analyze").
The baselines in the same run are the issue's targets (5 s on 2 CPU cores, 1 s on a GPU, for the
5 mm CT) and the time to just read the series (the floor any pipeline pays).

    python benchmarks/bench_analyze.py --device cpu --threads 2
    python benchmarks/bench_analyze.py --device cuda --compile --json out/analyze_gpu.json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import demo_bundle, dicom_study, emit, machine, set_threads, sync

TARGET_S = {"cpu": 5.0, "cuda": 1.0}  # the targets, for the 5 mm CT


def analyze_once(analyzer, folder: Path, out: Path, device: str, write: bool) -> dict[str, float]:
    from fmct.reading.files import read_volume
    from fmct.inference.study_folder import write_study_outputs
    from fmct.inference.report_png import write_report

    t = {}
    t0 = time.perf_counter()
    volume = read_volume(folder)
    t["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_input = analyzer.preprocessor(volume)
    t["preprocess_s"] = time.perf_counter() - t0
    probe = analyzer.analyze_prepared(model_input, None)  # which finding is most probable (not timed twice)
    top = max(probe.findings, key=lambda f: f.probability).name
    sync(device)
    t0 = time.perf_counter()
    result = analyzer.analyze_prepared(model_input, "integrated_gradients", [top], map_back=False)
    sync(device)
    t["predict_s"] = result.timings["predict_s"]
    t["explain_s"] = time.perf_counter() - t0 - t["predict_s"]
    t0 = time.perf_counter()
    result.saliency[top] = analyzer.map_back(result, top)
    t["map_back_s"] = time.perf_counter() - t0
    t["total_s"] = sum(t.values())
    if write:
        t0 = time.perf_counter()
        write_study_outputs(out, volume, result, analyzer.bundle.meta.name, str(analyzer.device), report=False)
        t["write_findings_and_saliency_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_report(volume, result, out / "report.png", analyzer.bundle.meta.name)
        t["write_report_png_s"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--kinds", default="thick,thin")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fmct_bench"), help="where test CTs are cached")
    ap.add_argument("--compile", action="store_true", help="also run with Analyzer(compile=True)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    from fmct.inference.analyze import Analyzer

    work = Path(args.work)
    bundle = demo_bundle(work)
    results = {"benchmark": "analyze", "machine": machine(args.device, threads), "bundle": str(bundle), "rows": []}
    kind_of_device = "cuda" if args.device.startswith("cuda") else "cpu"
    for compiled in ([False, True] if args.compile else [False]):
        t0 = time.perf_counter()
        analyzer = Analyzer(bundle, device=args.device, compile=compiled)
        for kind in args.kinds.split(","):
            folder = dicom_study(kind, work / kind)
            try:
                first = analyze_once(analyzer, folder, work / "out", args.device, write=False)  # warm-up
            except Exception as e:  # torch.compile can fail on a machine without a compiler: keep the other rows
                results["rows"].append({"ct": kind, "compiled": compiled, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"[{args.device}] {kind} compiled={compiled}: FAILED {e}", flush=True)
                continue
            cold = time.perf_counter() - t0 if kind == args.kinds.split(",")[0] else None
            runs = [analyze_once(analyzer, folder, work / "out" / kind, args.device, write=True) for _ in range(args.repeat)]
            stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            row = {"ct": kind, "compiled": compiled, "stages": stages, "first_call_s": first["total_s"],
                   "cold_start_incl_model_load_s": cold,
                   "ratio_to_read_only": stages["total_s"] / stages["read_s"]}
            if kind == "thick":
                row["target_s"] = TARGET_S[kind_of_device]
                row["ratio_to_target"] = stages["total_s"] / TARGET_S[kind_of_device]
                row["target_met"] = stages["total_s"] <= TARGET_S[kind_of_device]
            results["rows"].append(row)
            parts = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in stages.items() if k != "total_s")
            extra = f"; {row['ratio_to_target']:.2f}x the {row['target_s']:g} s target" if "target_s" in row else ""
            print(f"[{args.device}{' compiled' if compiled else ''}] {kind}: {stages['total_s']:.3f} s read->findings+1 "
                  f"saliency ({row['ratio_to_read_only']:.1f}x reading alone{extra}) | {parts}", flush=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
