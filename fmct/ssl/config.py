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

from fmct.config_file import read_config_file
from fmct.errors import ConfigError
from fmct.models.config import ViT3DConfig, preset


@dataclass
class EncoderSection:
    """A named size plus overrides, e.g. {preset: tiny, embed_dim: 48, depth: 2}."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

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
    source "manifest": your CTs, `path` being anything fmct.manifests.load_manifest reads (a folder of
    DICOM/NIfTI studies, a CSV, the RSNA or CQ500 layout; labels are ignored), preprocessed once
    into cache_dir.
    """

    source: str = "phantoms"
    path: str = ""
    cache_dir: str = ".fmct_cache"
    n: int = 12
    seed: int = 0
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)  # (x, y, z), as in PreprocessSpec
    size: tuple[int, int, int] = (64, 64, 64)  # (x, y, z); must match encoder img_size (z, y, x)
    in_plane_size: int = 128


@dataclass
class CropSection:
    """Multi-crop: 2 global views (the teacher sees these) and n_local small views.

    Sizes are in voxels (D, H, W) and must be multiples of the patch size; scales are the
    fraction of the volume each crop covers before resizing.
    """

    global_size: tuple[int, int, int] = (64, 64, 64)
    local_size: tuple[int, int, int] = (32, 32, 32)
    n_local: int = 4
    global_scale: tuple[float, float] = (0.5, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.35)
    flip_lr: float = 0.5
    max_rotation_deg: float = 10.0
    window_scale: float = 0.1
    window_shift: float = 0.05
    noise_std: float = 0.02


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
    clip_grad: float = 3.0
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0


@dataclass
class RunSection:
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    num_threads: int = 0  # 0: leave torch's default


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
        if self.data.source not in ("phantoms", "tensors", "manifest"):
            raise ConfigError(f"data.source is '{self.data.source}'; use 'phantoms', 'tensors' or 'manifest'")
        if self.data.source == "manifest" and not self.data.path:
            raise ConfigError("data.path is empty; data.source 'manifest' needs a folder of studies or a manifest CSV")
        if self.data.source == "tensors" and not self.data.path:
            raise ConfigError("data.path is empty; data.source 'tensors' needs a safetensors file with tensor 'x'")
        lo, hi = self.ibot.mask_ratio
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError(f"ibot.mask_ratio {[lo, hi]} must satisfy 0 <= min <= max < 1")
        if self.optim.batch_size < 1 or self.optim.steps < 1:
            raise ConfigError("optim.batch_size and optim.steps must be at least 1")
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
    """Build dataclass cls from a mapping; sections recurse, leaves take their default's type."""
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{where or 'root'}' must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"config section '{where or 'root'}': unknown key(s) {unknown}; known: {sorted(known)}")
    defaults = {f.name: f.default_factory() for f in fields(cls) if callable(f.default_factory)}  # type: ignore[misc]
    defaults.update({f.name: f.default for f in fields(cls) if not callable(f.default_factory)})  # type: ignore[misc]
    kwargs = {}
    for name, value in d.items():
        key = f"{where}.{name}" if where else name
        default = defaults[name]
        if is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, key)
        else:
            kwargs[name] = _coerce(value, default, key)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Give value the type of the default (tuples stay tuples, ints may become floats)."""
    try:
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(default):
                raise ConfigError(f"config key '{key}' must be a list of {len(default)} numbers, got {value!r}")
            return tuple(type(x)(v) for x, v in zip(default, value))
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
            return value
        if isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
            if isinstance(default, int) and not float(value).is_integer():
                raise ConfigError(f"config key '{key}' must be a whole number, got {value!r}")
            return type(default)(value)
        if isinstance(default, str):
            return str(value)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
            return dict(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key '{key}': {e}") from e
    return value
