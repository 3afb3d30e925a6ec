"""Analyze, in data-flow order: bundle -> runner (torch or onnxruntime) -> calibrated findings ->
out-of-distribution verdict -> explanations -> the study folder, report.png, batch.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "Bundle": "fmct.inference.bundle",
    "BundleMeta": "fmct.inference.bundle",
    "Task": "fmct.inference.bundle",
    "load_bundle": "fmct.inference.bundle",
    "read_bundle": "fmct.inference.bundle",
    "save_bundle": "fmct.inference.bundle",
    "TorchRunner": "fmct.inference.runners",
    "load_runner": "fmct.inference.runners",
    "calibrated_probabilities": "fmct.inference.calibration",
    "ReferenceStats": "fmct.inference.ood",
    "fit_reference": "fmct.inference.ood",
    "explain": "fmct.inference.explain",
    "explain_findings": "fmct.inference.explain",
    "explain_study": "fmct.inference.explain",
    "make_baseline": "fmct.inference.baselines",
    "SaliencyOnCTGrid": "fmct.inference.saliency",
    "attention_map": "fmct.inference.explain",
    "Analyzer": "fmct.inference.analyze",
    "AnalysisResult": "fmct.inference.analyze",
    "Finding": "fmct.inference.analyze",
    "write_study_outputs": "fmct.inference.study_folder",
    "read_findings": "fmct.inference.study_folder",
    "write_report": "fmct.inference.report_png",
    "run_batch": "fmct.inference.batch",
    "BatchReport": "fmct.inference.batch",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
