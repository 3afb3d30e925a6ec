"""Peak memory of `fmct batch` on one study with seven saliency maps, before and after the batch maps
them back one at a time (issue 27 item 6).

    python benchmarks/bench_batch_memory.py [--slices 165] [--before-rev REV] [--json out.json]

One synthetic head CT (512 x 512 x slices, int16 NRRD on disk) and a random 7-task bundle with
thresholds of 0.01 (fmct.phantom.fixtures.tiny_bundle), explained by occlusion for every finding
(7 maps, quick with the tiny model). Each variant runs run_batch in a fresh process with the
engine as it was at that revision (git archive of fmct/): "before" mapped back every map of a
study before writing any, "after" (the working tree) maps back, writes and frees each in turn.
Reported: the process's peak RSS (VmHWM), its RSS just before run_batch (model loaded), and the
increase over that as a multiple of the CT's float32 size (the decoded CT itself is one of it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEVEN = ("any_hemorrhage", "epidural", "subdural", "subarachnoid", "intraparenchymal", "fracture", "mass_effect")


def default_before_rev() -> str:
    """The parent of the commit that made the batch map back on demand."""
    found = subprocess.run(["git", "log", "-1", "--format=%H", "--grep=SaliencyOnCTGrid, like the CLI", "--",
                            "fmct/inference/batch.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return f"{found.strip()}^" if found.strip() else "HEAD"


def export_engine(rev: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "fmct"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(field)


def measure(engine: Path, work: Path) -> dict:
    sys.path.insert(0, str(engine))
    import fmct
    from fmct.inference.analyze import Analyzer
    from fmct.inference.batch import run_batch

    assert Path(fmct.__file__).resolve().is_relative_to(engine.resolve()), fmct.__file__
    analyzer = Analyzer(str(work / "seven"), device="cpu")
    before = rss_mb("VmRSS")
    run_batch(analyzer, work / "in", work / f"out-{engine.name}", explain_method="occlusion", explain_findings="all",
              num_workers=0)
    payload = json.loads((work / f"out-{engine.name}" / "ct" / "findings.json").read_text())
    return {"rss_before_batch_mb": before, "peak_rss_mb": rss_mb("VmHWM"), "maps": len(payload["saliency_files"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=165)
    parser.add_argument("--before-rev", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=2, metavar=("ENGINE_DIR", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(Path(args.one[0]), Path(args.one[1]))))
        return 0

    sys.path.insert(0, str(ROOT))
    import numpy as np

    from fmct.phantom.fixtures import tiny_bundle
    from fmct.reading.files import write_volume

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_slicer import ct_volume

    rev = args.before_rev or default_before_rev()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fmct-bench-batch-mem-") as tmp:
        work = Path(tmp)
        tiny_bundle(work / "seven", tasks=[(n, 0.01) for n in SEVEN], temperature=1.0)
        volume = ct_volume("thin") if args.slices == 165 else ct_volume("thick")
        (work / "in").mkdir()
        write_volume(volume.with_array(volume.array.round().astype(np.int16)), work / "in" / "ct.nrrd")
        ct_mb = volume.array.size * 4 / 2**20
        engines = {"before": export_engine(rev, work / "before"), "after": ROOT}
        for variant, engine in engines.items():
            env = {**os.environ, "PYTHONPATH": str(engine), "OMP_NUM_THREADS": "2"}
            run = subprocess.run([sys.executable, __file__, "--one", str(engine), str(work)], capture_output=True,
                                 text=True, timeout=1800, env=env)
            if run.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{run.stderr[-4000:]}")
            row = json.loads(run.stdout.strip().splitlines()[-1])
            row["increase_over_ct_float32"] = round((row["peak_rss_mb"] - row["rss_before_batch_mb"]) / ct_mb, 2)
            rows[variant] = row
            print(variant, json.dumps(row), flush=True)
    report = {"machine": {"cpu_count": os.cpu_count(), "load_avg_1min_at_start": round(os.getloadavg()[0], 2)},
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
              "before_rev": subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
              "ct_shape_zyx": list(volume.array.shape), "ct_float32_mb": round(ct_mb, 1), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
