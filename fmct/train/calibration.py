"""Post-hoc calibration on a validation split: one temperature and one threshold per task.

`calibrate_tasks` is the one place a trainer turns validation logits into the bundle's tasks, so
`fmct finetune` and the demo recipe write the same descriptions and use the same (overflow-free)
calibrated probabilities the runtime computes (`fmct.inference.calibration.calibrated_probabilities`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fmct.conventions.tasks import TASK_DESCRIPTIONS
from fmct.inference.bundle import Task
from fmct.inference.calibration import calibrated_probabilities


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the validation log-loss of sigmoid(logit / T).

    A 1-D grid search: robust with few labels, and the loss is smooth in log T.
    """
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    labels = labels.astype(np.float64)
    best_t, best_nll = 1.0, np.inf
    for t in grid:
        p = np.clip(calibrated_probabilities(np.asarray(logits)[:, None], [t], np.float64)[:, 0], 1e-7, 1 - 1e-7)
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


def task_description(name: str) -> str:
    """What a task means, from the one task list (a task outside it is described by its name)."""
    return TASK_DESCRIPTIONS.get(name, name.replace("_", " "))


def calibrate_tasks(names: Sequence[str], logits: np.ndarray, labels: np.ndarray) -> list[Task]:
    """One Task per output: temperature fitted on the validation logits, Youden threshold on the
    calibrated probabilities. Labels may hold NaN (unknown); a task with no known label keeps
    temperature 1 and threshold 0.5."""
    tasks = []
    for i, name in enumerate(names):
        known = ~np.isnan(np.asarray(labels[:, i], dtype=np.float64))
        temp = fit_temperature(logits[known, i], labels[known, i]) if known.any() else 1.0
        probs = calibrated_probabilities(logits[known, i:i + 1], [temp])[:, 0]
        thr = youden_threshold(probs, labels[known, i]) if known.any() else 0.5
        tasks.append(Task(name, task_description(name), round(thr, 4), round(temp, 4)))
    return tasks
