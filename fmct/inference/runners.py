"""The two ways to run a bundle's model, with one face: a model tensor in, logits out.

`TorchRunner` holds the torch module (so it can also explain); `fmct.inference.onnx_runner.OnnxModel` runs
the checked model.onnx with onnxruntime alone (findings only, torch never imported). The Analyzer
talks to either through `logits(array)` and `device`, calibrates once with
`calibrated_probabilities`, and offers explanations exactly when `runner.module` is not None.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fmct.inference.bundle import ONNX_FILE, Bundle, default_bundle_path, has_member, load_bundle, read_meta
from fmct.conventions.errors import ConfigError
from fmct.inference.calibration import calibrated_probabilities  # noqa: F401 (re-exported: Analyzer's face)
from fmct.conventions.runtime import autocast, cuda_may_be_present, parse_device, torch_device

if TYPE_CHECKING:
    import torch

BACKENDS = ("torch", "onnx")
BACKEND_CHOICES = ("auto", *BACKENDS)  # what a user may ask for; auto is settled by choose_backend


class Runner(Protocol):
    """What the Analyzer needs of a backend."""

    device: str
    module: Any  # the torch module when there is one (explanations need it), else None

    def logits(self, array: np.ndarray) -> np.ndarray:
        """[B, C, D, H, W] float32 model tensor -> [B, T] float32 logits."""

    def run(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and the pooled encoder features [B, F] (None when the backend cannot give them)."""


class TorchRunner:
    """A bundle's torch model on a device: bf16 autocast and SDPA attention on CUDA, optional torch.compile."""

    def __init__(self, module: "torch.nn.Module", device: str = "auto", compile: bool = False) -> None:
        import torch

        self.torch_device = torch_device(device)
        self.device = str(self.torch_device)
        self.module = module.to(self.torch_device).eval()
        # the one callable every path runs (logits, run, and so Analyzer and the batch): compiling it
        # means --compile is what users get, not a side path
        forward = self.module.forward_with_features
        self._forward = torch.compile(forward) if compile else forward

    def logits(self, array: "np.ndarray | torch.Tensor") -> np.ndarray:
        import torch

        x = torch.as_tensor(array).to(self.torch_device, non_blocking=True)
        with torch.no_grad(), autocast(self.torch_device):
            return self._forward(x)[0].float().cpu().numpy()

    def run(self, array: "np.ndarray | torch.Tensor") -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = torch.as_tensor(array).to(self.torch_device, non_blocking=True)
        with torch.no_grad(), autocast(self.torch_device):
            logits, features = self._forward(x)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()

    def to_device(self, tensor: "torch.Tensor") -> "torch.Tensor":
        return tensor.to(self.torch_device)


def choose_backend(backend: str, bundle: str | Path | None, device: str, explain_method: str | None) -> str:
    """The backend a run uses: "auto" is onnxruntime when only findings are asked for, the model runs on
    the CPU anyway and the bundle holds a model.onnx its fmct.json vouches for (or was shipped without
    it and gets it exported once into the user cache); torch otherwise.

    Both give the same probabilities (export checks them to 1e-4 and records both files' SHA-256,
    which load_onnx_bundle verifies: a stale or edited model.onnx is refused, not passed over), but
    onnxruntime imports in 0.1 s where torch takes 1-2 s, most of a findings-only cold start
    (benchmarks/RESULTS.md#coldstart). Explanations need gradients, hence torch.
    """
    if backend not in BACKEND_CHOICES:
        raise ConfigError(f"unknown backend '{backend}'; choose one of {', '.join(BACKEND_CHOICES)}")
    if backend != "auto":
        return backend
    device = parse_device(device)
    if explain_method is not None or device.startswith("cuda") or (device == "auto" and cuda_may_be_present()):
        return "torch"
    if importlib.util.find_spec("onnxruntime") is None:
        return "torch"
    path = Path(bundle) if bundle is not None else default_bundle_path()
    vouched = isinstance(read_meta(path).onnx, dict)  # a broken fmct.json is refused here, as loading would
    if not vouched:
        return "torch"
    return "onnx" if has_member(path, ONNX_FILE) or _onnx_obtainable(path) else "torch"


def _onnx_obtainable(path: Path) -> bool:
    """A vouched-for bundle shipped without model.onnx: its graph is in the user cache, or can be
    exported into it at first use (fmct.export.onnx_cache)."""
    from fmct.export import onnx_cache

    if onnx_cache.can_export():
        return True
    import hashlib

    from fmct.inference.bundle import WEIGHTS_FILE, read_members

    weights = read_members(path, (WEIGHTS_FILE,)).get(WEIGHTS_FILE)
    return weights is not None and onnx_cache.cached_onnx(hashlib.sha256(weights).hexdigest()) is not None


def load_runner(bundle: Bundle | str | Path | None = None, backend: str = "torch", device: str = "auto",
                compile: bool = False, threads: int | None = None) -> tuple[Bundle, Runner]:
    """A bundle (the bundled demo model when None) and a runner for it on the chosen backend."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    device = parse_device(device)
    if backend == "onnx":
        if compile:
            raise ConfigError("compile applies to the torch backend only")
        from fmct.inference.onnx_runner import load_onnx_bundle

        where = bundle.path if isinstance(bundle, Bundle) else bundle
        where = Path(where) if where is not None else default_bundle_path()
        from fmct.export.onnx_cache import onnx_for_bundle

        meta, model, weights_sha256 = load_onnx_bundle(where, device, threads, supply=onnx_for_bundle)
        # the hash of the weights just read: the OOD statistics and the batch's model identity need no second read
        return Bundle(meta, None, where, weights_sha256=weights_sha256), model
    if isinstance(bundle, Bundle) and bundle.model is None:
        if bundle.path is None:
            raise ConfigError("this Bundle has no torch model and no path to load one from")
        bundle = load_bundle(bundle.path)
    elif not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle if bundle is not None else default_bundle_path())
    return bundle, TorchRunner(bundle.model, device, compile)
