"""Issue 26: the model-independent checks (fmct.checks) on clean and hostile phantoms.

Clean: phantoms of every anatomy preset, thick, thin and random slices (seeds --seeds); every check
must pass (false refusals or flags are counted). Hostile: one head (seed 2, thick, 128 px) made
hostile as Testing/test_checks.py does; each must be refused or flagged by the named check. Also the
time of run_checks on a 512 x 512 thick-slice phantom (median of 3).

    python benchmarks/checks_issue26.py --seeds 0 10 --json benchmarks/results/checks_issue26.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import emit, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=(0, 10))
    ap.add_argument("--json")
    args = ap.parse_args()

    from fmct.checks.runner import run_checks
    from fmct.phantom import ANATOMY_PRESETS, make_phantom
    from fmct.reading.volume import Volume

    clean = {"n": 0, "not_passed": [], "orientation_not_judged": 0, "height_mm": [], "cavity_area_mm2": []}
    for preset in ANATOMY_PRESETS:
        for seed in range(*args.seeds):
            for slices in ("thick", "thin", "random"):
                report = run_checks(make_phantom(seed, slices=slices, in_plane_size=128, anatomy=preset).volume,
                                    refuse=False)
                clean["n"] += 1
                values = {c.name: c for c in report.checks}
                size = values["plausible head size"].value or {}
                clean["height_mm"].append(size.get("height_mm"))
                clean["cavity_area_mm2"].append(size.get("cavity_area_mm2"))
                clean["orientation_not_judged"] += values["orientation"].message.startswith("not judged")
                if not report.passed:
                    clean["not_passed"].append([preset, seed, slices, [c.name for c in report.checks if not c.passed]])
    for key in ("height_mm", "cavity_area_mm2"):
        v = [x for x in clean[key] if x is not None]
        clean[key] = [min(v), max(v)]

    head = make_phantom(2, slices="thick", in_plane_size=128).volume
    a, sp = head.array, head.spacing

    def same(array):
        return Volume(np.ascontiguousarray(array), sp, head.origin, head.direction)

    def cut(share, axis):
        other = 1 if axis == 2 else 2
        present = np.nonzero((a > -300).any(axis=(0, other)))[0]
        start = int(present.min() + share * (present.max() - present.min()))
        index = [slice(None)] * 3
        index[axis] = slice(start, None)
        origin = np.asarray(head.origin, float)
        origin[2 - axis] += start * sp[2 - axis]
        return Volume(a[tuple(index)].copy(), sp, origin, head.direction)

    sheared = np.eye(3)
    sheared[0, 1] = 0.3
    mr = np.interp(a, [-1024, -100, 0, 15, 25, 45, 100, 400, 1500, 3000], [-1000, -1000, 600, 550, 250, 300, 300, 100, 50, 50])
    hostile = {"rotated 90 in-plane": same(np.rot90(a, 1, axes=(1, 2))), "rotated 180 in-plane": same(np.rot90(a, 2, axes=(1, 2))),
               "upside down": same(a[::-1]), "front-back flipped (prone under supine)": same(a[:, ::-1]),
               **{f"cut {int(100 * s)}% {'left-right' if ax == 2 else 'front-back'}": cut(s, ax)
                  for s in (0.15, 0.25, 0.35, 0.45) for ax in (2, 1)},
               "HU x10": same(a * 10.0), "inverted": same(-a), "MR-like": same(mr.astype(np.float32)),
               "spacing x0.7": Volume(a, (sp[0] * 0.7, sp[1] * 0.7, sp[2]), head.origin),
               "spacing x1.5": Volume(a, (sp[0] * 1.5, sp[1] * 1.5, sp[2]), head.origin),
               "sheared direction": Volume(a, sp, head.origin, sheared)}
    hostile_rows = {}
    for name, volume in hostile.items():
        report = run_checks(volume, refuse=False)
        failed = [c for c in report.checks if not c.passed]
        hostile_rows[name] = {"caught_by": [c.name for c in failed], "refused": any(c.refuses for c in failed),
                              "message": failed[0].message[:160] if failed else "NOT CAUGHT"}
    big = make_phantom(2, slices="thick", in_plane_size=512).volume
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run_checks(big)
        times.append(time.perf_counter() - t0)
    record = {"machine": machine(), "clean": clean, "hostile": hostile_rows,
              "run_checks_s_512x512x%d" % big.array.shape[0]: round(statistics.median(times), 3)}
    print(clean)
    for name, row in hostile_rows.items():
        print(f"{name:<40} {row['caught_by']} refused={row['refused']}")
    emit(record, args.json)


if __name__ == "__main__":
    main()
