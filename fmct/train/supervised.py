"""Supervised training of encoder + heads: the loop behind the demo recipe and `fmct finetune`.

Batches come from a callable (in-memory tensors for phantom recipes, a cached DataLoader for
real data), so one loop serves both. Unknown labels (NaN) are masked out of the loss, which
lets partially labelled manifests train every task they do have.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fmct.conventions.errors import Cancelled, ConfigError
from fmct.models import FMCTClassifier
from fmct.conventions.runtime import CancelCheck, Progress, autocast
from fmct.train import checkpoint as ckpt

log = logging.getLogger("fmct.train.supervised")

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
    checkpoints: str | Path | None = None,
    identity: dict | None = None,
) -> list[float]:
    """AdamW with warm-up + cosine decay, bf16 autocast on CUDA; returns the mean loss per epoch.

    checkpoints: a folder; after every epoch the model, optimizer and RNG states go there
    (safetensors + JSON, atomic), and a call with the same folder continues after the last
    finished epoch, exactly as the uninterrupted run would (batch order is a function of the
    epoch). A checkpoint from other settings is refused; identity (JSON) names what else must
    match, such as the training studies.
    """
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
    settings = {"config": asdict(cfg), "steps_per_epoch": steps_per_epoch, "pos_weight": pos_weight.tolist(),
                "parameters": [list(p.shape) for p in model.parameters()], **({"identity": identity} if identity else {})}
    settings = json.loads(json.dumps(settings, default=str))  # as a checkpoint stores it: tuples, paths as JSON has them
    losses, start = (_resume(checkpoints, settings, model, opt, gen) if checkpoints is not None else ([], 0))
    step = start * steps_per_epoch
    for epoch in range(start, cfg.epochs):
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
        if checkpoints is not None:
            _save(checkpoints, epoch + 1, settings, losses, model, opt, gen)
        if progress is not None:
            progress((epoch + 1) / cfg.epochs, f"epoch {epoch + 1}/{cfg.epochs} loss {losses[-1]:.4f}")
    model.eval()
    return losses


def _save(folder: str | Path, epochs_done: int, settings: dict, losses: list[float], model: FMCTClassifier,
          opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    opt_tensors, opt_meta = ckpt.optimizer_state(opt)
    rng_tensors, rng_meta = ckpt.rng_state()
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors, **rng_tensors,
               "rng.augment": gen.get_state()}
    meta = {"epochs_done": epochs_done, "losses": losses, "settings": settings, "optimizer": opt_meta, "rng": rng_meta}
    ckpt.save_checkpoint(folder, epochs_done, tensors, meta)


def _resume(folder: str | Path, settings: dict, model: FMCTClassifier, opt: torch.optim.Optimizer,
            gen: torch.Generator) -> tuple[list[float], int]:
    """(losses so far, epochs done) from the folder's last checkpoint; ([], 0) when it has none."""
    found = ckpt.load_checkpoint(folder)
    if found is None:
        return [], 0
    if found.meta.get("settings") != settings:
        raise ConfigError(f"cannot resume from {found.path}: it was trained with other settings (config, data "
                          "or model); use the same settings, or another checkpoint folder")
    model.load_state_dict(ckpt.subset(found.tensors, "model"))
    ckpt.load_optimizer_state(opt, found.tensors, found.meta["optimizer"])
    ckpt.set_rng_state(found.tensors, found.meta["rng"])
    gen.set_state(found.tensors["rng.augment"])
    log.info("resumed from %s after epoch %d", found.path.name, found.meta["epochs_done"])
    return list(found.meta["losses"]), int(found.meta["epochs_done"])


@torch.no_grad()
def predict_with_features(model: FMCTClassifier, x: torch.Tensor | Iterable[torch.Tensor], device: torch.device,
                          batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, T] and pooled features [N, F] for a tensor [N, C, D, H, W] (batched here) or an
    iterable of ready batches: the one prediction helper of the trainers (calibration, OOD statistics, tests)."""
    model.to(device).eval()
    chunks = (x[i : i + batch_size] for i in range(0, len(x), batch_size)) if torch.is_tensor(x) else x
    logits, features = [], []
    for xb in chunks:
        with autocast(device):
            lg, ft = model.forward_with_features(xb.to(device).float())
        logits.append(lg.float().cpu())
        features.append(ft.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(features).numpy()


def predict_logits(model: FMCTClassifier, x: torch.Tensor | Iterable[torch.Tensor], device: torch.device,
                   batch_size: int = 16) -> np.ndarray:
    """Logits only (see predict_with_features)."""
    return predict_with_features(model, x, device, batch_size)[0]
