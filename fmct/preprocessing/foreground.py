"""The "foreground" preprocessing spec: MONAI's pipeline, for encoders trained with it (FM-HCT).

FM-HCT's encoder was trained on tensors made by MONAI transforms: orientation RAS, resampling to
1 mm with a cubic spline, a crop to the voxels above 0 HU, three HU windows each clipped at
c - w//2 .. c + w//2 and scaled to [0, 1], and the cropped box resized to 96^3 (MONAI's default
"area" mode, so each axis is stretched on its own). Features match the training pipeline only when
the same code makes the tensor, so this spec runs MONAI itself (the ``fmct[monai]`` extra),
imported here on first use; without it the run stops with exit 2 before any model runs.

The geometry record is MONAI's own: the affine MONAI carries through every step becomes the model
grid, so `Preprocessor.to_input_grid` puts saliency back onto the CT's grid with the same code as
for fmct's own spec. MONAI's channel-first tensor is [C, i, j, k] with i along the first letter of
the orientation (R for "RAS"); fmct's tensor is [C, z, y, x] with the last index along the grid's
first axis, so the model grid's axes are MONAI's in reverse order (the same array, no copy).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fmct.conventions.errors import ConfigError, InputVolumeError
from fmct.preprocessing.grid import Grid, ModelInput
from fmct.preprocessing.spec import PreprocessSpec
from fmct.reading.volume import Volume

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # the same matrix both ways


def require_monai() -> Any:
    """The monai package, or exit 2 saying how to install it."""
    try:
        import monai  # noqa: F401
        import monai.transforms
    except ImportError as e:
        raise ConfigError(
            "this bundle's preprocessing (crop 'foreground', the FM-HCT pipeline) runs MONAI's transforms, which are "
            f"not installed ({e.name or e}); install them with: pip install 'fmct[monai]'") from None
    return monai


def ras_affine(volume: Volume) -> np.ndarray:
    """The 4x4 voxel (i, j, k) -> RAS mm affine of a Volume (LPS geometry), as nibabel and MONAI use it."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(volume.direction, np.float64) @ np.diag(np.asarray(volume.spacing, np.float64))
    lps[:3, 3] = np.asarray(volume.origin, np.float64)
    return LPS_FROM_RAS @ lps


def to_metatensor(volume: Volume) -> Any:
    """A Volume as MONAI's channel-first MetaTensor [1, i, j, k] (float32) with its RAS affine."""
    import torch
    from monai.data import MetaTensor

    array = np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0), dtype=np.float32)[None]
    return MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(ras_affine(volume), dtype=torch.float64))


def window_bounds(center: float, width: float) -> tuple[float, float]:
    """The HU range a window maps onto [0, 1] in the FM-HCT pipeline: c - w//2 .. c + w//2."""
    return center - width // 2, center + width // 2


def monai_steps(spec: PreprocessSpec) -> tuple[list, list, Any]:
    """MONAI array transforms of the spec: (spatial steps before the windows, window steps, resize)."""
    require_monai()
    from monai.transforms import CropForeground, Orientation, Resize, ScaleIntensityRange, Spacing

    threshold = float(spec.foreground_hu)
    spatial = [Orientation(axcodes=spec.orientation.upper(), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
               Spacing(pixdim=tuple(float(s) for s in spec.spacing_mm), mode=int(spec.spline_order)),
               CropForeground(select_fn=lambda x: x > threshold, margin=0)]
    windows = [ScaleIntensityRange(*window_bounds(w.center, w.width), b_min=0.0, b_max=1.0, clip=True)
               for w in spec.windows]
    return spatial, windows, Resize(spatial_size=tuple(int(s) for s in spec.size), mode="area")


def apply_spec(image: Any, spec: PreprocessSpec) -> Any:
    """MONAI MetaTensor [1, i, j, k] in HU -> [C, *size] model tensor (a MetaTensor with its affine)."""
    import torch

    spatial, windows, resize = monai_steps(spec)
    for step in spatial:
        image = step(image)
    if min(image.shape[1:]) < 1 or image.numel() == 0:
        raise InputVolumeError(f"No head found: no voxel is above {spec.foreground_hu:g} HU after resampling. "
                               "Check that the input is a CT in Hounsfield units.")
    channels = torch.cat([w(image) for w in windows], dim=0)
    return resize(channels)


def model_grid_of(affine: Any, shape: tuple[int, ...]) -> Grid:
    """fmct's Grid of a MONAI tensor [C, i, j, k] with this RAS affine (axes in reverse order, see module doc)."""
    lps = LPS_FROM_RAS @ np.asarray(affine, np.float64)
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    return Grid(tuple(int(n) for n in shape[::-1]), tuple(float(s) for s in spacing[::-1]),
                tuple(float(o) for o in lps[:3, 3]), np.ascontiguousarray(direction[:, ::-1]))


def foreground_model_input(volume: Volume, spec: PreprocessSpec) -> ModelInput:
    """The model input of a "foreground" spec, and the grids that map its maps back onto the CT."""
    out = apply_spec(to_metatensor(volume), spec)
    array = out.detach().cpu().numpy().astype(np.float32, copy=False)[None]
    grid = model_grid_of(out.affine, tuple(out.shape[1:]))
    half = np.asarray(grid.spacing) * (np.asarray(grid.size) - 1) / 2.0
    center = np.asarray(grid.origin) + grid.direction @ half
    superior = int(np.argmax(np.abs(grid.direction[2])))  # LPS: row 2 is S
    extent = float(grid.spacing[superior] * grid.size[superior])  # the cropped foreground box, bottom to top
    return ModelInput(np.ascontiguousarray(array), grid, Grid.of(volume), tuple(float(c) for c in center), extent)
