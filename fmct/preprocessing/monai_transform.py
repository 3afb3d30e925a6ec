"""A MONAI dictionary transform that applies a bundle's preprocessing, so a MONAI pipeline feeds an FMCT model.

    Compose([LoadImaged("image"), EnsureChannelFirstd("image"), FMCTPreprocessd("image", bundle="my_bundle")])

gives, under "image", exactly the tensor [C, D, H, W] that `fmct analyze` / `fmct embed` feed the model for
that file (the same Preprocessor, any spec), and under "image_fmct_input" the ModelInput whose grids map a
saliency map back onto the CT (`Preprocessor.to_input_grid`). The image must carry its affine (a MetaTensor
from LoadImaged). Importing this module needs MONAI (the `fmct[monai]` extra); fmct itself never does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from fmct.preprocessing.foreground import LPS_FROM_RAS, require_monai
from fmct.preprocessing.preprocessor import Preprocessor, PreprocessSpec
from fmct.reading.volume import Volume

require_monai()
from monai.transforms import MapTransform  # noqa: E402


def volume_from_metatensor(image: Any) -> Volume:
    """MONAI's channel-first [1, i, j, k] image with a RAS affine -> fmct's Volume (LPS, array [k, j, i])."""
    if tuple(image.shape[:1]) != (1,) or image.ndim != 4:
        raise ValueError(f"expected one channel-first 3D image [1, i, j, k], got shape {tuple(image.shape)}")
    affine = getattr(image, "affine", None)
    if affine is None:
        raise ValueError("the image has no affine: load it with LoadImaged (a MetaTensor) so its geometry is known")
    lps = LPS_FROM_RAS @ np.asarray(affine, np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    array = np.asarray(image[0].detach().cpu().numpy() if hasattr(image, "detach") else image[0])
    return Volume(array.transpose(2, 1, 0), tuple(spacing), tuple(lps[:3, 3]), lps[:3, :3] / spacing)


class FMCTPreprocessd(MapTransform):
    """Replace each key's CT (HU) by the model tensor of a bundle's (or a spec's) preprocessing."""

    def __init__(self, keys: Sequence[Hashable], bundle: str | Path | None = None, spec: PreprocessSpec | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if (bundle is None) == (spec is None):
            raise ValueError("give exactly one of bundle (a bundle path) or spec (a PreprocessSpec)")
        if spec is None:
            from fmct.inference.bundle import read_meta

            spec = read_meta(bundle).preprocessing
        self.preprocessor = Preprocessor(spec)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import torch

        d = dict(data)
        for key in self.key_iterator(d):
            model_input = self.preprocessor(volume_from_metatensor(d[key]))
            d[key] = torch.from_numpy(model_input.array[0])
            d[f"{key}_fmct_input"] = model_input
        return d
