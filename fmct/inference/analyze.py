"""Analyze: a CT Volume in, calibrated findings and saliency Volumes on the CT's grid out.

This is the one code path behind `fmct analyze`, `fmct demo` and the Slicer module.
Two backends compute the probabilities: torch (default; also explanations, CUDA with bf16
autocast and SDPA attention, optional torch.compile) and onnxruntime (`backend="onnx"`: the
bundle's checked model.onnx, no torch imported at all, findings only). torch is therefore
imported inside the functions that need it, never at module level.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fmct.checks.runner import CheckReport, run_checks
from fmct.inference.bundle import Bundle
from fmct.conventions.errors import BundleError, ConfigError
from fmct.preprocessing.preprocessor import Grid, ModelInput, Preprocessor
from fmct.inference.ood import load_reference_stats
from fmct.inference.results import SALIENCY_MAX, AnalysisResult, Finding  # noqa: F401 (Finding: re-exported)
from fmct.inference.calibration import calibrated_probabilities
from fmct.inference.runners import load_runner
from fmct.conventions.runtime import CancelCheck, Progress, check_cancel, check_explain_method, progress_or_silent, sub_progress
from fmct.reading.volume import Volume, validate_ct

if TYPE_CHECKING:
    import torch


class Analyzer:
    """Holds a loaded bundle on a runner; analyze() may be called for many volumes.

    backend="torch": device "auto" picks CUDA when present; on CUDA the forward runs under bf16
    autocast, where SDPA dispatches to flash / memory-efficient attention. compile=True wraps the
    forward in torch.compile (worth it for many volumes on a GPU; the first call compiles).
    backend="onnx": onnxruntime runs the bundle's checked model.onnx; torch is never imported,
    so explanations (which need gradients) are unavailable.
    """

    def __init__(self, bundle: Bundle | str | Path | None = None, device: str = "auto", backend: str = "torch",
                 compile: bool = False, threads: int | None = None) -> None:
        self.bundle, self.runner = load_runner(bundle, backend, device, compile, threads)
        self.backend = backend
        if not self.bundle.meta.tasks:
            raise ConfigError(f"bundle '{self.bundle.meta.name}' has no task heads (a pretrained encoder); fine-tune it first")
        self.preprocessor = Preprocessor(self.bundle.meta.preprocessing)
        self.reference = load_reference_stats(self.bundle)

    @property
    def device(self) -> str:
        return self.runner.device

    @property
    def model(self) -> Any:
        """The torch module (None on the onnxruntime backend)."""
        return self.runner.module

    @property
    def can_explain(self) -> bool:
        return self.runner.module is not None

    @property
    def temperatures(self) -> list[float]:
        return [t.temperature for t in self.bundle.meta.tasks]

    def probabilities(self, x: "torch.Tensor | np.ndarray") -> np.ndarray:
        """Calibrated probabilities [B, T]: sigmoid(logit / temperature) per task, on either backend."""
        return calibrated_probabilities(self.runner.logits(x), self.temperatures)

    def analyze(
        self,
        volume: Volume,
        explain_method: str | None = "integrated_gradients",
        explain_findings: str | Sequence[str] = "positive",
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
        map_back: bool = True,
    ) -> AnalysisResult:
        """Findings for one CT, and a saliency map for each positive finding (or: "auto", "top", "all", the ones
        named). map_back=False: see analyze_prepared."""
        self.check_explain_method(explain_method)
        notify = progress_or_silent(progress)
        t0 = time.perf_counter()
        notify(0.0, "preprocessing")
        checks, model_input = self.prepare(volume)
        preprocess_s = time.perf_counter() - t0
        check_cancel(cancel)
        result = self.analyze_prepared(model_input, explain_method, explain_findings, progress=notify, cancel=cancel,
                                       map_back=map_back)
        result.timings = {"preprocess_s": preprocess_s, **result.timings}
        attach_checks(result, checks)
        return result

    def prepare(self, volume: Volume) -> tuple[CheckReport, ModelInput]:
        """Input checks, the head checks (refusing before any model runs), then preprocessing of the head.

        In a larger scan the head checks crop to the head; maps still come back onto the whole CT's grid.
        """
        return check_and_preprocess(self.preprocessor, volume)

    def check_explain_method(self, explain_method: str | None) -> None:
        """Refuse an unknown method, or any method on the onnxruntime backend (it has no gradients)."""
        check_explain_method(explain_method)
        if explain_method is not None and not self.can_explain:
            raise ConfigError(f"explanation '{explain_method}' needs the torch model (gradients or attention weights); "
                              "with backend onnx use explain none (--explain none), or use --backend torch")

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
        notify = progress_or_silent(progress)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        notify(0.1, "predicting")
        logits, features = self.runner.run(model_input.array)
        probs = calibrated_probabilities(logits, self.temperatures)[0]
        if not np.isfinite(logits).all():
            raise BundleError(f"model '{self.bundle.meta.name}' gave non-finite outputs for this CT; its weights are "
                              "broken (NaN or inf). Use another bundle, or re-train or re-download this one.")
        findings = [
            Finding(t.name, t.description, float(p), t.threshold, bool(p >= t.threshold) and t.validated, t.validated)
            for t, p in zip(self.bundle.meta.tasks, probs)
        ]
        timings["predict_s"] = time.perf_counter() - t0

        result = AnalysisResult(findings, method=explain_method, timings=timings, model_input=model_input,
                                input_warnings=list(model_input.input_warnings), banner=self.bundle.meta.banner)
        if self.reference is not None and features is not None:
            result.ood = self.reference.judge(features)
        targets = self._targets(findings, explain_findings) if explain_method else []
        t0 = time.perf_counter()
        if targets:  # every finding's map from one shared pass (one forward over the IG path, a backward each)
            from fmct.inference.saliency import explain_result

            check_cancel(cancel)
            explain_result(self, result, targets, explain_method, sub_progress(notify, 0.2, 0.9), cancel)
            map_progress = sub_progress(notify, 0.9, 0.99)
            for n, name in enumerate(list(result.model_saliency)):
                if map_back:
                    check_cancel(cancel)
                    map_progress(n / len(result.model_saliency), f"mapping {name} onto the CT")
                    result.saliency[name] = self.map_back(result, name)
        timings["explain_s"] = time.perf_counter() - t0
        notify(1.0, "done")
        return result

    def map_back(self, result: AnalysisResult, name: str) -> Volume:
        """One finding's saliency on the input CT's grid, as uint8 0..SALIENCY_MAX (what the files hold).

        A float32 map on a thin or very large CT's grid costs 4 bytes a voxel for what carries the
        model grid's information; uint8 is a quarter of that and is what findings.json describes.
        """
        return self.preprocessor.to_input_grid(result.model_saliency[name], result.model_input, levels=SALIENCY_MAX,
                                               finding=name, method=result.method)

    def _targets(self, findings: list[Finding], which: str | Sequence[str]) -> list[str]:
        if which == "auto":  # every positive finding on a GPU, the top one on a CPU (runtime.EXPLAIN_FINDINGS_CHOICES)
            which = "positive" if str(self.device).startswith("cuda") else "top"
        if which == "top":
            top = AnalysisResult(findings).primary_finding()
            return [top.name] if top is not None else []
        if which == "positive":
            return [f.name for f in findings if f.positive]
        if which == "all":
            return [f.name for f in findings]
        names = [which] if isinstance(which, str) else list(which)
        unknown = [n for n in names if n not in self.bundle.meta.task_names]
        if unknown:
            raise ConfigError(f"unknown finding(s) {unknown}; this model predicts {self.bundle.meta.task_names}")
        return names



def check_and_preprocess(preprocessor: Preprocessor, volume: Volume) -> tuple[CheckReport, ModelInput]:
    """validate_ct, the head checks (fmct.checks: refuse before any model runs), then the head preprocessed.

    One function for the Analyzer, the batch's workers and the Slicer worker, so none skips a check.
    """
    source = volume.meta.get("source", "input volume")
    validate_ct(volume, source)  # every caller, not only the readers
    checks = run_checks(volume, source)
    model_input = preprocessor(checks.crop.apply(volume) if checks.crop is not None else volume)
    model_input.input_grid = Grid.of(volume)  # maps go back onto the whole CT, cropped or not
    return checks, model_input


def attach_checks(result: AnalysisResult, checks: CheckReport | None) -> None:
    """Record the checks on the result; a flagged CT (a head cut by the field of view) is never "in distribution"."""
    result.checks = checks
    if checks is None or not checks.flagged or result.ood is None:
        return
    result.ood["in_distribution"] = False
    result.ood["flagged_by_checks"] = [c.name for c in checks.flagged]
