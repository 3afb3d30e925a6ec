"""An orthonormal direction matrix: a sheared or scaled one describes no scanner's grid.

A non-orthogonal matrix (a hand-edited NIfTI sform, a broken conversion) would make every distance
and angle the model sees wrong in a way no later check can tell from anatomy; refused from the header.
"""
from __future__ import annotations

import numpy as np

from fmct.checks.result import Check
from fmct.reading.volume import Volume

TOLERANCE = 1e-3  # largest |D^T D - I| entry accepted (rounding in headers is ~1e-6)
NAME = "direction matrix"


def check_direction(volume: Volume) -> Check:
    """Refuses a direction matrix whose axes are not orthogonal unit vectors (shear or scale in it)."""
    d = np.asarray(volume.direction, dtype=np.float64)
    error = float(np.max(np.abs(d.T @ d - np.eye(3)))) if np.isfinite(d).all() else float("inf")
    norms = [max(1e-12, float(np.linalg.norm(d[:, k]))) for k in range(3)]
    angles = [float(np.degrees(np.arccos(np.clip(abs(d[:, a] @ d[:, b]) / (norms[a] * norms[b]), 0, 1))))
              for a, b in ((0, 1), (0, 2), (1, 2))] if np.isfinite(d).all() else [float("nan")] * 3
    value = {"max_deviation": round(error, 6), "axis_angles_deg": [round(a, 2) for a in angles]}
    if error <= TOLERANCE:
        return Check(NAME, True, value, TOLERANCE, "orthonormal")
    return Check(NAME, False, value, TOLERANCE,
                 f"the header's direction matrix is not orthonormal (axes at {', '.join(f'{a:.1f}' for a in angles)} "
                 "degrees, sheared or scaled); no scanner grid looks like this. Re-export the CT, or fix the header's "
                 "orientation (direction cosines / sform).")
