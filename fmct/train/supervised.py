"""Supervised training of encoder + heads: the loop behind the demo recipe and `fmct finetune`.

Batches come from a callable (in-memory tensors for phantom recipes, a cached DataLoader for
real data), so one loop serves both. Unknown labels (NaN) are masked out of the loss, which
lets partially labelled manifests train every task they do have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fmct.errors import Cancelled
from fmct.models import FMCTClassifier
from fmct.runtime import CancelCheck, Progress, autocast

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> (x, y) batches


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


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> tuple[Batches, int]:
    """Shuffled mini-batches of in-memory tensors; the order depends only on (seed, epoch)."""

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            yield x[idx.to(x.device)], y[idx.to(y.device)]

    return batches, math.ceil(len(x) / batch_size)


def positive_weights(y: torch.Tensor, max_weight: float) -> torch.Tensor:
    """neg/pos ratio per task (known labels only), capped: rare findings are not drowned out."""
    known = ~torch.isnan(y)
    pos = (torch.nan_to_num(y) * known).sum(0) / known.sum(0).clamp(min=1)
    pos = pos.clamp(1e-3, 1 - 1e-3)
    return ((1 - pos) / pos).clamp(max=max_weight)


def masked_bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(y)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def train_classifier(
    model: FMCTClassifier,
    batches: Batches,
    steps_per_epoch: int,
    pos_weight: torch.Tensor,
    cfg: SupervisedConfig,
    device: torch.device,
    param_groups: list[dict] | None = None,
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
) -> list[float]:
    """AdamW with warm-up + cosine decay, bf16 autocast on CUDA; returns the mean loss per epoch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    params = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in opt.param_groups:
        group["base_lr"] = cfg.lr * group.get("lr_scale", 1.0)
    total = cfg.epochs * steps_per_epoch
    warmup = max(cfg.warmup_epochs * steps_per_epoch, 1)
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))  # noqa: E731
    pos_weight = pos_weight.to(device)
    losses, step = [], 0
    for epoch in range(cfg.epochs):
        total_loss, seen = 0.0, 0
        for xb, yb in batches(epoch):
            if cancel is not None and cancel():
                raise Cancelled("Training cancelled")
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * schedule(step)
            xb = augment(xb.to(device, non_blocking=True).float(), gen)
            yb = yb.to(device).float()
            with autocast(device):
                logits = model(xb)
            loss = masked_bce(logits.float(), yb, pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            total_loss += loss.item() * len(xb)
            seen += len(xb)
        losses.append(total_loss / max(seen, 1))
        if progress is not None:
            progress((epoch + 1) / cfg.epochs, f"epoch {epoch + 1}/{cfg.epochs} loss {losses[-1]:.4f}")
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model: FMCTClassifier, x: torch.Tensor | Iterable[torch.Tensor], device: torch.device,
                   batch_size: int = 16) -> np.ndarray:
    """Logits for a tensor [N, C, D, H, W] (batched here) or an iterable of ready batches."""
    model.to(device).eval()
    chunks = (x[i : i + batch_size] for i in range(0, len(x), batch_size)) if torch.is_tensor(x) else x
    out = []
    for xb in chunks:
        with autocast(device):
            out.append(model(xb.to(device).float()).float().cpu())
    return torch.cat(out).numpy()
