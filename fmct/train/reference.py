"""The out-of-distribution statistics of a model: features of reference CTs, a threshold from others.

`fmct finetune` and the demo recipe call `predict_with_features` on their training split (the
reference) and validation split (the calibration) and pass `fit_reference`'s result to
`save_bundle`. For a bundle made without them (such as the shipped demo model before this existed),
`python -m fmct.train.reference BUNDLE` computes them on fresh phantoms of the demo recipe's
distribution and adds `ood.safetensors` to the folder; the weights are not touched.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from fmct.conventions.atomic import write_bytes_atomic
from fmct.inference.bundle import OOD_FILE, WEIGHTS_FILE, load_bundle
from fmct.models import FMCTClassifier
from fmct.inference.ood import DEFAULT_QUANTILE, ReferenceStats, fit_reference
from fmct.conventions.runtime import autocast, torch_device

log = logging.getLogger("fmct.train.reference")


@torch.no_grad()
def predict_with_features(model: FMCTClassifier, x: torch.Tensor | Iterable[torch.Tensor], device: torch.device,
                          batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, T] and pooled features [N, F] for a tensor [N, C, D, H, W] or an iterable of batches."""
    model.to(device).eval()
    chunks = (x[i : i + batch_size] for i in range(0, len(x), batch_size)) if torch.is_tensor(x) else x
    logits, features = [], []
    for xb in chunks:
        with autocast(device):
            lg, ft = model.forward_with_features(xb.to(device).float())
        logits.append(lg.float().cpu())
        features.append(ft.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(features).numpy()


def write_reference(bundle_dir: str | Path, stats: ReferenceStats) -> Path:
    """Add (or replace) a bundle folder's ood.safetensors, tied to the weights that are there."""
    folder = Path(bundle_dir)
    sha = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    return write_bytes_atomic(folder / OOD_FILE, stats.to_bytes(sha))


def main(argv: list[str] | None = None) -> int:
    from fmct.train.demo_model import make_split

    ap = argparse.ArgumentParser(prog="python -m fmct.train.reference", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="a bundle folder made by the demo recipe (phantoms are its training distribution)")
    ap.add_argument("--n-reference", type=int, default=400)
    ap.add_argument("--n-calibration", type=int, default=200)
    ap.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    ap.add_argument("--anatomy", default="default",
                    help="phantom anatomy presets, comma-separated, taken in turn (the bundle's training anatomies)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = load_bundle(args.bundle)
    device = torch_device(args.device)
    spec = bundle.meta.preprocessing
    anatomies = [a.strip() for a in args.anatomy.split(",") if a.strip()]
    x_ref, _, _ = make_split("reference", args.n_reference, spec, args.workers, anatomies=anatomies)
    x_cal, _, _ = make_split("calibration", args.n_calibration, spec, args.workers, anatomies=anatomies)
    _, f_ref = predict_with_features(bundle.model, x_ref, device)
    _, f_cal = predict_with_features(bundle.model, x_cal, device)
    stats = fit_reference(f_ref, f_cal, args.quantile, source=(
        f"demo-recipe phantoms (anatomy {', '.join(anatomies)}, not augmented): reference = split 'reference' "
        f"({len(f_ref)}), threshold = split 'calibration' ({len(f_cal)}), fmct.train.demo_model seeds"))
    path = write_reference(args.bundle, stats)
    log.info("wrote %s: %d reference and %d calibration phantoms, threshold %.3f", path, len(f_ref), len(f_cal),
             stats.threshold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
