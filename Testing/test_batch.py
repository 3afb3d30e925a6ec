"""Batch analysis: folders and manifests, a bad study, resuming, sharding, the CLI."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmct.conventions.runtime import torchrun_rank
from fmct.inference.batch import Rank, discover_studies, run_batch
from fmct.inference.study_folder import saliency_file
from fmct.cli import main
from fmct.reading.dicom import write_dicom_series
from fmct.conventions.errors import ConfigError
from fmct.reading.files import read_volume, write_volume
from fmct_testing import ball_ct

REPO = Path(__file__).resolve().parent.parent


def make_studies(root: Path) -> Path:
    """Three small CTs (NIfTI, DICOM, NRRD) and one corrupt DICOM study."""
    root.mkdir(parents=True)
    ct, _ = ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0))
    write_volume(ct, root / "a.nii.gz")
    write_dicom_series(ct, root / "b")
    shifted, _ = ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0), ball_radius_mm=25.0)
    write_volume(shifted, root / "c.nrrd")
    (root / "broken").mkdir()
    (root / "broken" / "0001.dcm").write_bytes(b"DICM" + os.urandom(2000))
    (root / "notes.txt").write_text("not a study")
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    return make_studies(tmp_path_factory.mktemp("studies") / "in")


def read_summary(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def outputs_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
            and p.name != "summary.csv"}


def test_discover_folder_and_manifest(studies, tmp_path):
    assert [s.study_id for s in discover_studies(studies)] == ["a", "b", "broken", "c"]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"study_id,path\nfirst,{studies / 'c.nrrd'}\nsecond,../{tmp_path.name}/x.nii.gz\n")
    found = discover_studies(manifest)
    assert [s.study_id for s in found] == ["first", "second"]
    assert found[1].path == tmp_path / f"../{tmp_path.name}/x.nii.gz"
    (tmp_path / "bad.csv").write_text("id,file\nx,y\n")
    with pytest.raises(ConfigError, match="study_id"):
        discover_studies(tmp_path / "bad.csv")
    (tmp_path / "slash.csv").write_text("study_id,path\n../evil,a.nii.gz\n")
    with pytest.raises(ConfigError, match="folder name"):
        discover_studies(tmp_path / "slash.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no studies"):
        discover_studies(tmp_path / "empty")


def test_torchrun_rank_for_the_batch():
    assert torchrun_rank({}) == Rank(0, 1, 0)
    assert torchrun_rank({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Rank(3, 4, 1)
    with pytest.raises(ConfigError):
        torchrun_rank({"RANK": "4", "WORLD_SIZE": "4"})


def test_batch_then_resume(analyzer, studies, tmp_path):
    out = tmp_path / "out"
    report = run_batch(analyzer, studies, out, explain_method="attention", num_workers=2, report=True)
    rows = read_summary(out / "summary.csv")
    assert [r["study_id"] for r in rows] == ["a", "b", "broken", "c"]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]
    assert report.counts == {"ok": 3, "error": 1, "skipped": 0}
    assert "corrupt" in rows[2]["error"] and rows[2]["p_bleed"] == ""
    assert 0.0 <= report.data_wait_share <= 1.0 and report.studies_per_hour > 0

    # Each ok study has the folder a single analysis writes, with the same numbers.
    single = analyzer.analyze(read_volume(studies / "c.nrrd"), explain_method=None)
    for r in rows:
        if r["status"] != "ok":
            assert not (out / r["study_id"] / "findings.json").exists()
            continue
        payload = json.loads((out / r["study_id"] / "findings.json").read_text())
        probs = {f["name"]: f["probability"] for f in payload["findings"]}
        assert abs(probs["bleed"] - float(r["p_bleed"])) < 1e-5
        positive = [f["name"] for f in payload["findings"] if f["positive"]]
        assert r["positive"] == ";".join(positive)
        # attention is finding-agnostic: one map for a study with anything to explain (issue 27)
        assert sorted(payload["saliency_files"]) == (["attention"] if positive else [])
        for name in payload["saliency_files"].values():
            sal = read_volume_any(out / r["study_id"] / name)
            assert sal.shape[::-1] == tuple(payload["input"]["size_xyz"])
        assert (out / r["study_id"] / "report.png").is_file()
    c = {f["name"]: f["probability"] for f in json.loads((out / "c" / "findings.json").read_text())["findings"]}
    for f in single.findings:
        assert abs(c[f.name] - f.probability) < 1e-5
    # Saliency files hold exactly the in-memory uint8 map (0..255), on the CT's grid.
    explained = analyzer.analyze(read_volume(studies / "c.nrrd"), explain_method="attention")
    assert explained.saliency
    for name, sal in explained.saliency.items():
        stored = read_volume_any(out / "c" / saliency_file(name))
        assert stored.dtype == np.uint8 and stored.max() > 0
        np.testing.assert_array_equal(stored, sal.array)

    # A re-run resumes: done studies are skipped and not touched, the bad one is tried again.
    before = outputs_mtimes(out)
    again = run_batch(analyzer, studies, out, explain_method="attention", num_workers=0)
    rows2 = read_summary(out / "summary.csv")
    assert [r["status"] for r in rows2] == ["skipped", "skipped", "error", "skipped"]
    assert again.counts == {"ok": 0, "error": 1, "skipped": 3}
    for r1, r2 in zip(rows, rows2):
        assert (r1["p_bleed"], r1["p_fracture"], r1["positive"]) == (r2["p_bleed"], r2["p_fracture"], r2["positive"])
    assert outputs_mtimes(out) == before


def read_volume_any(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_cli_batch_manifest_and_refusals(bundle, studies, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("study_id,path\n" f"one,{studies / 'a.nii.gz'}\n" f"two,{studies / 'b'}\n")
    out = tmp_path / "out"
    rc = main(["analyze", str(manifest), "--model", str(bundle), "--out", str(out), "--device", "cpu",
               "--explain", "none", "--workers", "0"])
    assert rc == 0
    assert [r["status"] for r in read_summary(out / "summary.csv")] == ["ok", "ok"]
    assert "2 ok, 0 error, 0 skipped" in capsys.readouterr().out
    assert main(["analyze", str(studies), "--batch", "--series", "1.2.3", "--model", str(bundle)]) == 2
    assert "--series" in capsys.readouterr().err
    assert main(["analyze", str(studies / "a.nii.gz"), "--workers", "2", "--model", str(bundle)]) == 2
    assert "--workers" in capsys.readouterr().err


def test_output_folder_inside_the_input_is_not_a_study(bundle, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    ct, _ = ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0))
    write_volume(ct, root / "only.nii.gz")
    assert main(["analyze", str(root), "--batch", "--model", str(bundle), "--out", str(root / "results"),
                 "--explain", "none", "--workers", "0", "--device", "cpu"]) == 0
    assert main(["analyze", str(root), "--batch", "--model", str(bundle), "--out", str(root / "results"),
                 "--explain", "none", "--workers", "0", "--device", "cpu"]) == 0
    assert [r["study_id"] for r in read_summary(root / "results" / "summary.csv")] == ["only"]


@pytest.mark.slow
def test_two_ranks_share_the_studies_and_merge_one_summary(bundle, studies, tmp_path):
    """Two processes as torchrun would start them (RANK / WORLD_SIZE), no process group needed."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fmct.cli", "analyze", str(studies), "--batch", "--model", str(bundle), "--out",
           str(out), "--explain", "none", "--workers", "0", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace") for r in range(2)]
    for rank, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == (1 if rank == 0 else 0), stdout + stderr  # rank 0's share holds "broken": exit 1
    rows = read_summary(out / "summary.csv")
    assert [r["study_id"] for r in rows] == ["a", "b", "broken", "c"]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]
    assert [r["study_id"] for r in read_summary(out / "summary_rank0.csv")] == ["a", "broken"]
    assert [r["study_id"] for r in read_summary(out / "summary_rank1.csv")] == ["b", "c"]
