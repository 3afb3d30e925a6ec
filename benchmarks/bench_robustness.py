"""How much the answer moves when the head lies differently: pose, field of view, kernel, noise, slices.

Clear cases only (phantoms on which the model is at least `--margin` away from its threshold for
any_hemorrhage), each analysed as made (the baseline, same run) and under one perturbation at a
time: a rigid move (up to 5 mm and 5 degrees), the vertex cut by 1 or 2 cm, the neck cut by 3 cm,
a smoother or sharper reconstruction kernel, more noise, and thicker slices. Reported per
perturbation: mean and max |dp| over every finding, and how many clear any_hemorrhage decisions flip
(target: none).

    python benchmarks/bench_robustness.py --cases 12 --json benchmarks/results/robustness.json
    python benchmarks/bench_robustness.py --model OLD_BUNDLE NEW_BUNDLE --json ...   # before / after, same cases
"""
from __future__ import annotations

import argparse

import numpy as np
from common import emit, machine

RIGID_DRAWS = 3


def perturbations(rng: np.random.Generator) -> dict:
    """name -> function(Volume) -> Volume."""
    from fmct.phantom.variations import cut, kernel, noise, rigid, thicker_slices

    pert = {
        "vertex cut 1 cm": lambda v: cut(v, superior_mm=10.0),
        "vertex cut 2 cm": lambda v: cut(v, superior_mm=20.0),
        "neck cut 3 cm": lambda v: cut(v, inferior_mm=30.0),
        "smooth kernel (0.8 mm)": lambda v: kernel(v, sigma_mm=0.8),
        "sharp kernel": lambda v: kernel(v, sigma_mm=0.8, sharpen=1.0),
        "noise +15 HU": lambda v: noise(v, 15.0, rng),
        "slices x2 thicker": lambda v: thicker_slices(v, 2),
    }
    for n in range(RIGID_DRAWS):
        angle, axis = rng.uniform(3.0, 5.0), rng.normal(size=3)
        shift = rng.normal(size=3)
        shift = shift / np.linalg.norm(shift) * rng.uniform(3.0, 5.0)
        pert[f"rigid {n + 1} ({angle:.1f} deg, {np.linalg.norm(shift):.1f} mm)"] = (
            lambda v, a=angle, ax=axis, s=shift: rigid(v, a, ax, s))
    return pert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=[None],
                    help="bundle(s) (default: the bundled demo model); with two or more (before, after), the same "
                         "cases, clear for every one of them, and the same perturbations")
    ap.add_argument("--cases", type=int, default=12, help="clear cases to keep")
    ap.add_argument("--margin", type=float, default=0.2, help="|p - threshold| of any_hemorrhage for a clear case")
    ap.add_argument("--seed", type=int, default=500)
    ap.add_argument("--json")
    args = ap.parse_args()

    from fmct.inference.analyze import Analyzer
    from fmct.phantom import make_phantom

    models = [Model(Analyzer(path, device="cpu"), path) for path in args.model]
    cases, seed, tried = [], args.seed, 0
    while len(cases) < args.cases and tried < 6 * args.cases:
        ph = make_phantom(seed, slices="thin" if seed % 2 else "thick", in_plane_size=256)
        seed, tried = seed + 1, tried + 1
        p = [m.probs(ph.volume) for m in models]
        if all(m.clear(q, args.margin) for m, q in zip(models, p)):
            cases.append((ph.volume, p))
    rng = np.random.default_rng(args.seed)
    rows: dict = {m.label: {} for m in models}
    for name, perturb in perturbations(rng).items():
        for i, m in enumerate(models):
            dps, flips = [], 0
            for volume, p0 in cases:
                p = m.probs(perturb(volume))
                dps.append(np.abs(p - p0[i]))
                flips += int(m.positive(p) != m.positive(p0[i]))
            dps = np.stack(dps)
            row = rows[m.label][name] = {
                "mean_abs_dp": round(float(dps.mean()), 4), "max_abs_dp": round(float(dps.max()), 4),
                "any_hemorrhage_mean_abs_dp": round(float(dps[:, m.index].mean()), 4),
                "clear_decisions_flipped": f"{flips}/{len(cases)}"}
            print(f"{name:<34} {m.label:<24} mean |dp| {row['mean_abs_dp']:.3f}  max {row['max_abs_dp']:.3f}  "
                  f"any_hemorrhage flips {row['clear_decisions_flipped']}")
    emit({"machine": machine(), "models": {m.label: m.analyzer.bundle.meta.name for m in models},
          "clear_cases": len(cases), "positives": {m.label: int(sum(m.positive(p[i]) for _, p in cases))
                                                    for i, m in enumerate(models)},
          "margin": args.margin, "rows": rows if len(models) > 1 else rows[models[0].label]}, args.json)


class Model:
    """One bundle's probabilities and its any_hemorrhage decision."""

    def __init__(self, analyzer, path: str | None):
        self.analyzer, self.label = analyzer, path or "bundled demo model"
        self.index = analyzer.bundle.meta.task_names.index("any_hemorrhage")
        self.threshold = analyzer.bundle.meta.tasks[self.index].threshold

    def probs(self, volume) -> np.ndarray:
        return self.analyzer.probabilities(self.analyzer.preprocessor(volume).array)[0]

    def positive(self, p: np.ndarray) -> bool:
        return bool(p[self.index] >= self.threshold)

    def clear(self, p: np.ndarray, margin: float) -> bool:
        return abs(p[self.index] - self.threshold) >= margin


if __name__ == "__main__":
    main()
