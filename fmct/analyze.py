"""Analyze: a CT Volume in, calibrated findings and saliency Volumes on the CT's grid out.

This is the one code path behind `fmct analyze`, `fmct demo` and the Slicer module.
Two backends compute the probabilities: torch (default; also explanations, CUDA with bf16
autocast and SDPA attention, optional torch.compile) and onnxruntime (`backend="onnx"`: the
bundle's checked model.onnx, no torch imported at all, findings only). torch is therefore
imported inside the functions that need it, never at module level.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from fmct.bundle import Bundle, default_bundle_path, load_bundle
from fmct.errors import Cancelled, ConfigError
from fmct.io import validate_ct
from fmct.preprocess import ModelInput, Preprocessor
from fmct.volume import Volume

if TYPE_CHECKING:
    import torch

BACKENDS = ("torch", "onnx")

Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


@dataclass
class Finding:
    name: str
    description: str
    probability: float
    threshold: float
    positive: bool

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description, "probability": round(self.probability, 6),
            "threshold": self.threshold, "positive": self.positive,
        }


@dataclass
class AnalysisResult:
    findings: list[Finding]
    saliency: dict[str, Volume] = field(default_factory=dict)  # finding name -> map on the input grid
    method: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    model_input: ModelInput | None = None
    model_saliency: dict[str, np.ndarray] = field(default_factory=dict)  # the same maps on the model grid

    @property
    def positive(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]

    def finding(self, name: str) -> Finding:
        return next(f for f in self.findings if f.name == name)


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = device.partition(":")[2]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and index.isdigit()):
        raise ConfigError(f"unknown device '{device}'; choose auto, cpu, cuda or cuda:N")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(device)


class Analyzer:
    """Holds a loaded bundle on a device; analyze() may be called for many volumes.

    backend="torch": device "auto" picks CUDA when present; on CUDA the forward runs under bf16
    autocast, where SDPA dispatches to flash / memory-efficient attention. compile=True wraps the
    forward in torch.compile (worth it for many volumes on a GPU; the first call compiles).
    backend="onnx": onnxruntime runs the bundle's checked model.onnx; torch is never imported,
    so explanations (which need gradients) are unavailable.
    """

    def __init__(self, bundle: Bundle | str | Path | None = None, device: str = "auto", backend: str = "torch",
                 compile: bool = False, threads: int | None = None) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.onnx: Any = None
        if backend == "onnx":
            if compile:
                raise ConfigError("compile applies to the torch backend only")
            self._init_onnx(bundle, device, threads)
        else:
            self._init_torch(bundle, device, compile)
        if not self.bundle.meta.tasks:
            raise ConfigError(f"bundle '{self.bundle.meta.name}' has no task heads (a pretrained encoder); fine-tune it first")
        self.preprocessor = Preprocessor(self.bundle.meta.preprocessing)

    def _init_torch(self, bundle: Bundle | str | Path | None, device: str, compile: bool) -> None:
        import torch

        if isinstance(bundle, Bundle) and bundle.model is None:
            if bundle.path is None:
                raise ConfigError("this Bundle has no torch model and no path to load one from")
            bundle = load_bundle(bundle.path)
        elif not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle if bundle is not None else default_bundle_path())
        self.bundle = bundle
        self.device = resolve_device(device)
        self.model = bundle.model.to(self.device).eval()
        self._forward = torch.compile(self.model) if compile else self.model

    def _init_onnx(self, bundle: Bundle | str | Path | None, device: str, threads: int | None) -> None:
        from fmct.onnx_backend import load_onnx_bundle

        where = bundle.path if isinstance(bundle, Bundle) else bundle
        where = where if where is not None else default_bundle_path()
        meta, self.onnx = load_onnx_bundle(where, device, threads)
        self.bundle = Bundle(meta, None, Path(where))
        self.model = None
        self.device = self.onnx.device

    def _autocast(self):
        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def temperatures(self) -> list[float]:
        return [t.temperature for t in self.bundle.meta.tasks]

    def probabilities(self, x: "torch.Tensor | np.ndarray") -> np.ndarray:
        """Calibrated probabilities [B, T]: sigmoid(logit / temperature) per task."""
        if self.onnx is not None:
            from fmct.onnx_backend import calibrated_probabilities

            return calibrated_probabilities(self.onnx.logits(np.asarray(x, dtype=np.float32)), self.temperatures)
        import torch

        x = torch.as_tensor(x)
        with torch.no_grad(), self._autocast():
            logits = self._forward(x.to(self.device, non_blocking=True)).float()
        temps = torch.tensor(self.temperatures, device=logits.device)
        return torch.sigmoid(logits / temps).cpu().numpy()

    def analyze(
        self,
        volume: Volume,
        explain_method: str | None = "integrated_gradients",
        explain_findings: str | Sequence[str] = "positive",
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
    ) -> AnalysisResult:
        """Findings for one CT, and a saliency map for each positive finding (or the ones named)."""
        self.check_explain_method(explain_method)
        report = progress or (lambda f, m: None)
        t0 = time.perf_counter()
        report(0.0, "preprocessing")
        validate_ct(volume, volume.meta.get("source", "input volume"))  # every caller, not only the readers
        model_input = self.preprocessor(volume)
        preprocess_s = time.perf_counter() - t0
        _check_cancel(cancel)
        result = self.analyze_prepared(model_input, explain_method, explain_findings, progress=report, cancel=cancel)
        result.timings = {"preprocess_s": preprocess_s, **result.timings}
        return result

    def check_explain_method(self, explain_method: str | None) -> None:
        """Refuse an unknown method, or any method on the onnxruntime backend (it has no gradients)."""
        if explain_method is None:
            return
        if self.onnx is not None:
            raise ConfigError(f"explanation '{explain_method}' needs the torch model (gradients or attention weights); "
                              "with backend onnx use explain none (--explain none), or use --backend torch")
        from fmct.explain import METHODS

        if explain_method not in METHODS:
            raise ConfigError(f"unknown explanation method '{explain_method}'; choose one of {', '.join(METHODS)}")

    def analyze_prepared(
        self,
        model_input: ModelInput,
        explain_method: str | None = "integrated_gradients",
        explain_findings: str | Sequence[str] = "positive",
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
        map_back: bool = True,
    ) -> AnalysisResult:
        """analyze() after preprocessing: for batch analysis, where workers preprocess ahead of the model.

        map_back=False leaves the saliency on the model grid (result.model_saliency) so the caller
        can map it onto the CT's grid elsewhere (a writer thread), keeping the model busy.
        """
        self.check_explain_method(explain_method)
        report = progress or (lambda f, m: None)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        report(0.1, "predicting")
        probs = self.probabilities(model_input.array)[0]
        findings = [
            Finding(t.name, t.description, float(p), t.threshold, bool(p >= t.threshold))
            for t, p in zip(self.bundle.meta.tasks, probs)
        ]
        timings["predict_s"] = time.perf_counter() - t0

        result = AnalysisResult(findings, method=explain_method, timings=timings, model_input=model_input)
        targets = self._targets(findings, explain_findings) if explain_method else []
        t0 = time.perf_counter()
        if targets:
            from fmct.explain import explain
        for n, name in enumerate(targets):
            _check_cancel(cancel)
            lo, span = 0.2 + 0.75 * n / len(targets), 0.75 / len(targets)
            sub = lambda f, m, lo=lo, span=span, name=name: report(lo + span * f, f"explaining {name}")  # noqa: E731
            task_index = self.bundle.meta.task_names.index(name)
            x = model_input.tensor.to(self.device)
            model_map = explain(self.model, x, task_index, explain_method, sub, cancel)
            result.model_saliency[name] = model_map
            if map_back:
                result.saliency[name] = self.map_back(result, name)
        timings["explain_s"] = time.perf_counter() - t0
        report(1.0, "done")
        return result

    def map_back(self, result: AnalysisResult, name: str) -> Volume:
        """One finding's saliency, moved from the model grid onto the input CT's grid."""
        return self.preprocessor.to_input_grid(result.model_saliency[name], result.model_input, finding=name,
                                               method=result.method)

    def _targets(self, findings: list[Finding], which: str | Sequence[str]) -> list[str]:
        if which == "positive":
            return [f.name for f in findings if f.positive]
        if which == "all":
            return [f.name for f in findings]
        names = [which] if isinstance(which, str) else list(which)
        unknown = [n for n in names if n not in self.bundle.meta.task_names]
        if unknown:
            raise ConfigError(f"unknown finding(s) {unknown}; this model predicts {self.bundle.meta.task_names}")
        return names


def _check_cancel(cancel: CancelCheck | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("Analysis cancelled")
