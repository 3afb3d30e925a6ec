"""The one calibration: sigmoid(logit / temperature) per task, in numpy.

A leaf module (numpy only), so the runners, the ONNX export's parity check, the explanations and the
trainers all compute a probability the same way, with no import of each other.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def calibrated_probabilities(logits: np.ndarray, temperatures: Sequence[float], dtype: type = np.float32) -> np.ndarray:
    """sigmoid(logit / temperature) per task, in numpy (stable for any logit): the one calibration.
    float32 as the runners report it; fitting a temperature asks for float64 (confident logits)."""
    z = np.asarray(logits, dtype=np.float64) / np.asarray(temperatures, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(dtype)
