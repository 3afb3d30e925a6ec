"""Post-hoc calibration on a validation split: one temperature and one threshold per task."""
from __future__ import annotations

import numpy as np


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the validation log-loss of sigmoid(logit / T).

    A 1-D grid search: robust with few labels, and the loss is smooth in log T.
    """
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    labels = labels.astype(np.float64)
    best_t, best_nll = 1.0, np.inf
    for t in grid:
        p = np.clip(_sigmoid(logits / t), 1e-7, 1 - 1e-7)
        nll = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def youden_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (0.5 when a class is absent)."""
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        return 0.5
    candidates = np.unique(np.clip(probs, 1e-4, 1 - 1e-4))
    best_t, best_j = 0.5, -1.0
    for t in candidates:
        pred = probs >= t
        j = pred[labels].mean() + (~pred[~labels]).mean() - 1.0
        if j > best_j:
            best_t, best_j = float(t), j
    return best_t
