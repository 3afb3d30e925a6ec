"""Training data: manifests (folder, CSV, RSNA, CQ500), reading a study (sources), the prepared
cache (`fmct prepare`: fmct.data.prepare, fmct.data.cache), datasets over caches, and the random rescan augmentation.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "Study": "fmct.data.manifests",
    "Manifest": "fmct.data.manifests",
    "load_manifest": "fmct.data.manifests",
    "CachedVolumeDataset": "fmct.data.datasets",
    "PreparedCache": "fmct.data.cache",
    "PreparedVolumes": "fmct.data.cache",
    "read_study": "fmct.data.sources",
    "random_variation": "fmct.data.rescan",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
