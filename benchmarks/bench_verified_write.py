"""What reading each written study file back costs (issue 25 item 8): write vs read-back time.

A 512 x 512 x 40 CT (int16, noise: compresses like a real CT's soft tissue) and one uint8
saliency map, written as .nii.gz the way a study folder writes them, then read back by
fmct.inference.study_folder.verify_written (gzip to its CRC, NIfTI voxel count). Best of 3.

    python benchmarks/bench_verified_write.py --out benchmarks/results/verified_writes.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from fmct.inference.study_folder import verify_written
from fmct.reading.files import write_volume
from fmct.reading.volume import Volume


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    shape, spacing = (40, 512, 512), (0.5, 0.5, 5.0)
    files = {"ct.nii.gz (int16)": rng.normal(40, 20, shape).astype(np.int16),
             "saliency.nii.gz (uint8)": (rng.random(shape) * 30).astype(np.uint8)}
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for name, array in files.items():
            vol = Volume(array, spacing, (0.0, 0.0, 0.0), np.eye(3))
            write_s, read_s = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                path = write_volume(vol, Path(d) / "f.nii.gz")
                write_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                verify_written(path)
                read_s.append(time.perf_counter() - t)
            rows[name] = {"write_s": round(min(write_s), 3), "read_back_s": round(min(read_s), 3),
                          "read_back_share_of_write": round(min(read_s) / min(write_s), 2)}
            print(f"{name}: write {min(write_s):.3f} s, read back {min(read_s):.3f} s")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    record = {"benchmark": "verified study-file writes", "shape_zyx": list(shape), "results": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared and contended", "commit": commit,
              "command": "python benchmarks/bench_verified_write.py --out benchmarks/results/verified_writes.json"}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
