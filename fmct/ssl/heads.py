"""Projection heads used only during pretraining (they are not part of a bundle)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes, as in DINO/DINOv2.

    The L2 normalisation before the last layer, together with the weight-normed prototypes
    (whose norm is frozen at 1), keeps the logits bounded, which is what stops the
    student/teacher pair from collapsing early in training.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(nlayers - 1, 0)):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class PixelDecoder(nn.Module):
    """Linear patch-token -> voxels decoder for masked reconstruction (SimMIM/MAE-style).

    Deliberately weak (one linear layer), so the encoder, not the decoder, has to carry the
    information needed to fill in a hidden patch.
    """

    def __init__(self, embed_dim: int, in_chans: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(embed_dim, in_chans * patch_size[0] * patch_size[1] * patch_size[2])
        _init_linear(self.proj)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(patch_tokens)  # [B, N, C * pd * ph * pw]


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, N, C * pd * ph * pw], patches in the encoder's token order."""
    b, c, d, h, w = x.shape
    pd, ph, pw = patch_size
    x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (d // pd) * (h // ph) * (w // pw), c * pd * ph * pw)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
