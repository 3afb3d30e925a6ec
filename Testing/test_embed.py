"""Feature extraction (`fmct embed`, load_encoder, get_intermediate_layers), the encoder's parameter
groups, and `fmct probe` on saved embeddings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmct.cli import main
from fmct.features.embed import load_encoder, read_features
from fmct.phantom.fixtures import tiny_bundle
from fmct.models.config import ViT3DConfig
from fmct.models.vit3d import ViT3D
from fmct.phantom import write_phantom_set


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    folder = write_phantom_set(root / "phantoms", 8, 5, in_plane_size=64, slices="thick")
    bundle, _, _ = tiny_bundle(root / "bundle")
    return folder, bundle, root


def test_embed_writes_one_row_per_study_resumes_and_probes(studies, capsys):
    folder, bundle, root = studies
    out = root / "features.npz"
    assert main(["embed", str(folder), "--model", str(bundle), "--out", str(out), "--layers", "2", "--device", "cpu"]) == 0
    feats = read_features(out)
    encoder = load_encoder(bundle)
    d = encoder.cfg.embed_dim
    assert len(feats["study_id"]) == 8 and feats["cls"].shape == (8, d) and feats["patch_mean"].shape == (8, d)
    last = encoder.cfg.depth - 1
    assert feats[f"block{last}_cls"].shape == (8, d) and np.allclose(feats[f"block{last}_cls"], feats["cls"], atol=1e-5)
    assert "any_hemorrhage" in feats["tasks"] and feats["labels"].shape == (8, len(feats["tasks"]))

    # the row is the encoder's own output for that study, through the bundle's preprocessing
    from fmct.data.datasets import read_study
    from fmct.data.manifests import load_manifest
    from fmct.preprocessing.preprocessor import Preprocessor

    study = next(s for s in load_manifest(folder) if s.study_id == feats["study_id"][3])
    x = Preprocessor(encoder.preprocessing)(read_study(study)).tensor
    with torch.no_grad():
        f = encoder.forward_features(x)
    assert np.allclose(feats["cls"][3], f["cls"][0].numpy(), atol=1e-5)
    assert np.allclose(feats["patch_mean"][3], f["patch"][0].mean(0).numpy(), atol=1e-5)

    # resumable: a second run reuses every row; a different option is refused, --overwrite starts again
    capsys.readouterr()
    assert main(["embed", str(folder), "--model", str(bundle), "--out", str(out), "--layers", "2", "--device", "cpu"]) == 0
    assert "8 kept from an earlier run" in capsys.readouterr().out
    assert main(["embed", str(folder), "--model", str(bundle), "--out", str(out), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    csv_out = root / "features.csv"
    assert main(["embed", str(folder), "--model", str(bundle), "--out", str(csv_out), "--device", "cpu"]) == 0
    back = read_features(csv_out)
    assert back["study_id"] == feats["study_id"] and np.allclose(back["cls"], feats["cls"], atol=1e-4)

    report_path = root / "probe.json"
    assert main(["probe", str(out), "--tasks", "any_hemorrhage", "--folds", "2", "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())["tasks"]["any_hemorrhage"]
    assert report["n"] == 8 and {"knn", "logreg"} <= set(report)
    assert 0.0 <= report["logreg"]["auroc_pooled"] <= 1.0 and len(report["knn"]["auroc_folds"]) == 2
    assert main(["probe", str(csv_out), "--labels", str(folder / "labels.csv"), "--tasks", "any_hemorrhage",
                 "--method", "knn", "--folds", "2"]) == 0
    assert "knn" in capsys.readouterr().out


def test_probe_separates_separable_features(tmp_path):
    from fmct.features.probe import probe

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    x = rng.normal(size=(40, 8)) + y[:, None] * 2.0
    np.savez(tmp_path / "f.npz", study_id=np.array([f"s{i}" for i in range(40)]), tasks=np.array(["t"]),
             labels=y[:, None].astype(float), cls=x.astype(np.float32), patch_mean=x.astype(np.float32))
    report = probe(tmp_path / "f.npz", folds=4)["tasks"]["t"]
    assert report["knn"]["auroc_pooled"] > 0.9 and report["logreg"]["auroc_pooled"] > 0.9


def test_intermediate_layers_and_parameter_groups():
    torch.manual_seed(0)
    enc = ViT3D(ViT3DConfig(img_size=(16, 16, 16), embed_dim=32, depth=3, num_heads=2)).eval()
    x = torch.rand(2, 3, 16, 16, 16)
    outs = enc.get_intermediate_layers(x, n=2, return_class_token=True)
    full = enc.forward_features(x)
    assert len(outs) == 2 and torch.allclose(outs[-1][0], full["patch"], atol=1e-6) and torch.allclose(outs[-1][1], full["cls"], atol=1e-6)
    grid = enc.get_intermediate_layers(x, n=[0], reshape=True)[0]
    assert grid.shape == (2, 32, 2, 2, 2)
    with pytest.raises(ValueError):
        enc.get_intermediate_layers(x, n=[3])

    assert enc.no_weight_decay() == {"cls_token", "mask_token", "pos_embed"}
    assert enc.layer_id("patch_embed.proj.weight") == 0 and enc.layer_id("blocks.2.mlp.fc1.weight") == 3
    assert enc.layer_id("norm.weight") == 4 == enc.num_layers() - 1
    groups = enc.param_groups(0.05, lr_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in enc.named_parameters()}
    assert by_name["pos_embed"]["weight_decay"] == 0.0 and by_name["blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["norm.weight"]["lr_scale"] == 1.0 and by_name["blocks.2.attn.qkv.weight"]["lr_scale"] == 0.5
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** 4 * 0.2)
