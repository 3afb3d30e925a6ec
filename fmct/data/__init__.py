"""Training data: manifests (folder, CSV, RSNA, CQ500), datasets over the prepared cache, and the
random rescan augmentation.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "Study": "fmct.data.manifests",
    "Manifest": "fmct.data.manifests",
    "load_manifest": "fmct.data.manifests",
    "CachedVolumeDataset": "fmct.data.datasets",
    "random_variation": "fmct.data.rescan",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
