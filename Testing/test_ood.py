"""The out-of-distribution guard: statistics that travel with the weights, and CTs it must flag."""
import json
import shutil

import numpy as np
import pytest

from fmct.inference.analyze import Analyzer
from fmct.inference.bundle import OOD_FILE, default_bundle_path
from fmct.cli import main
from fmct.checks.runner import run_checks
from fmct.conventions.errors import BundleError, HeadCheckError
from fmct.reading.files import write_volume
from fmct.inference.ood import ReferenceStats, fit_reference
from fmct.phantom import make_phantom
from fmct.phantom.variations import contrast_enhanced, scaled, vertex_only
from fmct.reading.volume import Volume


def test_threshold_keeps_the_calibrated_share_and_flags_a_shifted_population():
    rng = np.random.default_rng(0)
    scale = np.linspace(0.1, 3.0, 32)
    stats = fit_reference(rng.normal(size=(400, 32)) * scale, rng.normal(size=(400, 32)) * scale, quantile=0.95)
    fresh = stats.score(rng.normal(size=(2000, 32)) * scale)
    assert 0.02 < np.mean(fresh > stats.threshold) < 0.09
    shifted = stats.score(rng.normal(size=(200, 32)) * scale + 1.5)
    assert np.mean(shifted > stats.threshold) > 0.95
    assert stats.judge(stats.mean[None])["in_distribution"] is True
    assert stats.judge(stats.mean[None] + 100.0)["in_distribution"] is False


def test_statistics_round_trip_and_refuse_other_weights_or_broken_values():
    rng = np.random.default_rng(1)
    stats = fit_reference(rng.normal(size=(50, 8)), rng.normal(size=(30, 8)), source="test")
    back = ReferenceStats.from_bytes(stats.to_bytes("abc"), weights_sha256="abc")
    np.testing.assert_array_equal(back.precision, stats.precision)
    assert back.threshold == stats.threshold and back.source == "test"
    with pytest.raises(BundleError, match="other weights"):
        ReferenceStats.from_bytes(stats.to_bytes("abc"), weights_sha256="def")
    stats.threshold = float("nan")
    with pytest.raises(BundleError, match="non-finite"):
        ReferenceStats.from_bytes(stats.to_bytes("abc"))
    with pytest.raises(BundleError, match="not a readable"):
        ReferenceStats.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(BundleError, match="another model"):
        back.score(np.zeros((1, 9)))


def _score(demo_analyzer: Analyzer, volume: Volume) -> float:
    _, features = demo_analyzer.runner.run(demo_analyzer.preprocessor(volume).array)
    return float(demo_analyzer.reference.score(features)[0])


@pytest.mark.slow
def test_shipped_model_flags_strongly_unlike_ct_and_few_training_like_ones(demo_analyzer):
    assert demo_analyzer.reference is not None, f"the bundled demo model must carry {OOD_FILE}"
    threshold = demo_analyzer.reference.threshold
    # Fresh phantoms of the demo recipe's own distribution (its test-split seeds): flagged at about the calibrated rate.
    volumes = [make_phantom(3_000_000 + i, slices="thick" if i % 2 == 0 else "thin", in_plane_size=128).volume
               for i in range(16)]
    in_dist = [_score(demo_analyzer, v) for v in volumes]
    assert np.mean(np.array(in_dist) > threshold) <= 1 / 16
    assert all(run_checks(v).passed for v in volumes)  # whole heads
    heads = [make_phantom(7_000_000 + i, slices="thick", in_plane_size=160).volume for i in range(3)]
    scores = [_score(demo_analyzer, contrast_enhanced(v)) for v in heads]
    assert min(scores) > threshold, f"contrast-enhanced: scores {scores} not all above {threshold:.3f}"
    # A partial scan or an infant-size head is refused by the size check before the model runs, whatever
    # its score would be (a model trained with field-of-view augmentations scores some below the threshold).
    for name, change, words in [("vertex only", vertex_only, "too short"),
                                ("infant-scale head (half size)", lambda v: scaled(v, 0.5), "too small")]:
        for v in heads:
            with pytest.raises(HeadCheckError, match=f"plausible head size check failed: .*{words}"):
                demo_analyzer.analyze(change(v), explain_method=None)


def test_cli_warns_and_findings_json_records_the_score(tmp_path, capsys):
    head = make_phantom(7_000_000, slices="thick", in_plane_size=160).volume
    write_volume(contrast_enhanced(head), tmp_path / "enhanced.nii.gz")
    assert main(["analyze", str(tmp_path / "enhanced.nii.gz"), "--out", str(tmp_path / "out"), "--explain", "none",
                 "--device", "cpu"]) == 0
    assert "unlike the data the model was trained on" in capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert payload["out_of_distribution"]["in_distribution"] is False
    assert payload["out_of_distribution"]["score"] > payload["out_of_distribution"]["threshold"]
    assert payload["warning"].startswith("WARNING")


def test_stale_statistics_are_refused(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), bundle)
    weights = bytearray((bundle / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # other weights (one bit of the last tensor), same statistics file
    (bundle / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(BundleError, match="stale"):
        Analyzer(bundle, device="cpu")


@pytest.mark.slow
def test_onnx_backend_gives_the_same_out_of_distribution_score(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), bundle)
    assert main(["export", str(bundle), "--onnx"]) == 0
    ct = contrast_enhanced(make_phantom(7_000_001, slices="thick", in_plane_size=160).volume)
    by_torch = Analyzer(bundle, device="cpu").analyze(ct, explain_method=None).ood
    by_onnx = Analyzer(bundle, device="cpu", backend="onnx").analyze(ct, explain_method=None).ood
    assert by_onnx["in_distribution"] is by_torch["in_distribution"] is False
    assert abs(by_onnx["score"] - by_torch["score"]) <= 1e-3 * by_torch["score"]


@pytest.mark.slow
def test_batch_summary_says_which_studies_are_out_of_distribution(tmp_path):
    import csv

    from fmct.inference.batch import run_batch

    studies = tmp_path / "studies"
    head = make_phantom(3_000_000, slices="thick", in_plane_size=128).volume
    write_volume(head, studies / "normal.nii.gz")
    write_volume(contrast_enhanced(head), studies / "enhanced.nii.gz")
    run_batch(Analyzer(default_bundle_path(), device="cpu"), studies, tmp_path / "out", explain_method=None, num_workers=0)
    with open(tmp_path / "out" / "summary.csv") as f:
        rows = {r["study_id"]: r for r in csv.DictReader(f)}
    assert rows["normal"]["in_distribution"] == "yes" and rows["enhanced"]["in_distribution"] == "no"
    assert float(rows["enhanced"]["ood_score"]) > float(rows["normal"]["ood_score"])


def test_cli_says_when_the_check_passed(tmp_path, capsys):
    write_volume(make_phantom(3_000_002, slices="thick", in_plane_size=128).volume, tmp_path / "ct.nii.gz")
    assert main(["analyze", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "out"), "--explain", "none",
                 "--device", "cpu"]) == 0
    assert "In-distribution check passed" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "findings.json").read_text())["warning"] is None
