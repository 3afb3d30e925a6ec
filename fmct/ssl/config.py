"""SSLConfig: every knob of a pretraining run, as dataclasses loadable from YAML or JSON.

A run writes the fully resolved config (every default filled in, the encoder expanded from its
preset) and its seed to ``config.json`` in the run folder, so a run can be repeated from that
file alone. Unknown keys are refused with the key named: a typo must not silently fall back
to a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from fmct.conventions.config_file import build_config, read_config_file
from fmct.conventions.errors import ConfigError
from fmct.models.config import ViT3DConfig, preset


@dataclass
class EncoderSection:
    """A named size plus overrides, e.g. {preset: tiny, embed_dim: 48, depth: 2}.

    grad_checkpointing recomputes each block in the backward pass instead of storing its
    activations (ViT3D.set_grad_checkpointing): what base-size pretraining at 128^3 needs to fit.
    """

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False

    def build(self) -> ViT3DConfig:
        over = dict(self.overrides)
        for key in ("img_size", "patch_size"):
            if key in over:
                over[key] = tuple(int(v) for v in over[key])
        try:
            return preset(self.preset, **over)
        except TypeError as e:
            raise ConfigError(f"encoder: {e}") from e


@dataclass
class DataSection:
    """Where the volumes come from.

    source "tensors": a safetensors file whose tensor "x" is [N, C, D, H, W] of preprocessed
    model-grid volumes. source "phantoms": n synthetic head CTs made and preprocessed at start.
    source "manifest": your CTs, `path` being anything fmct.data.manifests.load_manifest reads (a folder of
    DICOM/NIfTI studies, a CSV, the RSNA or CQ500 layout; labels are ignored), preprocessed once
    into a prepared cache under cache_dir (each torchrun rank prepares its own share, fmct.data.prepare).
    source "prepared": `path` is a cache from `fmct prepare`, read through its index (no source is
    touched unless verify is true).
    """

    source: str = "phantoms"
    path: str = ""
    cache_dir: str = ".fmct_cache"
    n: int = 12
    seed: int = 0
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)  # (x, y, z), as in PreprocessSpec
    size: tuple[int, int, int] = (64, 64, 64)  # (x, y, z); must match encoder img_size (z, y, x)
    in_plane_size: int = 128
    anatomy: str = "default"  # phantoms: anatomy preset(s), comma-separated and taken in turn, e.g. "default,ood"
    verify: bool = False  # prepared: check every study's bytes and source files at start (slow on a large archive)


@dataclass
class CropSection:
    """Multi-crop: 2 global views (the teacher sees these) and n_local small views.

    Sizes are in voxels (D, H, W) and must be multiples of the patch size; scales are the
    fraction of the volume each crop covers before resizing.
    """

    global_size: tuple[int, int, int] = (64, 64, 64)
    local_size: tuple[int, int, int] = (32, 32, 32)
    n_local: int = 4
    local_start_step: int = 0  # local crops join from this step on (once the global views have started to learn)
    global_scale: tuple[float, float] = (0.8, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.35)
    aspect_jitter: float = 0.05  # per-axis log-aspect range of a crop box; phantoms' head shapes differ by ~8%
    flip_lr: float = 0.0
    max_rotation_deg: float = 5.0
    window_scale: float = 0.05
    window_shift: float = 0.02
    noise_std: float = 0.01


@dataclass
class DINOSection:
    out_dim: int = 4096
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    nlayers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 100
    centering: str = "centering"  # or "sinkhorn_knopp"
    center_momentum: float = 0.9
    sinkhorn_queue: int = 0  # Sinkhorn-Knopp over this batch + this many past teacher rows (0 = the batch alone, DINOv2)
    loss_weight: float = 1.0
    koleo_loss_weight: float = 0.0  # DINOv2's KoLeo term on the student's CLS features (0.1 there); 0 = off


@dataclass
class IBOTSection:
    enabled: bool = True
    separate_head: bool = False
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    loss_weight: float = 1.0


@dataclass
class MAESection:
    """Masked voxel reconstruction from the student's masked patch tokens (off by default)."""

    enabled: bool = False
    loss_weight: float = 1.0
    norm_pix: bool = True


@dataclass
class OptimSection:
    batch_size: int = 4  # per process
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2  # cosine from weight_decay to this over the run (DINOv2: 0.04 -> 0.2)
    clip_grad: float = 3.0  # per part (backbone, each head), as DINOv2 clips
    patch_embed_lr_mult: float = 0.2  # DINOv2 trains the patch embedding at a fifth of the lr
    freeze_last_layer_steps: int = 0  # the heads' prototype layers get no update for this many steps (DINOv2: 1 epoch)
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0


@dataclass
class RunSection:
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    num_threads: int = 0  # 0: leave torch's default
    workers: int = -1  # DataLoader processes making crops ahead of the model; -1: auto (min(8, CPUs - 1) beside a GPU, 0 on CPU)
    crops: str = "auto"  # where crops are made: "loader" (per sample, fmct.ssl.augment), "device" (batched on the
    # training device, fmct.ssl.batched_crops; loader workers only read volumes), "auto" (device on CUDA, else loader)


@dataclass
class SSLConfig:
    encoder: EncoderSection = field(default_factory=EncoderSection)
    data: DataSection = field(default_factory=DataSection)
    crops: CropSection = field(default_factory=CropSection)
    dino: DINOSection = field(default_factory=DINOSection)
    ibot: IBOTSection = field(default_factory=IBOTSection)
    mae: MAESection = field(default_factory=MAESection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def encoder_config(self) -> ViT3DConfig:
        return self.encoder.build()

    def validate(self) -> None:
        enc = self.encoder.build()
        for name, size in (("crops.global_size", self.crops.global_size), ("crops.local_size", self.crops.local_size)):
            if any(s % p or s <= 0 for s, p in zip(size, enc.patch_size)):
                raise ConfigError(f"{name} {list(size)} must be positive multiples of encoder patch_size {list(enc.patch_size)}")
        if tuple(enc.img_size) != tuple(self.data.size[::-1]):
            raise ConfigError(f"encoder img_size {list(enc.img_size)} (z, y, x) does not match data.size {list(self.data.size)} (x, y, z)")
        if self.dino.centering not in ("centering", "sinkhorn_knopp"):
            raise ConfigError(f"dino.centering is '{self.dino.centering}'; use 'centering' or 'sinkhorn_knopp'")
        if self.run.crops not in ("auto", "loader", "device"):
            raise ConfigError(f"run.crops is '{self.run.crops}'; use 'auto', 'loader' or 'device'")
        if self.data.source not in ("phantoms", "tensors", "manifest", "prepared"):
            raise ConfigError(f"data.source is '{self.data.source}'; use 'phantoms', 'tensors', 'manifest' or 'prepared'")
        if self.data.source == "prepared" and not self.data.path:
            raise ConfigError("data.path is empty; data.source 'prepared' needs a cache folder from `fmct prepare`")
        if self.data.source == "manifest" and not self.data.path:
            raise ConfigError("data.path is empty; data.source 'manifest' needs a folder of studies or a manifest CSV")
        if self.data.source == "tensors" and not self.data.path:
            raise ConfigError("data.path is empty; data.source 'tensors' needs a safetensors file with tensor 'x'")
        lo, hi = self.ibot.mask_ratio
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError(f"ibot.mask_ratio {[lo, hi]} must satisfy 0 <= min <= max < 1")
        if self.optim.batch_size < 1 or self.optim.steps < 1:
            raise ConfigError("optim.batch_size and optim.steps must be at least 1")
        if self.dino.sinkhorn_queue < 0 or self.crops.local_start_step < 0 or self.optim.freeze_last_layer_steps < 0:
            raise ConfigError("dino.sinkhorn_queue, crops.local_start_step and optim.freeze_last_layer_steps must be >= 0")
        if not (0 < self.dino.warmup_teacher_temp and 0 < self.dino.teacher_temp):
            raise ConfigError("dino.warmup_teacher_temp and dino.teacher_temp must be > 0")
        if self.run.checkpoint_every < 1:
            raise ConfigError("run.checkpoint_every must be at least 1")

    # ----------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types (tuples become lists)."""
        return _to_plain(self)

    def resolved_dict(self) -> dict[str, Any]:
        """to_dict plus the encoder as the full ViT3DConfig it resolves to (written by a run)."""
        d = self.to_dict()
        d["encoder_resolved"] = self.encoder_config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SSLConfig":
        d = dict(d)
        d.pop("encoder_resolved", None)  # a run's own config.json reads back
        return _from_dict(cls, d, "")

    @classmethod
    def from_file(cls, path: str | Path) -> "SSLConfig":
        """Read a .yaml/.yml or .json config; a missing section keeps its defaults."""
        return cls.from_dict(read_config_file(path))


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _from_dict(cls: type, d: Any, where: str) -> Any:
    """Build dataclass cls from a mapping with the one typed loader (fmct.conventions.config_file.build_config)."""
    return build_config(cls, d, where)


# ----------------------------------------------------------------------------- size presets
# The recipe `fmct pretrain DATA --out RUN` starts from (flags and --config override it). "tiny" is
# Resources/Configs/pretrain_tiny.yaml less its data section, measured on 2 CPU cores
# (benchmarks/RESULTS.md#self-distillation); "small" and "base" scale the same recipe to the larger encoders
# and a GPU (wider crops, more local crops, a longer run, a larger batch); they are not yet measured.
_TINY_RECIPE: dict[str, Any] = {
    "encoder": {"preset": "tiny"},
    "data": {"source": "phantoms", "n": 96, "anatomy": "default,ood", "spacing_mm": [3.0, 3.0, 3.0], "size": [64, 64, 64]},
    "crops": {"global_size": [48, 48, 48], "local_size": [24, 24, 24], "n_local": 2, "local_start_step": 200,
              "global_scale": [0.8, 1.0], "local_scale": [0.3, 0.5], "aspect_jitter": 0.05, "flip_lr": 0.0,
              "max_rotation_deg": 5.0, "window_scale": 0.05, "window_shift": 0.02, "noise_std": 0.01},
    "dino": {"out_dim": 1024, "centering": "sinkhorn_knopp", "sinkhorn_queue": 256, "warmup_teacher_temp": 0.01,
             "teacher_temp": 0.01, "warmup_teacher_temp_steps": 300},
    "ibot": {"enabled": True, "mask_ratio": [0.1, 0.5]},
    "mae": {"enabled": True},
    "optim": {"batch_size": 8, "steps": 300, "lr": 5e-4, "warmup_steps": 30, "weight_decay": 0.04,
              "weight_decay_end": 0.2, "freeze_last_layer_steps": 30, "momentum_teacher": 0.99,
              "final_momentum_teacher": 0.999},
    "run": {"seed": 0, "checkpoint_every": 100},
}

# per size: encoder preset, data grid (x, y, z) and spacing, global/local crop edge, and what a GPU run changes
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"grid": 64, "spacing": 3.0, "global": 48, "local": 24, "changes": {}},
    "small": {"grid": 96, "spacing": 2.0, "global": 72, "local": 36,
              "changes": {"crops": {"n_local": 8, "local_start_step": 1000},
                          "dino": {"out_dim": 4096, "warmup_teacher_temp_steps": 3000, "teacher_temp": 0.04},
                          "optim": {"batch_size": 32, "steps": 20000, "warmup_steps": 1000, "freeze_last_layer_steps": 500,
                                    "momentum_teacher": 0.992, "final_momentum_teacher": 0.9995},
                          "run": {"checkpoint_every": 1000}}},
    "base": {"grid": 128, "spacing": 1.5, "global": 96, "local": 48,
             "changes": {"crops": {"n_local": 8, "local_start_step": 2000},
                         "dino": {"out_dim": 8192, "warmup_teacher_temp_steps": 5000, "teacher_temp": 0.04},
                         "optim": {"batch_size": 64, "steps": 50000, "warmup_steps": 2500, "freeze_last_layer_steps": 1000,
                                   "momentum_teacher": 0.994, "final_momentum_teacher": 0.9998, "lr": 3e-4},
                         "run": {"checkpoint_every": 1000}}},
}


def apply_size(raw: dict[str, Any], size: str, changes: bool = True) -> dict[str, Any]:
    """raw with the encoder, grid and crop sizes of a named size (and, with changes, its run scale)."""
    if size not in SIZES:
        raise ConfigError(f"unknown size '{size}'; choose one of {sorted(SIZES)}")
    s, out = SIZES[size], {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    out.setdefault("encoder", {})["preset"] = size
    data = out.setdefault("data", {})
    data["size"], data["spacing_mm"] = [s["grid"]] * 3, [s["spacing"]] * 3
    crops = out.setdefault("crops", {})
    crops["global_size"], crops["local_size"] = [s["global"]] * 3, [s["local"]] * 3
    if changes:
        for section, values in s["changes"].items():
            out.setdefault(section, {}).update(values)
    return out


def recipe(size: str = "tiny") -> dict[str, Any]:
    """The default recipe of a size as a raw config mapping (SSLConfig.from_dict reads it)."""
    import copy

    return apply_size(copy.deepcopy(_TINY_RECIPE), size)
