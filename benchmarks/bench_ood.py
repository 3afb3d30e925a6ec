"""How well the out-of-distribution score separates CTs the model was not trained on.

The bundled demo model's score on fresh phantoms of its own training distribution (the demo
recipe's test-split seeds, "default" anatomy, thick and thin) against: the "ood" anatomy preset,
contrast-enhanced heads, heads at 0.7 and 0.5 of adult size, and scans holding only the vertex.
Reported: AUROC of the score (1 = perfect separation), the share flagged at the bundle's
threshold (the calibrated rate for in-distribution CTs is 1 - 0.975), and the share flagged by the
verdict of the score (with the bundle's margin, if any). Since issue 26 partial and small heads never reach
the score: the model-independent size check (fmct.checks) refuses them first (benchmarks/checks_issue26.py).

    python benchmarks/bench_ood.py --n 60 --json benchmarks/results/ood.json
"""
from __future__ import annotations

import argparse

import numpy as np
from common import emit, machine



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="CTs per group")
    ap.add_argument("--model")
    ap.add_argument("--json")
    args = ap.parse_args()

    from fmct.inference.analyze import Analyzer
    from fmct.features.metrics import auroc
    from fmct.phantom import make_phantom
    from fmct.phantom.variations import contrast_enhanced, scaled, vertex_only

    analyzer = Analyzer(args.model, device="cpu")

    def judge(volume) -> tuple[float, bool]:
        """The score, and whether the score's verdict flags the CT."""
        model_input = analyzer.preprocessor(volume)
        _, features = analyzer.runner.run(model_input.array)
        record = analyzer.reference.judge(features)
        return float(analyzer.reference.score(features)[0]), not record["in_distribution"]

    def phantom(seed: int, i: int, anatomy: str = "default"):
        return make_phantom(seed, slices="thick" if i % 2 == 0 else "thin", in_plane_size=(128, 160)[(i // 2) % 2],
                            anatomy=anatomy).volume

    threshold = analyzer.reference.threshold
    in_dist = np.array([judge(phantom(3_000_000 + i, i)) for i in range(args.n)])
    others = [phantom(7_000_000 + i, i) for i in range(args.n)]
    groups = {
        "'ood' anatomy preset": [judge(phantom(8_000_000 + i, i, "ood")) for i in range(args.n)],
        "contrast-enhanced": [judge(contrast_enhanced(v)) for v in others],
        "head at 0.7 of adult size": [judge(scaled(v, 0.7)) for v in others],
        "head at 0.5 of adult size": [judge(scaled(v, 0.5)) for v in others],
        "vertex only (top 35%)": [judge(vertex_only(v)) for v in others],
    }
    rows = {"in distribution (demo test seeds)": {"n": len(in_dist), "flagged": round(float(np.mean(in_dist[:, 0] > threshold)), 3),
                                                  "flagged_by_verdict": round(float(np.mean(in_dist[:, 1])), 3)}}
    for name, judged in groups.items():
        judged = np.array(judged)
        y = np.r_[np.zeros(len(in_dist)), np.ones(len(judged))]
        rows[name] = {"n": len(judged), "auroc": round(float(auroc(y, np.r_[in_dist[:, 0], judged[:, 0]])), 3),
                      "flagged": round(float(np.mean(judged[:, 0] > threshold)), 3),
                      "flagged_by_verdict": round(float(np.mean(judged[:, 1])), 3)}
    for name, row in rows.items():
        print(f"{name:<36} {row}")
    emit({"machine": machine(), "model": analyzer.bundle.meta.name, "threshold": threshold, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
