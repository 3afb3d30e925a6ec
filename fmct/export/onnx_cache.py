"""model.onnx for a bundle that ships without it: exported once from the weights into a user cache.

The repository keeps one copy of the demo model's weights (model.safetensors); the ONNX graph is
the same weights a second time, so it is not stored. fmct.json still carries the "onnx" record of
the export that was checked when the bundle was made. At first use of the onnxruntime path the
graph is exported from the weights on disk, checked against torch on a generated head CT (the same
check as `fmct export --onnx`) and written to the cache with its own record; later runs read it
from there without importing torch, and trust it only while the record's SHA-256 of the weights
and of the graph match the files.

Cache folder: $FMCT_CACHE_DIR, else $XDG_CACHE_HOME/fmct, else ~/.cache/fmct; one sub-folder
onnx/<SHA-256 of the weights> per model, holding model.onnx and record.json.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from fmct.conventions.errors import BundleError, ConfigError

log = logging.getLogger("fmct")
CACHE_ENV = "FMCT_CACHE_DIR"
RECORD_FILE = "record.json"


def cache_root() -> Path:
    """Where fmct keeps files it can make again (today: ONNX exports of shipped bundles)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fmct"


def cache_folder(weights_sha256: str) -> Path:
    return cache_root() / "onnx" / weights_sha256


def cached_onnx(weights_sha256: str) -> tuple[bytes, dict[str, Any]] | None:
    """The cached graph and record for these weights, or None when absent or no longer matching."""
    folder = cache_folder(weights_sha256)
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        data = (folder / "model.onnx").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("weights_sha256") != weights_sha256 \
            or record.get("onnx_sha256") != hashlib.sha256(data).hexdigest():
        log.debug("ignoring the stale or edited ONNX cache in %s", folder)
        return None
    return data, record


def can_export() -> bool:
    """Whether this installation can make the graph (torch, onnx and onnxruntime importable)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx", "onnxruntime"))


def onnx_for_bundle(path: str | Path, weights_sha256: str, known: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The checked ONNX graph of a bundle without model.onnx: from the cache, else exported now and cached.

    known: fmct.json's record of the export checked when the bundle was made; an export identical
    to it byte for byte needs no second check. Raises ConfigError when it must be exported and
    torch/onnx are missing; BundleError when the export disagrees with torch (nothing is cached then).
    """
    hit = cached_onnx(weights_sha256)
    if hit is not None:
        return hit
    if not can_export():
        raise ConfigError(f"{path} ships no model.onnx and it cannot be exported here: pip install 'fmct[onnx]' "
                          "(with torch), or use --backend torch")
    from fmct.export.onnx import checked_export

    log.info("Exporting the model to ONNX once (cached in %s) ...", cache_folder(weights_sha256))
    data, record = checked_export(Path(path), known=known)
    if record["weights_sha256"] != weights_sha256:
        raise BundleError(f"{path}: the weights changed while they were exported; run again")
    _store(weights_sha256, data, record)
    return data, record


def _store(weights_sha256: str, data: bytes, record: dict[str, Any]) -> None:
    """Write the graph, then its record (a crash in between leaves a record-less folder, ignored)."""
    from fmct.conventions.atomic import write_bytes_atomic, write_text_atomic

    folder = cache_folder(weights_sha256)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / "model.onnx", data)
        write_text_atomic(folder / RECORD_FILE, json.dumps(record, indent=2, sort_keys=True))
    except OSError as e:  # a read-only home: run from memory this time
        log.warning("could not cache the ONNX export in %s (%s); it will be exported again next time", folder, e)
