"""The EMA teacher and the schedules that drive it.

The teacher is never trained by gradients: after each student step its weights move a little
towards the student's (momentum close to 1, rising to final_momentum by a cosine schedule),
which makes it a slowly-moving ensemble of past students and a stable target.
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (names must match)."""
    s_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, p in teacher.named_parameters():
        t_list.append(p)
        s_list.append(s_params[name].detach())
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


def cosine(step: int, total: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from warmup_start to start, then cosine from start to end at step total."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / max(warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / max(total - warmup_steps, 1), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def teacher_momentum(step: int, total: int, start: float, end: float) -> float:
    return cosine(step, total, start, end)


def teacher_temperature(step: int, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """Low (sharp) teacher temperature at first, then linear warm-up: avoids early collapse (DINO)."""
    if step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / max(warmup_steps, 1)
