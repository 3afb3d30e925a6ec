"""The out-of-distribution verdict of issue 26 item 6: shrinkage estimated, not fixed; a margin below the threshold."""
import numpy as np
import pytest

from fmct.conventions.errors import BundleError
from fmct.inference.ood import (ReferenceStats, fit_reference, ledoit_wolf_shrinkage, oas_shrinkage, shrunk_precision,
                                unshrunk_covariance)


def _ledoit_wolf_by_definition(x: np.ndarray) -> float:
    """Ledoit & Wolf (2004), Lemma 3.2-3.4, written out sample by sample (slow, independent of the closed form)."""
    x = x - x.mean(0)
    n, p = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / p
    d2 = np.sum((s - mu * np.eye(p)) ** 2) / p
    b2 = sum(np.sum((np.outer(row, row) - s) ** 2) / p for row in x) / n**2
    return min(b2, d2) / d2


def test_ledoit_wolf_matches_its_definition_and_moves_with_the_sample_size():
    rng = np.random.default_rng(0)
    few = rng.normal(size=(40, 30)) * np.linspace(0.5, 2.0, 30)
    assert ledoit_wolf_shrinkage(few) == pytest.approx(_ledoit_wolf_by_definition(few), rel=1e-9)
    many = rng.normal(size=(4000, 30)) * np.linspace(0.5, 2.0, 30)
    assert ledoit_wolf_shrinkage(many) < 0.05 < ledoit_wolf_shrinkage(few)  # more CTs, less shrinkage needed
    isotropic = rng.normal(size=(40, 30))
    assert ledoit_wolf_shrinkage(isotropic) > 0.8  # the truth is the target: shrink almost all the way


def test_fit_reference_estimates_and_records_the_shrinkage():
    rng = np.random.default_rng(1)
    ref, cal = rng.normal(size=(60, 20)) * np.linspace(0.2, 3, 20), rng.normal(size=(40, 20)) * np.linspace(0.2, 3, 20)
    stats = fit_reference(ref, cal)
    assert stats.shrinkage == pytest.approx(ledoit_wolf_shrinkage(ref))
    back = ReferenceStats.from_bytes(stats.to_bytes("abc"), weights_sha256="abc")
    assert back.shrinkage == stats.shrinkage and back.margin == 0.0
    assert "shrinkage" in back.judge(ref[:1])["method"]
    assert fit_reference(ref, cal, shrinkage=0.1).shrinkage == 0.1


def test_the_covariance_comes_back_from_a_shrunk_precision_and_oas_is_in_range():
    rng = np.random.default_rng(2)
    cov = np.cov(rng.normal(size=(80, 12)) * np.linspace(0.3, 2, 12), rowvar=False)
    np.testing.assert_allclose(unshrunk_covariance(shrunk_precision(cov, 0.1), 0.1), cov, atol=1e-10)
    assert 0.0 < oas_shrinkage(cov, 80) < 1.0 and oas_shrinkage(cov, 80) > oas_shrinkage(cov, 8000)


def test_a_score_within_the_margin_below_the_threshold_is_not_in_distribution():
    rng = np.random.default_rng(3)
    stats = fit_reference(rng.normal(size=(200, 8)), rng.normal(size=(100, 8)))
    stats.margin = 0.1
    direction = np.zeros((1, 8))
    direction[0, 0] = 1.0

    def at(fraction: float) -> np.ndarray:  # features whose score is `fraction` of the threshold
        unit = float(stats.score(stats.mean[None] + direction)[0])
        return stats.mean[None] + direction * np.sqrt(fraction * stats.threshold / unit)

    assert stats.judge(at(0.85))["in_distribution"] is True and stats.judge(at(0.85))["borderline"] is False
    borderline = stats.judge(at(0.95))
    assert borderline["in_distribution"] is False and borderline["borderline"] is True
    assert stats.judge(at(1.05))["in_distribution"] is False and stats.judge(at(1.05))["borderline"] is False
    back = ReferenceStats.from_bytes(stats.to_bytes("abc"))
    assert back.margin == pytest.approx(0.1)
    stats.margin = 1.5
    with pytest.raises(BundleError, match="margin"):
        ReferenceStats.from_bytes(stats.to_bytes("abc"))


def test_a_borderline_verdict_warns_in_its_own_words():
    from fmct.inference.analyze import AnalysisResult

    result = AnalysisResult([], ood={"score": 0.135, "threshold": 0.142, "in_distribution": False, "borderline": True})
    assert "within the measured margin below the threshold 0.142" in result.warning
    result.ood = {"score": 0.2, "threshold": 0.142, "in_distribution": False}
    assert "0.200 > 0.142" in result.warning


@pytest.mark.slow
def test_the_demo_models_verdict_holds_under_benign_rescans():
    """Noise 5-40 HU, 5 degrees, a field of view from 20 mm higher: each variant gets its CT's verdict."""
    from fmct.inference.analyze import Analyzer
    from fmct.inference.bundle import default_bundle_path
    from fmct.phantom import make_phantom
    from fmct.phantom.variations import cut, noise, rigid

    analyzer = Analyzer(default_bundle_path(), device="cpu")
    assert 0.0 < analyzer.reference.margin < 0.5 and analyzer.reference.shrinkage == pytest.approx(0.1)
    rng = np.random.default_rng(0)
    for seed in (3_000_000, 3_000_001):
        ct = make_phantom(seed, slices="thick" if seed % 2 == 0 else "thin", in_plane_size=128).volume
        verdict = analyzer.analyze(ct, explain_method=None).ood
        for variant in (noise(ct, 5.0, rng), noise(ct, 40.0, rng), rigid(ct, 5.0, np.array([1.0, 0.2, 0.3]), np.zeros(3)),
                        cut(ct, inferior_mm=20.0)):
            assert analyzer.analyze(variant, explain_method=None).ood["in_distribution"] is verdict["in_distribution"]
