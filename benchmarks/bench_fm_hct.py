"""FM-HCT-sized encoder on this machine: `fmct import fm-hct` time and `fmct embed` seconds per CT.

Random weights in the released layout (12 blocks, 768 wide, 89.4M parameters; nothing is downloaded),
phantom head CTs written as NIfTI (512 x 512 in-plane, thick slices). Embed time is split into
preprocessing (MONAI's pipeline: RAS, 1 mm cubic spline, crop, 3 windows, 96^3) and the encoder forward.

    python benchmarks/bench_fm_hct.py --threads 2 --n 2 --json benchmarks/results/fm_hct.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine, set_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=2, help="CTs to embed")
    ap.add_argument("--json")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    import torch

    from test_fm_hct import fm_hct_state

    from fmct.features.embed import load_encoder
    from fmct.importers.fm_hct import import_fm_hct
    from fmct.phantom import make_phantom
    from fmct.preprocessing.preprocessor import Preprocessor
    from fmct.reading.files import read_volume, write_volume

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(fm_hct_state(depth=12, seed=0), tmp / "model_weights.pth")
        t0 = time.perf_counter()
        import_fm_hct(tmp / "model_weights.pth", tmp / "bundle")
        import_s = time.perf_counter() - t0
        data = tmp / "data"
        data.mkdir()
        for i in range(args.n):
            write_volume(make_phantom(100 + i, slices="thick", in_plane_size=512).volume, data / f"ct{i}.nii.gz")
        encoder = load_encoder(tmp / "bundle")
        params = sum(p.numel() for n, p in encoder.named_parameters() if n != "mask_token")  # fixed positions included
        pre = Preprocessor(encoder.preprocessing)
        rows = []
        for path in sorted(data.iterdir()):
            t0 = time.perf_counter()
            x = pre(read_volume(path)).tensor
            t1 = time.perf_counter()
            with torch.no_grad():
                encoder.get_intermediate_layers(x, n=1, return_class_token=True)
            rows.append({"read_preprocess_s": round(t1 - t0, 2), "forward_s": round(time.perf_counter() - t1, 2)})
        t0 = time.perf_counter()  # the command as a user runs it (a fresh process: import, load, all CTs)
        subprocess.run([sys.executable, "-m", "fmct.cli", "embed", str(data), "--model", str(tmp / "bundle"), "--out",
                        str(tmp / "f.npz"), "--device", "cpu"], check=True, capture_output=True)
        cli_s = time.perf_counter() - t0
    emit({"benchmark": "fm_hct", "machine": machine("cpu", threads), "params": params,
          "import_s": round(import_s, 2), "per_ct": rows, "embed_cli_total_s": round(cli_s, 2), "n_ct": args.n,
          "embed_cli_s_per_ct": round(cli_s / args.n, 2)}, args.json)


if __name__ == "__main__":
    main()
