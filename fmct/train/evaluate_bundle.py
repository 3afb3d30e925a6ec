"""`fmct evaluate`: a bundle on one or two labelled test sets (in- and out-of-distribution).

Writes report.json, a readable table (also printed) and roc.png. Uses the bundle's own
thresholds and calibration temperatures, exactly as `fmct analyze` would.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fmct.inference.analyze import Analyzer
from fmct.data.datasets import CachedVolumeDataset, collate_skip_none
from fmct.conventions.errors import ConfigError
from fmct.features.metrics import evaluation_report, format_table, plot_roc, write_report_json
from fmct.data.manifests import load_manifest
from fmct.conventions.runtime import Progress

log = logging.getLogger("fmct.features.metrics")


def predict_dataset(analyzer: Analyzer, source: str, cache_dir: str, layout: str = "auto",
                    progress: Progress | None = None, path_prefix: str | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels [N, T] (NaN unknown) and calibrated probabilities [N, T] for every readable study."""
    tasks = analyzer.bundle.meta.task_names
    manifest = load_manifest(source, layout, path_prefix=path_prefix)
    if not any(t in manifest.tasks for t in tasks):
        raise ConfigError(f"{source} has no labels for any task of this model ({tasks})")
    ds = CachedVolumeDataset(manifest, analyzer.bundle.meta.preprocessing, cache_dir, tasks=tasks).prepare(progress)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip_none)
    probs = [analyzer.probabilities(b["image"].numpy()) for b in loader if b is not None]
    labels = np.array([ds.label_vector(s) for s in ds.studies], dtype=np.float64)
    return labels, np.concatenate(probs), [s.study for s in ds.studies]


def pool_by_study(labels: np.ndarray, probs: np.ndarray, studies: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Series-level rows -> one row per study: a study is positive, and scores, as its most positive series
    (FM-HCT's split files list several series per study; their study-level metrics pool them so)."""
    order = sorted(set(studies))
    index = {s: i for i, s in enumerate(order)}
    pooled_y = np.full((len(order), labels.shape[1]), np.nan)
    pooled_p = np.full((len(order), probs.shape[1]), -np.inf)
    for row, study in enumerate(studies):
        i = index[study]
        pooled_y[i] = np.fmax(pooled_y[i], labels[row])  # NaN (unknown) only where every series is unknown
        pooled_p[i] = np.maximum(pooled_p[i], probs[row])
    return pooled_y, pooled_p


def evaluate_bundle(bundle: str | None, data: str, out: str | Path, ood_data: str | None = None,
                    device: str = "auto", cache_dir: str = ".fmct_cache", n_boot: int = 1000, seed: int = 0,
                    progress: Progress | None = None, path_prefix: str | None = None) -> dict:
    analyzer = Analyzer(bundle, device=device)
    meta = analyzer.bundle.meta
    sets = {"in-distribution": data, **({"out-of-distribution": ood_data} if ood_data else {})}
    predictions, reports = {}, {}
    for name, source in sets.items():
        labels, probs, studies = predict_dataset(analyzer, source, cache_dir, progress=progress, path_prefix=path_prefix)
        predictions[name] = (labels, probs)
        reports[name] = evaluation_report(labels, probs, meta.task_names, [t.threshold for t in meta.tasks], n_boot, seed)
        if len(set(studies)) < len(studies):  # several series per study: metrics per study as well
            pooled = pool_by_study(labels, probs, studies)
            reports[f"{name} (per study)"] = evaluation_report(*pooled, meta.task_names, [t.threshold for t in meta.tasks],
                                                               n_boot, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_report_json({"model": meta.name, "sets": sets, "reports": reports}, out / "report.json")
    table = format_table(reports)
    (out / "report.txt").write_text(table + "\n")
    plot_roc(predictions, meta.task_names, out / "roc.png")
    print(table)
    return reports
