"""Feature extraction, the foundation-model interface: an encoder bundle -> one feature row per study.

In Python::

    from fmct.features.embed import load_encoder
    encoder = load_encoder("runs/pretrain/bundle")        # a ViT3D in eval mode, on the CPU
    x = Preprocessor(encoder.preprocessing)(volume).tensor  # [1, C, D, H, W], the bundle's own spec
    with torch.no_grad():                                 # features only: no graph
        feats = encoder.forward_features(x)               # {"cls": [1, D], "patch": [1, N, D]}
        layers = encoder.get_intermediate_layers(x, n=4, return_class_token=True)  # as DINOv2

On the command line, ``fmct embed DATA --model BUNDLE --out features.npz`` (or ``.csv``) writes, per
study: the CLS token, the mean patch token (what a bundle's task head reads), and with --layers N
the same two for each of the last N blocks. It is resumable like batch analysis: each study's row is
written as it is made under ``<out>.parts/``, a rerun skips the studies already there, and one made
with another model or other options is refused (--overwrite starts again). Studies that cannot be
read are listed in the output (``skipped``) and the run goes on.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fmct.conventions.atomic import write_bytes_atomic
from fmct.conventions.errors import ConfigError, FMCTError
from fmct.conventions.runtime import CancelCheck, Progress, progress_or_silent

log = logging.getLogger("fmct.features.embed")

PARTS_SUFFIX = ".parts"
FORMATS = (".npz", ".csv")


def load_encoder(bundle: Any, device: str = "cpu"):
    """The encoder of a bundle (a folder or .zip path, or a loaded fmct.inference.bundle.Bundle) as a ViT3D in eval mode.

    It carries ``encoder.preprocessing`` (the bundle's PreprocessSpec: feed it tensors made with
    that spec) and ``encoder.bundle_meta``. Works for task-less pretrained bundles and fine-tuned ones, and
    for a folder written by ``fmct export --hf`` (config.json + model.safetensors).
    """
    from fmct.inference.bundle import Bundle, load_bundle
    from fmct.conventions.runtime import torch_device

    if not isinstance(bundle, Bundle) and _is_hf_folder(Path(bundle)):
        loaded = _load_hf_folder(Path(bundle))
    else:
        loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if loaded.model is None:
        raise ConfigError("this bundle was loaded without its weights; load it with load_model=True")
    encoder = loaded.model.encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder.preprocessing = loaded.meta.preprocessing
    encoder.bundle_meta = loaded.meta
    return encoder.to(torch_device(device))


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "fmct.json").exists()


def _load_hf_folder(path: Path):
    """A folder from `fmct export --hf`, loaded with a bundle's checks (names, shapes, dtypes, finiteness)."""
    import hashlib

    from fmct.export.hf import read_hf_meta
    from fmct.inference.bundle import WEIGHTS_FILE, Bundle, build_model, check_weights_header, load_weights

    meta = read_hf_meta(path)
    weights = (path / WEIGHTS_FILE).read_bytes() if (path / WEIGHTS_FILE).is_file() else b""
    check_weights_header(meta, weights, where=str(path))
    model = build_model(meta)
    load_weights(model, weights, where=str(path))
    return Bundle(meta, model.eval(), path, None, hashlib.sha256(weights).hexdigest())


def _fingerprint(bundle_path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' rows comparable: the weights' bytes and the options."""
    from fmct.inference.bundle import load_bundle

    h = hashlib.sha256()
    if bundle_path.is_dir():
        weights = bundle_path / "model.safetensors"
        h.update(weights.read_bytes() if weights.is_file() else b"")
        meta_file = bundle_path / "fmct.json"
        h.update(meta_file.read_bytes() if meta_file.is_file() else b"")
    else:
        h.update(bundle_path.read_bytes())
    if _is_hf_folder(bundle_path):
        from fmct.export.hf import read_hf_meta

        name = read_hf_meta(bundle_path).name
    else:
        name = load_bundle(bundle_path, load_model=False).meta.name
    return {"model": name, "model_sha256": h.hexdigest(), **options}


def _part_name(study_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_id)
    return f"{safe}-{hashlib.sha1(study_id.encode()).hexdigest()[:8]}.npz"


def embed(data: str | Path, model: str | Path, out: str | Path, layers: int = 0, device: str = "auto",
          layout: str = "auto", overwrite: bool = False, progress: Progress | None = None,
          cancel: CancelCheck | None = None, verify: bool = False, path_prefix: str | None = None) -> dict[str, Any]:
    """Embed every study of DATA (a folder, manifest CSV, RSNA or CQ500 layout, FM-HCT's split CSV with
    path_prefix "OLD=NEW", or a cache from `fmct prepare` made for MODEL's grid; verify: check that
    cache's bytes and sources first) with MODEL's encoder.

    Returns {"out": path, "rows": n, "skipped": [...], "reused": n}. See the module docstring.
    """
    import torch

    from fmct.data.datasets import read_study
    from fmct.conventions.errors import Cancelled
    from fmct.data.cache import load_studies, open_for, windows_to_channels
    from fmct.preprocessing.preprocessor import Preprocessor
    from fmct.conventions.runtime import torch_device

    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out {out}: give a .npz or .csv file name")
    if layers < 0:
        raise ConfigError("--layers must be 0 or more")
    bundle_path = Path(model)
    encoder = load_encoder(bundle_path, "cpu")
    depth = len(encoder.blocks)
    if layers > depth:
        raise ConfigError(f"--layers {layers}: this encoder has {depth} blocks")
    dev = torch_device(device)
    encoder = encoder.to(dev)
    manifest, cache = load_studies(data, layout, path_prefix=path_prefix)  # a prepared cache: read through its index
    if cache is not None:
        open_for(cache, encoder.preprocessing, verify)
    if not manifest:
        raise ConfigError(f"{data} holds no studies to embed")

    parts = out.with_name(out.name + PARTS_SUFFIX)
    finger = _fingerprint(bundle_path, {"layers": int(layers)})
    meta_path = parts / "run.json"
    if parts.is_dir() and meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != finger and not overwrite:
            raise ConfigError(f"{parts} holds features made with another model or options ({old.get('model')}, layers "
                              f"{old.get('layers')}); use --overwrite to start again, or another --out")
        if old != finger:
            for p in parts.glob("*.npz"):
                p.unlink()
    parts.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(meta_path, json.dumps(finger, indent=1).encode())

    pre = Preprocessor(encoder.preprocessing)
    notify = progress_or_silent(progress)
    skipped, reused = [], 0
    for i, study in enumerate(manifest):
        if cancel is not None and cancel():
            raise Cancelled(f"embedding cancelled after {i} of {len(manifest)} studies; run it again to go on")
        part = parts / _part_name(study.study_id)
        if part.is_file():
            reused += 1
            continue
        notify(i / len(manifest), f"embedding {study.study_id}")
        try:
            x = (windows_to_channels(torch.from_numpy(cache.read_hu(i).copy()), encoder.preprocessing.windows)[None]
                 if cache is not None else pre(read_study(study)).tensor).to(dev)
        except (FMCTError, OSError, RuntimeError, ValueError) as e:
            skipped.append({"study_id": study.study_id, "path": str(study.path), "reason": str(e).splitlines()[0][:300]})
            log.warning("skipped %s: %s", study.study_id, skipped[-1]["reason"])
            continue
        with torch.no_grad():
            outs = encoder.get_intermediate_layers(x, n=max(layers, 1), return_class_token=True)
        row = {"cls": outs[-1][1][0], "patch_mean": outs[-1][0][0].mean(dim=0)}
        if layers:
            for k, (patch, cls) in enumerate(outs):
                block = depth - layers + k
                row[f"block{block}_cls"] = cls[0]
                row[f"block{block}_patch_mean"] = patch[0].mean(dim=0)
        buf = io.BytesIO()
        np.savez(buf, **{k: v.float().cpu().numpy() for k, v in row.items()})
        write_bytes_atomic(part, buf.getvalue())
    notify(1.0, "writing features")
    return _assemble(manifest, parts, out, skipped, reused, finger)


def _assemble(manifest, parts: Path, out: Path, skipped: list[dict], reused: int, finger: dict) -> dict[str, Any]:
    ids, rows = [], []
    for study in manifest:
        part = parts / _part_name(study.study_id)
        if part.is_file():
            with np.load(part) as z:
                rows.append({k: z[k] for k in z.files})
            ids.append(study.study_id)
    if not rows:
        raise ConfigError(f"no study could be embedded ({len(skipped)} skipped, e.g. {skipped[0]['reason'] if skipped else '-'})")
    tasks = manifest.tasks
    by_id = {s.study_id: s for s in manifest}
    labels = np.array([[np.nan if by_id[i].labels.get(t) is None else float(by_id[i].labels[t]) for t in tasks] for i in ids],
                      dtype=np.float64).reshape(len(ids), len(tasks))
    keys = list(rows[0])
    if out.suffix.lower() == ".npz":
        arrays = {k: np.stack([r[k] for r in rows]).astype(np.float32) for k in keys}
        buf = io.BytesIO()
        groups = {} if all(by_id[i].group is None for i in ids) else {"study": np.array([by_id[i].study for i in ids])}
        np.savez_compressed(buf, study_id=np.array(ids), tasks=np.array(tasks, dtype=str), labels=labels,
                            skipped=np.array(json.dumps(skipped)), meta=np.array(json.dumps(finger)), **groups, **arrays)
        write_bytes_atomic(out, buf.getvalue())
    else:
        text = io.StringIO()
        w = csv.writer(text)
        header = ["study_id", *[f"label_{t}" for t in tasks]]
        for k in keys:
            header += [f"{k}_{j}" for j in range(len(rows[0][k]))]
        w.writerow(header)
        for sid, lab, r in zip(ids, labels, rows):
            w.writerow([sid, *["" if np.isnan(v) else int(v) for v in lab], *[f"{v:.6g}" for k in keys for v in r[k]]])
        write_bytes_atomic(out, text.getvalue().encode())
    if skipped:
        write_bytes_atomic(out.with_name(out.name + ".skipped.json"), json.dumps(skipped, indent=1).encode())
    return {"out": out, "rows": len(ids), "skipped": skipped, "reused": reused, "features": keys}


# ----------------------------------------------------------------------------------- reading back
def read_features(path: str | Path) -> dict[str, Any]:
    """A features file from `fmct embed` -> {"study_id": [...], "tasks": [...], "labels": [N, T] (NaN unknown),
    "<feature>": [N, D] for each feature (cls, patch_mean, blockK_cls, ...)}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"features file not found: {path}")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files if k not in ("skipped", "meta")}
        out["study_id"] = [str(s) for s in out["study_id"]]
        if "study" in out:  # several series per study (FM-HCT's split files): the study of each row
            out["study"] = [str(s) for s in out["study"]]
        out["tasks"] = [str(t) for t in out.get("tasks", [])]
        return out
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        table = list(reader)
    if not header or header[0] != "study_id":
        raise ConfigError(f"{path} is not a features CSV from `fmct embed` (first column must be study_id)")
    tasks = [h[len("label_"):] for h in header if h.startswith("label_")]
    out: dict[str, Any] = {"study_id": [r[0] for r in table], "tasks": tasks}
    out["labels"] = np.array([[float(r[1 + j]) if r[1 + j] != "" else np.nan for j in range(len(tasks))] for r in table],
                             dtype=np.float64).reshape(len(table), len(tasks))
    columns: dict[str, list[int]] = {}
    for j, h in enumerate(header[1 + len(tasks):], start=1 + len(tasks)):
        columns.setdefault(h.rsplit("_", 1)[0], []).append(j)
    for name, idx in columns.items():
        out[name] = np.array([[float(r[j]) for j in idx] for r in table], dtype=np.float32)
    return out
