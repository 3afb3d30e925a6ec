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
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmct.conventions.version import code_version
from fmct.conventions.atomic import default_mode, write_bytes_atomic, write_text_atomic
from fmct.conventions.errors import BundleError, ConfigError
from fmct.conventions.names import check_identifier
from fmct.models.config import ViT3DConfig, weight_shapes
from fmct.preprocessing.spec import PreprocessSpec

if TYPE_CHECKING:
    import torch

    from fmct.models import FMCTClassifier

FORMAT = "fmct-bundle"
FORMAT_VERSION = 1
META_FILE = "fmct.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
OOD_FILE = "ood.safetensors"  # reference feature statistics for the out-of-distribution score (fmct.inference.ood)
# The most a bundle file may hold (declared in the zip and actually inflated): fmct.json is text,
# the weights of the largest preset are far below 4 GiB. Anything bigger is refused unread.
MAX_MEMBER_BYTES = {META_FILE: 16 << 20, WEIGHTS_FILE: 4 << 30, ONNX_FILE: 4 << 30, OOD_FILE: 256 << 20}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_DTYPE_NAMES = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16",
                "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


@dataclass
class Task:
    """One finding the head predicts. probability = sigmoid(logit / temperature)."""

    name: str
    description: str = ""
    threshold: float = 0.5
    temperature: float = 1.0
    # Whether the task's answer may be shown as a decision. A task that is not validated (e.g. a hemorrhage
    # type whose AUROC among bleeding CTs is near chance) is reported as "not validated", never POSITIVE.
    validated: bool = True
    validation: dict[str, Any] = field(default_factory=dict)  # the figures it was judged by (AUROC among bleeds, data)


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
    intended_use: str = ""  # what the model is for and what it was validated on
    banner: str = ""  # one line shown with every result of this model (e.g. "trained on synthetic heads only")

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
            "intended_use": self.intended_use,
            "banner": self.banner,
        }

    @classmethod
    def from_dict(cls, d: Any) -> BundleMeta:
        if not isinstance(d, dict):
            raise BundleError(f"{META_FILE} must hold a JSON object")
        if d.get("format") != FORMAT:
            raise BundleError(f"{META_FILE}: field 'format' is {d.get('format')!r}, expected {FORMAT!r}; is this an fmct model bundle?")
        version = d.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise BundleError(
                f"{META_FILE}: field 'format_version' is {version!r}; this fmct ({code_version()}) reads version "
                f"{FORMAT_VERSION}. Upgrade fmct or re-export the bundle."
            )
        for key in ("name", "encoder", "preprocessing", "tasks"):
            if key not in d:
                raise BundleError(f"{META_FILE}: required field '{key}' is missing")
        _check_types(d)
        try:
            encoder = ViT3DConfig.from_dict(d["encoder"])
        except (ConfigError, TypeError, ValueError, ZeroDivisionError) as e:
            raise BundleError(f"{META_FILE}: field 'encoder' is invalid: {e}") from e
        try:
            prep = PreprocessSpec.from_dict(d["preprocessing"])
        except ConfigError as e:
            raise BundleError(f"{META_FILE}: field 'preprocessing' is invalid: {e}") from e
        meta = cls(
            name=d["name"],
            encoder=encoder,
            preprocessing=prep,
            tasks=[_parse_task(i, t) for i, t in enumerate(_as_list(d["tasks"], "tasks"))],
            description=d.get("description") or "",
            provenance=dict(d.get("provenance") or {}),
            metrics=dict(d.get("metrics") or {}),
            onnx=d.get("onnx"),
            intended_use=d.get("intended_use") or "",
            banner=d.get("banner") or "",
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
        check_identifier(self.name, f"{META_FILE}: field 'name'", BundleError)
        for i, name in enumerate(self.task_names):
            check_identifier(name, f"{META_FILE}: field 'tasks[{i}].name'", BundleError)
        names = self.task_names
        if len(set(names)) != len(names):
            raise BundleError(f"{META_FILE}: field 'tasks' repeats a task name: {names}")


# Every field of fmct.json has a type, checked before anything is built from it (a bool is not a number).
_ENCODER_FIELDS = {
    "img_size": "size3", "patch_size": "size3", "in_chans": "posint", "embed_dim": "posint", "depth": "posint",
    "num_heads": "posint", "mlp_ratio": "posnum", "qkv_bias": "bool", "drop_path_rate": "rate",
    "layerscale_init": "posnum_or_null",
}
# Optional (absent: fmct's own encoder), for encoders trained elsewhere (fmct.importers).
_ENCODER_OPTIONAL = {"norm_eps": "posnum", "final_norm_eps": "posnum", "cls_pos_embed": "bool", "pos_embed_type": "str"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "obj": (lambda v: isinstance(v, dict), "an object"),
    "obj_or_null": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int0": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "posint": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "posnum": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    "posnum_or_null": (lambda v: v is None or (_is_number(v) and v > 0), "null or a positive finite number"),
    "rate": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "number": (_is_number, "a finite number"),
    "size3": (lambda v: isinstance(v, list) and len(v) == 3
              and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v), "three positive integers"),
    "spacing3": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v),
                 "three positive finite numbers"),
}


def _check_field(value: Any, kind: str, name: str) -> None:
    ok, what = _KINDS[kind]
    if not ok(value):
        raise BundleError(f"{META_FILE}: field '{name}' is {json.dumps(value, default=str)[:80]}; it must be {what}")


def _check_types(d: dict[str, Any]) -> None:
    """Types and finiteness of every field fmct.json holds, naming the first wrong one."""
    _check_field(d["name"], "str", "name")
    check_identifier(d["name"], f"{META_FILE}: field 'name'", BundleError)
    for key, kind in (("description", "str"), ("provenance", "obj"), ("metrics", "obj"), ("onnx", "obj"),
                      ("intended_use", "str"), ("banner", "str")):
        if d.get(key) is not None:  # optional: absent or null means none
            _check_field(d[key], kind, key)
    enc = d["encoder"]
    _check_field(enc, "obj", "encoder")
    for key, kind in _ENCODER_FIELDS.items():
        if key not in enc:
            raise BundleError(f"{META_FILE}: required field 'encoder.{key}' is missing (fmct never guesses an "
                              "architecture: the weights would not fit it)")
        _check_field(enc[key], kind, f"encoder.{key}")
    for key, kind in _ENCODER_OPTIONAL.items():
        if key in enc:
            _check_field(enc[key], kind, f"encoder.{key}")
    if "family" in enc:
        _check_field(enc["family"], "str", "encoder.family")
    prep = d["preprocessing"]
    _check_field(prep, "obj", "preprocessing")
    for key, kind in (("spacing_mm", "spacing3"), ("size", "size3")):
        if key not in prep:
            raise BundleError(f"{META_FILE}: required field 'preprocessing.{key}' is missing")
        _check_field(prep[key], kind, f"preprocessing.{key}")
    for key, kind in (("orientation", "str"), ("antialias", "bool"), ("crop", "str"), ("foreground_hu", "number"),
                      ("spline_order", "int0")):
        if key in prep:
            _check_field(prep[key], kind, f"preprocessing.{key}")
    windows = prep.get("windows")
    if not isinstance(windows, list) or not windows:
        raise BundleError(f"{META_FILE}: field 'preprocessing.windows' must be a non-empty list of HU windows")
    for i, w in enumerate(windows):
        _check_field(w, "obj", f"preprocessing.windows[{i}]")
        for key, kind in (("name", "str"), ("center", "number"), ("width", "posnum")):
            _check_field(w.get(key), kind, f"preprocessing.windows[{i}].{key}")


def _as_list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise BundleError(f"{META_FILE}: field '{name}' must be a list")
    return value


def _parse_task(i: int, t: Any) -> Task:
    where = f"{META_FILE}: field 'tasks[{i}]"
    if not isinstance(t, dict) or not t.get("name"):
        raise BundleError(f"{where}' must be an object with a 'name'")
    if not isinstance(t["name"], str) or not isinstance(t.get("description", ""), str):
        raise BundleError(f"{where}.name' and '.description' must be strings")
    check_identifier(t["name"], f"{where}.name'", BundleError)
    task = Task(t["name"], t.get("description", ""), t.get("threshold", 0.5), t.get("temperature", 1.0))
    if not _is_number(task.threshold) or not 0.0 < task.threshold < 1.0:
        raise BundleError(f"{where}.threshold' is {task.threshold!r}; it must be a probability strictly between 0 and 1")
    if not _is_number(task.temperature) or not task.temperature > 0:
        raise BundleError(f"{where}.temperature' is {task.temperature!r}; it must be a positive finite number")
    task.threshold, task.temperature = float(task.threshold), float(task.temperature)
    task.validated = t.get("validated", True)
    task.validation = t.get("validation") or {}
    if not isinstance(task.validated, bool):
        raise BundleError(f"{where}.validated' is {task.validated!r}; it must be true or false")
    if not isinstance(task.validation, dict):
        raise BundleError(f"{where}.validation' must be an object (the figures the task was validated by)")
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
    weights_sha256: str | None = None


def model_identity(bundle: Bundle) -> dict[str, Any]:
    """What makes two runs of a bundle give the same answers: its name, the SHA-256 of its weights and
    of the config that turns them into findings (architecture, preprocessing, tasks with thresholds)."""
    sha = bundle.weights_sha256
    if sha is None and bundle.path is not None:
        _, members = read_bundle(bundle.path)
        sha = hashlib.sha256(members[WEIGHTS_FILE]).hexdigest()
    d = bundle.meta.to_dict()
    config = json.dumps({k: d[k] for k in ("encoder", "preprocessing", "tasks")}, sort_keys=True)
    return {"name": bundle.meta.name, "weights_sha256": sha,
            "config_sha256": hashlib.sha256(config.encode()).hexdigest()}


def default_bundle_path() -> Path:
    """The bundled demo model: $FMCT_BUNDLE if set, else Resources/DemoModel of this checkout (a
    source tree or an editable install), else the copy a wheel carries as package data
    (fmct/_data/DemoModel, put there by setup.py), so a regular `pip install` runs `fmct demo`."""
    env = os.environ.get("FMCT_BUNDLE")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "Resources" / "DemoModel"
    if checkout.is_dir():
        return checkout
    from importlib.resources import files

    packaged = Path(str(files("fmct").joinpath("_data", "DemoModel")))
    return packaged if packaged.is_dir() else checkout  # neither: the error names the checkout's path


def build_model(meta: BundleMeta) -> FMCTClassifier:
    from fmct.models import FMCTClassifier

    return FMCTClassifier(meta.encoder, len(meta.tasks))


def read_members(path: Path, wanted: tuple[str, ...] = (META_FILE, WEIGHTS_FILE)) -> dict[str, bytes]:
    """The bundle's files as bytes, whether it is a folder or a .zip (only those wanted are read)."""
    if not path.exists():
        raise BundleError(f"Model bundle not found: {path}. Give a bundle folder or .zip (see README, 'Model bundles').")
    if path.is_dir():
        members = {}
        for n in wanted:
            if (path / n).is_file():
                size = (path / n).stat().st_size
                _check_size(path, n, size)
                members[n] = (path / n).read_bytes()
        return members
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = _zip_layout(path, zf)
                return {base: _read_zip_member(path, zf, names[base]) for base in wanted if base in names}
        except zipfile.BadZipFile as e:
            raise BundleError(f"{path} is a corrupt zip ({e}). Copy or download the bundle again.") from None
    raise BundleError(f"{path} is neither a bundle folder nor a .zip of one")


def has_member(path: Path, name: str) -> bool:
    """Whether a bundle folder or .zip holds the file `name` (nothing is read or inflated)."""
    if path.is_dir():
        return (path / name).is_file()
    try:
        with zipfile.ZipFile(path) as zf:
            return name in _zip_layout(path, zf)
    except (OSError, zipfile.BadZipFile):
        return False  # loading the bundle says what is wrong with it


def _zip_layout(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The bundle files of a zip, which must sit all at its root or all under one top-level folder."""
    known = (META_FILE, WEIGHTS_FILE, ONNX_FILE, OOD_FILE)
    found: dict[str, list[zipfile.ZipInfo]] = {}
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        if not info.is_dir() and name.rsplit("/", 1)[-1] in known:
            found.setdefault(name.rsplit("/", 1)[-1], []).append(info)
    repeated = sorted(b for b, infos in found.items() if len(infos) > 1)
    if repeated:
        where = ", ".join(i.filename for b in repeated for i in found[b])
        raise BundleError(f"{path}: the zip holds more than one {' / '.join(repeated)} ({where}); a bundle zip must hold "
                          "exactly one of each, at its root or under one top-level folder. Re-create the zip from "
                          "the bundle folder.")
    folders = {i.filename.replace("\\", "/").rpartition("/")[0] for infos in found.values() for i in infos}
    if len(folders) > 1 or any("/" in f for f in folders):
        raise BundleError(f"{path}: the zip's bundle files are spread over {sorted(folders)}; the layout must be the "
                          "files at the root of the zip, or under one top-level folder. Re-create the zip from the "
                          "bundle folder.")
    return {b: infos[0] for b, infos in found.items()}


def _check_size(path: Path, name: str, size: int) -> None:
    cap = MAX_MEMBER_BYTES.get(name, 0)
    if size > cap:
        raise BundleError(f"{path}: {name} is larger than the {cap / 2**20:.0f} MiB a bundle file may hold "
                          f"({size / 2**20:.0f} MiB); this is not an fmct bundle, or a damaged one.")


def _read_zip_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    base = info.filename.rsplit("/", 1)[-1]
    _check_size(path, base, info.file_size)  # declared size: refused before inflating anything
    with zf.open(info) as f:
        data = f.read(MAX_MEMBER_BYTES[base] + 1)
    _check_size(path, base, len(data))  # actual size
    return data


def read_bundle(path: str | Path, onnx: bool = False) -> tuple[BundleMeta, dict[str, bytes]]:
    """Validated metadata and the raw files of a bundle, without building a model (no torch).

    The weights' tensor table is checked against the config here, so the torch and the onnxruntime
    path refuse the same bundles.

    model.onnx is read only with onnx=True (the onnxruntime path and export need it).
    """
    path = Path(path)
    members = read_members(path, (META_FILE, WEIGHTS_FILE, ONNX_FILE) if onnx else (META_FILE, WEIGHTS_FILE))
    meta = _parse_meta(path, members)
    if WEIGHTS_FILE not in members:
        raise BundleError(f"{path}: {WEIGHTS_FILE} is missing")
    check_weights_header(meta, members[WEIGHTS_FILE], where=str(path))  # whatever the backend that runs it
    return meta, members


def read_meta(path: str | Path) -> BundleMeta:
    """A bundle's validated metadata alone (only fmct.json is read: no weights, no torch)."""
    path = Path(path)
    return _parse_meta(path, read_members(path, (META_FILE,)))


MAX_JSON_DEPTH = 64  # fmct.json nests 4 deep; provenance (a resolved config) a few more


def _parse_meta(path: Path, members: dict[str, bytes]) -> BundleMeta:
    if META_FILE not in members:
        raise BundleError(f"{path}: no {META_FILE}; this is not an fmct model bundle")
    raw = parse_strict_json(members[META_FILE], f"{path}/{META_FILE}")
    return BundleMeta.from_dict(raw)


def _refuse_duplicates(where: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for key, value in pairs:
            if key in d:
                raise BundleError(f"{where} gives the key '{key}' twice in one object; JSON readers disagree on "
                                  "which one counts, so fmct refuses it. Keep one.")
            d[key] = value
        return d
    return hook


def parse_strict_json(data: bytes, where: str) -> Any:
    """JSON that every reader reads the same way: UTF-8, no key given twice in an object, nesting at
    most MAX_JSON_DEPTH deep (checked before parsing, so a hostile file cannot exhaust the stack)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{where} is not UTF-8 text ({e}); save it as UTF-8") from None
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise BundleError(f"{where} nests lists or objects {depth} deep; a bundle's metadata needs at most "
                          f"{MAX_JSON_DEPTH}. This is not an fmct.json fmct wrote.")
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates(where))
    except json.JSONDecodeError as e:
        raise BundleError(f"{where} is not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{where} nests too deep to read; this is not an fmct.json fmct wrote.") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _max_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a linear scan; no recursion)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def load_bundle(path: str | Path, load_onnx: bool = False, load_model: bool = True) -> Bundle:
    """Load a bundle; load_model=False skips the torch model (the onnxruntime path needs none)."""
    path = Path(path)
    meta, members = read_bundle(path, onnx=load_onnx)
    onnx = members.get(ONNX_FILE) if load_onnx else None
    weights = members[WEIGHTS_FILE]
    sha = hashlib.sha256(weights).hexdigest()
    if not load_model:
        return Bundle(meta, None, path, onnx, sha)
    model = build_model(meta)
    load_weights(model, weights, where=str(path))
    model.eval()
    return Bundle(meta, model, path, onnx, sha)


def safetensors_header(data: bytes, where: str = "bundle") -> dict[str, Any]:
    """The tensor table of a safetensors file (names, dtypes, shapes), read without touching tensor data."""
    try:
        (n,) = struct.unpack_from("<Q", data, 0)
        if not 2 <= n <= len(data) - 8:
            raise ValueError(f"header length {n} does not fit a file of {len(data)} bytes")
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{where}/{WEIGHTS_FILE} is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def check_weights_header(meta: BundleMeta, data: bytes, where: str = "bundle") -> None:
    """The weights' names, shapes and dtypes against what the config needs, from the safetensors header
    alone and the model's tensor table (fmct.models.config.weight_shapes: no torch, no memory): a config
    that asks for far more than its weights hold is refused before anything is allocated, and the
    onnxruntime path checks a bundle exactly as the torch path does."""
    header = safetensors_header(data, where)
    expected = weight_shapes(meta.encoder, len(meta.tasks))
    _check_names(set(expected), set(header), where)
    for key, info in header.items():
        shape = tuple(info.get("shape", ())) if isinstance(info, dict) else None
        if shape != expected[key]:
            raise BundleError(
                f"{where}/{WEIGHTS_FILE}: tensor '{key}' has shape {list(shape or [])} but the config in "
                f"{META_FILE} needs {list(expected[key])}"
            )
        dtype = info.get("dtype")
        if dtype not in FLOAT_DTYPES:
            raise BundleError(
                f"{where}/{WEIGHTS_FILE}: tensor '{key}' is stored as {_DTYPE_NAMES.get(dtype, dtype)} "
                f"({dtype}); weights must be floating point ({', '.join(FLOAT_DTYPES)}). The file was not written "
                "by fmct, or was converted wrongly.")


def _check_names(expected: set[str], found: set[str], where: str) -> None:
    """The weights must hold exactly the tensors the config's model has."""
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise BundleError(
            f"{where}/{WEIGHTS_FILE} does not fit the config in {META_FILE}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )


def load_weights(model: torch.nn.Module, data: bytes, where: str = "bundle") -> None:
    """Load safetensors bytes into model, refusing any missing, extra or mis-shaped tensor."""
    import torch
    from safetensors.torch import load as load_safetensors_bytes

    try:
        state = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise BundleError(f"{where}/{WEIGHTS_FILE} is not a readable safetensors file ({e})") from e
    expected = model.state_dict()
    _check_names(set(expected), set(state), where)
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BundleError(
                f"{where}/{WEIGHTS_FILE}: tensor '{key}' has shape {list(tensor.shape)} but the config in "
                f"{META_FILE} needs {list(expected[key].shape)}"
            )
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise BundleError(f"{where}/{WEIGHTS_FILE}: tensor '{key}' is stored as {str(tensor.dtype).replace('torch.', '')}; "
                              "weights must be floating point. The file was not written by fmct, or was converted wrongly.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BundleError(f"{where}/{WEIGHTS_FILE}: tensor '{key}' holds {bad} value(s) that are not finite (NaN or "
                              "infinity); such a model answers nonsense. The training diverged or the file is damaged: "
                              "use another bundle.")
    model.load_state_dict(state, strict=True)


def save_bundle(model: torch.nn.Module, meta: BundleMeta, path: str | Path, onnx_bytes: bytes | None = None,
                reference: Any = None) -> Path:
    """Write a bundle folder (or .zip when path ends with .zip), atomically: a reader never sees half of one.

    Without onnx_bytes the bundle has no model.onnx, so any ONNX check record in meta.onnx
    (which describes a model.onnx of earlier weights) is dropped. reference (an
    fmct.inference.ood.ReferenceStats) is written as the out-of-distribution statistics of exactly these weights.
    """
    from safetensors.torch import save as save_safetensors_bytes

    meta.check_consistency()
    if onnx_bytes is None:
        meta.onnx = None
    path = Path(path)
    meta.provenance.setdefault("code_version", code_version())
    meta.provenance.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files = {
        META_FILE: meta_json(meta).encode(),
        WEIGHTS_FILE: save_safetensors_bytes(state, metadata={"format": FORMAT}),
    }
    if onnx_bytes is not None:
        files[ONNX_FILE] = onnx_bytes
    if reference is not None:
        files[OOD_FILE] = reference.to_bytes(hashlib.sha256(files[WEIGHTS_FILE]).hexdigest())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700 would make a shared bundle unreadable to others
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
    write_text_atomic(Path(bundle_dir) / META_FILE, meta_json(meta))


def meta_json(meta: BundleMeta) -> str:
    """fmct.json's text: always valid JSON. A metric that is not defined (an AUROC on one class) is null,
    never a NaN literal that strict JSON readers reject; allow_nan=False guards every other field."""
    return json.dumps(_finite_or_null(meta.to_dict()), indent=2, allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value

