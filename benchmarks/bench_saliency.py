"""Saliency for every finding: quality and cost of the shared explanation against the per-finding one.

quality: the RESULTS.md saliency benchmark (fmct.train.demo_model.measure_saliency's measures) on
  fresh phantoms, n per hemorrhage type (256 in-plane, thick and thin slices alternating), the map
  of the true finding mapped back onto the CT grid, with the demo model. Old = Captum's
  IntegratedGradients, 16 Gauss-Legendre steps, one finding at a time (how every map was made
  before); new = fmct.inference.explain.explain_findings at each --steps. All arms on the same phantoms.
  Enrichment = share of the map in the lesion / the lesion's share of the head (1 = chance);
  pointing game = the map's maximum within 5 mm of the lesion.
cost: on the 5 mm 512x512x40 CT of benchmarks/common.py (--ct thin: 512x512x300), warm, in one process: analyze + write the
  result folder (findings.json, saliency NIfTIs, report.png: what `fmct analyze` does after loading)
  with --explain none, then with maps for the first K positive findings (K = 1, half, all), rounds
  interleaved so drifting load hits every arm alike; plus the old per-finding loop (Captum) for
  all positive findings. Prints the ratios the issue asks for: all maps / findings only, and the
  growth per extra finding.

    python benchmarks/bench_saliency.py --threads 2 --part quality --n 6
    python benchmarks/bench_saliency.py --threads 2 --part cost --repeat 3
    python benchmarks/bench_saliency.py --threads 1 --part twins --n 2 --json benchmarks/results/saliency_issue27.json
    python benchmarks/bench_saliency.py --threads 1 --part completeness --n-cases 3 --json benchmarks/results/saliency_completeness.json
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import demo_bundle, dicom_study, emit, machine, set_threads

SEED_BASE = 4_600_000  # fresh: neither training (1-3 M), nor demo_model's saliency seeds (4.0 M)


def quality(args, bundle) -> dict:
    from fmct.inference.analyze import Analyzer
    from fmct.features.metrics import pointing_game, saliency_in_mask
    from fmct.inference.explain import explain_captum, explain_findings
    from fmct.phantom import make_phantom
    from fmct.conventions.tasks import HEMORRHAGE_TYPES

    analyzer = Analyzer(bundle, device=DEVICE)
    pre, names = analyzer.preprocessor, analyzer.bundle.meta.task_names
    arms = ["old: Captum IG 16 steps, per finding"] + [f"new: shared IG {s} steps" for s in args.steps]
    rows = {arm: {t: [] for t in HEMORRHAGE_TYPES} for arm in arms}
    seconds = {arm: 0.0 for arm in arms}
    for t_i, task in enumerate(HEMORRHAGE_TYPES):
        for k in range(args.n):
            ph = make_phantom(SEED_BASE + 100 * t_i + k, findings=[task], slices="thick" if k % 2 == 0 else "thin",
                              in_plane_size=256)
            mi = pre(ph.volume)
            head, mask = ph.volume.array > -300, ph.masks[task]
            for arm in arms:
                t0 = time.perf_counter()
                if arm.startswith("old"):
                    model_map = explain_captum(analyzer.model, mi.tensor, names.index(task), ig_steps=16)
                else:
                    steps = int(arm.split()[3])
                    model_map = explain_findings(analyzer.model, mi.tensor, [names.index(task)], ig_steps=steps)[0]
                seconds[arm] += time.perf_counter() - t0
                sal = pre.to_input_grid(model_map, mi).array
                stats = saliency_in_mask(sal, mask, head)
                stats["hit"] = pointing_game(sal, mask, ph.volume.spacing[::-1])
                rows[arm][task].append(stats)
            print(f"  {task} {k + 1}/{args.n}", flush=True)
    table = {
        arm: {t: {"enrichment": float(np.mean([s["enrichment"] for s in r])),
                  "share_in_mask": float(np.mean([s["share_in_mask"] for s in r])),
                  "pointing_game": float(np.mean([s["hit"] for s in r])),
                  "mask_share_of_head": float(np.mean([s["mask_share_of_head"] for s in r]))}
              for t, r in per_task.items()}
        for arm, per_task in rows.items()
    }
    print(f"\nSaliency quality, {args.n} fresh phantoms per type (enrichment / share in mask / pointing game):")
    print(f"  {'arm':<40}" + "".join(f"{t[:16]:>24}" for t in HEMORRHAGE_TYPES) + f"{'mean enrichment':>18}{'s/map':>8}")
    for arm in arms:
        cells = "".join(f"{table[arm][t]['enrichment']:>9.1f}x/{100 * table[arm][t]['share_in_mask']:>5.1f}%/"
                        f"{table[arm][t]['pointing_game']:>4.2f}  " for t in HEMORRHAGE_TYPES)
        mean_e = np.mean([table[arm][t]["enrichment"] for t in HEMORRHAGE_TYPES])
        print(f"  {arm:<40}{cells}{mean_e:>16.1f}x{seconds[arm] / (args.n * len(HEMORRHAGE_TYPES)):>8.2f}")
    return {"table": table, "seconds_per_map": {a: s / (args.n * len(HEMORRHAGE_TYPES)) for a, s in seconds.items()}}


def dilate(mask: np.ndarray, voxels: int = 1) -> np.ndarray:
    """The mask grown by `voxels` along each axis (6-neighbourhood steps), numpy only."""
    out = mask.astype(bool).copy()
    for _ in range(voxels):
        grown = out.copy()
        for axis in range(out.ndim):
            for shift in (1, -1):
                rolled = np.roll(out, shift, axis=axis)
                edge = [slice(None)] * out.ndim
                edge[axis] = 0 if shift == 1 else -1  # np.roll wraps around: the wrapped layer is not a neighbour
                rolled[tuple(edge)] = False
                grown |= rolled
        out = grown
    return out


def twins(args, bundle) -> dict:
    """Issue 27's benchmark that the skull cannot fool: each CT against its lesion-free twin.

    The twin is the phantom of the same seed without the finding (the same head, scan and noise). Per
    map: twin share = the share of the map's increase over the twin's map (positive part of map(CT) -
    map(twin), both in attribution units) that lies in the lesion dilated by one voxel; strict pointing
    game = the map's peak in the lesion dilated by one voxel (on the CT's grid: 0.9 mm in-plane at 256 px,
    so it cannot reach the inner table 2-3 mm away), and whether the peak voxel's HU is in the blood range
    (40-100 HU); the old 5 mm pointing game beside them. Before = zero (air) baseline, 16 fixed nodes;
    after = the normal-head baseline with adaptive nodes (what analyze now does). p(baseline) and the
    completeness error of every map are recorded.
    """
    import torch

    from fmct.conventions.tasks import HEMORRHAGE_TYPES
    from fmct.features.metrics import pointing_game
    from fmct.inference.analyze import Analyzer
    from fmct.inference.baselines import make_baseline
    from fmct.inference.explain import explain_study
    from fmct.inference.calibration import calibrated_probabilities
    from fmct.phantom import make_phantom

    analyzer = Analyzer(bundle, device=DEVICE)
    pre, names, spec = analyzer.preprocessor, analyzer.bundle.meta.task_names, analyzer.bundle.meta.preprocessing
    arms = {"before: zero baseline, 16 nodes": ("zero", 16), "after: normal-head baseline, adaptive nodes": ("normal_head", None)}
    rows = []
    for t_i, task in enumerate(HEMORRHAGE_TYPES):
        t = names.index(task)
        temp = analyzer.bundle.meta.tasks[t].temperature
        threshold = analyzer.bundle.meta.tasks[t].threshold
        for k in range(args.n):
            seed = SEED_BASE + 100 * t_i + k
            ph = make_phantom(seed, findings=[task], slices="thick", in_plane_size=256)
            twin = make_phantom(seed, findings=[], slices="thick", in_plane_size=256)
            mi, mi_twin = pre(ph.volume), pre(twin.volume)
            lesion = dilate(ph.masks[task], 1)
            p_ct = float(analyzer.probabilities(mi.array)[0, t])
            for arm, (baseline_name, steps) in arms.items():
                maps, record = [], {"task": task, "seed": seed, "arm": arm, "p_ct": round(p_ct, 4), "threshold": threshold}
                for which, m in (("ct", mi), ("twin", mi_twin)):
                    base = torch.from_numpy(make_baseline(baseline_name, m.array[0], spec.windows))[None]
                    ex = explain_study(analyzer.model, m.tensor, [t], ig_steps=steps, baseline=base)
                    f = ex.findings[0]
                    maps.append(pre.to_input_grid(f.saliency, m).array)  # attribution units, on the CT grid
                    record[f"completeness_{which}"] = f.completeness
                    record[f"p_baseline_{which}"] = round(float(calibrated_probabilities(
                        np.asarray([[ex.baseline_logits[0]]]), [temp])[0, 0]), 4)
                diff = np.maximum(maps[0] - maps[1], 0)
                record["twin_share_in_lesion"] = float(diff[lesion].sum() / diff.sum()) if diff.sum() > 0 else 0.0
                record["lesion_share_of_head"] = float(lesion.sum() / max((ph.volume.array > -300).sum(), 1))
                peak = np.unravel_index(int(np.argmax(maps[0])), maps[0].shape)
                record["strict_hit"] = bool(lesion[peak])
                record["peak_hu"] = float(ph.volume.array[peak])
                record["peak_hu_in_blood_range"] = bool(40.0 <= ph.volume.array[peak] <= 100.0)
                record["old_hit_5mm"] = pointing_game(maps[0], ph.masks[task], ph.volume.spacing[::-1])
                rows.append(record)
                print(f"  {task} {k + 1}/{args.n} {arm[:6]}: twin share {record['twin_share_in_lesion']:.2f} "
                      f"(lesion {record['lesion_share_of_head']:.3f} of head), strict hit {record['strict_hit']}, "
                      f"peak {record['peak_hu']:.0f} HU, 5 mm hit {record['old_hit_5mm']}, p(baseline) "
                      f"{record['p_baseline_ct']:.3f}, completeness error {record['completeness_ct']['relative_error']:.3f} "
                      f"at {record['completeness_ct']['nodes']} nodes", flush=True)
    table = {}
    for arm in arms:
        table[arm] = {}
        for task in HEMORRHAGE_TYPES:
            r = [x for x in rows if x["arm"] == arm and x["task"] == task]
            table[arm][task] = {
                "n": len(r),
                "twin_share_in_lesion": float(np.mean([x["twin_share_in_lesion"] for x in r])),
                "twin_enrichment": float(np.mean([x["twin_share_in_lesion"] / x["lesion_share_of_head"] for x in r])),
                "strict_pointing_game": float(np.mean([x["strict_hit"] for x in r])),
                "peak_in_blood_range": float(np.mean([x["peak_hu_in_blood_range"] for x in r])),
                "old_pointing_game_5mm": float(np.mean([x["old_hit_5mm"] for x in r])),
                "p_baseline_max": float(max(x["p_baseline_ct"] for x in r)),
                "completeness_error_max": float(max(x["completeness_ct"]["relative_error"] for x in r)),
            }
    return {"table": table, "rows": rows}


def completeness(args, bundle) -> dict:
    """Completeness error |sum of attributions - (logit(CT) - logit(baseline))| / |logit difference| by node
    count, zero vs normal-head baseline, for the true finding and any_hemorrhage of one phantom per type
    (seeds 4.8 M + k, thick slices, 256 px): what DEFAULT_IG_STEPS and MAX_IG_STEPS were chosen from."""
    import torch

    from fmct.inference.analyze import Analyzer
    from fmct.inference.baselines import make_baseline
    from fmct.inference.explain import explain_study
    from fmct.phantom import make_phantom

    analyzer = Analyzer(bundle, device=DEVICE)
    spec, names = analyzer.bundle.meta.preprocessing, analyzer.bundle.meta.task_names
    rows = []
    cases = [("intraparenchymal", 1), ("subdural", 2), ("epidural", 3), ("intraventricular", 4), ("subarachnoid", 5),
             ("fracture", 6)][:args.n_cases]
    for task, k in cases:
        x = analyzer.preprocessor(make_phantom(4_800_000 + k, findings=[task], slices="thick", in_plane_size=256).volume).array
        for baseline in ("normal_head", "zero"):
            b = torch.from_numpy(make_baseline(baseline, x[0], spec.windows))[None]
            for n in args.node_counts:
                ex = explain_study(analyzer.model, torch.from_numpy(x), [names.index(task), 0], ig_steps=n, baseline=b)
                for t, f in zip([task, "any_hemorrhage"], ex.findings):
                    rows.append({"task": task, "explained": t, "baseline": baseline, **f.completeness})
                    print(f"  {task} {t} {baseline} {n} nodes: error {f.completeness['relative_error']:.3f}", flush=True)
    return {"rows": rows}


def cost(args, bundle) -> dict:
    import fmct.inference.explain as ex
    from fmct.inference.analyze import Analyzer
    from fmct.inference.explain import explain_captum
    from fmct.reading.files import read_volume
    from fmct.inference.study_folder import write_study_outputs

    analyzer = Analyzer(bundle, device=DEVICE)
    folder = dicom_study(args.ct, Path(args.work) / args.ct)
    volume = read_volume(folder)
    # The files as `fmct analyze` writes them (several at once, where this fmct can; an older tree
    # measured with --baseline-tree writes them one by one, as it did).
    write_options = {"threads": None} if "threads" in inspect.signature(write_study_outputs).parameters else {}
    positive = [f.name for f in analyzer.analyze(volume, None).positive]
    ks = sorted({1, max(1, len(positive) // 2), len(positive)})
    out = Path(args.work) / "saliency_cost_out"

    def run(arm):  # (steps, k): shared IG maps for the first k positive findings; k = 0: findings only;
        steps, k = arm  # steps = "old": the per-finding Captum loop (16 steps) for all positive findings
        t0 = time.perf_counter()
        if steps == "old":
            result = analyzer.analyze(volume, None)
            result.method = "integrated_gradients"
            x = result.model_input.tensor
            for name in positive:
                result.model_saliency[name] = explain_captum(analyzer.model, x, analyzer.bundle.meta.task_names.index(name))
                result.saliency[name] = analyzer.map_back(result, name)
        else:
            ex.DEFAULT_IG_STEPS = steps
            result = analyzer.analyze(volume, "integrated_gradients" if k else None, positive[:k] if k else "positive")
        write_study_outputs(out, volume, result, analyzer.bundle.meta.name, "cpu", overwrite=True, **write_options)
        return time.perf_counter() - t0

    arms = [(0, 0)] + [(s, k) for s in args.cost_steps for k in ks] + ([("old", len(positive))] if args.old else [])
    run((args.cost_steps[0], 1))  # warm-up
    times = {arm: [] for arm in arms}
    for r in range(args.repeat):  # rounds interleave the arms, so drifting load hits all alike
        for arm in arms:
            times[arm].append(run(arm))
        print(f"  round {r + 1}/{args.repeat}", flush=True)
    med = {arm: statistics.median(v) for arm, v in times.items()}
    base = med[(0, 0)]
    print(f"\nAnalyze + write (findings.json, saliency NIfTIs, report.png) on the {args.ct} CT, {len(positive)} positive "
          f"findings, warm, median of {args.repeat}:")
    print(f"  findings only (--explain none): {base:.2f} s")
    summary = {}
    for s in args.cost_steps:
        kall, k1 = med[(s, ks[-1])], med[(s, 1)]
        growth = (kall - k1) / max(ks[-1] - 1, 1) / k1
        summary[s] = {"all_over_findings_only": kall / base, "growth_per_extra_finding": growth,
                      "seconds": {k: med[(s, k)] for k in ks}}
        row = ", ".join(f"{k} map(s) {med[(s, k)]:.2f} s ({med[(s, k)] / base:.2f}x)" for k in ks)
        print(f"  shared IG, {s} steps: {row}; all maps / findings only {kall / base:.2f}x (target <= 2x), "
              f"each extra finding +{100 * growth:.1f}% of the 1-map time (target < 15%)")
    if args.old:
        old = med[("old", len(positive))]
        print(f"  old per-finding Captum loop, {len(positive)} maps: {old:.2f} s = {old / base:.2f}x findings only; "
              + ", ".join(f"shared {s} steps is {old / med[(s, ks[-1])]:.2f}x faster" for s in args.cost_steps))
        summary["old"] = {"seconds": old, "over_findings_only": old / base}
    return {"positive": positive, "findings_only_s": base, "arms": summary,
            "raw": {f"{a[0]}:{a[1]}": v for a, v in times.items()}}


DEVICE = "cpu"  # set by --device


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU script measures the maps' cost there")
    ap.add_argument("--part", choices=["quality", "cost", "both", "twins", "completeness"], default="both")
    ap.add_argument("--n-cases", type=int, default=6, help="completeness: phantoms (one per finding type)")
    ap.add_argument("--node-counts", default="8,16,32,64", help="completeness: IG node counts")
    ap.add_argument("--n", type=int, default=6, help="phantoms per hemorrhage type (quality)")
    ap.add_argument("--steps", default="16,8,4", help="IG steps of the new arms (quality)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (cost)")
    ap.add_argument("--cost-steps", default="16,8", help="IG steps of the shared arms (cost)")
    ap.add_argument("--ct", choices=["thick", "thin"], default="thick",
                    help="cost: the 5 mm 512x512x40 CT (the issue's) or the thin 512x512x300 one")
    ap.add_argument("--no-old", dest="old", action="store_false", help="cost: skip the old per-finding loop")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fmct_bench"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    DEVICE = args.device
    args.steps = [int(s) for s in args.steps.split(",")]
    args.cost_steps = [int(s) for s in args.cost_steps.split(",")]
    threads = set_threads(args.threads)
    bundle = demo_bundle(Path(args.work))
    results = {"benchmark": "saliency", "machine": machine("cpu", threads)}
    if args.part in ("quality", "both"):
        results["quality"] = quality(args, bundle)
    if args.part in ("cost", "both"):
        results["cost"] = cost(args, bundle)
    if args.part == "completeness":
        args.node_counts = [int(v) for v in args.node_counts.split(",")]
        results["completeness"] = completeness(args, bundle)
    if args.part == "twins":
        results["twins"] = twins(args, bundle)
    emit(results, args.json)


if __name__ == "__main__":
    main()
