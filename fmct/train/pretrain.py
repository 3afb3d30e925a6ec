"""Self-supervised pretraining loop: DINO + iBOT (+ masked reconstruction) on head CTs.

    python -m fmct.train.pretrain --config cfg.yaml --out RUN_DIR [--resume] [--seed N]
    torchrun --nproc_per_node 4 -m fmct.train.pretrain --config cfg.yaml --out RUN_DIR

A run folder holds config.json (the resolved config, seed and world size), losses.jsonl (one
line per step), checkpoints/ (see fmct.train.checkpoint) and, when finished, bundle/: a model
bundle with no tasks whose weights are the teacher encoder's (``encoder.*``), ready for
fine-tuning. The data side (volumes, a prepared cache read through its index, step -> batch) is
fmct.train.pretrain_data; crops are made per sample by the loader, or batched on the training
device (run.crops, fmct.ssl.batched_crops; the default on CUDA).

Resume is exact: the data order comes from DistributedSampler(seed, epoch), every sample's
crops from a generator seeded by (seed, epoch, index), device-side noise from (seed, step, rank),
the masks from (seed, step, rank), and
the checkpoint carries everything else (student, teacher, centers, optimizer, scheduler, RNG
states, step and data position). So a run killed at any point and resumed logs the same losses
as one that never stopped. Ctrl-C (SIGINT) finishes the current step, saves and exits with 130.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fmct.conventions.atomic import disk_full_error, is_disk_full
from fmct.conventions.errors import Cancelled, ConfigError, FMCTError, ResumeMismatchError, TrainingDivergedError
from fmct.ssl.batched_crops import BatchedMultiCrop
from fmct.ssl.config import SSLConfig
from fmct.ssl.ema import cosine, teacher_momentum, teacher_temperature
from fmct.ssl.meta_arch import SelfDistillation
from fmct.train import checkpoint as ckpt
from fmct.train.pretrain_args import build_parser, config_from_args  # noqa: F401  (re-exported)
from fmct.train.pretrain_data import (  # noqa: F401  (re-exported: the data side of the loop)
    StepBatches, TensorVolumes, VolumeDataset, device_crops, load_dataset, make_phantom_tensors, preprocess_spec,
    resolve_workers, step_batches, view_calibration)
from fmct.train import distributed as ddp
from fmct.conventions.runtime import CancelCheck, Progress, autocast

log = logging.getLogger("fmct.train.pretrain")

CONFIG_FILE = "config.json"
LOSS_LOG = "losses.jsonl"
VIEW_CHECK = "view_check.json"  # the data's view calibration, measured at the start of a run
CHECKPOINT_DIR = "checkpoints"
BUNDLE_DIR = "bundle"


# ============================================================================ optimisation
def param_groups(student: torch.nn.Module, cfg: SSLConfig) -> list[dict[str, Any]]:
    """The student's AdamW groups: the encoder declares its own (ViT3D.param_groups: no decay on
    norms, biases, tokens and positions; the patch embedding at optim.patch_embed_lr_mult of the lr),
    the heads add theirs. Each group has an "lr_scale" and a "wd_scale" the schedules multiply."""
    o = cfg.optim
    groups = student.backbone.param_groups(o.weight_decay, patch_embed_lr_mult=o.patch_embed_lr_mult, prefix="backbone.")
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad or name.startswith("backbone."):
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups += [{"params": decay, "weight_decay": o.weight_decay, "wd_scale": 1.0, "lr_scale": 1.0},
               {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0, "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = o.lr * g["lr_scale"]
        g.pop("names", None)
    return groups


def weight_decay_at(step: int, cfg: SSLConfig) -> float:
    """Cosine weight-decay schedule from optim.weight_decay to optim.weight_decay_end (DINOv2)."""
    return cosine(step, cfg.optim.steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)


def clip_parts(student: torch.nn.Module, max_norm: float) -> None:
    """Clip the backbone and each head on its own, as DINOv2 does: one huge head gradient must not
    shrink the backbone's step."""
    for part in ("backbone", "dino_head", "ibot_head", "pixel_decoder"):
        module = getattr(student, part, None)
        if module is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def cancel_last_layer_gradients(student: torch.nn.Module) -> None:
    """The prototypes stay put while the rest of the head settles (DINOv2's freeze_last_layer)."""
    for name, p in student.named_parameters():
        if ".last_layer." in f".{name}" and p.grad is not None:
            p.grad = None


def lr_factor(cfg: SSLConfig) -> Callable[[int], float]:
    o = cfg.optim
    return lambda step: cosine(step, o.steps, 1.0, o.min_lr / o.lr, o.warmup_steps, 0.0) if o.lr > 0 else 0.0


class CollapseWatch:
    """Warns once when self-distillation is learning nothing, judged from what the features do.

    Entropy alone misleads (a very sharp teacher gives low-entropy targets on features that encode
    nothing), so over the last ``patience`` steps, past ``min_step``, the mean of
    - ``feature_spread`` (std of the normalised teacher CLS across the batch) below ``min_spread``:
      collapsed, every CT gets the same feature;
    - or ``dino_global_over_log_k`` (the DINO loss of the global views over log K; local crops are
      harder) above ``max_loss_ratio`` with ``view_gap`` below ``min_gap``: the loss sits at log(K)
      and the two views of one CT are no more alike than two CTs (uniform targets, nothing learnt).
    The run goes on (masked reconstruction, if on, still trains the encoder), but the log says
    what to change, from what the run measured (view calibration, temperature vs logit spread).
    """

    def __init__(self, cfg: SSLConfig, patience: int = 20, min_step: int | None = None, min_spread: float = 0.1,
                 max_loss_ratio: float = 0.97, min_gap: float = 0.03) -> None:
        self.cfg, self.patience = cfg, patience
        self.min_step = cfg.dino.warmup_teacher_temp_steps if min_step is None else min_step
        self.min_spread, self.max_loss_ratio, self.min_gap = min_spread, max_loss_ratio, min_gap
        self.recent: list[dict[str, float]] = []
        self.warned = False

    def verdict(self) -> str | None:
        """'collapsed', 'not learning' or None, from the recent window."""
        if len(self.recent) < self.patience:
            return None
        loss_key = "dino_global_over_log_k" if "dino_global_over_log_k" in self.recent[-1] else "dino_over_log_k"
        mean = {k: sum(r.get(k, 0.0) for r in self.recent) / len(self.recent) for k in ("feature_spread", "view_gap")}
        mean["dino_over_log_k"] = sum(r.get(loss_key, 0.0) for r in self.recent) / len(self.recent)
        if "feature_spread" in self.recent[-1] and mean["feature_spread"] < self.min_spread:
            return "collapsed"
        if mean["dino_over_log_k"] > self.max_loss_ratio and mean["view_gap"] < self.min_gap:
            return "not learning"
        return None

    def __call__(self, step: int, record: dict[str, float]) -> bool:
        """True on the step the warning is issued."""
        if step <= self.min_step:
            return False
        self.recent = (self.recent + [record])[-self.patience:]
        if self.warned:
            return False
        verdict = self.verdict()
        if verdict is None:
            return False
        self.warned = True
        r = {k: sum(x.get(k, 0.0) for x in self.recent) / len(self.recent) for k in record if isinstance(record[k], (int, float))}
        log.warning("step %d: self-distillation is %s (last %d steps: feature spread %.3f, view gap %.3f, DINO loss "
                    "%.2f x log K, teacher entropy %.3f): DINO/iBOT teach the encoder nothing so far%s. Try %s.",
                    step, verdict, len(self.recent), r.get("feature_spread", 0.0), r.get("view_gap", 0.0),
                    r.get("dino_over_log_k", 0.0), r.get("teacher_entropy", 0.0),
                    " (masked reconstruction still does)" if self.cfg.mae.enabled else "", self.remedies(r))
        return True

    def remedies(self, r: dict[str, float] | None = None) -> str:
        r, d, c, tips = r or {}, self.cfg.dino, self.cfg.crops, []
        if r.get("pixel_view_ratio", 0.0) > 0.9:
            tips.append(f"milder views (two views of one CT differ {r['pixel_view_ratio']:.2f}x as much as two CTs do: "
                        "raise crops.global_scale, lower crops.aspect_jitter, max_rotation_deg, window_scale, window_shift, "
                        "noise_std)")
        spread = r.get("teacher_logit_spread", 0.0)
        if spread and d.teacher_temp > 2 * spread:
            tips.append(f"a lower dino.warmup_teacher_temp / teacher_temp (the teacher's logits vary by {spread:.3f} "
                        f"across the batch; at temperature {d.teacher_temp:g} its targets are near uniform)")
        if c.n_local > 0 and c.local_start_step == 0:
            tips.append("crops.local_start_step > 0 (global views first)")
        if d.centering != "sinkhorn_knopp":
            tips.append("dino.centering: sinkhorn_knopp")
        elif d.sinkhorn_queue == 0 and 2 * self.cfg.optim.batch_size < d.out_dim:
            tips.append("dino.sinkhorn_queue: 256 (more rows than the batch's to equipartition over)")
        if d.out_dim > 1024:
            tips.append("a smaller dino.out_dim (e.g. 1024)")
        if not self.cfg.mae.enabled:
            tips.append("mae.enabled: true")
        tips += ["a larger optim.batch_size (more processes)", "more varied data"]
        return "; ".join(tips)


# ============================================================================ the loop
@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    losses: list[dict[str, float]] = field(default_factory=list)
    bundle: Path | None = None
    model: SelfDistillation | None = field(default=None, repr=False)  # student + teacher, for callers in-process


class _StopRequest:
    """Turns SIGINT into a flag checked between steps, so a checkpoint is never of half a step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _any_rank(flag: bool, info: ddp.DistInfo, device: torch.device) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(values: dict[str, torch.Tensor], info: ddp.DistInfo) -> dict[str, float]:
    keys = sorted(values)
    t = torch.stack([values[k].detach().float() for k in keys])
    if info.enabled:
        torch.distributed.all_reduce(t)
        t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.cpu())}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _truncate_log(path: Path, step: int) -> list[dict[str, float]]:
    """Keep only the log lines of steps a resumed run will not redo (a killed run may have logged more)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if rec.get("step", 0) <= step:
            kept.append(rec)
    ckpt.atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept


@dataclass
class _Run:
    """What one pretraining process holds while it runs: the pieces the step, checkpoint and resume share."""

    cfg: SSLConfig
    run_dir: Path
    info: ddp.DistInfo
    device: torch.device
    dataset: VolumeDataset
    batches: StepBatches
    model: SelfDistillation
    student: torch.nn.Module  # model.student, wrapped in DDP under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    crop: BatchedMultiCrop | None = None  # crops made on the device (run.crops), else by the loader

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOSS_LOG

    def config_record(self) -> dict[str, Any]:
        return {**self.cfg.resolved_dict(), "seed": self.cfg.run.seed, "world_size": self.info.world_size}

    def save(self, step: int) -> None:
        """Checkpoint everything resume needs (rank 0 writes; every rank waits for it)."""
        if self.info.is_main:
            tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
            opt_tensors, opt_meta = ckpt.optimizer_state(self.opt)
            rng_tensors, rng_meta = ckpt.rng_state()
            epoch, position = self.batches.position(step)
            meta = {"data": {"epoch": epoch, "position": position, "steps_per_epoch": self.batches.steps_per_epoch},
                    "optimizer": opt_meta, "scheduler": self.sched.state_dict(),  # JSON-safe: lr_lambdas entry is None
                    "rng": rng_meta, "seed": self.cfg.run.seed, "world_size": self.info.world_size}
            ckpt.save_checkpoint(self.ckpt_dir, step, {**tensors, **opt_tensors, **rng_tensors}, meta,
                                 self.cfg.run.keep_checkpoints)
        ddp.barrier()


def _open_run(cfg: SSLConfig, run_dir: Path, dataset: VolumeDataset | None) -> _Run:
    """Join the process group, seed, load the data, build the model, optimizer and schedule."""
    kind = ddp.process_group_kind(cfg.run.device)
    info = ddp.init_from_env(kind)
    device = ddp.device_for(info, kind if cfg.run.device == "auto" else cfg.run.device)
    if cfg.run.num_threads > 0:
        torch.set_num_threads(cfg.run.num_threads)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.run.seed)
    dataset = dataset if dataset is not None else load_dataset(cfg, info)
    on_device = cfg.run.crops == "device" or (cfg.run.crops == "auto" and device.type == "cuda")
    batches = StepBatches(dataset, cfg, info, on_device=on_device)
    model = SelfDistillation(cfg).to(device)
    student = ddp.wrap_ddp(model.student, info, device)
    if info.enabled:  # DDP broadcast rank 0's student; the teacher starts as its copy everywhere
        model.teacher.load_state_dict({k: v for k, v in model.student.state_dict().items()
                                       if k in model.teacher.state_dict()})
    opt = torch.optim.AdamW(param_groups(model.student, cfg), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    crop = BatchedMultiCrop(cfg.crops, preprocess_spec(cfg).windows) if on_device else None
    return _Run(cfg, run_dir, info, device, dataset, batches, model, student, opt, sched, crop)


def _restore(run: _Run) -> int:
    """Load the last checkpoint into the run; the step it was taken at (0 when there is none)."""
    found = ckpt.load_checkpoint(run.ckpt_dir)
    if found is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", run.ckpt_dir)
        return 0
    check_resume_config(run.run_dir / CONFIG_FILE, run.config_record())
    try:
        run.model.load_state_dict(ckpt.subset(found.tensors, "model"))
        ckpt.load_optimizer_state(run.opt, found.tensors, found.meta["optimizer"])
        run.sched.load_state_dict(found.meta["scheduler"])
        ckpt.set_rng_state(found.tensors, found.meta["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot resume from {found.path}: the checkpoint does not fit this model and optimizer "
                          f"({str(e).splitlines()[0][:200]}). Resume with the run's own config, or start a new "
                          "run in another --out folder.") from e
    log.info("resumed from %s (step %d)", found.path.name, found.step)
    return found.step


def _start_records(run: _Run, resume: bool, start: int) -> list[dict[str, float]]:
    """Rank 0: the loss log cut to the steps kept (empty for a new run), config.json, and at step 0
    the view calibration. Returns the kept log records."""
    history: list[dict[str, float]] = []
    if run.info.is_main:
        history = _truncate_log(run.log_path, start) if resume else []
        if not resume and run.log_path.exists():
            run.log_path.unlink()
        ckpt.atomic_write(run.run_dir / CONFIG_FILE, json.dumps(run.config_record(), indent=2).encode())
    ddp.barrier()
    if run.info.is_main and start == 0:
        check = view_calibration(run.dataset, run.cfg)
        ckpt.atomic_write(run.run_dir / VIEW_CHECK, json.dumps(check, indent=2).encode())
        too_far = check["pixel_view_ratio"] > 0.95
        (log.warning if too_far else log.info)(
            "views: two global views of one CT differ %.2fx as much as views of two CTs (pixel rms, %d volumes)%s",
            check["pixel_view_ratio"], check["volumes"],
            "; DINO cannot match views this different: use milder crops (see CollapseWatch's advice)" if too_far else "")
    return history


def _train_step(run: _Run, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """One optimisation step (student update, then the teacher's EMA); the step's log record."""
    cfg, model, opt = run.cfg, run.model, run.opt
    total = cfg.optim.steps
    temp = teacher_temperature(step, cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp, cfg.dino.warmup_teacher_temp_steps)
    momentum = teacher_momentum(step, total, cfg.optim.momentum_teacher, cfg.optim.final_momentum_teacher)
    with autocast(run.device):
        losses = model(batch, temp, run.student)
    if not torch.isfinite(losses["loss"]):
        raise TrainingDivergedError(f"pretraining loss is {float(losses['loss'].detach())} at step {step + 1}; lower "
                                    f"optim.lr (now {cfg.optim.lr:g}) or raise optim.warmup_steps, then "
                                    "start again or --resume from the last checkpoint")
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if step < cfg.optim.freeze_last_layer_steps:
        cancel_last_layer_gradients(model.student)
    if cfg.optim.clip_grad > 0:
        clip_parts(model.student, cfg.optim.clip_grad)
    lr = cfg.optim.lr * lr_factor(cfg)(step)  # the base lr; groups run at lr * lr_scale
    wd = weight_decay_at(step, cfg)
    for g in opt.param_groups:
        g["weight_decay"] = wd * g.get("wd_scale", 1.0)
    opt.step()
    run.sched.step()
    model.update_teacher(momentum)
    return {"step": step + 1, **_mean_over_ranks(losses, run.info), "lr": lr, "weight_decay": wd,
            "teacher_temp": temp, "momentum": momentum}


def _loop(run: _Run, start: int, history: list[dict[str, float]], progress: Progress | None,
          cancel: CancelCheck | None) -> int:
    """Steps start..optim.steps: log, checkpoint every run.checkpoint_every, stop cleanly on cancel or
    Ctrl-C (after a checkpoint). Returns the step reached."""
    cfg, info = run.cfg, run.info
    total, step, saved_at = cfg.optim.steps, start, start
    watch = CollapseWatch(cfg)
    workers = resolve_workers(cfg.run.workers, run.device)
    if workers:
        log.info("%s by %d DataLoader worker(s)", "volumes read" if run.crop else "crops made", workers)
    if run.crop is not None:
        log.info("crops made on %s, batched", run.device)
    feed = step_batches(run.batches, start, total, workers, pin=run.device.type == "cuda")
    log_file = open(run.log_path, "a") if info.is_main else None
    try:
        with _StopRequest() as stop:
            while step < total:
                cancelled = cancel is not None and cancel()
                if _any_rank(stop.requested or cancelled, info, run.device):
                    if step != saved_at:
                        run.save(step)
                    if cancelled:
                        raise Cancelled(f"pretraining cancelled at step {step}; --resume continues from there")
                    raise KeyboardInterrupt
                batch = {k: v.to(run.device, non_blocking=True) for k, v in next(feed).items()}
                if run.crop is not None:
                    batch = device_crops(run.crop, batch)
                record = _train_step(run, batch, step)
                step += 1
                history.append(record)
                if log_file is not None:
                    watch(step, record)
                    _append_line(log_file, json.dumps(record), run.log_path)
                if step % cfg.run.checkpoint_every == 0 or step == total:
                    run.save(step)
                    saved_at = step
                if progress is not None and info.is_main:
                    progress(step / total, f"step {step}/{total} loss {record['loss']:.4f}")
    finally:
        feed = None  # a DataLoader iterator's workers stop when it goes
        if log_file is not None:
            with contextlib.suppress(OSError):  # every line was flushed already; a full disk is reported above
                log_file.close()
    return step


def pretrain(cfg: SSLConfig, run_dir: str | Path, resume: bool = False, dataset: VolumeDataset | None = None,
             progress: Progress | None = None, cancel: CancelCheck | None = None) -> PretrainResult:
    """Run (or continue, with resume=True) self-supervised pretraining into run_dir.

    progress(fraction, message) is called on rank 0 after each step (its log line and any
    checkpoint are written by then). Raises Cancelled when cancel() turns true and
    KeyboardInterrupt on Ctrl-C, in both cases after writing a checkpoint that --resume continues from.
    """
    run = _open_run(cfg, Path(run_dir), dataset)
    start = _restore(run) if resume else 0
    history = _start_records(run, resume, start)
    step = _loop(run, start, history, progress, cancel)
    bundle = _write_bundle(run.model, cfg, run.run_dir, step) if run.info.is_main else None
    ddp.barrier()
    return PretrainResult(run.run_dir, step, history, bundle, run.model)


# Settings a resumed run may change: they do not change what the run computes (the device and thread
# count change only float rounding; optim.steps is how long to go on).
RESUME_MAY_CHANGE = ("run.device", "run.checkpoint_every", "run.keep_checkpoints", "run.num_threads", "run.workers",
                     "optim.steps", "data.verify")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_resume_config(stored_path: Path, new: dict[str, Any]) -> None:
    """Refuse --resume with a config that changes the run (seed, data, model, losses, crops, optimizer),
    naming the fields: the steps already done ran with the stored one, and config.json must stay true."""
    try:
        stored = json.loads(Path(stored_path).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot resume: {stored_path} is unreadable ({e}); start a new run in another --out") from e
    old, now = _flatten(stored), _flatten(json.loads(json.dumps(new)))
    changed = sorted(k for k in set(old) | set(now)
                     if old.get(k, "<missing>") != now.get(k, "<missing>") and not k.startswith(RESUME_MAY_CHANGE))
    if changed:
        shown = "; ".join(f"{k}: {old.get(k, '<missing>')!r} -> {now.get(k, '<missing>')!r}" for k in changed[:6])
        raise ResumeMismatchError(
            f"cannot --resume {stored_path.parent}: the config differs from the run's own in {len(changed)} field(s) "
            f"that change the run ({shown}{'; ...' if len(changed) > 6 else ''}). Resume with the same config (only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change), or start a new run in another --out folder.")
    if old.get("optim.steps") != now.get("optim.steps"):
        log.warning("--resume with optim.steps %s instead of %s: the learning-rate and teacher-momentum schedules "
                    "stretch to the new length", now.get("optim.steps"), old.get("optim.steps"))


def _write_bundle(model: SelfDistillation, cfg: SSLConfig, run_dir: Path, steps: int) -> Path:
    """The teacher encoder as a task-less bundle (DINO's teacher is the better encoder)."""
    from fmct.inference.bundle import BundleMeta, save_bundle
    from fmct.models import FMCTClassifier

    enc = cfg.encoder_config
    encoder = FMCTClassifier(enc, 0)
    encoder.encoder.load_state_dict(model.teacher.backbone.state_dict())
    meta = BundleMeta(
        name="fmct-pretrained-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", run_dir.name).strip("-")[:60] or "run"), encoder=enc,
        preprocessing=preprocess_spec(cfg),
        tasks=[], description="Self-supervised (DINO + iBOT) pretrained encoder; fine-tune it to add tasks.",
        provenance={"recipe": "fmct.train.pretrain", "steps": steps, "seed": cfg.run.seed, "config": cfg.resolved_dict()},
    )
    return save_bundle(encoder.cpu(), meta, run_dir / BUNDLE_DIR)


# ============================================================================ command line
def _append_line(f: Any, line: str, path: Path) -> None:
    """One line of the loss log, flushed; a full disk is the user's to fix (one line, exit 2), not a traceback."""
    try:
        f.write(line + "\n")
        f.flush()
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path.parent, path.name, len(line) + 1) from None
        raise


def _check_run_folder(args: argparse.Namespace) -> None:
    """An --out holding an earlier run: refused unless --resume or --overwrite (fmct.train.run_folder);
    checked by the main process only (under torchrun the others wait for it and stop with it)."""
    from fmct.conventions.runtime import torchrun_rank
    from fmct.train.run_folder import check_training_out, clear_run

    if not torchrun_rank().is_main:
        return
    overwrite = getattr(args, "overwrite", False)
    if args.resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    check_training_out(args.out, "pretrain", resume=args.resume, overwrite=overwrite)
    if overwrite:
        clear_run(args.out, (CHECKPOINT_DIR, LOSS_LOG, CONFIG_FILE, VIEW_CHECK, BUNDLE_DIR))


def run_from_args(args: argparse.Namespace, on_step: Progress | None = None) -> int:
    """`fmct pretrain` once parsed: exit 0 done, 2 a user error, 130 interrupted (checkpoint saved).

    on_step(fraction, message): called after each step besides the progress bar (an embedding
    program's hook, e.g. a test that paces the steps so a signal lands mid-run)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        _check_run_folder(args)
        bar = None
        from fmct.conventions.runtime import torchrun_rank

        is_main = torchrun_rank().is_main
        if is_main and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.optim.steps, desc="pretrain", unit="step")

        def progress(fraction: float, message: str) -> None:
            if bar is not None:
                bar.n = round(fraction * cfg.optim.steps)
                bar.set_postfix_str(message.split(" ", 2)[-1])  # "loss 1.2345"
                bar.refresh()
            if on_step is not None:
                on_step(fraction, message)

        try:
            result = pretrain(cfg, args.out, resume=args.resume, progress=progress)
        finally:
            if bar is not None:
                bar.close()
        if result.bundle is not None:
            last = result.losses[-1] if result.losses else {}
            if last:
                print(f"step {result.steps}: DINO loss {last.get('dino_over_log_k', float('nan')):.3f} x log K, view gap "
                      f"{last.get('view_gap', float('nan')):.3f}, feature spread {last.get('feature_spread', float('nan')):.3f}")
            print(f"pretrained encoder bundle: {result.bundle}")
            print(f"embed your CTs with it: fmct embed DATA --model {result.bundle} --out features.npz")
        return 0
    except KeyboardInterrupt:
        print(f"interrupted; checkpoint saved in {Path(args.out) / CHECKPOINT_DIR}; continue with --resume", file=sys.stderr)
        return 130
    except FMCTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ddp.shutdown()


def main(argv: Sequence[str] | None = None, on_step: Progress | None = None) -> int:
    """`python -m fmct.train.pretrain` (what torchrun starts): the same options as `fmct pretrain`."""
    return run_from_args(build_parser().parse_args(argv), on_step)


if __name__ == "__main__":
    sys.exit(main())
