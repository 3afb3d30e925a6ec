"""Encoder configuration as a dataclass, and the named model sizes.

Kept free of torch so that reading a bundle's metadata (and running its ONNX export with
onnxruntime alone) never imports torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from fmct.conventions.errors import ConfigError


POS_EMBED_TYPES = ("learned", "sincos")
# Fields added after bundle format 1 was fixed: optional in fmct.json, omitted there at these values.
OPTIONAL_DEFAULTS: dict[str, Any] = {"norm_eps": 1e-6, "final_norm_eps": 1e-6, "cls_pos_embed": True,
                                     "pos_embed_type": "learned"}


@dataclass(frozen=True)
class ViT3DConfig:
    """Encoder hyper-parameters. Sizes are in tensor order (D, H, W) = (z, y, x)."""

    img_size: tuple[int, int, int] = (64, 64, 64)
    patch_size: tuple[int, int, int] = (8, 8, 8)
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    layerscale_init: float | None = None
    # Options for encoders trained elsewhere (FM-HCT, MONAI's ViT); the defaults are fmct's own encoder and
    # are left out of to_dict, so bundles written before these options existed read and hash the same.
    norm_eps: float = 1e-6        # LayerNorm eps inside the blocks (MONAI's ViT: 1e-5)
    final_norm_eps: float = 1e-6  # LayerNorm eps of the final norm
    cls_pos_embed: bool = True    # False: the position embedding covers the patch tokens only, as MONAI's ViT
    pos_embed_type: str = "learned"  # "sincos": fixed 3D sin-cos positions, stored and never trained

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"encoder.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for n, (i, p) in enumerate(zip(self.img_size, self.patch_size)):
            if p <= 0 or i % p:
                raise ConfigError(f"encoder.img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.pos_embed_type not in POS_EMBED_TYPES:
            raise ConfigError(f"encoder.pos_embed_type '{self.pos_embed_type}' is not one of {list(POS_EMBED_TYPES)}")
        for name in ("norm_eps", "final_norm_eps"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"encoder.{name} {getattr(self, name)} must be a small positive number")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        return tuple(i // p for i, p in zip(self.img_size, self.patch_size))

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    def to_dict(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        for key, default in OPTIONAL_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return {"family": "vit3d", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViT3DConfig":
        d = dict(d)
        family = d.pop("family", "vit3d")
        if family != "vit3d":
            raise ConfigError(f"encoder.family '{family}' is not known to this version of fmct (expected 'vit3d')")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"encoder: unknown field(s) {unknown}; was the bundle written by a newer fmct?")
        for key in ("img_size", "patch_size"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


PRESETS: dict[str, ViT3DConfig] = {
    "tiny": ViT3DConfig(embed_dim=192, depth=6, num_heads=3),
    "small": ViT3DConfig(embed_dim=384, depth=12, num_heads=6, img_size=(96, 96, 96), patch_size=(12, 12, 12)),
    "base": ViT3DConfig(embed_dim=768, depth=12, num_heads=12, img_size=(128, 128, 128), patch_size=(16, 16, 16)),
    # The released FM-HCT encoder (Nature Biomedical Engineering 2026; NYUMedML/HeadCT-Foundation): MONAI's ViT
    # layout, 3 windows at 96^3, patch 12, no qkv bias, fixed sin-cos positions, CLS without a position.
    "fm-hct": ViT3DConfig(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, img_size=(96, 96, 96),
                          patch_size=(12, 12, 12), in_chans=3, qkv_bias=False, norm_eps=1e-5, final_norm_eps=1e-6,
                          cls_pos_embed=False, pos_embed_type="sincos"),
}


def preset(name: str, **overrides: Any) -> ViT3DConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model size '{name}'; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def weight_shapes(cfg: ViT3DConfig, num_tasks: int) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor FMCTClassifier(cfg, num_tasks).state_dict() holds, without torch.

    A bundle's weights are checked against these before anything is loaded, on the torch and the
    onnxruntime path alike (the latter must not import torch); Testing/test_bad_input_round2.py
    holds this table to the torch model's own state_dict.
    """
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.cls_token": (1, 1, d), "encoder.mask_token": (1, d), "encoder.pos_embed": (1, int(cfg.cls_pos_embed) + cfg.num_patches, d),
        "encoder.patch_embed.proj.weight": (d, cfg.in_chans, *cfg.patch_size), "encoder.patch_embed.proj.bias": (d,),
    }
    for i in range(cfg.depth):
        b = f"encoder.blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d)})
        if cfg.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
        shapes.update({b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)})
        if cfg.layerscale_init:
            shapes[b + "ls1.gamma"] = (d,)
        shapes.update({b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (hidden, d),
                       b + "mlp.fc1.bias": (hidden,), b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
        if cfg.layerscale_init:
            shapes[b + "ls2.gamma"] = (d,)
    shapes.update({"encoder.norm.weight": (d,), "encoder.norm.bias": (d,)})
    if num_tasks > 0:
        shapes.update({"head.norm.weight": (2 * d,), "head.norm.bias": (2 * d,), "head.fc.weight": (num_tasks, 2 * d),
                       "head.fc.bias": (num_tasks,)})
    return shapes
