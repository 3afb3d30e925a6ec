"""Metrics against values worked out by hand, and the report/plot writers."""
import math

import numpy as np

from fmct.features.metrics import (auprc, auroc, auroc_ci, evaluation_report, expected_calibration_error, format_table,
                           plot_roc, pointing_game, saliency_in_mask, sensitivity_specificity)


def test_auroc_by_hand_with_ties():
    # pairs (pos, neg): (0.9 > 0.1) (0.9 > 0.4) (0.4 = 0.4 -> 0.5) (0.4 > 0.1) => 3.5 / 4
    assert auroc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.1])) == 0.875
    assert auroc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
    assert math.isnan(auroc(np.array([1, 1]), np.array([0.1, 0.9])))


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    def sample(n):
        y = rng.integers(0, 2, n)
        return y, y + rng.normal(0, 1.0, n)
    y, s = sample(60)
    lo, hi = auroc_ci(y, s, n_boot=500)
    assert lo < auroc(y, s) < hi
    y2, s2 = sample(2000)
    lo2, hi2 = auroc_ci(y2, s2, n_boot=200)
    assert hi2 - lo2 < (hi - lo) / 2


def test_auprc_sens_spec_ece():
    y = np.array([1, 0, 1, 0])
    assert auprc(y, np.array([0.9, 0.8, 0.7, 0.1])) == (1 / 1 + 2 / 3) / 2
    assert sensitivity_specificity(y, np.array([0.9, 0.8, 0.2, 0.1]), 0.5) == (0.5, 0.5)
    assert expected_calibration_error(np.array([1, 1, 0, 0]), np.array([1.0, 1.0, 0.0, 0.0])) == 0.0
    assert abs(expected_calibration_error(np.array([0, 0]), np.array([0.95, 0.95])) - 0.95) < 1e-9


def test_report_table_and_plot(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (80, 2)).astype(float)
    y[:5, 1] = np.nan  # unknown labels are left out
    p = np.clip(np.nan_to_num(y) * 0.6 + rng.uniform(0, 0.4, y.shape), 0, 1)
    rep = evaluation_report(y, p, ["a", "b"], [0.5, 0.5], n_boot=100)
    assert rep["b"]["n"] == 75 and rep["a"]["n"] == 80
    assert rep["a"]["auroc"] == 1.0 and rep["a"]["sensitivity"] == 1.0
    table = format_table({"in-dist": rep, "ood": rep})
    assert "in-dist AUROC" in table and "ood AUROC" in table and table.count("\n") == 3
    png = plot_roc({"in-dist": (y, p)}, ["a", "b"], tmp_path / "roc.png")
    assert png.stat().st_size > 5000


def test_saliency_metrics():
    head = np.ones((10, 10, 10), bool)
    mask = np.zeros_like(head)
    mask[2:4, 2:4, 2:4] = True
    sal = mask.astype(float)
    stats = saliency_in_mask(sal, mask, head)
    assert stats["share_in_mask"] == 1.0 and abs(stats["enrichment"] - 1000 / 8) < 1e-9
    assert saliency_in_mask(np.ones((10, 10, 10)), mask, head)["enrichment"] == 1.0
    assert pointing_game(sal, mask, (1, 1, 1))
    far = np.zeros((10, 10, 10))
    far[9, 9, 9] = 1
    assert not pointing_game(far, mask, (1, 1, 1), tolerance_mm=5.0)
    assert pointing_game(far, mask, (1, 1, 1), tolerance_mm=10.5)  # nearest lesion voxel (3,3,3): 6*sqrt(3) = 10.39 mm
