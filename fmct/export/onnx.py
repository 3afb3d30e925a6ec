"""`fmct export BUNDLE --onnx`: write model.onnx from the bundle's own weights, and prove it agrees.

The export is only kept if onnxruntime and torch give the same calibrated probabilities (within
1e-4) on a generated head CT; the check, the versions and the SHA-256 of both model files are
recorded in fmct.json under "onnx", which is what lets the onnxruntime path trust the file later.
Both files are replaced atomically, model.onnx first: a crash in between leaves a record that no
longer matches, which the onnxruntime path refuses rather than trusting a half-finished export.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fmct.conventions.atomic import write_bytes_atomic
from fmct.inference.bundle import ONNX_FILE, WEIGHTS_FILE, load_bundle, read_bundle, read_meta, write_meta
from fmct.conventions.errors import BundleError, ConfigError
from fmct.inference.onnx_runner import (
    FEATURES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    TOLERANCE,
    OnnxModel,
    check_graph,
    OnnxSupply,
    read_onnx_bundle,
    sha256,
)
from fmct.preprocessing.preprocessor import Preprocessor
from fmct.inference.calibration import calibrated_probabilities
from fmct.conventions.runtime import Progress, progress_or_silent

DEFAULT_OPSET = 17  # first opset with LayerNormalization as one op


def export_onnx(
    bundle_path: str | Path,
    opset: int = DEFAULT_OPSET,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export model.onnx into a bundle folder, check it against torch, record the check; returns the record.

    Raises BundleError (and leaves the bundle untouched) when the two disagree by more than tolerance.
    """
    notify = progress_or_silent(progress)
    path = Path(bundle_path)
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle folder; export writes {ONNX_FILE} into one (unzip a .zip bundle first)")
    if not 7 <= int(opset) <= 20:
        raise ConfigError(f"ONNX opset {opset} is not supported; use 17 (default) to 20")
    if tolerance > TOLERANCE:
        raise ConfigError(f"tolerance {tolerance:g} is looser than the {TOLERANCE:g} the onnxruntime path accepts")
    require_onnx_extra()
    notify(0.0, "loading bundle")
    onnx_bytes, record = checked_export(path, opset, tolerance, seed, notify)
    notify(0.9, "writing")
    meta = read_meta(path)
    write_bytes_atomic(path / ONNX_FILE, onnx_bytes)
    meta.onnx = record
    write_meta(meta, path)
    notify(1.0, "done")
    return record


def require_onnx_extra() -> None:
    """Exit 2 naming the extra, not a traceback, when the ONNX packages are not installed."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"ONNX export needs {' and '.join(missing)}, which are not installed: "
                          "pip install 'fmct[onnx]'")


def checked_export(path: Path, opset: int = DEFAULT_OPSET, tolerance: float = TOLERANCE, seed: int = 0,
                   progress: Progress | None = None, known: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The ONNX graph of a bundle's weights and the record that vouches for it (fmct.json's "onnx").

    Shared by `fmct export --onnx` (which writes both into the bundle) and the user cache
    (fmct.export.onnx_cache, which exports a bundle shipped without model.onnx at first use).
    known: the bundle's own record; when the export is byte for byte the graph it vouches for (same
    weights, same torch exporter), that check stands and is not run again. Raises BundleError when
    onnxruntime and torch disagree by more than tolerance.
    """
    import onnxruntime
    import torch

    notify = progress_or_silent(progress)
    bundle = load_bundle(path)
    meta = bundle.meta
    if not meta.tasks:
        raise BundleError(f"bundle '{meta.name}' has no task heads (a pretrained encoder); fine-tune it before exporting")
    model = bundle.model.float().eval()

    notify(0.1, "making a test CT")
    x, checked_on = parity_input(meta, seed)
    notify(0.3, "exporting")
    onnx_bytes = to_onnx_bytes(model, x, opset)
    if known is not None and known.get("onnx_sha256") == sha256(onnx_bytes):
        _, members = read_bundle(path)
        if known.get("weights_sha256") == sha256(members[WEIGHTS_FILE]):
            return onnx_bytes, dict(known)  # byte for byte the graph that was checked against these weights

    notify(0.7, "checking onnxruntime against torch")
    temps = [t.temperature for t in meta.tasks]
    with torch.no_grad():
        p_torch = calibrated_probabilities(model(torch.from_numpy(x)).numpy(), temps)
    p_onnx = calibrated_probabilities(OnnxModel(onnx_bytes, device="cpu").logits(x), temps)
    diff = float(np.abs(p_onnx.astype(np.float64) - p_torch.astype(np.float64)).max())
    if not diff <= tolerance:
        raise BundleError(
            f"the ONNX export of '{meta.name}' disagrees with torch: max |p_onnx - p_torch| = {diff:.3g} > {tolerance:g} "
            f"on {checked_on}; model.onnx was not written. Try another --opset, or report it with the bundle.")
    _, members = read_bundle(path)  # hash exactly the weights on disk, which the ONNX path will check
    record = {
        "opset": int(opset),
        "max_abs_diff_probability": diff,
        "tolerance": tolerance,
        "checked_on": checked_on,
        "onnxruntime_version": onnxruntime.__version__,
        "torch_version": torch.__version__,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch", *x.shape[1:]],
        "onnx_sha256": sha256(onnx_bytes),
        "weights_sha256": sha256(members[WEIGHTS_FILE]),
    }
    return onnx_bytes, record


def check_onnx_parity(bundle_path: str | Path, seed: int = 0, progress: Progress | None = None,
                      supply: "OnnxSupply | None" = None) -> float:
    """`fmct export BUNDLE --check`: re-prove that the bundle's model.onnx agrees with its torch weights.

    The SHA-256 record in fmct.json only says the files are those of the export; this runs both on a
    generated head CT and refuses (BundleError) a disagreement above the tolerance. Returns the max
    |p_onnx - p_torch|.
    """
    require_onnx_extra()
    import torch

    notify = progress_or_silent(progress)
    path = Path(bundle_path)
    notify(0.0, "loading bundle")
    meta, members = read_onnx_bundle(path, supply)  # supply: a vouched graph the bundle does not ship
    onnx_model = OnnxModel(members[ONNX_FILE], device="cpu")
    check_graph(onnx_model, meta, str(path))
    model = load_bundle(path).model.float().eval()
    notify(0.3, "making a test CT")
    x, checked_on = parity_input(meta, seed)
    notify(0.6, "comparing onnxruntime with torch")
    temps = [t.temperature for t in meta.tasks]
    with torch.no_grad():
        p_torch = calibrated_probabilities(model(torch.from_numpy(x)).numpy(), temps)
    p_onnx = calibrated_probabilities(onnx_model.logits(x), temps)
    diff = float(np.abs(p_onnx.astype(np.float64) - p_torch.astype(np.float64)).max())
    notify(1.0, "done")
    if not diff <= TOLERANCE:
        raise BundleError(f"{path}/{ONNX_FILE} disagrees with the bundle's torch weights: max |p_onnx - p_torch| = "
                          f"{diff:.3g} > {TOLERANCE:g} on {checked_on}. Re-run `fmct export {path} --onnx`.")
    return diff


def parity_input(meta, seed: int = 0) -> tuple[np.ndarray, str]:
    """A batch of two model tensors from a generated head CT (it and its left-right mirror).

    A real-looking CT exercises the weights on the inputs that matter (windows in range, a head
    in the middle), and a batch of two checks the dynamic batch axis as well.
    """
    from fmct.phantom import make_phantom

    phantom = make_phantom(seed, findings=["subdural"], slices="thick", in_plane_size=128)
    x = Preprocessor(meta.preprocessing)(phantom.volume).array
    x = np.concatenate([x, x[..., ::-1]], axis=0).astype(np.float32)
    v = phantom.volume
    size = "x".join(str(s) for s in v.size)
    spacing = "x".join(f"{s:.3g}" for s in v.spacing)
    return np.ascontiguousarray(x), f"fmct.phantom seed {seed} (subdural, {size} voxels at {spacing} mm) and its mirror"


def _with_features(model):
    """The classifier as ONNX sees it: model tensor -> (logits, pooled features for the OOD score)."""
    import torch

    class WithFeatures(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.forward_with_features(x)

    return WithFeatures(model)


def to_onnx_bytes(model, example: np.ndarray, opset: int = DEFAULT_OPSET) -> bytes:
    """Trace the classifier (model tensor -> logits, features) to ONNX with a dynamic batch axis.

    Uses the TorchScript exporter (dynamo=False): the torch.export-based one needs onnxscript,
    which fmct does not depend on. SDPA is exported as plain MatMul/Softmax, which onnxruntime
    fuses into its own attention kernels.
    """
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter about the legacy exporter
        torch.onnx.export(
            _with_features(model), (torch.from_numpy(example[:1].copy()),), buf, dynamo=False, opset_version=int(opset),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, FEATURES_NAME], do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}},
        )
    return buf.getvalue()
