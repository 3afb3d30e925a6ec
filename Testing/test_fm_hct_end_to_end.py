"""The imported FM-HCT encoder everywhere (issue 28 item 3), with random weights in the released layout.

One encoder block instead of 12 keeps the CPU time down: the key layout, widths (768, 12 heads, MLP
3072), preprocessing and every code path are the released ones; only `blocks.1..11` are absent.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmct.cli import main
from fmct.phantom import make_phantom, write_phantom_set
from fmct.preprocessing.preprocessor import Preprocessor
from fmct.reading.files import read_volume

pytest.importorskip("monai")
pytest.importorskip("scipy")

from fm_hct_testing import fm_hct_state  # noqa: E402


@pytest.fixture(scope="module")
def encoder_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmhct_e2e")
    torch.save(fm_hct_state(depth=1, seed=5), folder / "model_weights.pth")
    assert main(["import", "fm-hct", str(folder / "model_weights.pth"), "--out", str(folder / "encoder")]) == 0
    return folder / "encoder"


@pytest.mark.slow
def test_maps_on_the_model_grid_go_back_exactly_onto_the_ct(encoder_bundle):
    """The model tensor's own bone window, mapped back, is the CT's bone window in place (not flipped, not shifted)."""
    from fmct.features.embed import load_encoder

    volume = make_phantom(4, findings=["fracture"], slices="thick", in_plane_size=128).volume
    pre = Preprocessor(load_encoder(encoder_bundle).preprocessing)
    model_input = pre(volume)
    back = pre.to_input_grid(model_input.array[0, 2], model_input)
    assert back.array.shape == volume.array.shape and np.allclose(back.direction, volume.direction)
    direct = np.clip((volume.array.astype(np.float32) + 800.0) / 2800.0, 0.0, 1.0)
    inside = back.array > 0
    assert inside.mean() > 0.2
    error = np.abs(back.array[inside] - direct[inside]).mean()
    for axis in range(3):  # any flip or one-voxel shift of the mapping is far worse
        assert error < 0.5 * np.abs(np.flip(back.array, axis)[inside] - direct[inside]).mean()
        assert error < np.abs(np.roll(back.array, 1, axis)[inside] - direct[inside]).mean()
    assert error < 0.03


@pytest.mark.slow
def test_embed_probe_finetune_analyze_export_and_slicer(encoder_bundle, tmp_path):
    data = tmp_path / "phantoms"
    # seed 12: both tasks have a positive in the training and the validation split (finetune refuses otherwise)
    write_phantom_set(data, 6, seed=12, fmt="nifti", slices="thick", in_plane_size=128)
    feats = tmp_path / "features.npz"
    assert main(["embed", str(data), "--model", str(encoder_bundle), "--out", str(feats), "--device", "cpu"]) == 0
    with np.load(feats, allow_pickle=False) as f:
        assert f["cls"].shape == (6, 768) and np.isfinite(f["cls"]).all()
        assert np.abs(f["cls"][0] - f["cls"][1]).max() > 1e-3
    assert main(["probe", str(feats), "--tasks", "fracture", "--folds", "2", "--out", str(tmp_path / "probe.json")]) == 0
    assert json.loads((tmp_path / "probe.json").read_text())

    tuned = tmp_path / "tuned"
    assert main(["finetune", "--data", str(data), "--encoder", str(encoder_bundle), "--out", str(tuned), "--mode", "linear",
                 "--epochs", "1", "--batch-size", "2", "--tasks", "any_hemorrhage,fracture", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    meta = json.loads((tuned / "fmct.json").read_text())
    assert [t["name"] for t in meta["tasks"]] == ["any_hemorrhage", "fracture"]
    assert meta["preprocessing"]["crop"] == "foreground" and meta["encoder"]["qkv_bias"] is False
    from safetensors.torch import load_file

    before, after = load_file(str(encoder_bundle / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # a linear probe keeps the imported encoder

    ct = data / "phantom_00000" / "ct.nii.gz"
    out = tmp_path / "analysis"
    assert main(["analyze", str(ct), "--model", str(tuned), "--out", str(out), "--findings", "all", "--explain",
                 "attention", "--device", "cpu"]) == 0
    import SimpleITK as sitk

    volume, image = read_volume(ct), sitk.ReadImage(str(ct))
    for name in ("attention.nii.gz",):  # attention: one finding-agnostic map (issue 27), on the CT's own grid
        saliency = sitk.ReadImage(str(out / name))  # a map, not a CT: no HU checks
        assert saliency.GetSize() == image.GetSize()
        assert np.allclose(saliency.GetSpacing(), image.GetSpacing()) and np.allclose(saliency.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert np.allclose(saliency.GetDirection(), image.GetDirection(), atol=1e-6)
        assert sitk.GetArrayViewFromImage(saliency).max() > 0

    assert main(["export", str(tuned), "--onnx"]) == 0
    assert (tuned / "model.onnx").is_file() and json.loads((tuned / "fmct.json").read_text())["onnx"]

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")  # noqa: F841
    from slicer_testing import headless_slicer

    from FMCTLib import selftest
    from FMCTLib.logic import FMCTLogic, bundlePathFromChoice, canAnalyze

    with headless_slicer() as app:
        node = selftest.loadAsNRRD(app.scene, volume, tmp_path / "slicer", volumes=app.volumesLogic)
        chosen = bundlePathFromChoice(False, str(tuned))
        assert canAnalyze(node, False, str(tuned), False)[0]
        result = FMCTLogic().analyze(node, bundlePath=chosen, device="CPU", explain="attention", explainFindings="all")
        selftest.checkFindings(result, chosen)
        selftest.checkSaliencyGeometry(node, result)
