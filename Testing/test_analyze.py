"""Analyzer and explanations with a small random bundle: plumbing, geometry, progress, cancel.

Whether saliency lands in the lesion is tested with the trained demo model in test_demo_model.py.
"""
import numpy as np
import pytest
import torch

from fmct.inference.analyze import Analyzer
from fmct.conventions.runtime import torch_device
from fmct.conventions.errors import Cancelled, ConfigError
from fmct.inference.explain import explain
from fmct.conventions.runtime import EXPLAIN_METHODS as METHODS
from fmct.inference.bundle import load_bundle
from fmct_testing import ball_ct, oblique_direction, tiny_bundle


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_normalised_map_on_the_ct_grid(analyzer, method):
    ct, _ = ball_ct(direction=oblique_direction(15.0), spacing=(1.5, 1.2, 4.0))
    result = analyzer.analyze(ct, explain_method=method, explain_findings="all")
    assert [f.name for f in result.findings] == ["bleed", "fracture"]
    for f in result.findings:
        assert 0.0 <= f.probability <= 1.0 and f.positive == (f.probability >= f.threshold)
    # attention is finding-agnostic: one map; the other methods: one per finding, on one shared scale
    # (issue 27): 255 = the strongest attribution among the study's maps, reached by one of them
    assert set(result.saliency) == ({"attention"} if method.startswith("attention") else {"bleed", "fracture"})
    for sal in result.saliency.values():
        assert sal.same_grid(ct)
        assert sal.array.dtype == np.uint8 and 0 < sal.array.max() <= 255
    assert max(int(sal.array.max()) for sal in result.saliency.values()) > 0.5 * 255  # 255 on the model grid


def test_probabilities_use_the_calibration_temperature(analyzer):
    ct, _ = ball_ct()
    mi = analyzer.preprocessor(ct)
    with torch.no_grad():
        logits = analyzer.model(mi.tensor)[0].numpy()
    probs = analyzer.probabilities(mi.tensor)[0]
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits / 1.5)), rtol=1e-5)


def test_progress_is_monotonic_and_reaches_one(analyzer):
    ct, _ = ball_ct()
    seen = []
    analyzer.analyze(ct, explain_method="integrated_gradients", explain_findings=["bleed"],
                     progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert all(b >= a for a, b in zip(seen, seen[1:]))


def test_cancel_stops_explanation(analyzer):
    ct, _ = ball_ct()
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        analyzer.analyze(ct, explain_method="occlusion", explain_findings="all", cancel=cancel)


def test_bad_options_are_config_errors(analyzer):
    ct, _ = ball_ct()
    with pytest.raises(ConfigError, match="explanation method"):
        analyzer.analyze(ct, explain_method="magic")
    with pytest.raises(ConfigError, match="unknown finding"):
        analyzer.analyze(ct, explain_findings=["tumour"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            torch_device("cuda")


def test_attention_rollout_differs_from_last_layer(analyzer):
    x = analyzer.preprocessor(ball_ct()[0]).tensor
    last = explain(analyzer.model, x, 0, "attention")
    roll = explain(analyzer.model, x, 0, "attention_rollout")
    assert last.shape == roll.shape == tuple(x.shape[2:])
    assert not np.allclose(last, roll)


def test_encoder_only_bundle_is_refused_for_analysis(tmp_path):
    path, _, _ = tiny_bundle(tmp_path / "enc", tasks=())
    assert load_bundle(path).model.head is None
    with pytest.raises(ConfigError, match="no task heads"):
        Analyzer(path, device="cpu")


def test_primary_finding_is_the_clearest_decision_among_explained_or_positive():
    from fmct.inference.analyze import AnalysisResult, Finding

    findings = [Finding("a", "", 0.95, 0.90, True), Finding("b", "", 0.70, 0.30, True), Finding("c", "", 0.2, 0.5, False)]
    # Thresholds differ: b is further above its threshold (0.40) than a (0.05), so b is shown first.
    assert AnalysisResult(findings).primary_finding().name == "b"
    # With maps, only explained findings compete (the overlay must exist).
    assert AnalysisResult(findings, model_saliency={"a": np.zeros(1), "c": np.zeros(1)}).primary_finding().name == "a"
    assert AnalysisResult([findings[2]]).primary_finding() is None


def test_files_written_at_once_are_the_files_written_one_by_one(analyzer, tmp_path, monkeypatch):
    """The CLI writes a study's maps, CT and report concurrently; the folder is the same, and a failed
    write still leaves no findings.json (the folder reads as incomplete)."""
    import SimpleITK as sitk

    from fmct.inference.study_folder import write_study_outputs

    ct, _ = ball_ct()
    result = analyzer.analyze(ct, explain_method="occlusion", explain_findings="all")  # attention: one map only
    assert len(result.saliency) >= 2
    folders = {}
    for threads in (1, None):
        folders[threads] = tmp_path / f"t{threads}"
        payload, written = write_study_outputs(folders[threads], ct, result, "m", "cpu", save_ct=True, threads=threads)
        assert [p.name for p in written] == ["findings.json", "ct.nii.gz",
                                             *[f"saliency_{n}.nii.gz" for n in result.saliency], "report.png"]
    for name in ["ct.nii.gz", *payload["saliency_files"].values()]:
        a, b = (sitk.ReadImage(str(folders[t] / name)) for t in (1, None))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()

    import fmct.inference.study_folder

    real = fmct.inference.study_folder._write_saliency

    def fail_on_one(maps, name, path):
        if path.name.endswith(f"{next(iter(result.saliency))}.nii.gz"):
            raise OSError(28, "No space left on device")
        return real(maps, name, path)

    monkeypatch.setattr(fmct.inference.study_folder, "_write_saliency", fail_on_one)
    with pytest.raises(OSError, match="No space"):
        write_study_outputs(tmp_path / "full", ct, result, "m", "cpu", threads=None)
    assert not (tmp_path / "full" / "findings.json").exists()
