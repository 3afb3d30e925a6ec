"""Model families: the 3D ViT encoder, task heads, and the classifier that joins them.

The configs (`ViT3DConfig`, `PRESETS`, `preset`) are torch-free and imported eagerly; the
networks are imported on first use, so `import fmct.models.config` (bundle metadata, the ONNX
runtime path) never pulls in torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fmct.models.config import PRESETS, ViT3DConfig, preset

if TYPE_CHECKING:
    from fmct.models.classifier import FMCTClassifier
    from fmct.models.heads import MultiLabelHead
    from fmct.models.vit3d import ViT3D

_LAZY = {"FMCTClassifier": "fmct.models.classifier", "MultiLabelHead": "fmct.models.heads", "ViT3D": "fmct.models.vit3d"}

__all__ = ["FMCTClassifier", "MultiLabelHead", "PRESETS", "ViT3D", "ViT3DConfig", "preset"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmct.models' has no attribute {name!r}")
