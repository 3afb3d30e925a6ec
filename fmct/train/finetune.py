"""Fine-tuning task heads on few labels: from a pretrained encoder bundle or from scratch.

    python -m fmct.cli finetune --config finetune.yaml      (or the options below)

Linear probe (frozen encoder) or full fine-tuning with layer-wise learning-rate decay; an
optional seeded few-label subset (K positives and K negatives per task); class imbalance
handled by per-task positive weights; a temperature and a threshold per task fitted on a
validation split. The output is a model bundle with its validation metrics, which
`fmct analyze` and the Slicer module run unchanged.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmct.inference.bundle import BundleMeta, load_bundle, save_bundle
from fmct.inference.ood import fit_reference
from fmct.conventions.config_file import build_config, read_config_file
from fmct.data.cache import PreparedVolumes, load_studies, open_for
from fmct.data.datasets import CachedVolumeDataset, collate_skip_none
from fmct.conventions.errors import ConfigError
from fmct.conventions.names import check_identifier
from fmct.features.metrics import evaluation_report
from fmct.data.manifests import Manifest, Study
from fmct.models import FMCTClassifier, preset
from fmct.preprocessing.spec import PreprocessSpec
from fmct.inference.calibration import calibrated_probabilities
from fmct.train.calibration import calibrate_tasks
from fmct.train.distributed import barrier, device_for, distributed_sampler, init_from_env, process_group_kind, wrap_ddp
from fmct.train.supervised import SupervisedConfig, positive_weights, predict_with_features, train_classifier
from fmct.conventions.runtime import CancelCheck, Progress, progress_or_silent

log = logging.getLogger("fmct.train.finetune")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; loadable from YAML/JSON, written resolved into the run."""

    data: str = ""
    out: str = "finetuned"
    layout: str = "auto"
    path_prefix: str | None = None  # "OLD=NEW" for FM-HCT's split files: where their img_path folder is here
    val_data: str | None = None
    val_fraction: float = 0.25
    cache_dir: str = ".fmct_cache"
    encoder: str | None = None  # pretrained bundle (no tasks); None trains from scratch
    size: str = "tiny"  # preset when training from scratch
    tasks: list[str] | None = None  # default: every task the manifest labels
    mode: str = "full"  # "full" (layer-wise lr decay) or "linear" (frozen encoder)
    labels_per_class: int | None = None
    epochs: int = 30
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: int = 2
    seed: int = 0
    augment: float = 0.0  # share of training items rescanned at random each epoch (fmct.data.rescan), 0 = off
    device: str = "auto"
    name: str = "fmct-finetuned"
    checkpoints: str | None = None  # a folder: a checkpoint per epoch, and a rerun continues after the last one
    verify: bool = False  # data from `fmct prepare`: check its bytes and source files first (stats every source)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("full", "linear"):
            raise ConfigError(f"finetune: mode '{self.mode}' must be 'full' or 'linear'")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("finetune: val_fraction must be between 0 and 1")
        if not 0.0 <= self.augment <= 1.0:
            raise ConfigError("finetune: augment must be between 0 (off) and 1 (every training item, every epoch)")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ConfigError("finetune: labels_per_class must be a positive integer")
        for key, low in (("epochs", 1), ("batch_size", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"finetune: {key} is {getattr(self, key)}; it must be at least {low}")
        for key in ("lr", "weight_decay", "layer_decay", "warmup_epochs"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
                raise ConfigError(f"finetune: {key} is {value}; it must be a {'positive' if key == 'lr' else 'non-negative'} "
                                  "finite number")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"finetune: layer_decay is {self.layer_decay}; it must be in (0, 1] (1: no decay)")
        check_identifier(self.name, "finetune: name (the bundle's name)", ConfigError)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "FinetuneConfig":
        raw = read_config_file(path)
        return cls.from_dict({**raw, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "FinetuneConfig":
        """Typed: every value converted to its field's type (YAML's string '1e-4' to 0.0001) or refused, naming the key."""
        return build_config(cls, raw, "finetune")


def check_out_is_not_the_encoder(cfg: FinetuneConfig) -> None:
    """An --out that is (or holds) the encoder bundle would destroy what the run starts from."""
    if cfg.encoder and cfg.out:
        encoder, out = Path(cfg.encoder).resolve(), Path(cfg.out).resolve()
        if encoder == out or out in encoder.parents:
            raise ConfigError(f"finetune: --out {cfg.out} would replace the encoder bundle {cfg.encoder} it starts from; "
                              "give another --out")


def check_training_inputs(cfg: FinetuneConfig, tasks: list[str], train: list[Study], val: list[Study]) -> None:
    """Refuse, before any training, what would give a head trained on nothing or an uncalibrated one:
    a task with no labels in the training split, a validation split without a positive of a task
    (its temperature and threshold would be made up), and an --out that is (or holds) the encoder."""
    check_out_is_not_the_encoder(cfg)
    for task in tasks:
        check_identifier(task, f"finetune: task '{task}' (a label column of {cfg.data}; it names the bundle's output "
                               "and its saliency file)", ConfigError)
        known = [s.labels.get(task) for s in train if s.labels.get(task) is not None]
        if not known:
            raise ConfigError(f"finetune: task '{task}' has no labels in the {len(train)} training studies (its column is "
                              f"missing or empty in {cfg.data}); label it, or leave it out of --tasks")
        positives = sum(s.labels.get(task) == 1 for s in val)
        if positives == 0:
            raise ConfigError(f"finetune: the validation split ({len(val)} studies) has no positive for task '{task}', so "
                              "its threshold and calibration cannot be fitted. Give --val-data with positives, raise "
                              "val_fraction, or try another --seed")


def few_label_subset(studies: list[Study], tasks: list[str], k: int, seed: int) -> list[Study]:
    """K positives and K negatives per task (fewer if the data has fewer), seeded; their union."""
    rng = random.Random(seed)
    chosen: dict[str, Study] = {}
    for task in tasks:
        for value in (1, 0):
            pool = [s for s in studies if s.labels.get(task) == value]
            rng.shuffle(pool)
            for s in pool[:k]:
                chosen[s.study_id] = s
    return [s for s in studies if s.study_id in chosen]


def split(manifest: Manifest, fraction: float, seed: int) -> tuple[list[Study], list[Study]]:
    """Train / validation by study: the series of one study (Study.group) never straddle the split."""
    studies = sorted(manifest, key=lambda s: s.study_id)
    if all(s.group is None for s in studies):  # one item per study: the split as it always was
        random.Random(seed).shuffle(studies)
        n_val = max(1, int(round(fraction * len(studies))))
        return studies[n_val:], studies[:n_val]
    groups = sorted({s.study for s in studies})
    random.Random(seed).shuffle(groups)
    val_groups = set(groups[:max(1, int(round(fraction * len(groups))))])
    return [s for s in studies if s.study not in val_groups], [s for s in studies if s.study in val_groups]


def build_model(cfg: FinetuneConfig, n_tasks: int) -> tuple[FMCTClassifier, PreprocessSpec, dict]:
    if cfg.encoder:
        encoder_bundle = load_bundle(cfg.encoder)
        model = FMCTClassifier(encoder_bundle.meta.encoder, n_tasks)
        model.encoder.load_state_dict(encoder_bundle.model.encoder.state_dict())
        origin = {"encoder_bundle": encoder_bundle.meta.name, "encoder_provenance": encoder_bundle.meta.provenance}
        return model, encoder_bundle.meta.preprocessing, origin
    spec = PreprocessSpec()
    model = FMCTClassifier(preset(cfg.size, img_size=spec.tensor_shape, in_chans=spec.in_channels), n_tasks)
    return model, spec, {"encoder_bundle": None, "initialisation": "random (from scratch)"}


@dataclass
class FinetuneResult:
    bundle: Path | None  # written by rank 0 only
    model: FMCTClassifier


def finetune(cfg: FinetuneConfig, progress: Progress | None = None, cancel: CancelCheck | None = None) -> FinetuneResult:
    """Run one fine-tuning job, on one device or under torchrun (DDP; rank 0 calibrates and writes)."""
    if not cfg.data:
        raise ConfigError("finetune: 'data' (a manifest CSV or a folder of studies) is required")
    torch.manual_seed(cfg.seed)
    notify = progress_or_silent(progress)
    info = init_from_env(process_group_kind(cfg.device))  # also refuses an unknown or absent device
    device = device_for(info, cfg.device)
    if cfg.checkpoints and info.enabled:
        raise ConfigError("finetune: checkpoints are kept for single-process runs only (each torchrun rank has its "
                          "own random state, so a resume would not be exact); drop --checkpoints under torchrun")
    studies = _select_studies(cfg)
    model, spec, origin = build_model(cfg, len(studies.tasks))
    notify(0.0, "preparing data")
    train_ds, val_ds = _datasets(cfg, studies, spec, info, cancel)
    losses = _train(cfg, model, train_ds, info, device, notify, cancel)
    if not info.is_main:
        return FinetuneResult(None, model)
    out = _calibrate_and_save(cfg, model, spec, origin, studies.tasks, train_ds, val_ds, losses, info, device, notify)
    notify(1.0, "done")
    return FinetuneResult(out, model)


@dataclass
class _Studies:
    """Which studies train and validate, and on which tasks (and the prepared caches they come from, if any)."""

    tasks: list[str]
    train: list[Study]
    val: list[Study]
    cache: Any = None
    val_cache: Any = None


def _select_studies(cfg: FinetuneConfig) -> _Studies:
    """The tasks and the train / validation studies, refused before any training when they cannot work."""
    manifest, cache = load_studies(cfg.data, cfg.layout, path_prefix=cfg.path_prefix)  # a cache is read through its index
    if cache is not None and cfg.augment > 0:
        raise ConfigError("finetune: --augment rescans the source CTs; it cannot run from a prepared cache. Give the "
                          "study folder as --data, or drop --augment")
    tasks = cfg.tasks or manifest.tasks
    if not tasks:
        raise ConfigError(f"finetune: {cfg.data} has no labels; give a labelled manifest or set 'tasks'")
    val_cache = None
    if cfg.val_data:
        val_manifest, val_cache = load_studies(cfg.val_data, cfg.layout, path_prefix=cfg.path_prefix)
        train_studies, val_studies = list(manifest), list(val_manifest)
    else:
        train_studies, val_studies = split(manifest, cfg.val_fraction, cfg.seed)
    if cfg.labels_per_class:
        train_studies = few_label_subset(train_studies, tasks, cfg.labels_per_class, cfg.seed)
    check_training_inputs(cfg, tasks, train_studies, val_studies)
    log.info("fine-tuning on %d studies, validating on %d, tasks %s", len(train_studies), len(val_studies), tasks)
    return _Studies(list(tasks), train_studies, val_studies, cache, val_cache)


def _datasets(cfg: FinetuneConfig, studies: _Studies, spec: PreprocessSpec, info: Any, cancel: CancelCheck | None):
    """Training and validation datasets: read through a prepared cache's index, or decoded once into
    cfg.cache_dir (rank 0 fills it first; the other ranks then only read it). Validation stays clean."""
    tasks = studies.tasks
    if not info.is_main:
        barrier()
    if studies.cache is not None:
        train_ds = PreparedVolumes(open_for(studies.cache, spec, cfg.verify), spec.windows, tasks,
                                   study_ids=[s.study_id for s in studies.train])
    else:
        train_ds = CachedVolumeDataset(studies.train, spec, cfg.cache_dir, tasks=tasks, augment=cfg.augment,
                                       augment_seed=cfg.seed).prepare(cancel=cancel)
    val_from = studies.val_cache if cfg.val_data else studies.cache
    if val_from is not None:
        val_ds = PreparedVolumes(open_for(val_from, spec, cfg.verify), spec.windows, tasks,
                                 study_ids=[s.study_id for s in studies.val])
    else:
        val_ds = CachedVolumeDataset(studies.val, spec, cfg.cache_dir, tasks=tasks).prepare(cancel=cancel)
    if info.is_main:
        barrier()
    return train_ds, val_ds


def _train(cfg: FinetuneConfig, model: FMCTClassifier, train_ds: Any, info: Any, device: torch.device,
           notify: Progress, cancel: CancelCheck | None) -> list[float]:
    """The supervised loop over the training split (linear probe or full fine-tuning with layer-wise lr decay)."""
    y_train = torch.tensor(np.array([train_ds.label_vector(s) for s in train_ds.studies], dtype=np.float32))
    model.encoder.mask_token.requires_grad_(False)  # only masked image modeling uses it; DDP wants every trained param used
    if cfg.mode == "linear":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    groups = model.param_groups(cfg.weight_decay, cfg.layer_decay if cfg.mode == "full" else 1.0)
    train_cfg = SupervisedConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.warmup_epochs, seed=cfg.seed)
    sampler = distributed_sampler(train_ds, info, cfg.seed) if info.enabled else None

    def batches(epoch: int):
        train_ds.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                                                 collate_fn=collate_skip_none)
        else:
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                                 collate_fn=collate_skip_none)
        return ((b["image"], b["labels"]) for b in loader if b is not None)

    steps = -(-len(train_ds) // (cfg.batch_size * info.world_size))
    trained = wrap_ddp(model.to(device), info, device)
    identity = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "checkpoints")},
                "studies": [str(s.path) for s in train_ds.studies]}
    return train_classifier(trained, batches, steps, positive_weights(y_train, train_cfg.max_pos_weight), train_cfg,
                            device, groups, progress=lambda f, m: notify(0.05 + 0.85 * f, m), cancel=cancel,
                            checkpoints=cfg.checkpoints, identity=identity)


def _calibrate_and_save(cfg: FinetuneConfig, model: FMCTClassifier, spec: PreprocessSpec, origin: dict,
                        tasks: list[str], train_ds: Any, val_ds: Any, losses: list[float], info: Any,
                        device: torch.device, notify: Progress) -> Path:
    """Calibrate each task on the validation split, fit the out-of-distribution statistics (training split:
    reference; validation split: threshold) and write the bundle."""
    notify(0.92, "calibrating on the validation split")
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size, collate_fn=collate_skip_none)
    val_logits, val_features = predict_with_features(model, (b["image"] for b in val_loader if b is not None), device)
    y_val = np.array([val_ds.label_vector(s) for s in val_ds.studies], dtype=np.float64)
    task_meta = calibrate_tasks(tasks, val_logits, y_val)
    val_probs = calibrated_probabilities(val_logits, [t.temperature for t in task_meta])
    metrics = {"validation": evaluation_report(y_val, val_probs, tasks, [t.threshold for t in task_meta])}
    meta = BundleMeta(
        name=cfg.name, encoder=model.encoder.cfg, preprocessing=spec, tasks=task_meta,
        description=f"Fine-tuned ({cfg.mode}) on {cfg.data}",
        provenance={
            "recipe": "fmct finetune", "config": asdict(cfg), "seed": cfg.seed, **origin,
            "data": {"source": cfg.data, "n_train": len(train_ds), "n_val": len(val_ds),
                     "skipped": [s.path for s in train_ds.skipped + val_ds.skipped]},
            "training": {"final_loss": losses[-1], "losses": losses, "device": str(device), "world_size": info.world_size},
        },
        metrics=metrics,
    )
    notify(0.95, "out-of-distribution statistics (training split: reference; validation split: threshold)")
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, collate_fn=collate_skip_none)
    _, train_features = predict_with_features(model, (b["image"] for b in train_loader if b is not None), device)
    return save_bundle(model.cpu(), meta, cfg.out, reference=fit_reference(
        train_features, val_features, source=f"fmct finetune on {cfg.data}: training split (reference), validation split (threshold)"))
