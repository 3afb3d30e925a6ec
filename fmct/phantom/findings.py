"""Which findings a phantom has, and what they imply: the plan (requested or drawn at random),
the mass effect and its cause, and the bit each lesion sets in the rendered lesion-bit volume.

The plan is drawn from its own generator, so the same seed with other findings gives the same
head (the mass-effect test relies on this).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fmct.conventions.errors import ConfigError
from fmct.phantom.common import _u
from fmct.conventions.tasks import HEMORRHAGE_TYPES, TASKS

_LESION_BIT = {"intraparenchymal": 1, "intraventricular": 2, "subarachnoid": 4, "subdural": 8, "epidural": 16, "fracture": 32}
_MIDLINE_BIT = 64


_MASS_CAUSES = ("intraparenchymal", "subdural", "epidural")


@dataclass
class _Plan:
    findings: set[str]
    shift_mm: float = 0.0
    cause: str | None = None


def _plan_findings(rng: np.random.Generator, findings: Sequence[str] | None) -> _Plan:
    if findings is None:
        return _random_plan(rng)
    requested = set(findings)
    unknown = requested - set(TASKS)
    if unknown:
        raise ConfigError(f"Unknown finding(s) {', '.join(sorted(unknown))}: use names from {', '.join(TASKS)}.")
    types = requested & set(HEMORRHAGE_TYPES)
    if "any_hemorrhage" in requested and not types:
        types.add(str(rng.choice(HEMORRHAGE_TYPES)))
    wants_shift = "midline_shift" in requested
    plan = _Plan(findings=types | (requested & {"fracture"}))
    if "mass_effect" in requested or wants_shift:
        _add_mass_effect(rng, plan, at_least_5mm=wants_shift)
    return plan


def _random_plan(rng: np.random.Generator) -> _Plan:
    """About half bleed; types co-occur as in trauma; fractures go with epidurals; big bleeds shift."""
    plan = _Plan(findings=set())
    if rng.random() < 0.5:
        first = str(rng.choice(HEMORRHAGE_TYPES))
        plan.findings = {first} | {t for t in HEMORRHAGE_TYPES if t != first and rng.random() < 0.3}
    p_fracture = 0.7 if "epidural" in plan.findings else 0.25
    if rng.random() < p_fracture:
        plan.findings.add("fracture")
    if plan.findings & set(_MASS_CAUSES) and rng.random() < 0.6:
        _add_mass_effect(rng, plan, at_least_5mm=False)
    return plan


def _add_mass_effect(rng: np.random.Generator, plan: _Plan, at_least_5mm: bool) -> None:
    candidates = sorted(plan.findings & set(_MASS_CAUSES)) or list(_MASS_CAUSES)
    plan.cause = str(rng.choice(candidates))
    plan.findings |= {plan.cause, "mass_effect"}
    plan.shift_mm = _u(rng, (5.5, 12.0) if at_least_5mm else (2.0, 12.0))
