"""The broken-input corpus: every kind of bad input FMCT must refuse (exit 2, one line naming the
problem, before any model runs, no findings.json), and the legitimate oddities it must still analyze.

Each case is one row: a builder that writes the bad input into a folder, the expected exit code
and a fragment of the expected message. Adding the next hole is one line in VOLUME_CASES or
BUNDLE_CASES. Cases that need file permissions are skipped when the tests run as root (root
reads and writes everything).
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from fmct.cli import main
from fmct.dicom import write_dicom_series
from fmct.io import write_volume
from fmct.volume import Volume
from fmct_testing import ball_ct, tiny_bundle

pydicom = pytest.importorskip("pydicom")

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SHAPE, SPACING = (16, 64, 64), (3.0, 3.0, 6.0)


@dataclass
class Case:
    id: str
    build: Callable[[Path], Path]  # writes the bad input under the folder, returns the path to give
    code: int
    words: str  # a fragment of the one-line message (case-insensitive)
    args: list[str] = field(default_factory=list)  # extra CLI arguments
    env: dict[str, str] = field(default_factory=dict)
    needs_non_root: bool = False

    def param(self):
        marks = [pytest.mark.skipif(IS_ROOT, reason="permissions do not apply to root")] if self.needs_non_root else []
        return pytest.param(self, id=self.id, marks=marks)


def small_ct(**kw) -> Volume:
    return ball_ct(shape_zyx=SHAPE, spacing=SPACING, **kw)[0]


# ------------------------------------------------------------------------------------- NIfTI
def _nifti_bytes(array: np.ndarray, spacing=SPACING) -> bytes:
    """An uncompressed NIfTI-1 file as ITK writes it."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.nii"
        write_volume(Volume(array, spacing), p)
        return p.read_bytes()


def _ct_array(dtype=np.float32) -> np.ndarray:
    return small_ct().array.astype(dtype)


def nii_gz_cut(fraction: float):
    def build(d: Path) -> Path:
        write_volume(small_ct(), d / "full.nii.gz")
        data = (d / "full.nii.gz").read_bytes()
        (d / "cut.nii.gz").write_bytes(data[: int(len(data) * fraction)])
        return d / "cut.nii.gz"
    return build


def nii_gz_inner_cut(d: Path) -> Path:
    raw = _nifti_bytes(_ct_array(np.int16))
    (d / "inner.nii.gz").write_bytes(gzip.compress(raw[: int(len(raw) * 0.75)]))
    return d / "inner.nii.gz"


def nii_gz_flipped(d: Path) -> Path:
    ct = small_ct()
    ct.array = ct.array + np.random.default_rng(0).normal(0, 20, ct.array.shape).astype(np.float32)  # not too compressible
    write_volume(ct, d / "full.nii.gz")
    data = bytearray((d / "full.nii.gz").read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(255 - b for b in data[mid : mid + 64])
    (d / "flipped.nii.gz").write_bytes(bytes(data))
    return d / "flipped.nii.gz"


def nii_cut(d: Path) -> Path:
    raw = _nifti_bytes(_ct_array(np.int16))
    (d / "cut.nii").write_bytes(raw[: int(len(raw) * 0.5)])
    return d / "cut.nii"


def nii_huge_values(d: Path) -> Path:
    """Flipped bytes in float data: values like 3.4e38 that no scanner writes."""
    raw = bytearray(_nifti_bytes(_ct_array(np.float32)))
    mid = len(raw) // 2
    raw[mid : mid + 4000] = b"\x7f\x7f\x7f\x7f" * 1000
    (d / "huge.nii").write_bytes(bytes(raw))
    return d / "huge.nii"


def with_values(name: str, edit: Callable[[np.ndarray], None], dtype=np.float32):
    def build(d: Path) -> Path:
        ct = small_ct()
        ct.array = ct.array.astype(dtype)
        edit(ct.array)
        write_volume(ct, d / name)
        return d / name
    return build


def _nan_block(a):
    a[4:8, 20:40, 20:40] = np.nan


def _nan_head(a):
    a[a > -500] = np.nan


def _one_inf(a):
    a[8, 32, 32] = np.inf


def _all_nan(a):
    a[:] = np.nan


def with_geometry(name: str, spacing=SPACING, shape=SHAPE):
    def build(d: Path) -> Path:
        arr = np.full(shape, -1000, np.int16)
        arr[tuple(slice(s // 4, max(s // 4 + 1, 3 * s // 4)) for s in shape)] = 40
        write_volume(Volume(arr, spacing), d / name)
        return d / name
    return build


def unreadable_file(d: Path) -> Path:
    write_volume(small_ct(), d / "locked.nii.gz")
    os.chmod(d / "locked.nii.gz", 0)
    return d / "locked.nii.gz"


# ------------------------------------------------------------------------------------- DICOM
def dicom_series(d: Path, edit: Callable[[int, "pydicom.Dataset"], None] | None = None, **kw) -> Path:
    files = write_dicom_series(small_ct(), d / "dicom", **kw)
    if edit is not None:
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            edit(k, ds)
            ds.save_as(f)
    return d / "dicom"


def dicom_edit(edit):
    return lambda d: dicom_series(d, edit)


def _spacing_zero(k, ds):
    ds.PixelSpacing = [0, 0]


def _spacing_missing(k, ds):
    del ds.PixelSpacing


def _iop_zero(k, ds):
    ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]


def _iop_parallel(k, ds):
    ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]


def dicom_drift(d: Path) -> Path:
    """32 slices: 15 steps of 5.5 mm then 16 of 6.0 mm. Every step is within 10% of the usual one, but the
    middle slices sit ~3.9 mm (more than half a slice) off the regular grid the series claims."""
    ct = ball_ct(shape_zyx=(32, 64, 64), spacing=(3.0, 3.0, 6.0))[0]
    files = write_dicom_series(ct, d / "dicom")
    z = np.concatenate([[0.0], np.cumsum([5.5] * 15 + [6.0] * 16)])
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], -80.0 + float(z[k])]
        ds.save_as(f)
    return d / "dicom"


def _rgb(k, ds):
    grey = ds.pixel_array.astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()


def dicom_unreadable_slice(d: Path) -> Path:
    folder = dicom_series(d)
    os.chmod(sorted(folder.iterdir())[5], 0)
    return folder


def dicom_unreadable_folder(d: Path) -> Path:
    folder = dicom_series(d)
    os.chmod(folder, 0)
    return folder


# ------------------------------------------------------------------------------------- output folders
def good_ct(d: Path) -> Path:
    write_volume(small_ct(), d / "ct.nii.gz")
    return d / "ct.nii.gz"


def out_is_file(d: Path) -> Path:
    (d / "o").write_text("a file, not a folder")
    return good_ct(d)


def out_under_file(d: Path) -> Path:
    (d / "f").write_text("a file")
    return good_ct(d)


def out_read_only(d: Path) -> Path:
    (d / "o").mkdir()
    os.chmod(d / "o", 0o555)
    return good_ct(d)


VOLUME_CASES = [
    Case("nifti-gz-cut-50%", nii_gz_cut(0.5), 2, "truncated"),
    Case("nifti-gz-cut-90%", nii_gz_cut(0.9), 2, "truncated"),
    Case("nifti-gz-inner-stream-cut-75%", nii_gz_inner_cut, 2, "truncated"),
    Case("nifti-gz-flipped-bytes", nii_gz_flipped, 2, "corrupt"),
    Case("nifti-cut-50%", nii_cut, 2, "truncated"),
    Case("nifti-values-3e38", nii_huge_values, 2, "beyond what any scanner writes"),
    Case("nifti-nan-block", with_values("nan_block.nii.gz", _nan_block), 2, "1600 voxel(s) are not finite"),
    Case("nifti-nan-head", with_values("nan_head.nii.gz", _nan_head), 2, "not finite"),
    Case("nifti-one-inf", with_values("inf.nii.gz", _one_inf), 2, "1 voxel(s) are not finite"),
    Case("nifti-all-nan", with_values("all_nan.nii.gz", _all_nan), 2, "not finite"),
    Case("nrrd-nan-block", with_values("nan.nrrd", _nan_block), 2, "1600 voxel(s) are not finite"),
    Case("mha-one-inf", with_values("inf.mha", _one_inf), 2, "1 voxel(s) are not finite"),
    Case("spacing-0.001mm", with_geometry("tiny_spacing.nii.gz", spacing=(0.001, 0.001, 0.001)), 2, "spacing"),
    Case("volume-3x3x3", with_geometry("cube3.nii.gz", spacing=(1.0, 1.0, 1.0), shape=(3, 3, 3)), 2, "too small"),
    Case("dicom-pixelspacing-0", dicom_edit(_spacing_zero), 2, "PixelSpacing"),
    Case("dicom-pixelspacing-missing", dicom_edit(_spacing_missing), 2, "PixelSpacing"),
    Case("dicom-iop-zero", dicom_edit(_iop_zero), 2, "ImageOrientationPatient"),
    Case("dicom-iop-parallel", dicom_edit(_iop_parallel), 2, "ImageOrientationPatient"),
    Case("dicom-slice-drift", dicom_drift, 2, "drift"),
    Case("dicom-rgb-tagged-ct", dicom_edit(_rgb), 2, "colour"),
    Case("memory-limit", good_ct, 2, "FMCT_MAX_MEMORY_GB", env={"FMCT_MAX_MEMORY_GB": "0.0001"}),
    Case("out-is-a-file", out_is_file, 2, "is a file", args=["--out", "{d}/o"]),
    Case("out-under-a-file", out_under_file, 2, "is a file", args=["--out", "{d}/f/o"]),
    Case("out-read-only", out_read_only, 2, "cannot write", args=["--out", "{d}/o"], needs_non_root=True),
    Case("unreadable-nifti", unreadable_file, 2, "permission", needs_non_root=True),
    Case("unreadable-dicom-slice", dicom_unreadable_slice, 2, "permission", needs_non_root=True),
    Case("unreadable-dicom-folder", dicom_unreadable_folder, 2, "permission", needs_non_root=True),
]


# ------------------------------------------------------------------------------------- running a case
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(tiny_bundle(tmp_path_factory.mktemp("bad-input") / "b")[0])


@pytest.fixture
def no_model(monkeypatch):
    """Call it to make any model run from then on (torch or onnxruntime) fail the test."""
    from fmct.onnx_backend import OnnxModel
    from fmct.runners import TorchRunner

    def refuse(*a, **k):
        raise AssertionError("a model ran on bad input")

    def arm() -> None:
        for runner in (TorchRunner, OnnxModel):
            for name in ("logits", "run"):
                if hasattr(runner, name):
                    monkeypatch.setattr(runner, name, refuse)
    return arm


def run_cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    code = main(argv)
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_refused(code: int, lines: list[str], case_code: int, words: str, out: Path) -> None:
    assert code == case_code, lines
    assert len(lines) == 1, lines  # one line: no warnings, no traceback ahead of it
    assert lines[0].startswith("fmct: error: ") and words.lower() in lines[0].lower(), lines[0]
    assert not (out / "findings.json").exists()


@pytest.mark.parametrize("case", [c.param() for c in VOLUME_CASES])
def test_bad_volume_is_refused(case: Case, tmp_path, bundle, no_model, monkeypatch, capfd):
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    path = case.build(tmp_path)
    no_model()
    args = [a.format(d=tmp_path) for a in case.args]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out)]
    try:
        code, lines = run_cli(["analyze", str(path), "--model", bundle, "--explain", "none", *args], capfd)
    finally:
        for p in (tmp_path / "o", tmp_path / "dicom", path):
            if p.exists() and not p.is_symlink():
                os.chmod(p, 0o755)
    assert_refused(code, lines, case.code, case.words, out if out.is_dir() else tmp_path / "nowhere")


# ------------------------------------------------------------------------------------- legitimate oddities
def padded(pad: float, metal: bool = False):
    """A CT whose corners outside the circular field of view hold padding far below air (and optionally metal)."""
    def build(d: Path) -> Path:
        ct = small_ct()
        arr = ct.array.astype(np.int16)
        k, j, i = np.indices(arr.shape)
        outside = (j - 31.5) ** 2 + (i - 31.5) ** 2 > 31 ** 2
        arr[outside] = pad
        if metal:
            arr[8, 30:34, 30:34] = 3800  # a clip
        ct.array = arr
        write_volume(ct, d / "ct.nii.gz")
        return d / "ct.nii.gz"
    return build


@pytest.mark.parametrize("build", [padded(-2000), padded(-2048), padded(-3024), padded(-1024, metal=True)],
                         ids=["pad-2000", "pad-2048", "pad-3024", "metal-3800HU"])
def test_padding_and_metal_are_analyzed(build, tmp_path, bundle, capfd):
    path = build(tmp_path)
    code = main(["analyze", str(path), "--model", bundle, "--explain", "none", "--out", str(tmp_path / "out")])
    assert code == 0, capfd.readouterr().err
    payload = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert all(np.isfinite(f["probability"]) for f in payload["findings"])


def test_padding_is_analyzed_as_air(tmp_path, bundle):
    """Padding of -3024 HU outside the field of view gives the model the same tensor as air there."""
    from fmct.analyze import Analyzer
    from fmct.io import read_volume

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = read_volume(padded(-3024)(tmp_path / "a")), read_volume(padded(-1024)(tmp_path / "b"))
    pre = Analyzer(bundle, device="cpu").preprocessor
    np.testing.assert_allclose(pre(a).array, pre(b).array, atol=1e-6)


# ------------------------------------------------------------------------------------- bad bundles
def _write_json(path: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((path / "fmct.json").read_text())
    edit(meta)
    (path / "fmct.json").write_text(json.dumps(meta))


def edited_meta(edit: Callable[[dict], None]):
    def build(d: Path) -> Path:
        path, _, _ = tiny_bundle(d / "b")
        _write_json(path, edit)
        return path
    return build


def edited_weights(edit: Callable[[dict], dict]):
    def build(d: Path) -> Path:
        from safetensors.torch import load_file, save_file

        path, _, _ = tiny_bundle(d / "b")
        state = load_file(str(path / "model.safetensors"))
        save_file(edit(state), str(path / "model.safetensors"))
        return path
    return build


def _nan_weights(state):
    import torch

    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}


def _int_weights(state):
    import torch

    return {k: v.to(torch.int64) if k.startswith("head") else v for k, v in state.items()}


def zipped(layout: Callable[[Path, zipfile.ZipFile], None]):
    def build(d: Path) -> Path:
        path, _, _ = tiny_bundle(d / "b")
        with zipfile.ZipFile(d / "b.zip", "w") as zf:
            layout(path, zf)
        return d / "b.zip"
    return build


def _hidden_meta(path: Path, zf: zipfile.ZipFile) -> None:
    for name in ("fmct.json", "model.safetensors"):
        zf.write(path / name, name)
    meta = json.loads((path / "fmct.json").read_text())
    for t in meta["tasks"]:
        t["threshold"] = 0.001
    zf.writestr("zzz/fmct.json", json.dumps(meta))


def _nested(path: Path, zf: zipfile.ZipFile) -> None:
    for name in ("fmct.json", "model.safetensors"):
        zf.write(path / name, f"a/b/{name}")


def _split(path: Path, zf: zipfile.ZipFile) -> None:
    zf.write(path / "fmct.json", "x/fmct.json")
    zf.write(path / "model.safetensors", "y/model.safetensors")


def bad_crc_zip(d: Path) -> Path:
    path, _, _ = tiny_bundle(d / "b")
    with zipfile.ZipFile(d / "b.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.write(path / "fmct.json", "fmct.json")
        zf.write(path / "model.safetensors", "model.safetensors")
    data = bytearray((d / "b.zip").read_bytes())
    at = data.find(b"model.safetensors") + 200  # inside the stored weights of the local entry
    data[at : at + 16] = bytes(255 - b for b in data[at : at + 16])
    (d / "b.zip").write_bytes(bytes(data))
    return d / "b.zip"


def onnx_wrong_outputs(d: Path) -> Path:
    """A model.onnx of a 2-task model in a 3-task bundle whose record vouches for it."""
    from fmct.bundle import load_bundle, save_bundle
    from fmct.onnx_backend import sha256
    from fmct.onnx_export import export_onnx

    two, _, _ = tiny_bundle(d / "two")
    export_onnx(two)
    onnx_bytes = (two / "model.onnx").read_bytes()
    three, model, meta = tiny_bundle(d / "three", tasks=("a", "b", "c"))
    record = json.loads((two / "fmct.json").read_text())["onnx"]
    save_bundle(model, meta, three, onnx_bytes=onnx_bytes)
    record["onnx_sha256"] = sha256(onnx_bytes)
    record["weights_sha256"] = sha256((three / "model.safetensors").read_bytes())
    _write_json(three, lambda m: m.__setitem__("onnx", record))
    load_bundle(three)  # the bundle itself is valid
    return three


def _set(path: str, value):
    def edit(meta):
        keys = path.split(".")
        target = meta
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        if value is _DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return edit


_DELETE = object()

BUNDLE_CASES = [
    Case("nan-weights", edited_weights(_nan_weights), 2, "not finite"),
    Case("int64-weights", edited_weights(_int_weights), 2, "int64"),
    Case("zip-hidden-fmct.json", zipped(_hidden_meta), 2, "fmct.json"),
    Case("zip-nested-folders", zipped(_nested), 2, "layout"),
    Case("zip-split-folders", zipped(_split), 2, "layout"),
    Case("zip-bad-crc", bad_crc_zip, 2, "corrupt"),
    Case("heads-0", edited_meta(_set("encoder.num_heads", 0)), 2, "num_heads"),
    Case("provenance-string", edited_meta(_set("provenance", "a string")), 2, "provenance"),
    Case("metrics-list", edited_meta(_set("metrics", [1, 2])), 2, "metrics"),
    Case("format-version-true", edited_meta(_set("format_version", True)), 2, "format_version"),
    Case("embed-dim-missing", edited_meta(_set("encoder.embed_dim", _DELETE)), 2, "embed_dim"),
    Case("embed-dim-string", edited_meta(_set("encoder.embed_dim", "48")), 2, "embed_dim"),
    Case("temperature-inf", edited_meta(_set("tasks.0.temperature", float("inf"))), 2, "temperature"),
    Case("threshold-bool", edited_meta(_set("tasks.0.threshold", True)), 2, "threshold"),
    Case("name-not-string", edited_meta(_set("name", {"a": 1})), 2, "name"),
    Case("spacing-nan", edited_meta(_set("preprocessing.spacing_mm", [6, "nan", 6])), 2, "spacing_mm"),
    Case("onnx-graph-3-outputs-for-2-tasks", onnx_wrong_outputs, 2, "output", args=["--backend", "onnx"]),
]


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    return str(good_ct(tmp_path_factory.mktemp("ct")))


@pytest.mark.parametrize("case", [c.param() for c in BUNDLE_CASES])
def test_bad_bundle_is_refused(case: Case, tmp_path, ct_file, no_model, capfd):
    path = case.build(tmp_path)
    no_model()
    capfd.readouterr()
    out = tmp_path / "out"
    code, lines = run_cli(["analyze", ct_file, "--model", str(path), "--explain", "none", "--out", str(out), *case.args],
                          capfd)
    assert_refused(code, lines, case.code, case.words, out)


def test_weights_checked_before_the_model_is_built(tmp_path, ct_file, monkeypatch, capfd):
    """A config far larger than its weights is refused from the safetensors header, before any allocation."""
    import fmct.bundle

    path = edited_meta(lambda m: m["encoder"].update(embed_dim=8192, depth=48, num_heads=8))(tmp_path)
    monkeypatch.setattr(fmct.bundle, "build_model", lambda meta: pytest.fail("the model was built before the check"))
    code, lines = run_cli(["analyze", ct_file, "--model", str(path), "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and "does not fit the config" in lines[-1], lines


def test_zip_reads_only_what_it_needs(tmp_path, monkeypatch):
    """Unrelated members are never inflated, model.onnx only for the ONNX path, and sizes are capped."""
    import fmct.bundle
    from fmct.bundle import load_bundle
    from fmct.errors import BundleError

    path, _, _ = tiny_bundle(tmp_path / "b")
    with zipfile.ZipFile(tmp_path / "b.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("fmct.json", "model.safetensors"):
            zf.write(path / name, f"b/{name}")
        zf.writestr("b/model.onnx", b"\0" * 1000)
        zf.writestr("b/junk.bin", b"\0" * 2_000_000)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(getattr(name, "filename", name)) or real_open(self, name, *a, **k))
    load_bundle(tmp_path / "b.zip")
    assert sorted(opened) == ["b/fmct.json", "b/model.safetensors"]
    monkeypatch.setattr(fmct.bundle, "MAX_MEMBER_BYTES", {**fmct.bundle.MAX_MEMBER_BYTES, "model.safetensors": 1000})
    with pytest.raises(BundleError, match="larger than"):
        load_bundle(tmp_path / "b.zip")


def test_nan_probability_is_never_written(tmp_path):
    from fmct.analyze import AnalysisResult, Finding
    from fmct.errors import FMCTError
    from fmct.outputs import write_study_outputs

    result = AnalysisResult([Finding("bleed", "", float("nan"), 0.5, False)])
    with pytest.raises(FMCTError, match="not a finite probability"):
        write_study_outputs(tmp_path / "o", small_ct(), result, "m", "cpu", report=False)
    assert not (tmp_path / "o" / "findings.json").exists()
