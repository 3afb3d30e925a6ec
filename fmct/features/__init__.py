"""The foundation-model interface: embeddings of an encoder, probes on them, and the metrics.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "embed": "fmct.features.embed",
    "load_encoder": "fmct.features.embed",
    "read_features": "fmct.features.embed",
    "probe": "fmct.features.probe",
    "auroc": "fmct.features.metrics",
    "auprc": "fmct.features.metrics",
    "expected_calibration_error": "fmct.features.metrics",
    "pointing_game": "fmct.features.metrics",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
