"""Small helpers every stage of the generator shares: uniform draws from a range, unit vectors,
Python-float triples, the HU of air.

They live apart so that anatomy, findings, scan geometry and drawing can each be a module of their
own without importing one another for a one-line helper.
"""
from __future__ import annotations

import numpy as np

_AIR = -1000.0


Range = tuple[float, float]


def _u(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _f3(v) -> tuple[float, float, float]:
    """Python floats, so float32 arithmetic is never promoted to float64 (NEP 50)."""
    return tuple(float(x) for x in v)
