"""Peak memory of writing a study's saliency maps, against the CT's own size (issue 27 item 6).

Before: every map mapped back onto the CT's grid first, then the files written (what `fmct analyze`
did). After: `fmct.inference.saliency.SaliencyOnCTGrid`, each map mapped back inside the job that
writes it and freed once written (what the CLI and the Slicer worker do now). The maps on the model
grid are random (the explanation itself does not change what map-back and writing cost); each arm
runs in a fresh process so ru_maxrss is its own. Reported: (peak RSS - RSS with the model and the CT
loaded) / the CT's bytes, for K maps.

    python benchmarks/bench_saliency_memory.py --slices 300 --maps 1,3,5,9 --json benchmarks/results/saliency_memory.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def arm(mode: str, k: int, slices: int, work: Path) -> dict:
    import numpy as np

    from fmct.inference.analyze import Analyzer
    from fmct.inference.saliency import SaliencyOnCTGrid
    from fmct.inference.study_folder import write_study_outputs
    from fmct.reading.volume import Volume

    analyzer = Analyzer(ROOT / "Resources" / "DemoModel", device="cpu")
    rng = np.random.default_rng(0)
    head = np.full((slices, 512, 512), -1000.0, np.float32)
    z, y, x = np.ogrid[:slices, :512, :512]
    head[((z - slices / 2) / (slices / 2.2)) ** 2 + ((y - 256) / 200) ** 2 + ((x - 256) / 170) ** 2 < 1] = 35.0
    volume = Volume(head, (0.45, 0.45, 180.0 / slices), (-115.0, -115.0, -90.0), np.eye(3), {})
    result = analyzer.analyze(volume, explain_method=None)
    names = analyzer.bundle.meta.task_names[:k]
    result.method = "integrated_gradients"
    for name in names:
        result.model_saliency[name] = rng.random(analyzer.preprocessor.spec.tensor_shape, dtype=np.float32)
    import gc
    import tracemalloc

    gc.collect()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak so far: model, CT, findings
    tracemalloc.start()  # numpy's arrays (the maps on the CT's grid) are traced; SimpleITK's copies show in RSS
    if mode == "before":
        for name in names:
            result.saliency[name] = analyzer.map_back(result, name)
    else:
        result.saliency = SaliencyOnCTGrid(analyzer, result)
    write_study_outputs(work / f"{mode}{k}", volume, result, "demo", "cpu", report=False, overwrite=True, threads=None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    traced = tracemalloc.get_traced_memory()[1]
    return {"mode": mode, "maps": k, "ct_bytes": head.nbytes, "rss_loaded": loaded, "rss_peak": peak,
            "traced_peak_over_ct": traced / head.nbytes, "ct_plus_traced_over_ct": 1 + traced / head.nbytes,
            "extra_over_ct": (peak - loaded) / head.nbytes, "peak_over_ct_with_ct": (peak - loaded + head.nbytes) / head.nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--maps", default="1,3,5,9")
    ap.add_argument("--json")
    ap.add_argument("--arm", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fmct_bench_memory"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.arm:
        print(json.dumps(arm(args.arm[0], int(args.arm[1]), args.slices, work)))
        return
    rows = []
    for k in [int(v) for v in args.maps.split(",")]:
        for mode in ("before", "after"):
            run = subprocess.run([sys.executable, __file__, "--arm", mode, str(k), "--slices", str(args.slices),
                                  "--work", str(work)], capture_output=True, text=True, check=True)
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{mode:>6} {k} maps: numpy peak while mapping back and writing {r['traced_peak_over_ct']:.2f}x the CT; "
                  f"RSS peak - loaded = {r['extra_over_ct']:.2f}x the CT "
                  f"(CT + that = {r['peak_over_ct_with_ct']:.2f}x; CT {r['ct_bytes'] / 2**20:.0f} MiB)", flush=True)
    out = {"benchmark": "saliency_memory", "slices": args.slices, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
