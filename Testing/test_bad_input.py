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
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from bad_input_support import IS_ROOT, SHAPE, SPACING, Case, assert_refused, dicom_series, run_cli, small_ct  # noqa: F401
from fmct_testing import ball_ct, tiny_bundle

from fmct.cli import main
from fmct.reading.dicom import write_dicom_series
from fmct.reading.files import write_volume
from fmct.reading.volume import Volume

pydicom = pytest.importorskip("pydicom")

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


def cut_file(d: Path, name: str, fraction: float) -> Path:
    sitk.WriteImage(small_ct().to_sitk(), str(d / name), useCompression=True)
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: int(len(data) * fraction)])
    return d / name


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
    Case("mha-cut-60%", lambda d: cut_file(d, "ct.mha", 0.6), 2, "truncated"),
    Case("nrrd-compressed-cut-60%", lambda d: cut_file(d, "ct.nrrd", 0.6), 2, "truncated"),
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
    from fmct.inference.analyze import Analyzer
    from fmct.reading.files import read_volume

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
    from fmct.inference.bundle import load_bundle, save_bundle
    from fmct.inference.onnx_runner import sha256
    from fmct.export.onnx import export_onnx

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
    import fmct.inference.bundle

    path = edited_meta(lambda m: m["encoder"].update(embed_dim=8192, depth=48, num_heads=8))(tmp_path)
    monkeypatch.setattr(fmct.inference.bundle, "build_model", lambda meta: pytest.fail("the model was built before the check"))
    code, lines = run_cli(["analyze", ct_file, "--model", str(path), "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and "does not fit the config" in lines[-1], lines


def test_zip_reads_only_what_it_needs(tmp_path, monkeypatch):
    """Unrelated members are never inflated, model.onnx only for the ONNX path, and sizes are capped."""
    import fmct.inference.bundle
    from fmct.inference.bundle import load_bundle
    from fmct.conventions.errors import BundleError

    path, _, _ = tiny_bundle(tmp_path / "b")
    with zipfile.ZipFile(tmp_path / "b.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("fmct.json", "model.safetensors"):
            zf.write(path / name, f"b/{name}")
        zf.writestr("b/model.onnx", b"\0" * 1000)
        zf.writestr("b/junk.bin", b"\0" * 2_000_000)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: opened.append(getattr(name, "filename", name)) or real_open(self, name, *a, **k))
    load_bundle(tmp_path / "b.zip")
    assert sorted(opened) == ["b/fmct.json", "b/model.safetensors"]
    monkeypatch.setattr(fmct.inference.bundle, "MAX_MEMBER_BYTES", {**fmct.inference.bundle.MAX_MEMBER_BYTES, "model.safetensors": 1000})
    with pytest.raises(BundleError, match="larger than"):
        load_bundle(tmp_path / "b.zip")


def test_nan_probability_is_never_written(tmp_path):
    from fmct.inference.analyze import AnalysisResult, Finding
    from fmct.conventions.errors import FMCTError
    from fmct.inference.study_folder import write_study_outputs

    result = AnalysisResult([Finding("bleed", "", float("nan"), 0.5, False)])
    with pytest.raises(FMCTError, match="not a finite probability"):
        write_study_outputs(tmp_path / "o", small_ct(), result, "m", "cpu", report=False)
    assert not (tmp_path / "o" / "findings.json").exists()


# ------------------------------------------------------------------------------------- result folders (item 5, 11, 16)
@pytest.mark.slow
def test_result_folder_never_mixes_two_studies(tmp_path, bundle, capfd):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    write_volume(small_ct(), a)
    write_volume(small_ct(ball_radius_mm=25.0), b)
    out = str(tmp_path / "out")
    run = ["--model", bundle, "--explain", "attention", "--findings", "all", "--out", out]
    assert main(["analyze", str(a), "--save-ct", *run]) == 0
    assert main(["analyze", str(a), *run]) == 0  # the same CT again: replaced, and its stale ct.nii.gz removed
    assert not (tmp_path / "out" / "ct.nii.gz").exists()
    assert main(["analyze", str(a), "--save-ct", *run]) == 0
    capfd.readouterr()
    code, lines = run_cli(["analyze", str(b), *run], capfd)
    assert code == 2 and "another study" in lines[-1] and "--overwrite" in lines[-1]
    assert (tmp_path / "out" / "ct.nii.gz").exists()  # A's results are untouched by the refusal
    assert main(["analyze", str(b), "--overwrite", *run]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "ct.nii.gz" not in names  # nothing of A next to B
    payload = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert sorted(names) == sorted(["findings.json", "report.png", *payload["saliency_files"].values()])


def test_debug_adds_the_traceback_and_keeps_exit_2(tmp_path, capfd):
    code = main(["--debug", "analyze", str(tmp_path / "missing.nii.gz")])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("fmct: error:")


@pytest.mark.parametrize("out", ["file", pytest.param("read-only", marks=pytest.mark.skipif(IS_ROOT, reason="root"))])
def test_batch_output_folder_checked_before_anything(tmp_path, bundle, no_model, capfd, out):
    studies = tmp_path / "in"
    studies.mkdir()
    write_volume(small_ct(), studies / "a.nii.gz")
    target = tmp_path / "o"
    if out == "file":
        target.write_text("x")
    else:
        target.mkdir()
        target.chmod(0o555)
    no_model()
    try:
        code, lines = run_cli(["analyze", str(studies), "--batch", "--model", bundle, "--out", str(target)], capfd)
    finally:
        target.chmod(0o755)
    assert code == 2 and len(lines) == 1 and str(target) in lines[0]


# ------------------------------------------------------------------------------------- batch resume and locks (items 6, 17)
def _batch_studies(root: Path) -> Path:
    root.mkdir()
    write_volume(small_ct(), root / "a.nii.gz")
    write_volume(small_ct(ball_radius_mm=25.0), root / "b.nii.gz")
    return root


def test_batch_resume_redoes_studies_of_another_model_or_options(tmp_path):
    from fmct.inference.analyze import Analyzer
    from fmct.inference.batch import run_batch

    studies = _batch_studies(tmp_path / "in")
    first = Analyzer(tiny_bundle(tmp_path / "m1", seed=0)[0], device="cpu")
    second = Analyzer(tiny_bundle(tmp_path / "m2", seed=1)[0], device="cpu")  # same name, other weights
    out = tmp_path / "out"
    assert run_batch(first, studies, out, explain_method=None, num_workers=0).counts["ok"] == 2
    assert run_batch(first, studies, out, explain_method=None, num_workers=0).counts["skipped"] == 2
    again = run_batch(second, studies, out, explain_method=None, num_workers=0)
    assert again.counts == {"ok": 2, "error": 0, "skipped": 0}
    p = json.loads((out / "a" / "findings.json").read_text())["findings"][0]["probability"]
    expected = second.analyze(__import__("fmct.reading.files", fromlist=["read_volume"]).read_volume(studies / "a.nii.gz"),
                              explain_method=None).findings[0].probability
    assert abs(p - expected) < 1e-5  # the new model's numbers under the new model's name, not the old ones
    with_ct = run_batch(second, studies, out, explain_method=None, num_workers=0, save_ct=True)
    assert with_ct.counts["ok"] == 2 and (out / "a" / "ct.nii.gz").is_file()
    assert run_batch(second, studies, out, explain_method=None, num_workers=0).counts["skipped"] == 2  # ct.nii.gz extra


def test_second_batch_process_skips_the_study_the_first_is_doing(tmp_path):
    import fcntl
    import threading

    from fmct.inference.analyze import Analyzer
    from fmct.inference.batch import LOCK_DIR, run_batch

    studies = _batch_studies(tmp_path / "in")
    analyzer = Analyzer(tiny_bundle(tmp_path / "m")[0], device="cpu")
    out = tmp_path / "out"
    (out / LOCK_DIR).mkdir(parents=True)
    held = open(out / LOCK_DIR / "a.lock", "a+")  # "another process" is analyzing study a
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    timer = threading.Timer(1.0, held.close)
    timer.start()
    report = run_batch(analyzer, studies, out, explain_method=None, num_workers=0)
    timer.join()
    rows = {r["study_id"]: r for r in report.rows}
    assert rows["b"]["status"] == "ok"
    assert rows["a"]["status"] == "error" and "another fmct process" in rows["a"]["error"]
    assert not (out / "a" / "findings.json").exists()  # this process left a to the other one


# ------------------------------------------------------------------------------------- file modes (item 10)
@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_atomic_writes_get_the_umask_mode(tmp_path, umask, file_mode, dir_mode):
    from fmct.conventions.atomic import write_bytes_atomic

    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "f.json", b"{}")
        path, _, _ = tiny_bundle(tmp_path / "shared")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == file_mode
    assert path.stat().st_mode & 0o777 == dir_mode
    assert {p.stat().st_mode & 0o777 for p in path.iterdir()} == {file_mode}


# ------------------------------------------------------------------------------------- ONNX parity on demand (item 9)
def test_export_check_reproves_onnx_parity(tmp_path, capfd):
    from fmct.inference.onnx_runner import sha256
    from fmct.export.onnx import export_onnx

    good, _, _ = tiny_bundle(tmp_path / "good")
    assert main(["export", str(good), "--onnx", "--check"]) == 0
    other, _, _ = tiny_bundle(tmp_path / "other", seed=5)
    export_onnx(other)
    # Swap in another model's graph and make the record vouch for it: the hashes pass, parity does not.
    (good / "model.onnx").write_bytes((other / "model.onnx").read_bytes())
    _write_json(good, lambda m: m["onnx"].update(onnx_sha256=sha256((good / "model.onnx").read_bytes())))
    capfd.readouterr()
    code, lines = run_cli(["export", str(good), "--check"], capfd)
    assert code == 2 and "disagrees" in lines[-1]


# ------------------------------------------------------------------------------------- reading large CTs (item 14)
def test_int16_ct_is_read_as_int16_without_a_copy(tmp_path):
    from fmct.reading.files import read_volume

    ct = small_ct()
    ct.array = ct.array.astype(np.int16)
    for name in ("ct.nii", "ct.nii.gz", "ct.nrrd", "ct.mha"):
        got = read_volume(write_volume(ct, tmp_path / name))
        assert got.array.dtype == np.int16 and np.array_equal(got.array, ct.array)
        if name.endswith(("nrrd", "mha")):
            assert got.array.base is not None  # a view of the image ITK read, not a second copy
    files = write_dicom_series(ct, tmp_path / "dicom", storage="uint16")
    got = read_volume(files[0].parent)
    assert got.array.dtype == np.int16 and np.array_equal(got.array, ct.array)


def test_memory_guard_comes_from_the_header(tmp_path, monkeypatch):
    """The refusal names the size and the variable, and happens before the pixels are read."""
    import fmct.reading.files
    from fmct.conventions.errors import VolumeTooLargeError

    path = good_ct(tmp_path)
    monkeypatch.setenv("FMCT_MAX_MEMORY_GB", "0.0001")
    monkeypatch.setattr(fmct.reading.files, "_read_sitk", lambda *a: pytest.fail("pixels read before the memory check"))
    with pytest.raises(VolumeTooLargeError, match=r"64 x 64 x 16 voxels .* FMCT_MAX_MEMORY_GB"):
        fmct.reading.files.read_volume(path)


# ------------------------------------------------------------------------------------- training runs (items 12, 13, 17)
def _ssl_config(**changes):
    from fmct.ssl.config import SSLConfig

    raw = {
        "encoder": {"preset": "tiny", "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2,
                                                    "img_size": [32, 32, 32], "patch_size": [8, 8, 8]}},
        "data": {"spacing_mm": [6, 6, 6], "size": [32, 32, 32]},
        "crops": {"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 2},
        "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "warmup_teacher_temp_steps": 4},
        "optim": {"batch_size": 2, "steps": 3, "warmup_steps": 1},
        "run": {"seed": 0, "checkpoint_every": 1, "num_threads": 1},
    }
    for path, value in changes.items():
        section, key = path.split(".", 1)
        if section == "encoder":
            raw["encoder"]["overrides"][key] = value
        else:
            raw[section][key] = value
    return SSLConfig.from_dict(raw)


@pytest.fixture(scope="module")
def ssl_data():
    import torch

    from fmct.train.pretrain import TensorVolumes

    return TensorVolumes(torch.rand(4, 3, 32, 32, 32, generator=torch.Generator().manual_seed(0)).half())


@pytest.fixture
def one_step_run(tmp_path, ssl_data):
    """A pretraining run cancelled after its first step (checkpoint at step 1)."""
    from fmct.conventions.errors import Cancelled
    from fmct.train.pretrain import pretrain

    with pytest.raises(Cancelled):
        pretrain(_ssl_config(), tmp_path / "run", dataset=ssl_data, progress=lambda f, m: None, cancel=_after(1))
    return tmp_path / "run"


def _after(n):
    calls = []
    return lambda: calls.append(1) or len(calls) > n


@pytest.mark.parametrize("changes, fields", [
    ({"run.seed": 7}, "run.seed"),
    ({"encoder.depth": 3}, "encoder.overrides.depth"),
    ({"crops.n_local": 3}, "crops.n_local"),
    ({"dino.teacher_temp": 0.05}, "dino.teacher_temp"),
], ids=["seed", "architecture", "crops", "loss"])
def test_resume_refuses_a_changed_run(one_step_run, ssl_data, changes, fields):
    from fmct.conventions.errors import ResumeMismatchError
    from fmct.train.pretrain import pretrain

    before = (one_step_run / "config.json").read_text()
    with pytest.raises(ResumeMismatchError, match=fields.replace(".", r"\.")):
        pretrain(_ssl_config(**changes), one_step_run, resume=True, dataset=ssl_data)
    assert (one_step_run / "config.json").read_text() == before  # the record still tells the truth


def test_resume_may_change_harmless_settings(one_step_run, ssl_data):
    from fmct.train.pretrain import pretrain

    result = pretrain(_ssl_config(**{"optim.steps": 2, "run.checkpoint_every": 2}), one_step_run, resume=True,
                      dataset=ssl_data)
    assert result.steps == 2


def test_resume_from_a_damaged_checkpoint_of_the_same_size(one_step_run, ssl_data):
    from fmct.conventions.errors import ConfigError
    from fmct.train.pretrain import pretrain

    ckpt = next((one_step_run / "checkpoints").glob("ckpt-*.safetensors"))
    data = bytearray(ckpt.read_bytes())
    data[8:40] = b"\xff" * 32  # the header, same length
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged"):
        pretrain(_ssl_config(), one_step_run, resume=True, dataset=ssl_data)


def test_stale_checkpoint_temp_files_are_removed(tmp_path):
    import torch

    from fmct.train import checkpoint as ckpt

    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {})
    (tmp_path / ".ckpt-00000002.safetensors.x1.tmp").write_bytes(b"half a file")  # what a kill leaves
    ckpt.load_checkpoint(tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / ".ckpt-00000003.json.x2.tmp").write_bytes(b"half")
    ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {})
    assert not list(tmp_path.glob(".*.tmp"))


def test_diverged_pretraining_is_one_line_exit_2(tmp_path, monkeypatch, capfd):
    import torch
    from safetensors.torch import save_file

    from fmct.ssl.meta_arch import SelfDistillation
    from fmct.train.pretrain import main as pretrain_main

    save_file({"x": torch.rand(4, 3, 32, 32, 32).half()}, str(tmp_path / "x.safetensors"))
    cfg = _ssl_config().to_dict()
    cfg["data"].update(source="tensors", path=str(tmp_path / "x.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    forward = SelfDistillation.forward

    def diverging(self, *a, **k):
        losses = forward(self, *a, **k)
        losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(SelfDistillation, "forward", diverging)
    code = pretrain_main(["--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"), "--no-progress"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip() and "INFO" not in line]
    assert code == 2 and "Traceback" not in "\n".join(err) and "lower optim.lr" in err[-1]


@pytest.mark.parametrize("build", [dicom_drift, nii_gz_flipped, lambda d: cut_file(d, "ct.mha", 0.6)],
                         ids=["dicom-drift", "nifti-flipped", "mha-cut"])
@pytest.mark.slow
def test_the_installed_command_prints_one_line(tmp_path, bundle, build):
    """The real console command (logging and ITK's own warnings included): exit 2 and exactly one line."""
    import subprocess
    import sys

    path = build(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "fmct.cli", "analyze", str(path), "--model", bundle,
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("fmct: error: "), proc.stderr
