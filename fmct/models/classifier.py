"""Encoder + task head: the network a bundle holds and Analyze runs."""
from __future__ import annotations

import torch
from torch import nn

from fmct.models.heads import MultiLabelHead
from fmct.models.vit3d import ViT3D, ViT3DConfig


class FMCTClassifier(nn.Module):
    """Volume tensor [B, C, D, H, W] -> logits [B, num_tasks].

    With num_tasks=0 it is a bare pretrained encoder (no head): same weight names
    ("encoder.*"), so a pretrained bundle's weights load straight into a fine-tuning model.
    """

    def __init__(self, cfg: ViT3DConfig, num_tasks: int) -> None:
        super().__init__()
        self.encoder = ViT3D(cfg)
        self.head = MultiLabelHead(cfg.embed_dim, num_tasks) if num_tasks > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("this model has no task head (a pretrained encoder); fine-tune it first")
        feats = self.encoder.forward_features(x)
        return self.head(feats["cls"], feats["patch"])

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the pooled features they come from, from one pass (findings + OOD score)."""
        if self.head is None:
            raise RuntimeError("this model has no task head (a pretrained encoder); fine-tune it first")
        feats = self.encoder.forward_features(x)
        pooled = self.head.pool(feats["cls"], feats["patch"])
        return self.head.classify(pooled), pooled

    def param_groups(self, weight_decay: float, lr_decay: float = 1.0) -> list[dict]:
        """AdamW groups whose lr shrinks by lr_decay per block from the head down to the patch embedding.

        Early layers hold the generic features pretraining learnt; moving them less keeps them. The
        encoder declares its groups (ViT3D.param_groups: layer ids, no decay on norms, biases, tokens
        and positions, as in DINOv2/BEiT fine-tuning); the head trains at the full lr. Frozen
        parameters (linear probing) are left out.
        """
        groups = list(self.encoder.param_groups(weight_decay, lr_decay=lr_decay, prefix="encoder."))
        head = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("encoder.")]
        groups += [{"params": [p for p in head if p.ndim > 1], "lr_scale": 1.0, "weight_decay": weight_decay},
                   {"params": [p for p in head if p.ndim <= 1], "lr_scale": 1.0, "weight_decay": 0.0}]
        for g in groups:
            g.pop("names", None)
        return [g for g in groups if g["params"]]
