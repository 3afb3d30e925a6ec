"""Run every plausibility check of a CT, in the order their evidence depends on, before any model runs.

The header first (direction matrix), then the HU scale (anatomy is found by HU), then the head by
its skull, whether the field of view cuts it, its size and its orientation. Refusing checks raise a
HeadCheckError (exit 2) naming the first that failed; flags ride along in the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fmct.checks.calibration import check_calibration
from fmct.checks.direction import check_direction
from fmct.checks.field_of_view import check_field_of_view
from fmct.checks.head import Crop, check_head
from fmct.checks.orientation import check_orientation
from fmct.checks.result import Check, refusal
from fmct.checks.sample import sample
from fmct.checks.size import check_size
from fmct.checks.skull import find_skull
from fmct.reading.volume import Volume


@dataclass
class CheckReport:
    """Every check's record, and the part of the CT to analyze (the head, cropped from a larger scan)."""

    checks: list[Check] = field(default_factory=list)
    crop: Crop | None = None

    @property
    def flagged(self) -> list[Check]:
        return [c for c in self.checks if c.flagged]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_list(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.checks]

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]


def run_checks(volume: Volume, source: str = "input volume", refuse: bool = True) -> CheckReport:
    """The report for one CT; with refuse=True (the default) a refusing check that fails raises HeadCheckError."""
    report = CheckReport([check_direction(volume)])
    if refuse and report.checks[-1].refused:
        raise refusal(report.checks, source)
    s = sample(volume)
    report.checks.append(check_calibration(s))
    if report.checks[-1].refused:
        if refuse:
            raise refusal(report.checks, source)
        return report
    skull = find_skull(s)
    head, report.crop = check_head(skull, s, volume)
    fov = check_field_of_view(skull, s)
    report.checks += [head, fov, check_size(skull, s, cut=not fov.passed), check_orientation(skull, s, cut=not fov.passed)]
    if refuse and any(c.refused for c in report.checks):
        raise refusal(report.checks, source)
    return report
