"""Preprocessing: fmct's Preprocessor against an equivalent MONAI Compose pipeline, same CT, same run.

Both take a CT already in memory (reading is not timed) to the model tensor [C, 64, 64, 64]:
orientation LPS, 3 mm voxels, a 64^3 box centred on the head, and one [0, 1] channel per HU
window (brain, subdural, bone). MONAI: Orientation -> Spacing (bilinear) -> CropForeground
(HU > -300) -> ResizeWithPadOrCrop (air padding) -> ScaleIntensityRange per window; fmct:
block-average (anti-aliasing) -> head centroid -> one resampling onto the model grid -> windows.
The MONAI pipeline does not anti-alias, so on a thin series it samples noise that fmct averages;
and it centres the box on the bounding box of everything above -300 HU (head and headrest), fmct on
the head alone (largest connected component), so the two outputs are shifted by a few voxels.
Ratio = MONAI seconds / fmct seconds (above 1: fmct is faster).

    python benchmarks/bench_preprocess.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from common import emit, head_ct, machine, set_threads, timeit


def monai_pipeline(spec):
    from monai.transforms import Compose, CropForeground, Lambda, Orientation, ResizeWithPadOrCrop, Spacing

    windows = [(w.center - w.width / 2, w.center + w.width / 2) for w in spec.windows]

    def to_channels(img):
        import torch

        return torch.cat([((img - lo) / (hi - lo)).clamp(0, 1) for lo, hi in windows], dim=0)

    return Compose([
        Orientation(axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacing(pixdim=spec.spacing_mm, mode="bilinear", padding_mode="border"),
        CropForeground(select_fn=lambda x: x > -300, allow_smaller=True),
        ResizeWithPadOrCrop(spatial_size=spec.size, value=-1024.0),
        Lambda(to_channels),
    ])


def to_monai(volume):
    """A MetaTensor [1, x, y, z] with MONAI's RAS affine, from an LPS Volume."""
    import torch
    from monai.data import MetaTensor

    affine = np.eye(4)
    affine[:3, :3] = volume.direction @ np.diag(volume.spacing)
    affine[:3, 3] = volume.origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS
    array = np.ascontiguousarray(volume.array.transpose(2, 1, 0))[None]
    return MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(affine))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kinds", default="thick,thin")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fmct_bench"))
    args = ap.parse_args()
    threads = set_threads(args.threads)
    from fmct.preprocessing.preprocessor import Preprocessor, PreprocessSpec

    spec = PreprocessSpec()
    fmct_pre, monai_pre = Preprocessor(spec), monai_pipeline(spec)
    results = {"benchmark": "preprocess", "machine": machine("cpu", threads), "rows": []}
    for kind in args.kinds.split(","):
        volume = head_ct(kind)
        fm = fmct_pre(volume).array[0]
        mo = monai_pre(to_monai(volume)).numpy().transpose(0, 3, 2, 1)  # -> [C, z, y, x] like fmct
        t_f, t_m = [], []
        for _ in range(args.repeat):  # alternate, so load drift on a shared host hits both alike
            t_f.append(timeit(lambda: fmct_pre(volume), warmup=0, repeat=1))
            t_m.append(timeit(lambda: monai_pre(to_monai(volume)), warmup=0, repeat=1))
        row = {"ct": kind, "size_xyz": list(volume.size), "fmct_s": statistics.median(t_f),
               "monai_s": statistics.median(t_m), "output_shapes": [list(fm.shape), list(mo.shape)],
               "mean_abs_diff_of_outputs": float(np.abs(fm - mo).mean()) if fm.shape == mo.shape else None}
        row["ratio_monai_over_fmct"] = row["monai_s"] / row["fmct_s"]
        results["rows"].append(row)
        print(f"[cpu x{threads}] {kind} {volume.size}: fmct {row['fmct_s']:.3f} s, MONAI Compose {row['monai_s']:.3f} s "
              f"-> fmct {row['ratio_monai_over_fmct']:.2f}x faster (mean |diff| of outputs "
              f"{row['mean_abs_diff_of_outputs']})", flush=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
