"""Run a bundle's model.onnx with onnxruntime alone: the deployment path that needs no torch.

The ONNX graph maps the model tensor [B, C, D, H, W] to logits [B, T], the same face as the torch
runner (`fmct.inference.runners`), where the one calibration (temperature and sigmoid) is applied to both. A model.onnx is only
trusted when fmct.json records that it was checked against the weights it sits next to:
`fmct export --onnx` records the SHA-256 of both files, so an edited, swapped or stale
model.onnx (the weights were retrained after the export) is refused instead of silently giving
different answers. A bundle that ships without model.onnx but with that record (the demo model:
the repository stores its weights once) gets its graph exported at first use into a user cache,
checked the same way (fmct.export.onnx_cache).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fmct.inference.bundle import ONNX_FILE, WEIGHTS_FILE, BundleMeta, read_bundle
from fmct.conventions.errors import BundleError, ConfigError
from fmct.conventions.runtime import device_index, parse_device

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"  # the pooled encoder features, for the out-of-distribution score
TOLERANCE = 1e-4  # max |p_onnx - p_torch| accepted at export time
RECORD_FIELDS = ("opset", "max_abs_diff_probability", "checked_on", "onnxruntime_version", "torch_version",
                 "onnx_sha256", "weights_sha256")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_onnx_record(meta: BundleMeta, members: dict[str, bytes], where: str) -> None:
    """Refuse a model.onnx that fmct.json does not vouch for (missing, unchecked, edited or stale)."""
    if ONNX_FILE not in members:
        raise BundleError(f"{where} has no {ONNX_FILE}. Run `fmct export {where} --onnx` first, or use --backend torch.")
    record = meta.onnx
    if not isinstance(record, dict):
        raise BundleError(f"{where}/fmct.json: field 'onnx' is missing, so {ONNX_FILE} was never checked against the "
                          f"weights. Re-run `fmct export {where} --onnx`.")
    missing = [k for k in RECORD_FIELDS if k not in record]
    if missing:
        raise BundleError(f"{where}/fmct.json: field 'onnx' lacks {missing}. Re-run `fmct export {where} --onnx`.")
    diff = record["max_abs_diff_probability"]
    if not isinstance(diff, (int, float)) or not 0 <= diff <= TOLERANCE:
        raise BundleError(f"{where}/fmct.json: field 'onnx.max_abs_diff_probability' is {diff!r}; it must be at most "
                          f"{TOLERANCE:g}. Re-run `fmct export {where} --onnx`.")
    if sha256(members[ONNX_FILE]) != record["onnx_sha256"]:
        raise BundleError(f"{where}/{ONNX_FILE} is not the file that was checked at export (its SHA-256 differs from "
                          f"'onnx.onnx_sha256'); it was edited or replaced. Re-run `fmct export {where} --onnx`.")
    if sha256(members[WEIGHTS_FILE]) != record["weights_sha256"]:
        raise BundleError(f"{where}/{ONNX_FILE} was exported from other weights than {WEIGHTS_FILE} (stale export). "
                          f"Re-run `fmct export {where} --onnx`.")


def providers_for(device: str) -> list:
    """onnxruntime execution providers for an fmct device name: auto prefers CUDA when onnxruntime has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    device = parse_device(device)
    if device == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise ConfigError(f"device '{device}' was asked for but this onnxruntime has no CUDA provider "
                          "(install onnxruntime-gpu); use --device cpu or auto")
    return [("CUDAExecutionProvider", {"device_id": device_index(device) or 0}), "CPUExecutionProvider"]


class OnnxModel:
    """An onnxruntime session over model.onnx: model tensor (numpy) in, logits out (a runner without gradients)."""

    module = None  # no torch module, so no explanations

    def __init__(self, onnx_bytes: bytes, device: str = "auto", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ConfigError("--backend onnx needs onnxruntime: pip install 'fmct[onnx]'") from e
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        # No busy-waiting between runs: decoding workers and writer threads need those cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=providers_for(device))
        except ConfigError:
            raise
        except Exception as e:  # onnxruntime raises its own types for invalid graphs
            raise BundleError(f"{ONNX_FILE} cannot be loaded by onnxruntime ({e})") from e
        self.providers = self.session.get_providers()

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def logits(self, array: np.ndarray) -> np.ndarray:
        """[B, C, D, H, W] float32 -> [B, T] float32."""
        x = np.ascontiguousarray(array, dtype=np.float32)
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise BundleError(f"{ONNX_FILE} returned logits of shape {list(logits.shape)} for a batch of {x.shape[0]}; "
                              "the graph does not match the bundle. Re-run `fmct export BUNDLE --onnx`.")
        return logits

    def run(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits, and the pooled features when the graph exports them (for the out-of-distribution score)."""
        if FEATURES_NAME not in {o.name for o in self.session.get_outputs()}:
            return self.logits(array), None
        x = np.ascontiguousarray(array, dtype=np.float32)
        logits, features = self.session.run([OUTPUT_NAME, FEATURES_NAME], {INPUT_NAME: x})
        return logits, features


def load_onnx_bundle(path: str | Path, device: str = "auto", threads: int | None = None,
                     supply: "OnnxSupply | None" = None) -> tuple[BundleMeta, OnnxModel, str]:
    """The bundle's metadata, a checked onnxruntime model and the SHA-256 of its weights (never imports torch)."""
    meta, members = read_onnx_bundle(path, supply)
    model = OnnxModel(members[ONNX_FILE], device, threads)
    check_graph(model, meta, str(path))
    return meta, model, sha256(members[WEIGHTS_FILE])


# supply(bundle path, weights SHA-256, fmct.json's ONNX record) -> (graph bytes, its record): where a
# vouched-for graph the bundle does not ship comes from (fmct.export.onnx_cache.onnx_for_bundle: the
# user cache, exported there at first use). Passed in by the caller, so this runner imports no exporter.
OnnxSupply = Callable[[Path, str, dict], tuple[bytes, dict]]


def read_onnx_bundle(path: str | Path, supply: OnnxSupply | None = None) -> tuple[BundleMeta, dict[str, bytes]]:
    """The bundle's metadata and files with a model.onnx that its record vouches for (refused otherwise).

    A bundle shipped without model.onnx but with the record of a checked export (the demo model:
    the repository stores its weights once) gets the graph from `supply`; the metadata then carries
    the supplied record.
    """
    meta, members = read_bundle(path, onnx=True)
    if ONNX_FILE not in members and isinstance(meta.onnx, dict) and supply is not None:
        members[ONNX_FILE], record = supply(Path(path), sha256(members[WEIGHTS_FILE]), meta.onnx)
        meta = dataclasses.replace(meta, onnx=record)
    check_onnx_record(meta, members, str(path))
    return meta, members


def check_graph(model: OnnxModel, meta: BundleMeta, where: str) -> None:
    """The graph's one input and one output must be the model tensor [B, C, D, H, W] and logits [B, tasks]."""
    inputs, outputs = model.session.get_inputs(), model.session.get_outputs()
    channels, shape = meta.preprocessing.in_channels, meta.preprocessing.tensor_shape
    want_in, want_out = ["batch", channels, *shape], ["batch", len(meta.tasks)]

    def fits(actual, want) -> bool:  # symbolic dimensions (strings, None) fit anything
        return len(actual) == len(want) and all(not isinstance(a, int) or not isinstance(w, int) or a == w
                                                for a, w in zip(actual, want))

    problems = []
    if [i.name for i in inputs] != [INPUT_NAME] or not fits(inputs[0].shape, want_in):
        problems.append(f"inputs {[(i.name, i.shape) for i in inputs]} (needed: '{INPUT_NAME}' {want_in})")
    if OUTPUT_NAME not in [o.name for o in outputs] or not fits(next(o for o in outputs if o.name == OUTPUT_NAME).shape, want_out):
        problems.append(f"outputs {[(o.name, o.shape) for o in outputs]} (needed: '{OUTPUT_NAME}' {want_out} for the "
                        f"{len(meta.tasks)} tasks in fmct.json)")
    if problems:
        raise BundleError(f"{where}/{ONNX_FILE} does not match the bundle's fmct.json: graph " + "; ".join(problems)
                          + f". Re-run `fmct export {where} --onnx`.")


def onnx_summary(record: dict[str, Any] | None) -> str:
    """One line about a bundle's ONNX check, for messages."""
    if not record:
        return "no ONNX export"
    return (f"ONNX opset {record.get('opset')}, max |p_onnx - p_torch| = {record.get('max_abs_diff_probability'):.2e} "
            f"on {record.get('checked_on')}")
