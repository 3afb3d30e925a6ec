"""Metrics: discrimination, calibration, and whether saliency points at the lesion.

Plain numpy on purpose: these run in CI, in the demo-model recipe, in `fmct evaluate` and in
benchmarks, and must give the same number everywhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half).

    NaN when only one class is present: the AUROC is undefined there, not 0.5.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - counts + 1 + upper) / 2.0)[inverse]


def auroc_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUROC (cases resampled with replacement)."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].all() or not labels[idx].any():
            continue
        values.append(auroc(labels[idx], scores[idx]))
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision as scikit-learn defines it: sum over the distinct score thresholds, from the
    highest, of (recall gained) x (precision at that threshold).

    Tied scores form one threshold, so the order of the rows cannot change the result (saturated
    float32 probabilities tie easily; ranking ties one by one gave 0.866 or 0.935 for one set
    depending on row order, scikit-learn 0.903).
    """
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, hits = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each run of tied scores
    tp = np.cumsum(hits)[last]
    precision, recall = tp / (last + 1), tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sensitivity_specificity(labels: np.ndarray, probs: np.ndarray, threshold: float) -> tuple[float, float]:
    labels, pred = np.asarray(labels).astype(bool), np.asarray(probs) >= threshold
    sens = float(pred[labels].mean()) if labels.any() else float("nan")
    spec = float((~pred[~labels]).mean()) if (~labels).any() else float("nan")
    return sens, spec


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Mean |observed rate - mean probability| over equal-width bins, weighted by bin size."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(labels[in_bin].mean() - probs[in_bin].mean())
    return float(ece)


def task_report(labels: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric for one task; cases with an unknown label (NaN) are left out."""
    known = ~np.isnan(np.asarray(labels, dtype=np.float64))
    y, p = np.asarray(labels)[known].astype(int), np.asarray(probs)[known]
    lo, hi = auroc_ci(y, p, n_boot, seed)
    sens, spec = sensitivity_specificity(y, p, threshold)
    return {
        "n": int(len(y)), "n_positive": int(y.sum()),
        "auroc": auroc(y, p), "auroc_ci95": [lo, hi], "auprc": auprc(y, p),
        "threshold": threshold, "sensitivity": sens, "specificity": spec,
        "ece": expected_calibration_error(y, p) if len(y) else float("nan"),
    }


def evaluation_report(labels: np.ndarray, probs: np.ndarray, tasks: Sequence[str], thresholds: Sequence[float],
                      n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per-task reports for labels/probs of shape [N, T] (NaN labels = unknown)."""
    return {t: task_report(labels[:, i], probs[:, i], thresholds[i], n_boot, seed) for i, t in enumerate(tasks)}


def format_table(reports: dict[str, dict[str, dict]]) -> str:
    """A readable table: one row per task, one AUROC [CI] column block per test set."""
    sets = list(reports)
    tasks = list(next(iter(reports.values())))
    # a long set name ("out-of-distribution") widens its column: never glued to the previous column's header
    width = {s: max(30, len(s + " AUROC [95% CI]") + 3) for s in sets}
    head = f"{'task':<20}" + "".join(f"{s + ' AUROC [95% CI]':>{width[s]}}{'AUPRC':>8}{'sens':>7}{'spec':>7}{'ECE':>7}"
                                     for s in sets)
    lines = [head, "-" * len(head)]
    for t in tasks:
        row = f"{t:<20}"
        for s in sets:
            r = reports[s][t]
            ci = f"{_f(r['auroc'])} [{_f(r['auroc_ci95'][0])}, {_f(r['auroc_ci95'][1])}]"
            row += f"{ci:>{width[s]}}{_f(r['auprc']):>8}{_f(r['sensitivity']):>7}{_f(r['specificity']):>7}{_f(r['ece']):>7}"
        lines.append(row)
    return "\n".join(lines)


def _f(x: float) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    tp = np.concatenate([[0], np.cumsum(labels[order])]) / max(labels.sum(), 1)
    fp = np.concatenate([[0], np.cumsum(~labels[order])]) / max((~labels).sum(), 1)
    return fp, tp


def plot_roc(sets: dict[str, tuple[np.ndarray, np.ndarray]], tasks: Sequence[str], path: str | Path) -> Path:
    """ROC curves, one panel per task, one line per test set (e.g. in- and out-of-distribution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(tasks), 3)
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), dpi=80, squeeze=False)
    for ax, (i, task) in zip(axes.flat, enumerate(tasks)):
        for name, (labels, probs) in sets.items():
            known = ~np.isnan(labels[:, i])
            y, p = labels[known, i], probs[known, i]
            if 0 < y.sum() < len(y):
                fp, tp = roc_curve(y, p)
                ax.plot(fp, tp, label=f"{name} AUROC {auroc(y, p):.3f}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set_title(task)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(loc="lower right", fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report_json(reports: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(reports, indent=2, allow_nan=True))
    return path


def saliency_in_mask(saliency: np.ndarray, mask: np.ndarray, head: np.ndarray) -> dict[str, float]:
    """Share of the saliency mass (within the head) that falls inside the lesion mask.

    Compared with the mask's share of the head volume: a map that ignores the lesion scores an
    enrichment of ~1, a map that points only at it scores 1 / mask_share.
    """
    saliency = np.where(head, np.maximum(saliency, 0), 0)
    total = float(saliency.sum())
    mask = mask.astype(bool) & head.astype(bool)
    mask_share = float(mask.sum()) / max(float(head.sum()), 1.0)
    share = float(saliency[mask].sum()) / total if total > 0 else 0.0
    return {"share_in_mask": share, "mask_share_of_head": mask_share, "enrichment": share / mask_share if mask_share else float("nan")}


def pointing_game(saliency: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, float, float], tolerance_mm: float = 5.0) -> bool:
    """Hit when the saliency maximum lies within tolerance_mm of the lesion mask."""
    peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    if mask[peak]:
        return True
    inside = np.argwhere(mask)
    if len(inside) == 0:
        return False
    offsets_mm = (inside - np.asarray(peak)) * np.asarray(spacing_zyx)
    return bool(np.sqrt((offsets_mm**2).sum(axis=1)).min() <= tolerance_mm)
