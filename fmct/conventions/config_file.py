"""Reading a YAML or JSON config file into a dict, with one clear error for every way it can be wrong.

Shared by `fmct pretrain`, `fmct finetune` and `fmct evaluate` (and so by FMCTTraining).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmct.conventions.errors import ConfigError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A .json file (parsed as JSON: YAML would read 1e-06 as a string) or YAML -> a mapping of options."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")  # YAML and JSON are UTF-8 whatever the locale says
        raw = (json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'} ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    return raw


# ----------------------------------------------------------------------------- typed configs
def build_config(cls: type, raw: Any, where: str = "") -> Any:
    """Dataclass ``cls`` from a mapping, every value converted to its field's annotated type or refused.

    The one typed loader of `fmct pretrain`, `fmct finetune` and `fmct evaluate`: unknown keys are
    refused with the key named (a typo must not fall back to a default); numbers written as strings
    (PyYAML reads ``lr: 1e-4`` as the string '1e-4', since YAML 1.1 floats need a dot) are converted;
    anything else of the wrong type is refused with the key, the value and what was expected.
    Nested dataclass fields are sections and recurse.
    """
    import dataclasses
    import typing

    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{where or 'root'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"config section '{where or 'root'}': unknown field(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section '{where or 'root'}': {e}") from e


def _number(value: Any, key: str, whole: bool) -> Any:
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be {kind}, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"config key '{key}' must be {kind}, got the text {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"config key '{key}' must be {kind}, got {value!r}")
    if whole:
        if not float(value).is_integer():
            raise ConfigError(f"config key '{key}' must be {kind}, got {value!r}")
        return int(value)
    return float(value)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """value as type tp (an annotation: int, float, bool, str, X | None, tuple[...], list[X], dict, a dataclass)."""
    import dataclasses
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} fits none of {options}")
    if value is None:
        raise ConfigError(f"config key '{key}' must not be empty (null)")
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        return _number(value, key, whole=True)
    if tp is float:
        return _number(value, key, whole=False)
    if tp is str:
        if isinstance(value, (dict, list, tuple, bool)):
            raise ConfigError(f"config key '{key}' must be text, got {value!r}")
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if isinstance(value, str):  # "a,b,c" from a command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    return value


@dataclass
class EvaluateConfig:
    """`fmct evaluate`'s options (a --config file holds any of them; flags win)."""

    model: str | None = None
    data: str | None = None
    ood_data: str | None = None
    out: str = "fmct_eval"
    device: str = "auto"
    cache_dir: str = ".fmct_cache"
    n_boot: int = 1000

    @classmethod
    def from_file_and_flags(cls, path: str | Path | None, **flags: Any) -> EvaluateConfig:
        raw = read_config_file(path) if path else {}
        return build_config(cls, {**raw, **{k: v for k, v in flags.items() if v is not None}}, "evaluate")
