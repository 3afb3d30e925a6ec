"""Exports of a bundle for other runtimes: ONNX, MONAI's ViT, a Hugging Face-style folder.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "export_onnx": "fmct.export.onnx",
    "check_onnx_parity": "fmct.export.onnx",
    "export_monai": "fmct.export.monai_vit",
    "export_hf": "fmct.export.hf",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
