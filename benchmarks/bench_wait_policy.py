"""`fmct analyze` with torch's threads spinning (OMP_WAIT_POLICY=ACTIVE, the OpenMP default) or sleeping
(PASSIVE, what the CLI and the Slicer worker now set) while they wait (issue 27 item 6).

Each run is a fresh `fmct analyze` process on the same phantom CT (torch backend), rounds alternating
the two policies so drifting load hits both alike; the machine's load average is recorded with each
run. Run it on a quiet machine and under load (e.g. with other processes using the cores) and compare.

    python benchmarks/bench_wait_policy.py --threads 2 --repeat 3 --explain none --json benchmarks/results/wait_policy.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--explain", default="none", help="--explain of the analyze runs (none, or a method: top finding)")
    ap.add_argument("--json")
    args = ap.parse_args()
    from fmct.phantom.demo_sample import demo_sample
    from fmct.reading.files import write_volume

    work = Path(tempfile.mkdtemp(prefix="fmct-wait-"))
    ct = write_volume(demo_sample(in_plane_size=256).volume, work / "ct.nii.gz")
    times = {"ACTIVE": [], "PASSIVE": []}
    loads = {"ACTIVE": [], "PASSIVE": []}
    for r in range(args.repeat):
        for policy in times:
            env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": str(args.threads)}
            loads[policy].append(os.getloadavg()[0])
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fmct.cli", "analyze", str(ct), "--out", str(work / policy),
                            "--overwrite", "--backend", "torch", "--device", "cpu", "--explain", args.explain],
                           env=env, check=True, capture_output=True)
            times[policy].append(time.perf_counter() - t0)
            print(f"round {r + 1} {policy}: {times[policy][-1]:.1f} s (load {loads[policy][-1]:.1f})", flush=True)
    med = {p: statistics.median(v) for p, v in times.items()}
    out = {"benchmark": "wait_policy", "threads": args.threads, "explain": args.explain, "seconds": times,
           "load_average_1min": loads, "median_s": med, "active_over_passive": med["ACTIVE"] / med["PASSIVE"],
           "cpus": os.cpu_count()}
    print(f"median ACTIVE {med['ACTIVE']:.1f} s, PASSIVE {med['PASSIVE']:.1f} s: ACTIVE / PASSIVE = "
          f"{out['active_over_passive']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
