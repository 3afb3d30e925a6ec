"""A bundle says what it was validated on (issue 26 item 7): intended use, a banner shown with every result,
and per-task validity; a task that is not validated is shown "not validated", never POSITIVE."""
import csv
import json

import pytest

from fmct.cli import main
from fmct.conventions.errors import BundleError
from fmct.inference.analyze import Analyzer
from fmct.inference.bundle import default_bundle_path, read_meta
from fmct.phantom import make_phantom
from fmct.reading.files import write_volume
from fmct_testing import tiny_bundle

BANNER = "Test model: trained on synthetic heads only."


def _bundle(tmp_path, **edits):
    """A tiny bundle whose 'bleed' task fires on anything (threshold 1e-6) and is marked not validated."""
    path, _, _ = tiny_bundle(tmp_path / "bundle", tasks=[("bleed", 1e-6), ("fracture", 1e-6)])
    meta = json.loads((path / "fmct.json").read_text())
    meta["tasks"][0]["validated"] = False
    meta["tasks"][0]["validation"] = {"auroc_among_bleeds": 0.5}
    meta["intended_use"] = "tests only"
    meta["banner"] = BANNER
    meta.update(edits)
    (path / "fmct.json").write_text(json.dumps(meta))
    return path


def test_validity_and_banner_round_trip_and_bad_types_are_refused(tmp_path):
    path = _bundle(tmp_path)
    meta = read_meta(path)
    assert [t.validated for t in meta.tasks] == [False, True] and meta.tasks[0].validation == {"auroc_among_bleeds": 0.5}
    assert meta.banner == BANNER and meta.intended_use == "tests only"
    assert meta.to_dict()["tasks"][0]["validated"] is False
    bad = json.loads((path / "fmct.json").read_text())
    bad["tasks"][1]["validated"] = "yes"
    (path / "fmct.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError, match=r"tasks\[1\].validated"):
        read_meta(path)


def test_a_task_that_is_not_validated_is_never_positive_and_every_output_says_so(tmp_path, capsys):
    path = _bundle(tmp_path)
    ct = make_phantom(2, slices="thick", in_plane_size=96).volume
    result = Analyzer(path, device="cpu").analyze(ct, explain_method=None)
    bleed, fracture = result.findings
    assert bleed.probability >= bleed.threshold and not bleed.positive and bleed.shown == "not validated"
    assert fracture.positive and fracture.shown == "POSITIVE"
    assert result.banner == BANNER
    write_volume(ct, tmp_path / "ct.nii.gz")
    assert main(["analyze", str(tmp_path / "ct.nii.gz"), "--model", str(path), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--explain", "none"]) == 0
    printed = capsys.readouterr().out
    assert BANNER in printed and "not validated" in printed
    bleed_line = next(line for line in printed.splitlines() if line.strip().startswith("bleed"))
    assert "not validated" in bleed_line and "POSITIVE" not in bleed_line
    assert "Checks of the CT" in printed and "calibrated CT: ok" in printed
    payload = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert payload["banner"] == BANNER
    assert payload["findings"][0]["result"] == "not validated" and payload["findings"][0]["positive"] is False
    assert [c["name"] for c in payload["checks"]][:2] == ["direction matrix", "calibrated CT"]
    assert all({"name", "passed", "value", "limit"} <= set(c) for c in payload["checks"])


def test_batch_summary_has_the_banner_and_the_checks(tmp_path, capsys):
    path = _bundle(tmp_path)
    studies = tmp_path / "in"
    studies.mkdir()
    write_volume(make_phantom(2, slices="thick", in_plane_size=96).volume, studies / "a.nii.gz")
    assert main(["analyze", str(studies), "--batch", "--model", str(path), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--explain", "none"]) == 0
    assert BANNER in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert rows[0]["checks"] == "passed" and rows[0]["positive"] == "fracture"


def test_the_demo_model_marks_its_subtype_and_fracture_heads_not_validated():
    meta = read_meta(default_bundle_path())
    validated = {t.name: t.validated for t in meta.tasks}
    assert {n for n, v in validated.items() if not v} == {"intraparenchymal", "intraventricular", "subarachnoid",
                                                           "fracture"}
    assert "synthetic heads only" in meta.banner and meta.intended_use
    for t in meta.tasks:
        if t.name in ("intraparenchymal", "intraventricular", "subarachnoid", "subdural", "epidural"):
            assert 0.0 < t.validation["auroc_among_bleeds"] < 1.0
