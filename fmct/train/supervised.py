"""Supervised training of encoder + heads on preprocessed tensors.

Used by the demo-model recipe; the few-label fine-tuning of the training issue builds on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fmct.models import FMCTClassifier

Progress = Callable[[float, str], None]


@dataclass
class SupervisedConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    max_pos_weight: float = 10.0
    seed: int = 0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Left-right flips and small shifts: every finding keeps its label under both."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1, 1).to(x.device), x.flip(-1), x)
    shift = [int(s) for s in torch.randint(-3, 4, (3,), generator=gen)]
    return torch.roll(x, shifts=shift, dims=(2, 3, 4))


def train_classifier(
    model: FMCTClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: SupervisedConfig,
    device: torch.device,
    progress: Progress | None = None,
) -> list[float]:
    """Train on x [N, C, D, H, W] (any float dtype) and multi-label y [N, T]; returns epoch losses."""
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    if device.type == "cuda":
        x, y = x.to(device), y.to(device)  # a phantom set fits in GPU memory; saves a copy per step
    pos = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - pos) / pos).clamp(max=cfg.max_pos_weight).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
    )
    use_amp = device.type == "cuda"
    losses = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        epoch_loss = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = augment(x[idx.to(x.device)].to(device, non_blocking=True).float(), gen)
            yb = y[idx.to(y.device)].to(device).float()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = model(xb)
            loss = F.binary_cross_entropy_with_logits(logits.float(), yb, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            epoch_loss += loss.item() * len(idx)
        losses.append(epoch_loss / len(x))
        if progress is not None:
            progress((epoch + 1) / cfg.epochs, f"epoch {epoch + 1}/{cfg.epochs} loss {losses[-1]:.4f}")
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model: FMCTClassifier, x: torch.Tensor, device: torch.device, batch_size: int = 16) -> np.ndarray:
    model.to(device).eval()
    out = []
    for i in range(0, len(x), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(x[i : i + batch_size].to(device).float()).float().cpu())
    return torch.cat(out).numpy()
