"""What an analysis gives: the findings, the maps and the records beside them, and the saliency scale.

A leaf of the inference package (it imports no other stage), so the Analyzer that fills a result, the
study folder and report.png that write it, and the explanation stage all depend on it and not on each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmct.checks.runner import CheckReport
from fmct.preprocessing.grid import ModelInput
from fmct.reading.volume import Volume

SALIENCY_MAX = 255  # stored value of the strongest attribution; divide by it for the [0, 1] map


@dataclass
class Finding:
    name: str
    description: str
    probability: float
    threshold: float
    positive: bool  # above its threshold AND validated: a task that is not validated is never positive
    validated: bool = True

    @property
    def shown(self) -> str:
        """What a person is shown as the result: POSITIVE, '-' or 'not validated' (never POSITIVE then)."""
        return "not validated" if not self.validated else ("POSITIVE" if self.positive else "-")

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        """The inverse of to_dict (which adds the derived 'result')."""
        return cls(d["name"], d.get("description", ""), float(d["probability"]), float(d["threshold"]),
                   bool(d["positive"]), bool(d.get("validated", True)))

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description, "probability": round(self.probability, 6),
            "threshold": self.threshold, "positive": self.positive, "validated": self.validated, "result": self.shown,
        }


@dataclass
class AnalysisResult:
    findings: list[Finding]
    saliency: dict[str, Volume] = field(default_factory=dict)  # finding name -> uint8 map (0..255) on the input grid
    method: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    model_input: ModelInput | None = None
    model_saliency: dict[str, np.ndarray] = field(default_factory=dict)  # the same maps on the model grid
    ood: dict[str, Any] | None = None  # the out-of-distribution record (fmct.inference.ood), None when the bundle has no statistics
    input_warnings: list[str] = field(default_factory=list)  # what the reader noticed (e.g. NIfTI qform and sform disagree)
    checks: CheckReport | None = None  # the plausibility checks (fmct.checks) run before the model; None when not run
    banner: str = ""  # the bundle's one line shown with every result (e.g. "trained on synthetic heads only")
    explanation: dict[str, Any] | None = None  # baseline, scale, completeness per map (fmct.inference.saliency)

    @property
    def in_distribution(self) -> bool | None:
        """False when the CT is unlike the model's training data; None when that could not be judged."""
        return None if self.ood is None else bool(self.ood["in_distribution"])

    @property
    def warning(self) -> str | None:
        """The line a person must see above the findings when they are not to be trusted."""
        lines = [w if w.startswith("WARNING") else f"WARNING: {w}" for w in self.input_warnings]
        trust = self._trust_warning()
        return " ".join(lines + ([trust] if trust else [])) or None

    def _trust_warning(self) -> str | None:
        """A flagged check of the CT (a head cut by the field of view, ...) first, else the OOD verdict."""
        flags = self.checks.flagged if self.checks is not None else []
        if flags:
            return f"WARNING: {flags[0].message}"
        if self.in_distribution is not False:
            return None
        if self.ood.get("borderline"):
            return (f"WARNING: this CT is at the edge of the data the model was trained on (out-of-distribution score "
                    f"{self.ood['score']:.3f}, within the measured margin below the threshold "
                    f"{self.ood['threshold']:.3f}: benign changes of the scan move it across); the findings are "
                    f"unreliable for it.")
        if self.ood.get("flagged_by_checks") and self.ood["score"] <= self.ood["threshold"]:
            return f"WARNING: {', '.join(self.ood['flagged_by_checks'])} check flagged this CT; the findings are unreliable for it."
        return (f"WARNING: this CT is unlike the data the model was trained on (out-of-distribution score "
                f"{self.ood['score']:.3f} > {self.ood['threshold']:.3f}); the findings are unreliable for it.")

    @property
    def positive(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]

    def finding(self, name: str) -> Finding:
        return next(f for f in self.findings if f.name == name)

    def primary_finding(self) -> Finding | None:
        """The finding a person is shown first (report.png, the CLI table, the Slicer overlay).

        Among the findings that have a saliency map when any do, else among the positive ones: the
        one furthest above its own threshold (thresholds differ per finding, so the margin, not the
        raw probability, says which decision is clearest). None when nothing is positive or explained.
        """
        explained = (set(self.model_saliency) | set(self.saliency)) & {f.name for f in self.findings}
        candidates = [f for f in self.findings if f.name in explained] if explained else self.positive
        return max(candidates, key=lambda f: f.probability - f.threshold) if candidates else None
