"""Random weights in FM-HCT's released key layout, for the FM-HCT tests (a helper module, not a test module,
so the parity, end-to-end and export tests share it without importing each other)."""
from __future__ import annotations

import torch

DIM, HEADS, MLP = 768, 12, 3072  # the released encoder's width, heads and MLP size


def fm_hct_state(depth: int, seed: int = 0, prefix: str = "module.backbone.") -> dict[str, torch.Tensor]:
    """Random weights with FM-HCT's names and shapes (as their training wrapper saves them, with prefixes)."""
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"patch_embedding.patch_embeddings.weight": r(DIM, 3, 12, 12, 12), "patch_embedding.patch_embeddings.bias": r(DIM),
          "patch_embedding.position_embeddings": build_sincos_position_embedding([8, 8, 8], DIM, 3).detach().clone(),
          "cls_token": r(1, 1, DIM, std=1.0), "norm.weight": 1 + r(DIM, std=0.1), "norm.bias": r(DIM)}
    for n in range(depth):
        b = f"blocks.{n}."
        sd.update({b + "att_norm.weight": 1 + r(DIM, std=0.1), b + "att_norm.bias": r(DIM),
                   b + "ffn_norm.weight": 1 + r(DIM, std=0.1), b + "ffn_norm.bias": r(DIM),
                   b + "attn.qkv.weight": r(3 * DIM, DIM), b + "attn.proj.weight": r(DIM, DIM), b + "attn.proj.bias": r(DIM),
                   b + "mlp.linear1.weight": r(MLP, DIM), b + "mlp.linear1.bias": r(MLP),
                   b + "mlp.linear2.weight": r(DIM, MLP), b + "mlp.linear2.bias": r(DIM)})
    return {prefix + k: v for k, v in sd.items()}
