"""The `fmct` command: analyze and phantom end to end, and a clean exit 2 for every bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from fmct.cli import main
from fmct.reading.dicom import write_dicom_series
from fmct.reading.files import read_volume, write_volume
from fmct.reading.volume import Volume
from fmct_testing import ball_ct, oblique_direction


def test_analyze_dicom_writes_findings_saliency_and_report(tmp_path, bundle, capsys):
    ct, _ = ball_ct(direction=oblique_direction(12.0))
    write_dicom_series(ct, tmp_path / "dicom", shuffle_names_seed=3)
    out = tmp_path / "out"
    code = main(["analyze", str(tmp_path / "dicom"), "--model", bundle, "--out", str(out),
                 "--findings", "all", "--explain", "attention", "--save-ct"])
    assert code == 0
    payload = json.loads((out / "findings.json").read_text())
    assert [f["name"] for f in payload["findings"]] == ["bleed", "fracture"]
    assert payload["saliency_files"] == {"attention": "attention.nii.gz"}  # finding-agnostic: one map (issue 27)
    sal = read_volume_any(out / "attention.nii.gz")
    ref = sitk.ReadImage(str(out / "ct.nii.gz"))
    assert sal.GetSize() == ref.GetSize()
    np.testing.assert_allclose(sal.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(sal.GetDirection(), ref.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(sal.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    assert (out / "report.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "bleed" in printed and "fracture" in printed


def read_volume_any(path):
    return sitk.ReadImage(str(path))


def _single_slice(tmp_path):
    p = tmp_path / "one.nii.gz"
    write_volume(Volume(np.full((1, 64, 64), -1000, np.float32), (1, 1, 5)), p)
    return p


def _mr_series(tmp_path):
    ct, _ = ball_ct()
    write_dicom_series(ct, tmp_path / "mr", modality="MR")
    return tmp_path / "mr"


def _missing_slice(tmp_path):
    ct, _ = ball_ct()
    files = write_dicom_series(ct, tmp_path / "gap", shuffle_names_seed=1)
    # remove the file whose slice sits in the middle of the stack
    z = []
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(str(f))
        r.ReadImageInformation()
        z.append(float(r.GetMetaData("0020|0032").split("\\")[2]))
    files[int(np.argsort(z)[len(z) // 2])].unlink()
    return tmp_path / "gap"


def _corrupt(tmp_path):
    p = tmp_path / "broken.nii.gz"
    p.write_bytes(b"\x1f\x8b this is not a nifti")
    return p


def _absurd_spacing(tmp_path):
    ct, _ = ball_ct()
    ct.spacing = (1.0, 1.0, 35.0)
    p = tmp_path / "absurd.nrrd"
    write_volume(ct, p)
    return p


def _not_hu(tmp_path):
    p = tmp_path / "mr.nii.gz"
    write_volume(Volume(np.random.default_rng(0).uniform(0, 800, (20, 32, 32)).astype(np.float32), (1, 1, 3)), p)
    return p


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize(
    "make, words",
    [
        (_single_slice, "slice"),
        (_mr_series, "MR"),
        (_missing_slice, "missing"),
        (_corrupt, "broken.nii.gz"),
        (_absurd_spacing, "spacing"),
        (_not_hu, "Hounsfield"),
        (_empty, "empty"),
        (lambda t: t / "does_not_exist", "not"),
    ],
    ids=["single-slice", "mr", "missing-slice", "corrupt", "absurd-spacing", "not-hu", "empty-folder", "no-such-path"],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, bundle, capsys, make, words):
    path = make(tmp_path)
    code = main(["analyze", str(path), "--model", bundle, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("fmct: error: ") and words.lower() in err[-1].lower()
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o" / "findings.json").exists()


def test_bad_bundle_exits_2(tmp_path, capsys):
    ct, _ = ball_ct()
    write_volume(ct, tmp_path / "ct.nii.gz")
    assert main(["analyze", str(tmp_path / "ct.nii.gz"), "--model", str(tmp_path / "nope")]) == 2
    assert "bundle not found" in capsys.readouterr().err.lower()


@pytest.mark.slow
def test_console_script_and_debug_traceback(tmp_path):
    """The installed `fmct` command: exit 2 without traceback, with it under --debug."""
    missing = str(tmp_path / "missing.nii.gz")
    plain = subprocess.run([sys.executable, "-m", "fmct.cli", "analyze", missing], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and plain.stderr.count("\n") == 1
    debug = subprocess.run([sys.executable, "-m", "fmct.cli", "--debug", "analyze", missing], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_phantom_command_writes_cases_masks_and_labels(tmp_path):
    out = tmp_path / "ph"
    assert main(["phantom", str(out), "--n", "2", "--seed", "5", "--size", "96", "--slices", "thick"]) == 0
    rows = (out / "labels.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "any_hemorrhage" in rows[0]
    cts = sorted(out.glob("*/ct.nii.gz"))
    assert len(cts) == 2
    vol = read_volume(cts[0])
    assert vol.array.shape[1:] == (96, 96)


def test_phantom_command_dicom(tmp_path):
    out = tmp_path / "phd"
    assert main(["phantom", str(out), "--n", "1", "--seed", "2", "--size", "64", "--slices", "thick", "--format", "dicom"]) == 0
    case = next(p for p in out.iterdir() if p.is_dir())
    vol = read_volume(case / "ct")
    assert vol.meta["format"] == "dicom" and vol.array.shape[1:] == (64, 64)
