"""Model bundles: a folder (or .zip of one) that fully describes a model.

model.safetensors holds the weights and fmct.json everything else (encoder config,
preprocessing, tasks with threshold and calibration temperature, provenance, metrics), so any
bundle runs with no code change. Nothing is ever unpickled. A bundle that does not validate
is refused with a message naming the field.

Reading the metadata needs no torch (torch and safetensors.torch are imported only where weights
are loaded or saved), so the onnxruntime path of Analyze runs on a machine without torch.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmct import __version__
from fmct.atomic import write_bytes_atomic, write_text_atomic
from fmct.errors import BundleError, ConfigError
from fmct.models.config import ViT3DConfig
from fmct.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import torch

    from fmct.models import FMCTClassifier

FORMAT = "fmct-bundle"
FORMAT_VERSION = 1
META_FILE = "fmct.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"


@dataclass
class Task:
    """One finding the head predicts. probability = sigmoid(logit / temperature)."""

    name: str
    description: str = ""
    threshold: float = 0.5
    temperature: float = 1.0


@dataclass
class BundleMeta:
    name: str
    encoder: ViT3DConfig
    preprocessing: PreprocessSpec
    tasks: list[Task] = field(default_factory=list)
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "encoder": self.encoder.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "tasks": [asdict(t) for t in self.tasks],
            "provenance": self.provenance,
            "metrics": self.metrics,
            "onnx": self.onnx,
        }

    @classmethod
    def from_dict(cls, d: Any) -> "BundleMeta":
        if not isinstance(d, dict):
            raise BundleError(f"{META_FILE} must hold a JSON object")
        if d.get("format") != FORMAT:
            raise BundleError(f"{META_FILE}: field 'format' is {d.get('format')!r}, expected {FORMAT!r}; is this an fmct model bundle?")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{META_FILE}: field 'format_version' is {version!r}; this fmct ({__version__}) reads version "
                f"{FORMAT_VERSION}. Upgrade fmct or re-export the bundle."
            )
        for key in ("name", "encoder", "preprocessing", "tasks"):
            if key not in d:
                raise BundleError(f"{META_FILE}: required field '{key}' is missing")
        try:
            encoder = ViT3DConfig.from_dict(d["encoder"])
        except (ConfigError, TypeError) as e:
            raise BundleError(f"{META_FILE}: field 'encoder' is invalid: {e}") from e
        try:
            prep = PreprocessSpec.from_dict(d["preprocessing"])
        except ConfigError as e:
            raise BundleError(f"{META_FILE}: field 'preprocessing' is invalid: {e}") from e
        meta = cls(
            name=str(d["name"]),
            encoder=encoder,
            preprocessing=prep,
            tasks=[_parse_task(i, t) for i, t in enumerate(_as_list(d["tasks"], "tasks"))],
            description=str(d.get("description", "")),
            provenance=dict(d.get("provenance") or {}),
            metrics=dict(d.get("metrics") or {}),
            onnx=d.get("onnx"),
        )
        meta.check_consistency()
        return meta

    def check_consistency(self) -> None:
        if self.encoder.in_chans != self.preprocessing.in_channels:
            raise BundleError(
                f"{META_FILE}: 'encoder.in_chans' is {self.encoder.in_chans} but 'preprocessing.windows' has "
                f"{self.preprocessing.in_channels} windows; they must match"
            )
        if tuple(self.encoder.img_size) != self.preprocessing.tensor_shape:
            raise BundleError(
                f"{META_FILE}: 'encoder.img_size' {list(self.encoder.img_size)} (z, y, x) does not match "
                f"'preprocessing.size' {list(self.preprocessing.size)} (x, y, z)"
            )
        names = self.task_names
        if len(set(names)) != len(names):
            raise BundleError(f"{META_FILE}: field 'tasks' repeats a task name: {names}")


def _as_list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise BundleError(f"{META_FILE}: field '{name}' must be a list")
    return value


def _parse_task(i: int, t: Any) -> Task:
    where = f"{META_FILE}: field 'tasks[{i}]"
    if not isinstance(t, dict) or not t.get("name"):
        raise BundleError(f"{where}' must be an object with a 'name'")
    task = Task(str(t["name"]), str(t.get("description", "")), t.get("threshold", 0.5), t.get("temperature", 1.0))
    if not isinstance(task.threshold, (int, float)) or not 0.0 < task.threshold < 1.0:
        raise BundleError(f"{where}.threshold' is {task.threshold!r}; it must be a probability strictly between 0 and 1")
    if not isinstance(task.temperature, (int, float)) or not task.temperature > 0:
        raise BundleError(f"{where}.temperature' is {task.temperature!r}; it must be a positive number")
    task.threshold, task.temperature = float(task.threshold), float(task.temperature)
    return task


@dataclass
class Bundle:
    """A loaded bundle: its metadata and a ready model (without a head when it has no tasks).

    model is None when it was loaded with load_model=False (metadata and ONNX only, no torch).
    """

    meta: BundleMeta
    model: FMCTClassifier | None
    path: Path | None = None
    onnx_bytes: bytes | None = None


def default_bundle_path() -> Path:
    """The bundled demo model: $FMCT_BUNDLE if set, else Resources/DemoModel of this checkout."""
    env = os.environ.get("FMCT_BUNDLE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "Resources" / "DemoModel"


def build_model(meta: BundleMeta) -> FMCTClassifier:
    from fmct.models import FMCTClassifier

    return FMCTClassifier(meta.encoder, len(meta.tasks))


def _read_members(path: Path) -> dict[str, bytes]:
    """The bundle's files as bytes, whether it is a folder or a .zip."""
    if not path.exists():
        raise BundleError(f"Model bundle not found: {path}. Give a bundle folder or .zip (see README, 'Model bundles').")
    wanted = (META_FILE, WEIGHTS_FILE, ONNX_FILE)
    if path.is_dir():
        return {n: (path / n).read_bytes() for n in wanted if (path / n).is_file()}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            # A zip of the folder may keep the folder as a prefix; accept both layouts.
            by_base = {Path(n).name: n for n in zf.namelist() if Path(n).name in wanted}
            return {base: zf.read(name) for base, name in by_base.items()}
    raise BundleError(f"{path} is neither a bundle folder nor a .zip of one")


def read_bundle(path: str | Path) -> tuple[BundleMeta, dict[str, bytes]]:
    """Validated metadata and the raw files of a bundle, without building a model (no torch)."""
    path = Path(path)
    members = _read_members(path)
    if META_FILE not in members:
        raise BundleError(f"{path}: no {META_FILE}; this is not an fmct model bundle")
    try:
        raw = json.loads(members[META_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}/{META_FILE} is not valid JSON ({e})") from e
    meta = BundleMeta.from_dict(raw)
    if WEIGHTS_FILE not in members:
        raise BundleError(f"{path}: {WEIGHTS_FILE} is missing")
    return meta, members


def load_bundle(path: str | Path, load_onnx: bool = False, load_model: bool = True) -> Bundle:
    """Load a bundle; load_model=False skips the torch model (the onnxruntime path needs none)."""
    path = Path(path)
    meta, members = read_bundle(path)
    onnx = members.get(ONNX_FILE) if load_onnx else None
    if not load_model:
        return Bundle(meta, None, path, onnx)
    model = build_model(meta)
    load_weights(model, members[WEIGHTS_FILE], where=str(path))
    model.eval()
    return Bundle(meta, model, path, onnx)


def load_weights(model: torch.nn.Module, data: bytes, where: str = "bundle") -> None:
    """Load safetensors bytes into model, refusing any missing, extra or mis-shaped tensor."""
    from safetensors.torch import load as load_safetensors_bytes

    try:
        state = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise BundleError(f"{where}/{WEIGHTS_FILE} is not a readable safetensors file ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise BundleError(
            f"{where}/{WEIGHTS_FILE} does not fit the config in {META_FILE}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BundleError(
                f"{where}/{WEIGHTS_FILE}: tensor '{key}' has shape {list(tensor.shape)} but the config in "
                f"{META_FILE} needs {list(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def save_bundle(model: torch.nn.Module, meta: BundleMeta, path: str | Path, onnx_bytes: bytes | None = None) -> Path:
    """Write a bundle folder (or .zip when path ends with .zip), atomically: a reader never sees half of one.

    Without onnx_bytes the bundle has no model.onnx, so any ONNX check record in meta.onnx
    (which describes a model.onnx of earlier weights) is dropped.
    """
    from safetensors.torch import save as save_safetensors_bytes

    meta.check_consistency()
    if onnx_bytes is None:
        meta.onnx = None
    path = Path(path)
    meta.provenance.setdefault("code_version", __version__)
    meta.provenance.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files = {
        META_FILE: json.dumps(meta.to_dict(), indent=2).encode(),
        WEIGHTS_FILE: save_safetensors_bytes(state, metadata={"format": FORMAT}),
    }
    if onnx_bytes is not None:
        files[ONNX_FILE] = onnx_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if path.suffix == ".zip":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
            write_bytes_atomic(path, buf.getvalue())
        else:
            for name, data in files.items():
                write_bytes_atomic(tmp / name, data)
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_meta(meta: BundleMeta, bundle_dir: str | Path) -> None:
    """Rewrite only fmct.json of a bundle folder (metrics, ONNX check), atomically."""
    meta.check_consistency()
    write_text_atomic(Path(bundle_dir) / META_FILE, json.dumps(meta.to_dict(), indent=2))

