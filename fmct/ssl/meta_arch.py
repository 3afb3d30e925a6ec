"""Student, EMA teacher, heads and losses joined: one call per step returns the losses.

The student is one module with one forward over all views (global crops with masks, local
crops without), so it can be wrapped in DistributedDataParallel as is: DDP expects a single
forward per backward, and with the mask token always in the graph no parameter goes unused.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fmct.models.vit3d import DropPath, ViT3D
from fmct.ssl.config import SSLConfig
from fmct.ssl.ema import update_teacher
from fmct.ssl.heads import DINOHead, PixelDecoder, patchify
from fmct.ssl.losses import DINOLoss, IBOTPatchLoss, koleo_loss, masked_reconstruction_loss
from fmct.ssl.metrics import logit_spread, pixel_view_ratio, view_metrics


@torch.no_grad()
def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the target rows over log(K): 1.0 means the teacher says nothing (uniform collapse).

    DINO's usual failure is silent: the loss settles at log(K) and training "converges" to an
    encoder that encodes nothing. This number makes that visible in losses.jsonl.
    """
    p = probs.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=-1).mean() / math.log(probs.shape[-1])


class Student(nn.Module):
    """backbone + DINO head (+ iBOT head, + pixel decoder): crops -> logits."""

    def __init__(self, cfg: SSLConfig) -> None:
        super().__init__()
        enc = cfg.encoder_config
        d = cfg.dino
        self.backbone = ViT3D(enc)
        self.backbone.set_grad_checkpointing(cfg.encoder.grad_checkpointing)
        self.dino_head = DINOHead(enc.embed_dim, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.nlayers)
        self.ibot_head = (DINOHead(enc.embed_dim, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.nlayers)
                          if cfg.ibot.enabled and cfg.ibot.separate_head else None)
        self.pixel_decoder = PixelDecoder(enc.embed_dim, enc.in_chans, enc.patch_size) if cfg.mae.enabled else None

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.backbone.forward_features(global_crops, masks)
        cls = [g["cls"]]
        if local_crops.shape[0]:
            cls.append(self.backbone.forward_features(local_crops)["cls"])
        out = {"cls_logits": self.dino_head(torch.cat(cls)), "global_cls": g["cls"]}
        masked_tokens = g["patch"][masks]  # [M, D]
        out["patch_logits"] = self.patch_head()(masked_tokens)
        if self.pixel_decoder is not None:
            out["pixels"] = self.pixel_decoder(g["patch"])
        return out


class Teacher(nn.Module):
    """The EMA copy: backbone + the heads it needs; never receives gradients, always in eval mode.

    The student's stochastic depth is switched off in the copy (DINOv2's teacher has
    drop_path 0), and ``train()`` never puts it back in training mode: the targets must be
    the deterministic output of the averaged weights.
    """

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)
        self.dino_head = copy.deepcopy(student.dino_head)
        self.ibot_head = copy.deepcopy(student.ibot_head) if student.ibot_head is not None else None
        for p in self.parameters():
            p.requires_grad = False
        for m in self.modules():
            if isinstance(m, DropPath):
                m.p = 0.0
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    @torch.no_grad()
    def forward(self, global_crops: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.backbone.forward_features(global_crops)
        return {"cls_logits": self.dino_head(g["cls"]), "patch_logits": self.patch_head()(g["patch"][masks]), "cls": g["cls"]}


class SelfDistillation(nn.Module):
    """DINO + iBOT (+ masked reconstruction). ``student`` may be replaced by a DDP wrapper of itself."""

    def __init__(self, cfg: SSLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = Student(cfg)
        self.teacher = Teacher(self.student)
        q = cfg.dino.sinkhorn_queue if cfg.dino.centering == "sinkhorn_knopp" else 0
        self.dino_loss = DINOLoss(cfg.dino.out_dim, cfg.dino.student_temp, cfg.dino.center_momentum, q)
        self.ibot_loss = IBOTPatchLoss(cfg.dino.out_dim, cfg.dino.student_temp, cfg.dino.center_momentum, q)

    def forward(self, batch: dict[str, torch.Tensor], teacher_temp: float, student: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Losses of one step; batch holds "global" [2B, ...], "local" [nB, ...], "masks" [2B, N]."""
        student = student if student is not None else self.student
        cfg = self.cfg
        glob, loc, masks = batch["global"], batch["local"], batch["masks"]
        n_global = 2
        b = glob.shape[0] // n_global

        t = self.teacher(glob, masks)
        teacher_probs = self.dino_loss.targets(t["cls_logits"], teacher_temp, cfg.dino.centering).chunk(n_global)
        s = student(glob, loc, masks)
        student_views = list(s["cls_logits"].split(b))
        losses = {"dino": self.dino_loss(student_views, list(teacher_probs)) * cfg.dino.loss_weight}
        # What says whether DINO learns (fmct.ssl.metrics); logged, never differentiated.
        losses["teacher_entropy"] = normalized_entropy(torch.cat(teacher_probs))
        losses["dino_over_log_k"] = losses["dino"].detach() / (cfg.dino.loss_weight * math.log(cfg.dino.out_dim)) \
            if cfg.dino.loss_weight > 0 else losses["dino"].detach() * 0.0
        if len(student_views) > n_global:  # the same ratio over the global-view terms alone (local crops are harder)
            with torch.no_grad():
                dino_global = self.dino_loss(student_views[:n_global], list(teacher_probs))
                losses["dino_global_over_log_k"] = dino_global / math.log(cfg.dino.out_dim)
        else:
            losses["dino_global_over_log_k"] = losses["dino_over_log_k"]
        losses.update(view_metrics(*t["cls"].chunk(n_global)))
        losses["pixel_view_ratio"] = pixel_view_ratio(*glob.chunk(n_global))
        losses["teacher_logit_spread"] = logit_spread(t["cls_logits"])
        total = losses["dino"]
        if cfg.dino.koleo_loss_weight > 0:
            losses["koleo"] = sum(koleo_loss(c) for c in s["global_cls"].chunk(n_global)) * cfg.dino.koleo_loss_weight
            total = total + losses["koleo"]
        if cfg.ibot.enabled:
            patch_probs = self.ibot_loss.targets(t["patch_logits"], teacher_temp, cfg.dino.centering)
            losses["ibot"] = self.ibot_loss(s["patch_logits"], patch_probs, masks) * cfg.ibot.loss_weight
            total = total + losses["ibot"]
        else:
            total = total + s["patch_logits"].sum() * 0.0  # keeps DDP's every-parameter-used invariant
        if "pixels" in s:
            target = patchify(glob, cfg.encoder_config.patch_size)
            losses["mae"] = masked_reconstruction_loss(s["pixels"], target, masks, cfg.mae.norm_pix) * cfg.mae.loss_weight
            total = total + losses["mae"]
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_teacher(self.teacher.backbone, self.student.backbone, momentum)
        update_teacher(self.teacher.dino_head, self.student.dino_head, momentum)
        if self.teacher.ibot_head is not None:
            update_teacher(self.teacher.ibot_head, self.student.ibot_head, momentum)
