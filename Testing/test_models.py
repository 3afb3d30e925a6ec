"""3D ViT encoder and classifier: shapes, SDPA vs explicit attention, masking, presets."""
import pytest
import torch

from fmct.conventions.errors import ConfigError
from fmct.models import PRESETS, FMCTClassifier, ViT3D, ViT3DConfig, preset

CFG = ViT3DConfig(img_size=(32, 32, 32), patch_size=(8, 8, 8), embed_dim=48, depth=2, num_heads=2)


def test_tokens_and_logits_shapes():
    torch.manual_seed(0)
    enc = ViT3D(CFG).eval()
    x = torch.randn(2, 3, 32, 32, 32)
    feats = enc.forward_features(x)
    assert feats["cls"].shape == (2, 48) and feats["patch"].shape == (2, 64, 48)
    assert FMCTClassifier(CFG, 5)(x).shape == (2, 5)


def test_sdpa_and_explicit_attention_agree():
    """The fast path (SDPA) and the explanation path (explicit softmax) compute the same thing."""
    torch.manual_seed(0)
    enc = ViT3D(CFG).eval()
    x = torch.randn(1, 3, 32, 32, 32)
    tokens = enc.prepare_tokens(x)
    fast = enc.blocks[0](tokens)
    slow, attn = enc.blocks[0](tokens, return_attention=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    assert attn.shape == (1, 2, 65, 65)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, 65))
    assert len(enc.attention_maps(x)) == CFG.depth


def test_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    enc = ViT3D(CFG).eval()
    x = torch.randn(1, 3, 32, 32, 32)
    masks = torch.zeros(1, 64, dtype=torch.bool)
    masks[0, :10] = True
    a = enc.prepare_tokens(x, masks)
    b = enc.prepare_tokens(torch.randn(1, 3, 32, 32, 32), masks)
    torch.testing.assert_close(a[:, 1:11], b[:, 1:11])  # masked positions ignore the image
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_other_input_size_interpolates_positions():
    enc = ViT3D(CFG).eval()
    assert enc.forward_features(torch.randn(1, 3, 16, 24, 32))["patch"].shape == (1, 2 * 3 * 4, 48)


def test_gradients_reach_the_input():
    model = FMCTClassifier(CFG, 3)
    x = torch.randn(1, 3, 32, 32, 32, requires_grad=True)
    model(x)[0, 1].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_presets_and_config_errors():
    assert set(PRESETS) == {"tiny", "small", "base", "fm-hct"}
    assert preset("base").embed_dim == 768
    with pytest.raises(ConfigError, match="divisible"):
        ViT3DConfig(img_size=(30, 32, 32))
    with pytest.raises(ConfigError, match="unknown model size"):
        preset("huge")
    assert ViT3DConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ConfigError, match="unknown field"):
        ViT3DConfig.from_dict({**CFG.to_dict(), "depthh": 3})
