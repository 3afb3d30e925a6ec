"""Self-distillation losses: DINO on the CLS token, iBOT on masked patch tokens, and masked
voxel reconstruction (MAE/SimMIM-style) as an option.

The teacher's targets are made sharp (low temperature) and balanced (centering, or
Sinkhorn-Knopp) before the student is asked to match them; sharpening alone collapses to one
prototype and balancing alone to a uniform output, together neither happens. Centers are
buffers, so they travel with checkpoints. In a distributed run the batch statistics are
all-reduced, so every rank holds the same center.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x)
    return x


class _TeacherTargets(nn.Module):
    """Turns teacher logits [M, K] into target distributions: centered softmax or Sinkhorn-Knopp."""

    def __init__(self, out_dim: int, center_momentum: float, queue_size: int = 0) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Batch-size-aware Sinkhorn-Knopp: equipartition over this batch plus the last queue_size rows of
        # teacher logits (as SwAV's queue). With M rows and K prototypes, plain Sinkhorn-Knopp must spread
        # every row over K/M prototypes, which floors the target entropy at log(K/M)/log(K) (0.6 at
        # 16 rows, 1024 prototypes) however well the teacher knows the image.
        self.queue_size = int(queue_size)
        self.register_buffer("queue", torch.zeros(self.queue_size, out_dim))
        self.register_buffer("queue_fill", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def softmax_center(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the (global) batch mean of the teacher logits; a batch with no tokens leaves it."""
        total = _all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        count = _all_reduce_sum(torch.tensor([float(teacher_logits.shape[0])], device=total.device))
        if float(count) > 0:  # every rank sees the same count, so all skip together
            self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp(self, teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
        """Equipartition the batch over the prototypes (SwAV/DINOv2); rows of the result sum to 1."""
        n_now = teacher_logits.shape[0]
        raw = teacher_logits.float()
        if self.queue_size > 0:
            fill = int(self.queue_fill)
            raw = torch.cat([raw, self.queue[:fill]])
            self._enqueue(teacher_logits.float())
        logits = raw / temp
        m = _all_reduce_sum(torch.tensor([float(logits.shape[0])], device=logits.device))
        if float(m) == 0:  # no masked tokens anywhere this step
            return logits
        top = logits.max().detach().clone() if logits.numel() else logits.new_tensor(float("-inf"))
        if _distributed():
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        q = torch.exp(logits - top).t()  # [K, M]; shifting by the global max only avoids overflow
        k = q.shape[0]
        q /= _all_reduce_sum(q.sum()).clamp(min=1e-30)
        for _ in range(n_iterations):
            q /= _all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp(min=1e-30)
            q /= k
            q /= q.sum(dim=0, keepdim=True).clamp(min=1e-30)
            q /= m
        return (q * m).t()[:n_now]

    @torch.no_grad()
    def _enqueue(self, rows: torch.Tensor) -> None:
        """Newest rows first; the oldest fall off the end (a buffer, so checkpoints carry it)."""
        rows = rows.detach()[: self.queue_size]
        if rows.shape[0] == 0:
            return
        self.queue.copy_(torch.cat([rows, self.queue])[: self.queue_size])
        self.queue_fill.fill_(min(int(self.queue_fill) + rows.shape[0], self.queue_size))

    def targets(self, teacher_logits: torch.Tensor, temp: float, method: str) -> torch.Tensor:
        """Targets for these logits; the center moves only with a centered softmax."""
        if method == "sinkhorn_knopp":
            return self.sinkhorn_knopp(teacher_logits, temp)
        out = self.softmax_center(teacher_logits, temp)
        self.update_center(teacher_logits)
        return out


class DINOLoss(_TeacherTargets):
    """Cross-entropy between every teacher global view and every *other* student view."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, queue_size: int = 0) -> None:
        super().__init__(out_dim, center_momentum, queue_size)
        self.student_temp = student_temp

    def forward(self, student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor]) -> torch.Tensor:
        """student_logits: one [B, K] per view (globals first); teacher_probs: one [B, K] per global view."""
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher_probs):
            for v, s in enumerate(student_logits):
                if v == iq:  # a view predicting itself teaches nothing
                    continue
                total = total + torch.sum(-q * F.log_softmax(s.float() / self.student_temp, dim=-1), dim=-1).mean()
                terms += 1
        return total / max(terms, 1)


class IBOTPatchLoss(_TeacherTargets):
    """Student masked patch tokens predict the teacher's tokens at the same (unmasked) positions."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, queue_size: int = 0) -> None:
        super().__init__(out_dim, center_momentum, queue_size)
        self.student_temp = student_temp

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """student_logits, teacher_probs: [M, K] for the M masked tokens (in masks[masks] order); masks [B, N].

        Each masked image weighs the same however many patches it hides, and the sum is divided by
        all images of the batch, masked or not, as DINOv2 does (dividing by the masked ones only
        weighed iBOT ~1/mask_probability times more than its loss_weight says).
        """
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0  # keeps the head in the graph (DDP needs every parameter used)
        per_token = torch.sum(-teacher_probs * F.log_softmax(student_logits.float() / self.student_temp, dim=-1), dim=-1)
        counts = masks.sum(dim=-1, keepdim=True).clamp(min=1).expand_as(masks)[masks].float()
        return (per_token / counts).sum() / max(masks.shape[0], 1)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate of L2-normalised features [B, D] (DINOv2), as a loss.

    Minus the mean log distance from each feature to its nearest neighbour in the batch: it
    pushes a batch's CLS features apart, DINOv2's guard against collapse when the images all
    look alike. On our phantoms at batch 8 it did not stop the collapse (benchmarks/HISTORY.md#history-8).
    """
    x = F.normalize(features.float(), dim=-1, eps=eps)
    if x.shape[0] < 2:
        return x.sum() * 0.0
    dist = torch.cdist(x, x)
    dist = dist + torch.eye(len(x), device=x.device, dtype=x.dtype) * 1e9  # never one's own neighbour
    return -torch.log(dist.min(dim=1).values + eps).mean()


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error over hidden patches only; pred/target [B, N, P], masks [B, N].

    norm_pix normalises each target patch (MAE): the model then learns structure, not the
    overall brightness that window jitter randomises anyway.
    """
    target = target.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    err = ((pred.float() - target) ** 2).mean(dim=-1)
    return (err * masks).sum() / masks.sum().clamp(min=1)
