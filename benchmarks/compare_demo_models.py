"""Two demo-model bundles on the same test phantoms: AUROC per finding and anatomy, paired.

The test splits are the ones a demo-recipe run kept in its --resume folder
(`split-test-<anatomy>.safetensors`: preprocessed phantoms whose seeds no training split uses), so
both bundles see exactly the same cases. Per finding: AUROC with a 95% bootstrap CI over test cases,
the difference (second - first) with a paired CI (the same resamples for both), and the ECE of each
bundle's calibrated probabilities. For each hemorrhage type also its AUROC among the bleeding CTs
only: a head that only tells bleed from none scores ~0.5 there, however high its overall AUROC.

    python benchmarks/compare_demo_models.py --splits RUN_DIR --bundles OLD NEW --json benchmarks/results/demo_models.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import bootstrap_aurocs, ci95, emit, machine, set_threads


def calibrated_probabilities(bundle_path: str, x) -> np.ndarray:
    """The bundle's probabilities for preprocessed phantoms, with its own temperatures."""
    import torch

    from fmct.inference.bundle import load_bundle
    from fmct.train.supervised import predict_logits

    bundle = load_bundle(bundle_path)
    logits = predict_logits(bundle.model, x, torch.device("cpu"))
    temps = np.array([t.temperature for t in bundle.meta.tasks])
    return 1 / (1 + np.exp(-logits / temps))


def paired(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict:
    """AUROC of a and b with CIs, and b - a with the CI of the same resamples."""
    from fmct.features.metrics import auroc

    d = bootstrap_aurocs(y, [[a], [b]], n_boot, seed)
    first, second = auroc(y, a), auroc(y, b)
    return {"first": round(first, 4), "first_ci95": ci95(d[:, 0]), "second": round(second, 4), "second_ci95": ci95(d[:, 1]),
            "difference": round(second - first, 4), "difference_ci95": ci95(d[:, 1] - d[:, 0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=Path, required=True, help="a demo-recipe --resume folder")
    ap.add_argument("--bundles", nargs=2, required=True, metavar=("FIRST", "SECOND"))
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    from safetensors.torch import load_file

    from fmct.features.metrics import expected_calibration_error
    from fmct.conventions.tasks import HEMORRHAGE_TYPES, TASKS

    results = {"machine": machine("cpu", threads), "bundles": args.bundles, "anatomies": {}}
    for path in sorted(args.splits.glob("split-test-*.safetensors")):
        anatomy = path.stem.removeprefix("split-test-")
        t = load_file(str(path))
        y = t["y"].numpy().astype(np.float64)
        p = [calibrated_probabilities(b, t["x"]) for b in args.bundles]
        rows = {}
        for i, task in enumerate(TASKS):
            rows[task] = {**paired(y[:, i], p[0][:, i], p[1][:, i], args.boot, seed=i),
                          "ece": [round(expected_calibration_error(y[:, i], q[:, i]), 4) for q in p],
                          "positives": int(y[:, i].sum())}
            r = rows[task]
            print(f"{anatomy:>9} {task:<18} {r['first']:.3f} [{r['first_ci95'][0]:.3f}, {r['first_ci95'][1]:.3f}] -> "
                  f"{r['second']:.3f} [{r['second_ci95'][0]:.3f}, {r['second_ci95'][1]:.3f}]  "
                  f"{r['difference']:+.3f} [{r['difference_ci95'][0]:+.3f}, {r['difference_ci95'][1]:+.3f}]  "
                  f"ECE {r['ece'][0]:.3f} -> {r['ece'][1]:.3f}")
            if task in HEMORRHAGE_TYPES:  # does the head tell this type from other bleeds, or only bleed from none?
                bleed = y[:, TASKS.index("any_hemorrhage")] == 1
                w = r["within_bleeds"] = paired(y[bleed, i], p[0][bleed, i], p[1][bleed, i], args.boot, seed=100 + i)
                print(f"{'':>9} {'  among bleeds':<18} {w['first']:.3f} -> {w['second']:.3f} "
                      f"[{w['second_ci95'][0]:.3f}, {w['second_ci95'][1]:.3f}]  (chance 0.5; {int(bleed.sum())} bleeding CTs)")
        results["anatomies"][anatomy] = {"n": int(len(y)), "findings": rows}
    if not results["anatomies"]:
        raise SystemExit(f"{args.splits} holds no split-test-*.safetensors: run the demo recipe with --resume {args.splits}")
    emit(results, args.json)


if __name__ == "__main__":
    main()
