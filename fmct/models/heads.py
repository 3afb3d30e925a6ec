"""Task heads on top of the encoder: multi-label logits, one per finding."""
from __future__ import annotations

import torch
from torch import nn


class MultiLabelHead(nn.Module):
    """Linear head on [CLS, mean of patch tokens].

    The mean patch token carries local evidence (a small bleed) that the CLS token of a
    lightly trained encoder may not; concatenating both is what DINOv2's linear probes do.
    """

    def __init__(self, embed_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.fc = nn.Linear(2 * embed_dim, num_tasks)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, cls: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(cls, patch))

    @staticmethod
    def pool(cls: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """The head's input [B, 2 * embed_dim]: what the out-of-distribution statistics describe."""
        return torch.cat([cls, patch.mean(dim=1)], dim=-1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))
