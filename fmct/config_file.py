"""Reading a YAML or JSON config file into a dict, with one clear error for every way it can be wrong.

Shared by `fmct pretrain`, `fmct finetune` and `fmct evaluate` (and so by FMCTTraining).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmct.errors import ConfigError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A .json file (parsed as JSON: YAML would read 1e-06 as a string) or YAML -> a mapping of options."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
        raw = (json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'} ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    return raw
