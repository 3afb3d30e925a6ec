"""Model families: the 3D ViT encoder, task heads, and the classifier that joins them."""
from fmct.models.classifier import FMCTClassifier
from fmct.models.heads import MultiLabelHead
from fmct.models.vit3d import PRESETS, ViT3D, ViT3DConfig, preset

__all__ = ["FMCTClassifier", "MultiLabelHead", "PRESETS", "ViT3D", "ViT3DConfig", "preset"]
