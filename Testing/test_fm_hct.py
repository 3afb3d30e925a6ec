"""FM-HCT's released encoder in FMCT (issue 28): import, parity with MONAI's pipeline and an independent ViT.

The checkpoints are random weights in the released key layout (nothing is downloaded). The reference
is made here, not by fmct: MONAI's dictionary transforms from the NIfTI file, and a ViT forward
written below in plain torch ops over the checkpoint's own state dict. Most tests use 2 blocks (the same
key layout, `blocks.0` and `blocks.1`); one slow test runs the full 12-block, 89.4M-parameter encoder.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fm_hct_testing import DIM, HEADS, fm_hct_state

from fmct.cli import main
from fmct.phantom import make_phantom
from fmct.reading.files import read_volume, write_volume

pytest.importorskip("monai")
pytest.importorskip("scipy")

WINDOWS = ((40, 80), (80, 200), (600, 2800))


def reference_cls(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """FM-HCT's forward as the issue states it, in plain torch ops: patches + positions, CLS in front
    (no position), pre-norm blocks (eps 1e-5, qkv without bias, softmax attention), final norm eps 1e-6."""
    sd = {k.replace("module.", "").replace("backbone.", ""): v.double() for k, v in sd.items()}
    x = x.double()
    t = F.conv3d(x, sd["patch_embedding.patch_embeddings.weight"], sd["patch_embedding.patch_embeddings.bias"], stride=12)
    t = t.flatten(2).transpose(1, 2) + sd["patch_embedding.position_embeddings"]
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    b_, n_, hd = t.shape[0], t.shape[1], DIM // HEADS
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (DIM,), sd[p + "att_norm.weight"], sd[p + "att_norm.bias"], eps=1e-5)
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).reshape(b_, n_, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1) @ v
        t = t + a.transpose(1, 2).reshape(b_, n_, DIM) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = F.layer_norm(t, (DIM,), sd[p + "ffn_norm.weight"], sd[p + "ffn_norm.bias"], eps=1e-5)
        h = F.gelu(h @ sd[p + "mlp.linear1.weight"].T + sd[p + "mlp.linear1.bias"])
        t = t + h @ sd[p + "mlp.linear2.weight"].T + sd[p + "mlp.linear2.bias"]
    t = F.layer_norm(t, (DIM,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 0].float()


def monai_reference_tensor(nifti: Path) -> torch.Tensor:
    """FM-HCT's data pipeline in MONAI's dictionary transforms, from the file: [1, 3, 96, 96, 96]."""
    from monai.transforms import (Compose, ConcatItemsd, CopyItemsd, CropForegroundd, EnsureChannelFirstd, LoadImaged,
                                  Orientationd, Resized, ScaleIntensityRanged, Spacingd)

    keys = ["w0", "w1", "w2"]
    steps = [LoadImaged("w0"), EnsureChannelFirstd("w0"), Orientationd("w0", axcodes="RAS"),
             Spacingd("w0", pixdim=(1.0, 1.0, 1.0), mode=3), CropForegroundd("w0", source_key="w0"),
             CopyItemsd("w0", times=2, names=keys[1:])]
    steps += [ScaleIntensityRanged(k, a_min=c - w // 2, a_max=c + w // 2, b_min=0.0, b_max=1.0, clip=True)
              for k, (c, w) in zip(keys, WINDOWS)]
    steps += [ConcatItemsd(keys, "image"), Resized("image", spatial_size=(96, 96, 96))]
    return torch.as_tensor(Compose(steps)({"w0": str(nifti)})["image"].as_tensor())[None]


@pytest.fixture(scope="module")
def phantom_nifti(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fmhct_ct")
    ph = make_phantom(3, findings=["subdural"], slices="thick", in_plane_size=128)
    return write_volume(ph.volume, folder / "case1.nii.gz")


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("fmhct")
    sd = fm_hct_state(depth=2)
    torch.save(sd, folder / "model_weights.pth")
    assert main(["import", "fm-hct", str(folder / "model_weights.pth"), "--out", str(folder / "bundle")]) == 0
    return sd, folder / "bundle"


def test_import_writes_an_encoder_bundle_with_provenance(imported):
    import hashlib

    sd, bundle = imported
    meta = json.loads((bundle / "fmct.json").read_text())
    assert meta["tasks"] == []
    assert meta["encoder"]["qkv_bias"] is False and meta["encoder"]["cls_pos_embed"] is False
    assert meta["encoder"]["embed_dim"] == DIM and meta["encoder"]["depth"] == 2
    assert meta["preprocessing"]["crop"] == "foreground" and meta["preprocessing"]["spline_order"] == 3
    assert meta["preprocessing"]["orientation"] == "RAS" and meta["preprocessing"]["size"] == [96, 96, 96]
    pth = bundle.parent / "model_weights.pth"
    assert meta["provenance"]["checkpoint_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    from safetensors.torch import load_file

    stored = load_file(str(bundle / "model.safetensors"))
    assert torch.equal(stored["encoder.blocks.1.mlp.fc2.weight"], sd["module.backbone.blocks.1.mlp.linear2.weight"])
    assert torch.equal(stored["encoder.pos_embed"], sd["module.backbone.patch_embedding.position_embeddings"])


@pytest.mark.slow
def test_model_alone_matches_the_independent_forward(imported):
    from fmct.features.embed import load_encoder

    sd, bundle = imported
    encoder = load_encoder(bundle)
    x = torch.rand(2, 3, 96, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder.forward_features(x)["cls"]
    ref = reference_cls(sd, x)
    assert ours.shape == (2, DIM)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float((ref[0] - ref[1]).abs().max()) > 1e-2  # the two inputs give different features


@pytest.mark.slow
def test_end_to_end_from_the_nifti_file_matches_monai_and_the_reference(imported, phantom_nifti, tmp_path):
    sd, bundle = imported
    x_ref = monai_reference_tensor(phantom_nifti)
    from fmct.preprocessing.preprocessor import Preprocessor
    from fmct.features.embed import load_encoder

    ours_x = Preprocessor(load_encoder(bundle).preprocessing)(read_volume(phantom_nifti)).array
    assert ours_x.shape == tuple(x_ref.shape)
    assert float(np.abs(ours_x - x_ref.numpy()).max()) <= 1e-4  # the same tensor, from fmct's reader and MONAI's
    ref = reference_cls(sd, x_ref)[0].numpy()
    out = tmp_path / "features.npz"
    assert main(["embed", str(phantom_nifti.parent), "--model", str(bundle), "--out", str(out), "--device", "cpu"]) == 0
    with np.load(out, allow_pickle=False) as f:
        cls = f["cls"][0]
    scale = float(np.abs(ref).max())
    assert scale > 0.1
    assert float(np.abs(cls - ref).max()) <= 1e-3 * scale


@pytest.mark.slow
def test_full_size_encoder_matches_the_independent_forward(tmp_path):
    """The released size: 12 blocks, 89.4M parameters (0.4M of them the fixed positions), one forward on the CPU."""
    from fmct.features.embed import load_encoder

    sd = fm_hct_state(depth=12, seed=3, prefix="")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "model.safetensors"))
    assert main(["import", "fm-hct", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "bundle")]) == 0
    encoder = load_encoder(tmp_path / "bundle")
    assert sum(p.numel() for n, p in encoder.named_parameters() if n != "mask_token") == sum(v.numel() for v in sd.values())
    x = torch.rand(1, 3, 96, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert float((encoder(x) - reference_cls(sd, x)).abs().max()) <= 1e-5


@pytest.mark.slow
def test_import_refuses_what_is_not_fm_hct(tmp_path, capsys):
    sd = fm_hct_state(depth=1, prefix="module.")
    broken = dict(sd)
    del broken["module.blocks.0.attn.proj.bias"]
    broken["module.head.weight"] = torch.zeros(2, DIM)
    torch.save(broken, tmp_path / "missing.pth")
    assert main(["import", "fm-hct", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "b1")]) == 2
    err = capsys.readouterr().err
    assert "blocks.0.attn.proj.bias" in err and "head.weight" in err
    shaped = dict(sd)
    shaped["module.cls_token"] = torch.zeros(1, 1, 384)
    torch.save(shaped, tmp_path / "shape.pth")
    assert main(["import", "fm-hct", str(tmp_path / "shape.pth"), "--out", str(tmp_path / "b2")]) == 2
    assert "cls_token [1, 1, 384]" in capsys.readouterr().err
    torch.save({"weights": sd, "optimizer": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)},
               tmp_path / "pickled.pth")  # an object that weights_only refuses to unpickle
    assert main(["import", "fm-hct", str(tmp_path / "pickled.pth"), "--out", str(tmp_path / "b3")]) == 2
    assert "tensors-only" in capsys.readouterr().err
    assert not any((tmp_path / b).exists() for b in ("b1", "b2", "b3"))


@pytest.mark.slow
def test_foreground_spec_without_monai_exits_2_naming_the_extra(imported, phantom_nifti, tmp_path):
    """A machine without MONAI: the run stops with exit 2 before any model runs (monai made unimportable)."""
    _, bundle = imported
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'monai' or name.startswith('monai.'):\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fmct.cli import main\n"
        f"sys.exit(main(['embed', {str(phantom_nifti.parent)!r}, '--model', {str(bundle)!r}, '--out', "
        f"{str(tmp_path / 'f.npz')!r}, '--device', 'cpu']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fmct[monai]" in proc.stderr
    assert not (tmp_path / "f.npz").exists()
