"""Metrics: discrimination (AUROC) and whether saliency points at the lesion.

Plain numpy on purpose: these run in CI, in the demo-model recipe and in benchmarks, and
must give the same number everywhere.
"""
from __future__ import annotations

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
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


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
