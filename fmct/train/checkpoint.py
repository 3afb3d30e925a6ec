"""Training checkpoints as safetensors + JSON, written atomically; never pickle.

A checkpoint is two files, ``ckpt-<step>.safetensors`` (every tensor: model, optimizer
moments, RNG states) and ``ckpt-<step>.json`` (everything else: step, data position, optimizer
hyper-parameters, scheduler, numpy/python RNG states, the safetensors' size), plus ``last.json``
naming the newest one. Each file is written to a temporary file in the same folder, fsynced,
renamed over its target and the folder fsynced, and ``last.json`` is updated only after both
files are durable: a run killed at any instant leaves either the previous checkpoint or the
new one, never half of one. Temporary files a killed run left behind (``.ckpt-*.tmp``) are removed
at the next save and resume.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmct.conventions.atomic import write_bytes_atomic
from fmct.conventions.errors import ConfigError

LAST = "last.json"
FORMAT = "fmct-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path


atomic_write = write_bytes_atomic  # checkpoints, the run log and the resolved config all go through it


# ----------------------------------------------------------------------------------- flattening
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW (or any optimizer) state as named tensors 'optim.state.<i>.<name>' plus JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim.state."):
            idx, name = key[len("optim.state."):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU, CUDA), numpy and python RNG states: tensors plus JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py_version, list(py_state), py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


# ----------------------------------------------------------------------------------- save / load
def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint <step> atomically, point last.json at it, and keep only the newest ``keep``."""
    from safetensors.torch import save as save_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:08d}"
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # clone: no shared storage
    blob = save_bytes(state, metadata={"format": FORMAT})
    atomic_write(folder / f"{name}.safetensors", blob)
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                 "tensors_file": f"{name}.safetensors", "tensors_bytes": len(blob), **meta}
    atomic_write(folder / f"{name}.json", json.dumps(full_meta, indent=1).encode())
    atomic_write(folder / LAST, json.dumps({"checkpoint": name, "step": int(step)}).encode())
    _prune(folder, keep)
    return folder / f"{name}.json"


def remove_stale_temp_files(folder: Path) -> None:
    """The temporary files of writes a killed run never finished (atomic writes name them .<target>.*.tmp).

    Only one process writes a run's checkpoints, so any such file seen between writes is stale.
    """
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file() and p.name.startswith((".ckpt-", f".{LAST}.")):
            p.unlink(missing_ok=True)


def _prune(folder: Path, keep: int) -> None:
    remove_stale_temp_files(folder)
    names = sorted(p.stem for p in folder.glob("ckpt-*.json"))
    for stem in names[:-keep] if keep > 0 else []:
        for suffix in (".safetensors", ".json"):
            (folder / f"{stem}{suffix}").unlink(missing_ok=True)


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The checkpoint last.json points at, or None when the folder has none."""
    from safetensors.torch import load as load_bytes

    folder = Path(folder)
    last = folder / LAST
    if not last.is_file():
        return None
    try:
        name = json.loads(last.read_text())["checkpoint"]
        meta = json.loads((folder / f"{name}.json").read_text())
        blob = (folder / meta["tensors_file"]).read_bytes()
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot resume from {folder}: its last checkpoint is unreadable ({e})") from e
    if meta.get("format") != FORMAT or len(blob) != meta.get("tensors_bytes"):
        raise ConfigError(f"cannot resume from {folder}: {name} is not a complete fmct checkpoint")
    remove_stale_temp_files(folder)
    try:
        tensors = load_bytes(blob)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ConfigError(f"cannot resume from {folder}: {meta['tensors_file']} is damaged ({e}). Delete that "
                          "checkpoint (and last.json) to resume from an earlier one, or start a new run.") from e
    return Checkpoint(int(meta["step"]), tensors, meta, folder / f"{name}.json")


def subset(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under 'prefix.' with the prefix removed (e.g. the model's state dict)."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
