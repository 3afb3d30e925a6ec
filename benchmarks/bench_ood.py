"""How well the out-of-distribution score separates CTs the model was not trained on.

The bundled demo model's score on fresh phantoms of its own training distribution (the demo
recipe's test-split seeds, "default" anatomy, thick and thin) against: the "ood" anatomy preset,
contrast-enhanced heads, heads at 0.7 and 0.5 of adult size, and scans holding only the vertex.
Reported: AUROC of the score (1 = perfect separation) and the share flagged at the bundle's
threshold (the calibrated rate for in-distribution CTs is 1 - 0.975).

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

    from fmct.analyze import Analyzer
    from fmct.evaluate import auroc
    from fmct.phantom import make_phantom
    from fmct.phantom.variations import contrast_enhanced, scaled, vertex_only

    analyzer = Analyzer(args.model, device="cpu")

    def score(volume) -> float:
        _, features = analyzer.runner.run(analyzer.preprocessor(volume).array)
        return float(analyzer.reference.score(features)[0])

    def phantom(seed: int, i: int, anatomy: str = "default"):
        return make_phantom(seed, slices="thick" if i % 2 == 0 else "thin", in_plane_size=(128, 160)[(i // 2) % 2],
                            anatomy=anatomy).volume

    threshold = analyzer.reference.threshold
    in_dist = np.array([score(phantom(3_000_000 + i, i)) for i in range(args.n)])
    others = [phantom(7_000_000 + i, i) for i in range(args.n)]
    groups = {
        "'ood' anatomy preset": [score(phantom(8_000_000 + i, i, "ood")) for i in range(args.n)],
        "contrast-enhanced": [score(contrast_enhanced(v)) for v in others],
        "head at 0.7 of adult size": [score(scaled(v, 0.7)) for v in others],
        "head at 0.5 of adult size": [score(scaled(v, 0.5)) for v in others],
        "vertex only (top 35%)": [score(vertex_only(v)) for v in others],
    }
    rows = {"in distribution (demo test seeds)": {"n": len(in_dist), "flagged": round(float(np.mean(in_dist > threshold)), 3)}}
    for name, scores in groups.items():
        scores = np.array(scores)
        y = np.r_[np.zeros(len(in_dist)), np.ones(len(scores))]
        rows[name] = {"n": len(scores), "auroc": round(float(auroc(y, np.r_[in_dist, scores])), 3),
                      "flagged": round(float(np.mean(scores > threshold)), 3)}
    for name, row in rows.items():
        print(f"{name:<36} {row}")
    emit({"machine": machine(), "model": analyzer.bundle.meta.name, "threshold": threshold, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
