"""ONNX export and the onnxruntime backend: parity with torch, no torch import, refusals."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmct.inference.analyze import Analyzer
from fmct.inference.batch import run_batch
from fmct.inference.bundle import load_bundle, save_bundle
from fmct.cli import main
from fmct.conventions.errors import BundleError, ConfigError
from fmct.reading.files import write_volume
from fmct.inference.onnx_runner import TOLERANCE
from fmct.inference.runners import calibrated_probabilities, choose_backend
from fmct.conventions.runtime import cuda_may_be_present
from fmct_testing import ball_ct, tiny_bundle

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny bundle exported by the CLI, as a user would."""
    path, _, _ = tiny_bundle(tmp_path_factory.mktemp("onnx") / "bundle")
    assert main(["export", str(path), "--onnx"]) == 0
    return path


@pytest.fixture
def bundle_copy(exported, tmp_path):
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def test_export_records_the_check_and_onnxruntime_matches_torch(exported):
    record = json.loads((exported / "fmct.json").read_text())["onnx"]
    assert record["opset"] >= 17 and record["max_abs_diff_probability"] <= TOLERANCE
    assert "phantom" in record["checked_on"]
    assert record["torch_version"] == torch.__version__ and record["onnxruntime_version"]
    assert (exported / "model.onnx").stat().st_size > 0

    ct, _ = ball_ct()
    torch_an, onnx_an = Analyzer(exported, device="cpu"), Analyzer(exported, device="cpu", backend="onnx")
    x = torch_an.preprocessor(ct).array
    np.testing.assert_allclose(onnx_an.probabilities(x), torch_an.probabilities(x), atol=TOLERANCE, rtol=0)
    batch = np.concatenate([x, np.flip(x, axis=-1)])  # the batch axis is dynamic
    np.testing.assert_allclose(onnx_an.probabilities(batch), torch_an.probabilities(batch), atol=TOLERANCE, rtol=0)
    a, b = torch_an.analyze(ct, explain_method=None), onnx_an.analyze(ct, explain_method=None)
    assert [f.name for f in a.findings] == [f.name for f in b.findings]
    assert all(abs(f.probability - g.probability) <= TOLERANCE for f, g in zip(a.findings, b.findings))


def test_calibration_matches_the_torch_formula():
    logits = np.array([[-800.0, -3.0, 0.0, 2.5, 900.0]], np.float32)
    temps = [1.0, 1.5, 2.0, 0.7, 1.0]
    expected = torch.sigmoid(torch.from_numpy(logits) / torch.tensor(temps)).numpy()
    np.testing.assert_allclose(calibrated_probabilities(logits, temps), expected, atol=1e-7)


@pytest.mark.parametrize("flags", [["--backend", "onnx"], ["--explain", "none", "--device", "cpu"]],
                         ids=["backend onnx", "default backend, findings only"])
def test_cli_onnx_analysis_never_imports_torch(exported, tmp_path, flags):
    """Also the default: findings only on the CPU with a checked model.onnx is onnxruntime's (cold start)."""
    ct, _ = ball_ct()
    write_volume(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from fmct.cli import main\n"
        f"rc = main(['analyze', {str(tmp_path / 'ct.nii.gz')!r}, '--model', {str(exported)!r}, *{flags!r}, "
        f"'--out', {str(out)!r}])\n"
        "assert rc == 0, rc\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked[:5]\n"
        "print('NO-TORCH-OK')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NO-TORCH-OK" in proc.stdout
    payload = json.loads((out / "findings.json").read_text())
    assert payload["backend"] == "onnx" and payload["explain_method"] is None
    torch_probs = Analyzer(exported, device="cpu").analyze(ct, explain_method=None).findings
    for f, g in zip(payload["findings"], torch_probs):
        assert abs(f["probability"] - g.probability) <= TOLERANCE


def test_auto_backend_is_onnxruntime_only_for_findings_on_the_cpu_with_a_checked_onnx(exported, tmp_path):
    assert choose_backend("auto", exported, "cpu", None) == "onnx"
    assert choose_backend("auto", exported, "cpu", "integrated_gradients") == "torch"  # gradients
    assert choose_backend("auto", exported, "cuda", None) == "torch"  # onnxruntime here has no GPU
    assert choose_backend("auto", exported, "auto", None) == ("torch" if cuda_may_be_present() else "onnx")
    assert choose_backend("torch", exported, "cpu", None) == "torch"
    plain = Path(shutil.copytree(exported, tmp_path / "plain"))
    (plain / "model.onnx").unlink()
    # vouched for, but shipped without it to save space: exported once into the user cache (fmct.export.onnx_cache)
    assert choose_backend("auto", plain, "cpu", None) == "onnx"
    shutil.make_archive(str(tmp_path / "zipped"), "zip", exported)
    assert choose_backend("auto", tmp_path / "zipped.zip", "cpu", None) == "onnx"
    meta = json.loads((plain / "fmct.json").read_text())
    meta["onnx"] = None
    (plain / "fmct.json").write_text(json.dumps(meta))
    assert choose_backend("auto", plain, "cpu", None) == "torch"  # nothing vouched for: torch
    if torch.__version__.endswith("+cpu"):
        assert not cuda_may_be_present()
    with pytest.raises(ConfigError, match="unknown backend"):
        choose_backend("tensorrt", exported, "cpu", None)


def test_auto_backend_refuses_a_tampered_onnx_instead_of_passing_it_over(bundle_copy, tmp_path, capsys):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    write_volume(ball_ct()[0], tmp_path / "ct.nii.gz")
    rc = main(["analyze", str(tmp_path / "ct.nii.gz"), "--model", str(bundle_copy), "--explain", "none",
               "--device", "cpu", "--out", str(tmp_path / "o")])
    assert rc == 2 and "edited or replaced" in capsys.readouterr().err
    assert not (tmp_path / "o" / "findings.json").exists()


def test_onnx_backend_refuses_explanations_and_compile(exported, tmp_path, capsys):
    an = Analyzer(exported, device="cpu", backend="onnx")
    with pytest.raises(ConfigError, match="explain none"):
        an.analyze(ball_ct()[0], explain_method="integrated_gradients")
    with pytest.raises(ConfigError, match="torch backend only"):
        Analyzer(exported, device="cpu", backend="onnx", compile=True)
    write_volume(ball_ct()[0], tmp_path / "ct.nii.gz")
    rc = main(["analyze", str(tmp_path / "ct.nii.gz"), "--model", str(exported), "--backend", "onnx",
               "--explain", "occlusion", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--explain none" in capsys.readouterr().err


def test_tampered_onnx_is_refused(bundle_copy, tmp_path, capsys):
    other, _, _ = tiny_bundle(tmp_path / "other", seed=1)
    assert main(["export", str(other), "--onnx"]) == 0
    shutil.copy(other / "model.onnx", bundle_copy / "model.onnx")  # a valid ONNX file, but of other weights
    with pytest.raises(BundleError, match="edited or replaced"):
        Analyzer(bundle_copy, device="cpu", backend="onnx")
    (bundle_copy / "model.onnx").write_bytes(b"not an onnx file")
    write_volume(ball_ct()[0], tmp_path / "ct.nii.gz")
    rc = main(["analyze", str(tmp_path / "ct.nii.gz"), "--model", str(bundle_copy), "--backend", "onnx",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "edited or replaced" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stale_onnx_after_new_weights_is_refused(bundle_copy, tmp_path):
    retrained, _, _ = tiny_bundle(tmp_path / "retrained", seed=2)
    shutil.copy(retrained / "model.safetensors", bundle_copy / "model.safetensors")
    with pytest.raises(BundleError, match="other weights"):
        Analyzer(bundle_copy, device="cpu", backend="onnx")


def test_unchecked_or_missing_onnx_is_refused(bundle_copy, tmp_path):
    meta = json.loads((bundle_copy / "fmct.json").read_text())
    meta["onnx"] = None
    (bundle_copy / "fmct.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="never checked"):
        Analyzer(bundle_copy, device="cpu", backend="onnx")
    plain, _, _ = tiny_bundle(tmp_path / "plain")
    with pytest.raises(BundleError, match="fmct export"):
        Analyzer(plain, device="cpu", backend="onnx")


def test_parity_failure_refuses_the_export(tmp_path, monkeypatch):
    import fmct.export.onnx as ox

    path, model, _ = tiny_bundle(tmp_path / "b")
    before = (path / "fmct.json").read_text()
    real = ox.to_onnx_bytes

    def drifted(m, example, opset):  # an exporter that gets the weights subtly wrong
        m = load_bundle(path).model
        with torch.no_grad():
            m.head.fc.bias += 0.05
        return real(m, example, opset)

    monkeypatch.setattr(ox, "to_onnx_bytes", drifted)
    with pytest.raises(BundleError, match="disagrees with torch"):
        ox.export_onnx(path)
    assert not (path / "model.onnx").exists()
    assert (path / "fmct.json").read_text() == before


def test_export_refusals(tmp_path, capsys):
    path, _, _ = tiny_bundle(tmp_path / "b")
    assert main(["export", str(path)]) == 2 and "--onnx" in capsys.readouterr().err
    zipped, _, _ = tiny_bundle(tmp_path / "b.zip")
    assert main(["export", str(zipped), "--onnx"]) == 2 and "unzip" in capsys.readouterr().err


def test_resaving_a_bundle_drops_its_onnx_record(exported, tmp_path):
    bundle = load_bundle(exported)
    assert bundle.meta.onnx
    out = save_bundle(bundle.model, bundle.meta, tmp_path / "resaved")
    assert not (out / "model.onnx").exists()
    assert json.loads((out / "fmct.json").read_text())["onnx"] is None


def test_onnx_batch_uses_a_torch_free_worker_pool(exported, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    ct, _ = ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0))
    write_volume(ct, studies / "s1.nii.gz")
    write_volume(ct.with_array(np.full_like(ct.array, 0.5)), studies / "s2.nii.gz")  # not HU: an error row
    an = Analyzer(exported, device="cpu", backend="onnx")
    report = run_batch(an, studies, tmp_path / "out", explain_method=None, num_workers=1)
    assert [r["status"] for r in report.rows] == ["ok", "error"]
    assert "Hounsfield" in report.rows[1]["error"]
    assert (tmp_path / "out" / "s1" / "findings.json").is_file()
