"""Analyze: a CT Volume in, calibrated findings and saliency Volumes on the CT's grid out.

This is the one code path behind `fmct analyze`, `fmct demo` and the Slicer module.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fmct.bundle import Bundle, default_bundle_path, load_bundle
from fmct.errors import Cancelled, ConfigError
from fmct.explain import METHODS, explain
from fmct.preprocess import ModelInput, Preprocessor
from fmct.volume import Volume

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

    @property
    def positive(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]

    def finding(self, name: str) -> Finding:
        return next(f for f in self.findings if f.name == name)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device '{device}'; choose auto, cpu or cuda")
    return torch.device(device)


class Analyzer:
    """Holds a loaded bundle on a device; analyze() may be called for many volumes."""

    def __init__(self, bundle: Bundle | str | Path | None = None, device: str = "auto") -> None:
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle if bundle is not None else default_bundle_path())
        if not bundle.meta.tasks:
            raise ConfigError(f"bundle '{bundle.meta.name}' has no task heads (a pretrained encoder); fine-tune it first")
        self.bundle = bundle
        self.device = resolve_device(device)
        self.model = bundle.model.to(self.device).eval()
        self.preprocessor = Preprocessor(bundle.meta.preprocessing)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities [B, T]: sigmoid(logit / temperature) per task."""
        with self._autocast():
            logits = self.model(x.to(self.device)).float()
        temps = torch.tensor([t.temperature for t in self.bundle.meta.tasks], device=logits.device)
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
        if explain_method is not None and explain_method not in METHODS:
            raise ConfigError(f"unknown explanation method '{explain_method}'; choose one of {', '.join(METHODS)}")
        report = progress or (lambda f, m: None)
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        report(0.0, "preprocessing")
        model_input = self.preprocessor(volume)
        timings["preprocess_s"] = time.perf_counter() - t0
        _check_cancel(cancel)

        t0 = time.perf_counter()
        report(0.1, "predicting")
        probs = self.probabilities(model_input.tensor)[0]
        findings = [
            Finding(t.name, t.description, float(p), t.threshold, bool(p >= t.threshold))
            for t, p in zip(self.bundle.meta.tasks, probs)
        ]
        timings["predict_s"] = time.perf_counter() - t0

        result = AnalysisResult(findings, method=explain_method, timings=timings, model_input=model_input)
        targets = self._targets(findings, explain_findings) if explain_method else []
        t0 = time.perf_counter()
        for n, name in enumerate(targets):
            _check_cancel(cancel)
            lo, span = 0.2 + 0.75 * n / len(targets), 0.75 / len(targets)
            sub = lambda f, m, lo=lo, span=span, name=name: report(lo + span * f, f"explaining {name}")  # noqa: E731
            task_index = self.bundle.meta.task_names.index(name)
            x = model_input.tensor.to(self.device)
            model_map = explain(self.model, x, task_index, explain_method, sub, cancel)
            result.saliency[name] = self.preprocessor.to_input_grid(
                model_map, model_input, finding=name, method=explain_method
            )
        timings["explain_s"] = time.perf_counter() - t0
        report(1.0, "done")
        return result

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
