"""The one calibration: fmct finetune and the demo recipe build their tasks with calibrate_tasks,
on the runtime's overflow-free calibrated probabilities, with descriptions from the one task list."""
import warnings

import numpy as np

from fmct.conventions.tasks import TASK_DESCRIPTIONS
from fmct.inference.calibration import calibrated_probabilities
from fmct.train.calibration import calibrate_tasks, fit_temperature


def test_calibrate_tasks_survives_extreme_logits_and_unknown_labels():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 2)) < 0.4).astype(np.float64)
    logits = np.where(labels > 0, 800.0, -800.0) + rng.normal(0, 1, labels.shape)  # exp(800) overflows float64
    labels[:5, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in a hand-made sigmoid raises here
        tasks = calibrate_tasks(["subdural", "my_finding"], logits, labels)
    assert [t.name for t in tasks] == ["subdural", "my_finding"]
    assert tasks[0].description == TASK_DESCRIPTIONS["subdural"] and tasks[1].description == "my finding"
    for i, task in enumerate(tasks):
        known = ~np.isnan(labels[:, i])
        probs = calibrated_probabilities(logits[known, i:i + 1], [task.temperature])[:, 0]
        assert np.isfinite(probs).all()
        assert ((probs >= task.threshold) == (labels[known, i] > 0)).all()  # separable data: a perfect threshold


def test_a_task_without_known_labels_keeps_the_neutral_calibration():
    tasks = calibrate_tasks(["midline_shift"], np.zeros((4, 1)), np.full((4, 1), np.nan))
    assert (tasks[0].temperature, tasks[0].threshold) == (1.0, 0.5)
    assert tasks[0].description == "Midline shift of 5 mm or more"


def test_fit_temperature_matches_a_direct_log_loss_minimum():
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.5).astype(float)
    logits = (2 * y - 1) * 3.0 + rng.normal(0, 2.0, 400)
    t = fit_temperature(logits, y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    nll = [-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
           for p in (np.clip(1 / (1 + np.exp(-logits / g)), 1e-7, 1 - 1e-7) for g in grid)]
    assert t == float(grid[int(np.argmin(nll))])
