"""fmct.features.metrics.auprc is average precision as scikit-learn defines it, ties included (issue 27 item 7)."""
import numpy as np
import pytest

from fmct.features.metrics import auprc

sklearn_metrics = pytest.importorskip("sklearn.metrics")  # the test extra installs scikit-learn


@pytest.mark.parametrize("seed", range(6))
def test_auprc_equals_scikit_learn_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    n = 40 + 10 * seed
    labels = rng.random(n) < 0.3
    labels[0] = True
    scores = rng.random(n).astype(np.float32)
    scores[rng.random(n) < 0.5] = np.float32(1.0)  # saturated probabilities: many exact ties
    assert auprc(labels, scores) == pytest.approx(sklearn_metrics.average_precision_score(labels, scores), abs=1e-12)
    untied = rng.random(n)
    assert auprc(labels, untied) == pytest.approx(sklearn_metrics.average_precision_score(labels, untied), abs=1e-12)


def test_auprc_does_not_depend_on_the_order_of_tied_rows():
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 1], bool)
    scores = np.array([0.9, 0.9, 0.9, 0.9, 0.2, 0.2, 0.1, 0.8])
    values = {round(auprc(labels[p], scores[p]), 12) for p in (np.random.default_rng(s).permutation(8) for s in range(20))}
    assert len(values) == 1
    assert auprc(labels, scores) == pytest.approx(sklearn_metrics.average_precision_score(labels, scores))
    assert np.isnan(auprc(np.zeros(3, bool), np.ones(3)))
