"""From explain's attributions to a study's maps: one baseline, one scale, one attention map.

The analyze step's explanation stage (Analyzer.analyze_prepared calls `explain_result`):
- Integrated Gradients start from the CT's own head made normal (fmct.inference.baselines), and the
  record says which baseline and the model's calibrated probability of each explained finding there
  (below its threshold on the saliency benchmark's cases, issue 27).
- Every IG map records its completeness: the sum of its attributions against logit(CT) -
  logit(baseline), the nodes used, and a warning when the tolerance was not reached.
- One scale per study: IG and occlusion maps are divided by the largest peak among the study's maps,
  so 255 means the same attribution (recorded as attribution per grey level) in every map, and a
  finding the model barely uses looks faint beside one it relies on. Attention has no such unit:
  it is normalised on its own.
- Attention is finding-agnostic: one map, under the key "attention" (attention.nii.gz).
torch is imported by fmct.inference.explain, which this module imports only when called.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, Sequence

import numpy as np

from fmct.conventions.runtime import CancelCheck, Progress
from fmct.inference.results import SALIENCY_MAX, AnalysisResult


class Analyzer(Protocol):
    """What the explanation stage needs of fmct.inference.analyze.Analyzer (declared here, so this stage
    does not import the Analyzer that calls it)."""

    bundle: Any
    runner: Any

    @property
    def model(self) -> Any: ...

    def map_back(self, result: AnalysisResult, name: str) -> Any: ...

ATTENTION_KEY = "attention"  # the one finding-agnostic map's key in result.saliency and its file's stem
UNITS = {"integrated_gradients": "logit per model-grid voxel", "occlusion": "logit drop per model-grid voxel"}


class SaliencyOnCTGrid(Mapping):
    """result.saliency for the study writer, each map mapped back onto the CT's grid when it is asked for.

    The writer fetches a map inside the job that writes it (fmct.inference.study_folder), so one
    full-size map exists per writing thread whatever the number of maps, and each is freed once
    written: a 2.1 GB CT with 5 maps peaked at 4.0x the CT when every map was mapped back first.
    The `fmct analyze` CLI and the Slicer worker use this; report.png maps its one map once more.
    """

    def __init__(self, analyzer: Analyzer, result: AnalysisResult) -> None:
        self.analyzer, self.result = analyzer, result

    def __getitem__(self, name: str) -> Any:
        if name not in self.result.model_saliency:
            raise KeyError(name)
        return self.analyzer.map_back(self.result, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.result.model_saliency)

    def __len__(self) -> int:
        return len(self.result.model_saliency)


def is_finding_agnostic(method: str | None) -> bool:
    return bool(method) and str(method).startswith("attention")


def map_keys(method: str | None, targets: Sequence[str]) -> list[str]:
    """The keys of the maps an explanation of these findings gives: one per finding, or one attention map."""
    if not targets or method is None:
        return []
    return [ATTENTION_KEY] if is_finding_agnostic(method) else list(targets)


def explain_result(analyzer: Analyzer, result: AnalysisResult, targets: Sequence[str], method: str,
                   progress: Progress | None = None, cancel: CancelCheck | None = None) -> None:
    """Fill result.model_saliency (maps in [0, 1] on the model grid, one shared scale) and result.explanation."""
    import torch

    from fmct.inference.baselines import DEFAULT_BASELINE, make_baseline
    from fmct.inference.explain import explain_study
    from fmct.inference.calibration import calibrated_probabilities

    names = analyzer.bundle.meta.task_names
    agnostic = is_finding_agnostic(method)
    targets = list(targets)[:1] if agnostic else list(targets)
    x = analyzer.runner.to_device(result.model_input.tensor)
    baseline = None
    if method == "integrated_gradients":
        spec = analyzer.bundle.meta.preprocessing
        baseline = torch.from_numpy(make_baseline(DEFAULT_BASELINE, result.model_input.array[0], spec.windows))[None]
    ex = explain_study(analyzer.model, x, [names.index(t) for t in targets], method, progress, cancel,
                       names=targets, baseline=baseline)
    record: dict[str, Any] = {"method": method, "maps": {}, "warnings": []}
    if agnostic:
        result.model_saliency[ATTENTION_KEY] = ex.findings[0].saliency
        record["maps"][ATTENTION_KEY] = {
            "finding_agnostic": True, "file": f"{ATTENTION_KEY}.nii.gz",
            "scale": "normalised on its own: 255 = the strongest attention (CLS to patch) in this CT"}
        result.explanation = record
        return
    peak = max(f.peak for f in ex.findings)
    per_level = peak / SALIENCY_MAX if peak > 0 else 0.0
    record["scale"] = {"attribution_per_grey_level": float(f"{per_level:.6g}"), "unit": UNITS[method],
                       "shared": True, "note": "one scale for every map of this CT: 255 = the strongest attribution "
                                               "among them"}
    if baseline is not None:
        temps = np.asarray([analyzer.bundle.meta.tasks[names.index(t)].temperature for t in targets])
        probs = calibrated_probabilities(np.asarray(ex.baseline_logits)[None], temps)[0]
        record["baseline"] = {"name": DEFAULT_BASELINE,
                              "probability": {t: round(float(p), 6) for t, p in zip(targets, probs)}}
    for name, f in zip(targets, ex.findings):
        result.model_saliency[name] = f.saliency / np.float32(peak) if peak > 0 else f.saliency
        entry: dict[str, Any] = {"peak_attribution": float(f"{f.peak:.6g}"),
                                 "peak_grey_level": int(round(f.peak / per_level)) if per_level else 0}
        if f.completeness is not None:
            entry["completeness"] = f.completeness
            if not f.completeness["converged"]:
                record["warnings"].append(
                    f"{name}: the attributions sum to {f.completeness['sum_of_attributions']:.3f} against a logit "
                    f"difference of {f.completeness['logit_difference']:.3f} ({100 * f.completeness['relative_error']:.0f}% "
                    f"off after {f.completeness['nodes']} nodes; tolerance {100 * f.completeness['tolerance']:.0f}%): "
                    "read this map with caution")
        record["maps"][name] = entry
    result.explanation = record
