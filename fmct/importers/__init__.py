"""Importers: encoders trained elsewhere, turned into FMCT bundles (FM-HCT's released encoder).
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "import_fm_hct": "fmct.importers.fm_hct",
    "fm_hct_spec": "fmct.importers.fm_hct",
    "read_state_dict": "fmct.importers.fm_hct",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
