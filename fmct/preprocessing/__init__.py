"""Volume <-> model tensor, both directions through one `Preprocessor` (spec, canonical view, crop,
windows, resample), and the separable map back onto the CT grid.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "Preprocessor": "fmct.preprocessing.preprocessor",
    "PreprocessSpec": "fmct.preprocessing.preprocessor",
    "Window": "fmct.preprocessing.preprocessor",
    "ModelInput": "fmct.preprocessing.preprocessor",
    "resample_parallel": "fmct.preprocessing.separable",
    "FMCTPreprocessd": "fmct.preprocessing.monai_transform",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
