"""The out-of-distribution statistics of a model: features of reference CTs, a threshold from others.

`fmct finetune` and the demo recipe call `fmct.train.supervised.predict_with_features` on their
training split (the reference) and validation split (the calibration) and pass `fit_reference`'s
result to `save_bundle`. For a bundle made without them, `python -m fmct.train.demo_model reference
BUNDLE` computes them on fresh phantoms of the demo recipe's distribution and `write_reference` adds
`ood.safetensors` to the folder; the weights are not touched.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from fmct.conventions.atomic import write_bytes_atomic
from fmct.inference.bundle import OOD_FILE, WEIGHTS_FILE
from fmct.inference.ood import ReferenceStats


def write_reference(bundle_dir: str | Path, stats: ReferenceStats) -> Path:
    """Add (or replace) a bundle folder's ood.safetensors, tied to the weights that are there."""
    folder = Path(bundle_dir)
    sha = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    return write_bytes_atomic(folder / OOD_FILE, stats.to_bytes(sha))
