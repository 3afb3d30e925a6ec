"""Is this a plain, calibrated, whole head CT? Model-independent checks that run before any model does.

One module per check: direction (the header's matrix), calibration (HU), skull (finding the cranium),
head (found, cropped from a larger scan), field_of_view (cut by the image edge), size (adult head at
the header's spacing), orientation (anatomy against the header); runner runs them in order.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "Check": "fmct.checks.result",
    "CheckReport": "fmct.checks.runner",
    "run_checks": "fmct.checks.runner",
}
__getattr__ = lazy_exports(__name__, _NAMES)
__all__ = list(_NAMES)
