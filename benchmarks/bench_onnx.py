"""onnxruntime CPU against torch CPU on the same bundle, same threads, same run.

The demo-sized bundle (Resources/DemoModel if present, else a random model of its size) is
exported with `fmct export --onnx` into a temporary copy; then the model forward (model tensor ->
calibrated probabilities, batch 1) and `fmct analyze` findings-only on the 5 mm CT (read ->
preprocess -> probabilities, no saliency) are timed with Analyzer(backend="torch") and
Analyzer(backend="onnx"). Ratio = torch seconds / onnxruntime seconds (above 1: onnxruntime is faster).

    python benchmarks/bench_onnx.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import demo_bundle, dicom_study, emit, machine, set_threads, timeit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fmct_bench"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    from fmct.inference.analyze import Analyzer
    from fmct.reading.files import read_volume
    from fmct.export.onnx import export_onnx

    work = Path(args.work)
    bundle = demo_bundle(work)
    t0 = time.perf_counter()
    record = export_onnx(bundle)
    export_s = time.perf_counter() - t0
    torch_an = Analyzer(bundle, device="cpu")
    onnx_an = Analyzer(bundle, device="cpu", backend="onnx", threads=threads)
    folder = dicom_study("thick", work / "thick")
    x = torch_an.preprocessor(read_volume(folder)).array
    diff = float(np.abs(torch_an.probabilities(x) - onnx_an.probabilities(x)).max())

    fwd = {"torch": [], "onnx": []}
    e2e = {"torch": [], "onnx": []}
    for an in (torch_an, onnx_an):  # warm-up
        an.probabilities(x)
    for _ in range(args.repeat):  # alternate, so load drift on a shared host hits both alike
        for name, an in (("torch", torch_an), ("onnx", onnx_an)):
            fwd[name].append(timeit(lambda: an.probabilities(x), warmup=0, repeat=1))
    for _ in range(max(3, args.repeat // 5)):
        for name, an in (("torch", torch_an), ("onnx", onnx_an)):
            e2e[name].append(timeit(lambda: an.analyze(read_volume(folder), explain_method=None), warmup=0, repeat=1))
    row = {
        "forward_s": {k: statistics.median(v) for k, v in fwd.items()},
        "findings_only_end_to_end_s": {k: statistics.median(v) for k, v in e2e.items()},
        "max_abs_diff_probability_on_5mm_ct": diff,
        "export": {"seconds": export_s, "opset": record["opset"],
                   "max_abs_diff_probability": record["max_abs_diff_probability"]},
    }
    row["ratio_forward_torch_over_onnx"] = row["forward_s"]["torch"] / row["forward_s"]["onnx"]
    row["ratio_end_to_end_torch_over_onnx"] = (row["findings_only_end_to_end_s"]["torch"]
                                               / row["findings_only_end_to_end_s"]["onnx"])
    results = {"benchmark": "onnx", "machine": machine("cpu", threads), "bundle": str(bundle), "rows": [row]}
    print(f"[cpu x{threads}] forward: torch {1000 * row['forward_s']['torch']:.1f} ms, onnxruntime "
          f"{1000 * row['forward_s']['onnx']:.1f} ms -> {row['ratio_forward_torch_over_onnx']:.2f}x | findings-only "
          f"analyze of the 5 mm CT: torch {row['findings_only_end_to_end_s']['torch']:.3f} s, onnxruntime "
          f"{row['findings_only_end_to_end_s']['onnx']:.3f} s -> {row['ratio_end_to_end_torch_over_onnx']:.2f}x | "
          f"max |dp| {diff:.1e}", flush=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
