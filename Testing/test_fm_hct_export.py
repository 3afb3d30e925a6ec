"""FMCT out to the ecosystem (issue 28 item 5): MONAI's ViT, a Hugging Face-style folder, a MONAI transform.

Random weights in FM-HCT's released layout (2 blocks; the same names and widths as the release).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmct.cli import main
from fmct.phantom import make_phantom
from fmct.preprocessing.preprocessor import Preprocessor
from fmct.reading.files import read_volume, write_volume

pytest.importorskip("monai")
pytest.importorskip("einops")  # MONAI's ViT needs it

from fmct_testing import tiny_bundle  # noqa: E402
from fm_hct_testing import fm_hct_state  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmhct_export")
    torch.save(fm_hct_state(depth=2, seed=7), folder / "w.pth")
    assert main(["import", "fm-hct", str(folder / "w.pth"), "--out", str(folder / "encoder")]) == 0
    return folder / "encoder"


@pytest.mark.slow
def test_monai_export_loads_into_monai_vit_and_gives_the_same_cls(bundle, tmp_path):
    from monai.networks.nets import ViT
    from safetensors.torch import load_file

    from fmct.features.embed import load_encoder

    assert main(["export", str(bundle), "--monai", "--out", str(tmp_path / "monai")]) == 0
    spec = json.loads((tmp_path / "monai" / "vit.json").read_text(encoding="utf-8"))
    vit = ViT(**spec["kwargs"])
    del vit.classification_head
    vit.load_state_dict(load_file(str(tmp_path / "monai" / "vit.safetensors")), strict=True)
    vit.eval()
    x = torch.rand(1, 3, 96, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = load_encoder(bundle)(x)
        theirs = vit(x)[0][:, 0]
        assert float((ours - theirs).abs().max()) <= 1e-3 * float(ours.abs().max())  # MONAI's final norm: eps 1e-5
        vit.norm.eps = spec["final_norm_eps"]  # with FM-HCT's eps the two are the same computation
        assert float((ours - vit(x)[0][:, 0]).abs().max()) <= 1e-5


def test_monai_export_refuses_an_encoder_monai_cannot_hold(tmp_path, capsys):
    own, _, _ = tiny_bundle(tmp_path / "own")  # fmct's own layout: CLS with a position
    assert main(["export", str(own), "--monai", "--out", str(tmp_path / "m")]) == 2
    assert "MONAI's ViT cannot hold" in capsys.readouterr().err
    assert not (tmp_path / "m" / "vit.safetensors").exists()


@pytest.mark.slow
def test_hf_folder_has_a_model_card_and_loads_back(bundle, tmp_path):
    from fmct.features.embed import load_encoder

    assert main(["export", str(bundle), "--hf", "--out", str(tmp_path / "hf")]) == 0
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    assert config["hidden_size"] == 768 and config["fmct"]["preprocessing"]["crop"] == "foreground"
    card = (hf / "README.md").read_text(encoding="utf-8")
    for section in ("## Intended use", "## Training data", "## Metrics", "## Limitations", "## Licence", "## Citation"):
        assert section in card
    assert json.loads((bundle / "fmct.json").read_text(encoding="utf-8"))["provenance"]["checkpoint_sha256"] in card
    assert (hf / "model.safetensors").read_bytes() == (bundle / "model.safetensors").read_bytes()
    x = torch.rand(1, 3, 96, 96, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(load_encoder(hf)(x), load_encoder(bundle)(x))
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(Exception, match="not an fmct export"):
        load_encoder(hf)


@pytest.mark.slow
def test_monai_transform_gives_the_identical_tensor(bundle, tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from fmct.preprocessing.monai_transform import FMCTPreprocessd
    from fmct_testing import SMALL_SPEC

    path = write_volume(make_phantom(6, findings=["epidural"], slices="thick", in_plane_size=128).volume,
                        tmp_path / "ct.nii.gz")
    own, _, _ = tiny_bundle(tmp_path / "own")
    for source in (bundle, own):  # FM-HCT's spec (MONAI inside) and fmct's own head-centred spec
        pipeline = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), FMCTPreprocessd("image", bundle=source)])
        out = pipeline({"image": str(path)})
        from fmct.inference.bundle import read_meta

        expected = Preprocessor(read_meta(source).preprocessing)(read_volume(path))
        assert tuple(out["image"].shape) == expected.array.shape[1:]
        assert np.array_equal(out["image"].numpy(), expected.array[0])
        grid = out["image_fmct_input"].model_grid
        assert np.allclose(grid.origin, expected.model_grid.origin, atol=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        FMCTPreprocessd("image", bundle=own, spec=SMALL_SPEC)
