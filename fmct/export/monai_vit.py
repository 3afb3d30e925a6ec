"""`fmct export BUNDLE --monai`: a bundle's encoder as a `monai.networks.nets.ViT` state dict.

Writes `vit.safetensors` (MONAI's names) and `vit.json` (the ViT constructor's arguments) into the output
folder, so a MONAI user builds ``ViT(**json.load(open("vit.json")))`` and loads the weights strictly. MONAI's
ViT adds positions to the patch tokens only and has no LayerScale, so only encoders with
``cls_pos_embed: false`` and no layerscale map onto it (FM-HCT's does; fmct's own presets do not and are
refused). The CLS token is kept (``classification=True``; the classification head MONAI then builds is not
part of the encoder: delete it, as vit.json says, before loading). MONAI's LayerNorms use eps 1e-5; an
encoder whose final norm uses 1e-6 (FM-HCT) differs from MONAI's by that eps alone (~1e-6 relative).
For UNETR (same width, 12 blocks, 96^3, patch 16 is UNETR's own), the same tensors without ``cls_token``
load into ``unetr.vit`` with ``strict=False`` only where the sizes match; fmct checks ViT, not UNETR.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmct.conventions.atomic import write_bytes_atomic, write_text_atomic
from fmct.conventions.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fmct.models.config import ViT3DConfig

_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.qkv", "attn.proj": "attn.out_proj",
          "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}
_TOP = {"patch_embed.proj.weight": "patch_embedding.patch_embeddings.weight",
        "patch_embed.proj.bias": "patch_embedding.patch_embeddings.bias",
        "pos_embed": "patch_embedding.position_embeddings", "cls_token": "cls_token",
        "norm.weight": "norm.weight", "norm.bias": "norm.bias"}


def monai_vit_kwargs(cfg: ViT3DConfig) -> dict[str, Any]:
    """The `monai.networks.nets.ViT` arguments of an fmct encoder config (refusing one MONAI cannot hold)."""
    if cfg.cls_pos_embed or cfg.layerscale_init:
        raise ConfigError("this encoder gives the CLS token a position (or uses LayerScale); MONAI's ViT cannot hold "
                          "it. --monai exports encoders in MONAI's layout (e.g. one imported with `fmct import fm-hct`)")
    return {"in_channels": cfg.in_chans, "img_size": list(cfg.img_size), "patch_size": list(cfg.patch_size),
            "hidden_size": cfg.embed_dim, "mlp_dim": int(cfg.embed_dim * cfg.mlp_ratio), "num_layers": cfg.depth,
            "num_heads": cfg.num_heads, "proj_type": "conv",
            "pos_embed_type": "sincos" if cfg.pos_embed_type == "sincos" else "learnable",
            "classification": True, "qkv_bias": cfg.qkv_bias, "spatial_dims": 3}


def monai_state_dict(encoder_state: dict[str, torch.Tensor], cfg: ViT3DConfig) -> dict[str, torch.Tensor]:
    """fmct encoder tensors (names inside the encoder) -> MONAI ViT names; mask_token is dropped."""
    import torch

    out = {theirs: encoder_state[ours] for ours, theirs in _TOP.items()}
    for n in range(cfg.depth):
        for ours, theirs in _BLOCK.items():
            for leaf in ("weight", "bias"):
                key = f"blocks.{n}.{ours}.{leaf}"
                if key in encoder_state:
                    out[f"blocks.{n}.{theirs}.{leaf}"] = encoder_state[key]
        # MONAI builds a cross-attention norm in every block even when unused: its default values
        out[f"blocks.{n}.norm_cross_attn.weight"] = torch.ones(cfg.embed_dim)
        out[f"blocks.{n}.norm_cross_attn.bias"] = torch.zeros(cfg.embed_dim)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def export_monai(bundle_path: str | Path, out: str | Path) -> Path:
    """Write vit.safetensors and vit.json for MONAI's ViT into the folder `out`; returns it."""
    from safetensors.torch import save

    from fmct.features.embed import load_encoder

    encoder = load_encoder(bundle_path)
    kwargs = monai_vit_kwargs(encoder.cfg)
    state = monai_state_dict(encoder.state_dict(), encoder.cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "vit.safetensors", save(state, metadata={"format": "monai.networks.nets.ViT"}))
    note = ("build monai.networks.nets.ViT(**kwargs), `del vit.classification_head`, then "
            "vit.load_state_dict(safetensors.torch.load_file('vit.safetensors')); features: vit(x)[0][:, 0] "
            "(the CLS token after the final norm). Input: the tensor of the bundle's preprocessing (fmct.json).")
    meta = {"kwargs": kwargs, "usage": note, "final_norm_eps": encoder.cfg.final_norm_eps,
            "block_norm_eps": encoder.cfg.norm_eps, "source_bundle": encoder.bundle_meta.name,
            "preprocessing": encoder.bundle_meta.preprocessing.to_dict()}
    write_text_atomic(out / "vit.json", json.dumps(meta, indent=2))
    return out
