"""Real software to install (issue 29 items 1-3): the wheel carries the demo model, model.onnx is made
from the one stored copy of the weights into a user cache, and the version comes from git."""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fmct.cli import main
from fmct.conventions.version import code_version
from fmct.export import onnx_cache
from fmct.inference.bundle import default_bundle_path, load_bundle
from fmct.inference.onnx_runner import TOLERANCE
from fmct.inference.runners import choose_backend, load_runner
from fmct_testing import tiny_bundle

REPO = Path(__file__).resolve().parent.parent
DEMO_FILES = {"fmct.json", "model.safetensors", "ood.safetensors"}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def _has_git_checkout() -> bool:
    return shutil.which("git") is not None and (REPO / ".git").exists()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(onnx_cache.CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def onnx_less_bundle(tmp_path_factory):
    """A bundle shipped as the repository ships the demo model: an ONNX record in fmct.json, no model.onnx."""
    path, _, _ = tiny_bundle(tmp_path_factory.mktemp("pkg") / "bundle")
    env_before = os.environ.get(onnx_cache.CACHE_ENV)
    os.environ[onnx_cache.CACHE_ENV] = str(tmp_path_factory.mktemp("unused-cache"))
    try:
        assert main(["export", str(path), "--onnx"]) == 0
    finally:
        if env_before is None:
            os.environ.pop(onnx_cache.CACHE_ENV)
        else:
            os.environ[onnx_cache.CACHE_ENV] = env_before
    (path / "model.onnx").unlink()
    return path


def test_the_repository_keeps_the_demo_weights_once():
    demo = REPO / "Resources" / "DemoModel"
    meta = json.loads((demo / "fmct.json").read_text())
    assert isinstance(meta["onnx"], dict)  # the record of the checked export: auto still finds onnxruntime
    if _has_git_checkout():  # no model.onnx beside model.safetensors in git (a local export is git-ignored)
        assert {Path(p).name for p in _git("ls-files", "Resources/DemoModel").splitlines()} == DEMO_FILES
        assert _git("check-ignore", "Resources/DemoModel/model.onnx")
    else:
        assert {p.name for p in demo.iterdir()} == DEMO_FILES


def test_onnx_is_exported_once_into_the_cache_and_checked(onnx_less_bundle, cache):
    assert choose_backend("auto", onnx_less_bundle, "cpu", None) == "onnx"
    bundle, runner = load_runner(onnx_less_bundle, backend="onnx", device="cpu")
    cached = cache / "onnx" / bundle.weights_sha256
    record = json.loads((cached / "record.json").read_text())
    assert record["max_abs_diff_probability"] <= TOLERANCE and record["weights_sha256"] == bundle.weights_sha256
    assert (onnx_less_bundle / "model.onnx").exists() is False  # the bundle itself is never written to
    x = np.random.default_rng(0).normal(size=(1, *runner.session.get_inputs()[0].shape[1:])).astype(np.float32)
    torch_bundle = load_bundle(onnx_less_bundle)
    import torch

    with torch.no_grad():
        expected = torch_bundle.model.float().eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.logits(x), expected, atol=1e-3)

    # A second run reads the cache and never imports torch (the point of the onnxruntime path).
    code = (
        "import sys\n"
        "from fmct.inference.runners import load_runner\n"
        f"load_runner({str(onnx_less_bundle)!r}, backend='onnx', device='cpu')\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "print('NO-TORCH-OK')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "NO-TORCH-OK" in proc.stdout, proc.stdout + proc.stderr


def test_an_edited_cache_is_not_trusted(onnx_less_bundle, cache):
    bundle, _ = load_runner(onnx_less_bundle, backend="onnx", device="cpu")
    graph = cache / "onnx" / bundle.weights_sha256 / "model.onnx"
    good = graph.read_bytes()
    graph.write_bytes(good[:-10] + b"0123456789")
    assert onnx_cache.cached_onnx(bundle.weights_sha256) is None  # SHA-256 no longer the record's
    load_runner(onnx_less_bundle, backend="onnx", device="cpu")  # exported again, and checked
    assert graph.read_bytes() != good[:-10] + b"0123456789"
    assert onnx_cache.cached_onnx(bundle.weights_sha256) is not None


def test_export_check_of_a_bundle_without_onnx_uses_the_cache(onnx_less_bundle, cache, capsys):
    assert main(["export", str(onnx_less_bundle), "--check"]) == 0
    assert "agrees with the torch weights" in capsys.readouterr().out


def test_version_comes_from_git_and_is_recorded(tmp_path):
    version = code_version()
    assert version != "0.1.0" and re.match(r"^\d", version)  # 0+unknown in a source tree without git
    if _has_git_checkout():
        assert _git("rev-parse", "--short=7", "HEAD") in version
        assert f"dev{_git('rev-list', '--count', 'HEAD')}" in version
    out = subprocess.run([sys.executable, "-m", "fmct.cli", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"fmct {version}"
    path, _, _ = tiny_bundle(tmp_path / "b")
    assert json.loads((path / "fmct.json").read_text())["provenance"]["code_version"] == version
    from fmct.reading.files import write_volume
    from fmct_testing import ball_ct

    write_volume(ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0))[0], tmp_path / "ct.nii.gz")
    assert main(["analyze", str(tmp_path / "ct.nii.gz"), "--model", str(path), "--explain", "none", "--backend", "torch",
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "findings.json").read_text())["fmct_version"] == version


@pytest.mark.slow
def test_the_wheel_carries_the_demo_model_and_finds_it(tmp_path):
    """Build the wheel as pip does (setup.py's build_py hook), unpack it and import fmct from there."""
    pytest.importorskip("setuptools_scm")
    if not _has_git_checkout():
        pytest.skip("needs the git checkout (the version comes from git)")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("fmct-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    assert {f"fmct/_data/DemoModel/{n}" for n in DEMO_FILES} <= names
    assert "fmct/_data/DemoModel/model.onnx" not in names and "fmct/py.typed" in names
    assert "fmct/_scm_version.py" in names
    code = ("from fmct.inference.bundle import default_bundle_path, read_meta\n"
            "from fmct.conventions.version import code_version\n"
            "p = default_bundle_path(); print(p); print(read_meta(p).name); print(code_version())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FMCT_BUNDLE")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    where, name, version = out.stdout.split("\n")[:3]
    assert Path(where) == tmp_path / "site" / "fmct" / "_data" / "DemoModel"
    assert name == load_bundle(default_bundle_path(), load_model=False).meta.name
    assert version.split("+")[0] == code_version().split("+")[0] and "+g" in version  # the build's git version


def test_fetch_keeps_a_release_asset_only_with_the_published_sha256(tmp_path, capsys):
    """A model > 25 MB is a release asset with its SHA-256: fetched on request, verified (file:// stands in)."""
    import hashlib

    bundle, _, _ = tiny_bundle(tmp_path / "release" / "bundle")
    asset = Path(shutil.make_archive(str(tmp_path / "release" / "fmct-model"), "zip", bundle))
    digest = hashlib.sha256(asset.read_bytes()).hexdigest()
    url = asset.as_uri()
    out = tmp_path / "models"
    assert main(["fetch", url, "--sha256", digest, "--out", str(out)]) == 0
    fetched = out / asset.name
    assert fetched.read_bytes() == asset.read_bytes()
    assert load_bundle(fetched).meta.name == load_bundle(bundle).meta.name  # usable as --model as it is
    assert main(["fetch", url, "--sha256", digest, "--out", str(fetched)]) == 0  # already there: kept

    wrong = "0" * 64
    capsys.readouterr()
    assert main(["fetch", url, "--sha256", wrong, "--out", str(tmp_path / "bad.zip")]) == 2
    err = capsys.readouterr().err
    assert "is not the published" in err and not (tmp_path / "bad.zip").exists()
    assert not list(tmp_path.glob(".bad.zip.*"))  # no partial download left behind
    assert main(["fetch", url, "--sha256", "abc", "--out", str(tmp_path / "x.zip")]) == 2
    assert main(["fetch", (tmp_path / "missing.zip").as_uri(), "--sha256", digest, "--out", str(tmp_path / "m.zip")]) == 2
    assert "could not download" in capsys.readouterr().err
    fetched.write_bytes(b"another file")
    assert main(["fetch", url, "--sha256", digest, "--out", str(fetched)]) == 2  # never replaced silently
    assert main(["fetch", url, "--sha256", digest, "--out", str(fetched), "--overwrite"]) == 0
    assert fetched.read_bytes() == asset.read_bytes()


def test_an_export_unlike_the_bundles_record_is_checked_against_torch(onnx_less_bundle, cache, tmp_path):
    """Another torch exporter writes other bytes: the cached graph is then proven anew, not taken on trust."""
    other = Path(shutil.copytree(onnx_less_bundle, tmp_path / "other"))
    meta = json.loads((other / "fmct.json").read_text())
    meta["onnx"]["onnx_sha256"] = "0" * 64  # the bundle maker's export differs from what this torch writes
    meta["onnx"]["max_abs_diff_probability"] = 0.0
    (other / "fmct.json").write_text(json.dumps(meta))
    bundle, _ = load_runner(other, backend="onnx", device="cpu")
    record = json.loads((cache / "onnx" / bundle.weights_sha256 / "record.json").read_text())
    assert record["onnx_sha256"] != "0" * 64 and record["max_abs_diff_probability"] <= TOLERANCE  # measured here
    assert record["checked_on"].startswith("fmct.phantom seed 0") and record != meta["onnx"]
