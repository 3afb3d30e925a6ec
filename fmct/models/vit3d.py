"""A 3D Vision Transformer encoder for CT volumes, in the shape of timm's / DINOv2's ViT.

Patch embedding is a strided Conv3d; attention uses PyTorch SDPA (flash / memory-efficient
kernels on GPU) unless the attention weights are asked for, which explanations need: blocks
return a tensor, and the weights only with ``return_attention=True`` (as timm's flag).
A mask token is part of the encoder so masked image modeling can replace patch tokens.
``set_grad_checkpointing()`` (timm's name) recomputes each block in the backward pass instead
of keeping its activations, which a base-size encoder needs to pretrain at 128^3.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fmct.models.config import PRESETS, ViT3DConfig, preset  # noqa: F401  (re-exported: torch users import them from here)


def sincos_position_embedding(grid: tuple[int, int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 3D sin-cos positions [1, prod(grid), dim] (MAE's recipe per axis, equal to MONAI's "sincos"):
    a fresh fm-hct-shaped encoder starts with the kind of positions the released one stores."""
    if dim % 6:
        raise ValueError(f"sin-cos positions in 3D need embed_dim divisible by 6, got {dim}")
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 6, dtype=torch.float32) / (dim // 6))
    parts = []
    for a in (axes[1], axes[0], axes[2]):  # MONAI's order: w, h, d
        out = a.flatten()[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1)[None]


class PatchEmbed3D(nn.Module):
    def __init__(self, cfg: ViT3DConfig) -> None:
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, C]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if return_attention:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            out = attn @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float | None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init)) if init else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma if self.gamma is not None else x


class DropPath(nn.Module):
    """Stochastic depth: drop whole residual branches per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, cfg: ViT3DConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(dim, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.layerscale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The block's output tokens; with ``return_attention`` also its softmax attention [B, heads, N, N]
        (computed explicitly instead of by SDPA: for explanations, not for training)."""
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attention else x


class ViT3D(nn.Module):
    """Encoder: volume [B, C, D, H, W] -> CLS token and patch tokens."""

    def __init__(self, cfg: ViT3DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed3D(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))
        # CLS gets a position of its own unless cls_pos_embed is False (MONAI's ViT adds positions to the
        # patch tokens only); sin-cos positions are fixed (requires_grad False) but stored with the weights.
        n_pos = cfg.num_patches + (1 if cfg.cls_pos_embed else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, cfg.embed_dim), requires_grad=cfg.pos_embed_type == "learned")
        # torch.linspace(0, rate, depth) in plain Python, so the model can be built on the meta device
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.final_norm_eps)
        self.grad_checkpointing = False
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (timm's
        switch): activation memory of one block instead of ``depth``, for about a third more compute.
        Only while gradients are recorded; inference is unchanged."""
        self.grad_checkpointing = bool(enable)

    def _run_block(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and tokens.requires_grad:
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:  # shapes only (the bundle's weight check): torch's normal_ on the meta
            return                  # device goes through torch._refs and imports torch._dynamo, 1.2 s of a cold start
        if self.cfg.pos_embed_type == "sincos":
            with torch.no_grad():
                self.pos_embed[:, -self.cfg.num_patches:] = sincos_position_embedding(self.cfg.grid_size, self.cfg.embed_dim)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.mask_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pos_embed_for(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Positional embedding for a patch grid; interpolated when it differs from training."""
        if grid == self.cfg.grid_size:
            return self.pos_embed
        n_cls = 1 if self.cfg.cls_pos_embed else 0
        cls_pos, patch_pos = self.pos_embed[:, :n_cls], self.pos_embed[:, n_cls:]
        patch_pos = patch_pos.reshape(1, *self.cfg.grid_size, -1).permute(0, 4, 1, 2, 3)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="trilinear", align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed, replace masked patches by the mask token, prepend CLS, add positions.

        masks: optional bool [B, N], True where a patch is hidden (masked image modeling).
        """
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.cfg.patch_size))
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if not self.cfg.cls_pos_embed:  # positions on the patch tokens only, then CLS in front (MONAI's ViT)
            return torch.cat([cls, tokens + self._pos_embed_for(grid)], dim=1)
        tokens = torch.cat([cls, tokens], dim=1)
        return tokens + self._pos_embed_for(grid)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        tokens = self.prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = self._run_block(block, tokens)
        tokens = self.norm(tokens)
        return {"cls": tokens[:, 0], "patch": tokens[:, 1:]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """Outputs of the last ``n`` blocks (or of the blocks whose indices ``n`` lists), as DINOv2 has it.

        Each entry is the patch tokens [B, N, D] (``reshape``: [B, D, gd, gh, gw] on the patch
        grid), or with ``return_class_token`` a pair (patch tokens, CLS [B, D]). ``norm`` applies
        the final LayerNorm to every returned layer, as DINOv2 does.

        Gradients flow as in ``forward`` (a dense head trained on intermediate layers needs them, as in
        DINOv2 and timm); callers that only read features say ``torch.no_grad()`` themselves.
        """
        total = len(self.blocks)
        wanted = set(range(total - n, total) if isinstance(n, int) else n)
        if not wanted or min(wanted) < 0 or max(wanted) >= total:
            raise ValueError(f"layers {sorted(wanted)} are outside this encoder's 0..{total - 1}")
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.cfg.patch_size))
        tokens, outputs = self.prepare_tokens(x), []
        for i, block in enumerate(self.blocks):
            tokens = self._run_block(block, tokens)
            if i in wanted:
                outputs.append(self.norm(tokens) if norm else tokens)
        result = []
        for out in outputs:
            cls, patch = out[:, 0], out[:, 1:]
            if reshape:
                patch = patch.transpose(1, 2).reshape(out.shape[0], -1, *grid)
            result.append((patch, cls) if return_class_token else patch)
        return tuple(result)

    # ------------------------------------------------------------------ parameter groups (timm's names)
    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay must not shrink: tokens and positions (biases and norms are 1-D)."""
        return {"cls_token", "mask_token", "pos_embed"}

    def num_layers(self) -> int:
        """Layer ids run 0 (embeddings) .. depth + 1 (final norm), for layer-wise lr decay."""
        return len(self.blocks) + 2

    def layer_id(self, name: str) -> int:
        """The layer a parameter (its name inside this encoder) belongs to: 0 embeddings, i + 1 block i,
        depth + 1 the final norm."""
        if name.startswith(("patch_embed.", "cls_token", "mask_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def param_groups(self, weight_decay: float, lr_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                     prefix: str = "") -> list[dict]:
        """AdamW groups: no decay on 1-D parameters and ``no_weight_decay()``, an ``lr_scale`` per layer
        (lr_decay ** (num_layers - 1 - layer_id)), the patch embedding times patch_embed_lr_mult.

        Trainers multiply each group's lr by its ``lr_scale`` and its weight decay by ``wd_scale``
        (1.0 or 0.0), so a weight-decay schedule keeps the no-decay groups at 0. ``prefix`` names
        the parameters as the caller's module sees them (e.g. "encoder.").
        """
        skip, top, groups = self.no_weight_decay(), self.num_layers() - 1, {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.ndim <= 1 or name in skip
            lid = self.layer_id(name)
            scale = lr_decay ** (top - lid) * (patch_embed_lr_mult if name.startswith("patch_embed.") else 1.0)
            key = (lid, no_decay, name.startswith("patch_embed."))
            g = groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                        "wd_scale": 0.0 if no_decay else 1.0, "lr_scale": scale, "layer_id": lid})
            g["params"].append(p)
            g["names"].append(prefix + name)
        return [groups[k] for k in sorted(groups)]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention of every block, each [B, heads, 1+N, 1+N] (for explanations)."""
        tokens = self.prepare_tokens(x)
        maps = []
        for block in self.blocks:
            tokens, attn = block(tokens, return_attention=True)
            maps.append(attn)
        return maps
