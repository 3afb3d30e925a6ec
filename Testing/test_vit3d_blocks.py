"""The encoder's timm/DINOv2-shaped API (issue 24 item 7): blocks return a tensor (attention only
when asked for), get_intermediate_layers passes gradients, and gradient checkpointing changes
memory, not results."""
import torch

from fmct.models import FMCTClassifier, ViT3D, ViT3DConfig

CFG = ViT3DConfig(img_size=(16, 16, 16), patch_size=(8, 8, 8), embed_dim=32, depth=3, num_heads=2)


def test_a_block_returns_a_tensor_and_attention_only_on_request():
    torch.manual_seed(0)
    enc = ViT3D(CFG).eval()
    tokens = enc.prepare_tokens(torch.rand(1, 3, 16, 16, 16))
    out = enc.blocks[0](tokens)
    assert isinstance(out, torch.Tensor) and out.shape == tokens.shape
    same, attn = enc.blocks[0](tokens, return_attention=True)
    torch.testing.assert_close(out, same, atol=1e-5, rtol=1e-4)
    assert attn.shape == (1, 2, 9, 9)


def test_intermediate_layers_carry_gradients_for_a_dense_head():
    torch.manual_seed(0)
    enc = ViT3D(CFG)
    x = torch.rand(1, 3, 16, 16, 16, requires_grad=True)
    (patch, cls), = enc.get_intermediate_layers(x, n=[1], return_class_token=True)
    (patch.sum() + cls.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert enc.blocks[1].mlp.fc1.weight.grad.abs().sum() > 0 and enc.blocks[2].mlp.fc1.weight.grad is None
    with torch.no_grad():  # callers that only read features say so
        assert not enc.get_intermediate_layers(x, n=1)[0].requires_grad


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = FMCTClassifier(CFG, 2).train()
    x = torch.rand(2, 3, 16, 16, 16)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.encoder.set_grad_checkpointing(enable)
        out = model(x)
        out.sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert model.encoder.grad_checkpointing


def test_pretraining_config_switches_checkpointing_on():
    from fmct.ssl.config import SSLConfig
    from fmct.ssl.meta_arch import Student

    cfg = SSLConfig.from_dict({"encoder": {"preset": "tiny", "grad_checkpointing": True,
                                           "overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2}}})
    assert Student(cfg).backbone.grad_checkpointing
    small = SSLConfig.from_dict({"encoder": {"overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2}}})
    assert not Student(small).backbone.grad_checkpointing
