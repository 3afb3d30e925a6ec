"""Cold start of `fmct analyze CT --explain none` against its warm time in the same run.

One fresh process runs the CLI's `main(["analyze", CT, "--explain", "none", ...])` several times in
a row. Cold = process spawn (interpreter start, every import, bundle load, CUDA-free model build,
read, predict, write findings.json + report.png) to the end of the first call, i.e. to the first
finding on the screen; warm = each later call in the same process (a fresh Analyzer and bundle
load every time, like a second `fmct analyze`, but with imports and the file cache warm). The
ratio cold / warm is the result (target <= 3x). A second process with `-X importtime` says which
top-level imports the cold start paid for.

--baseline-tree DIR runs the same measurement on another checkout of fmct (e.g. `git archive
<commit> | tar -x -C DIR`), rounds interleaved with this tree's, for a before/after in one run.

    python benchmarks/bench_coldstart.py --threads 2 --rounds 3
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, dicom_study, emit, machine

DRIVER = r"""
import sys, time, json, shutil
calls = int(sys.argv[1]); argv = sys.argv[2:]
from fmct.cli import main
ends = []
for i in range(calls):
    shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)  # a fresh folder: no --overwrite needed
    main(argv)
    ends.append(time.time())
print("COLDSTART " + json.dumps(ends), flush=True)
"""


def run_driver(tree: Path, ct: Path, out: Path, threads: int, calls: int, importtime: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
    argv = ["analyze", str(ct), "--explain", "none", "--device", "cpu", "--out", str(out)]
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", DRIVER, str(calls), *argv]
    t_spawn = time.time()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", cwd=tempfile.gettempdir())
    line = next((x for x in proc.stdout.splitlines() if x.startswith("COLDSTART ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"driver failed ({proc.returncode}): {proc.stderr[-2000:]}")
    ends = json.loads(line.split(" ", 1)[1])
    times = [ends[0] - t_spawn] + [b - a for a, b in itertools.pairwise(ends)]
    result = {"cold_s": times[0], "warm_s": min(times[1:]) if len(times) > 1 else None, "calls_s": times}
    if importtime:
        result["top_imports_s"] = top_level_imports(proc.stderr)
    return result


def top_level_imports(stderr: str, n: int = 10) -> dict[str, float]:
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)", line)
        if m and len(m.group(2)) == 1:
            rows.append((int(m.group(1)) / 1e6, m.group(3)))
    rows.sort(reverse=True)
    return {"total": round(sum(r[0] for r in rows), 3), **{name: round(s, 3) for s, name in rows[:n]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per tree")
    ap.add_argument("--calls", type=int, default=3, help="analyses per process (1 cold + warm ones)")
    ap.add_argument("--baseline-tree", default=None, help="another fmct checkout to measure in the same run")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fmct_bench"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    ct = dicom_study("thick", work / "thick")
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees = {"baseline": Path(args.baseline_tree).resolve(), **trees}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(run_driver(tree, ct, work / f"coldstart_out_{name.replace(' ', '_')}", args.threads, args.calls))
            print(f"  round {r + 1} {name}: cold {runs[name][-1]['cold_s']:.2f} s, warm {runs[name][-1]['warm_s']:.2f} s", flush=True)
    results = {"benchmark": "coldstart", "machine": machine("cpu", args.threads), "ct": "512x512x40 5 mm DICOM", "trees": {}}
    print(f"\n`fmct analyze CT --explain none` on the 5 mm CT, {args.threads} threads, {args.rounds} processes each:")
    for name, tree in trees.items():
        cold = statistics.median(x["cold_s"] for x in runs[name])
        warm = statistics.median(x["warm_s"] for x in runs[name])
        imports = run_driver(tree, ct, work / "coldstart_out_it", args.threads, 1, importtime=True)["top_imports_s"]
        results["trees"][name] = {"path": str(tree), "cold_s": cold, "warm_s": warm, "ratio": cold / warm,
                                  "runs": runs[name], "top_imports_s": imports}
        print(f"  {name}: cold {cold:.2f} s, warm {warm:.2f} s -> cold/warm {cold / warm:.2f}x (target <= 3x); "
              f"imports {imports['total']:.2f} s: " + ", ".join(f"{k} {v:.2f}" for k, v in imports.items() if k != "total"))
    if args.baseline_tree:
        b, t = results["trees"]["baseline"], results["trees"]["this tree"]
        print(f"  cold start this tree / baseline: {t['cold_s'] / b['cold_s']:.2f}x")
    emit(results, args.json)


if __name__ == "__main__":
    main()
