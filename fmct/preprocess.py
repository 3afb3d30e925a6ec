"""Volume <-> model tensor, both directions through one object.

The forward map resamples the CT onto a fixed model grid (canonical orientation, target
spacing, fixed size, centred on the head) and turns HU into one channel per window. The
inverse map resamples anything computed on that grid (saliency, attention) back onto the
input's own grid. Both use the same geometry record, so an overlay cannot drift from the
CT it explains.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from fmct.errors import ConfigError, InputVolumeError
from fmct.volume import Volume

AIR_HU = -1024.0
HEAD_THRESHOLD_HU = -300.0

# Axis letters of an orientation code, as the LPS unit vector each letter points to.
_AXIS_VECTORS = {
    "L": (1, 0, 0), "R": (-1, 0, 0),
    "P": (0, 1, 0), "A": (0, -1, 0),
    "S": (0, 0, 1), "I": (0, 0, -1),
}


@dataclass(frozen=True)
class Window:
    """An HU window that becomes one input channel, scaled to [0, 1]."""

    name: str
    center: float
    width: float

    def apply(self, hu: np.ndarray) -> np.ndarray:
        low = self.center - self.width / 2.0
        return np.clip((hu - low) / self.width, 0.0, 1.0)


DEFAULT_WINDOWS = (Window("brain", 40, 80), Window("subdural", 80, 200), Window("bone", 600, 2800))


@dataclass(frozen=True)
class PreprocessSpec:
    """How a bundle's model sees a CT. Stored in fmct.json under "preprocessing".

    spacing_mm and size are in physical (x, y, z) order along the orientation's axes;
    the tensor is [C, z, y, x].
    """

    windows: tuple[Window, ...] = DEFAULT_WINDOWS
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    size: tuple[int, int, int] = (64, 64, 64)
    orientation: str = "LPS"
    antialias: bool = True

    def __post_init__(self) -> None:
        if not self.windows:
            raise ConfigError("preprocessing.windows: at least one HU window is needed")
        for w in self.windows:
            if w.width <= 0:
                raise ConfigError(f"preprocessing.windows: window '{w.name}' has width {w.width}; it must be > 0")
        if len(self.spacing_mm) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing_mm):
            raise ConfigError(f"preprocessing.spacing_mm must be three positive numbers, got {self.spacing_mm}")
        if len(self.size) != 3 or any(int(s) < 1 for s in self.size):
            raise ConfigError(f"preprocessing.size must be three positive integers, got {self.size}")
        orientation_direction(self.orientation)  # validates the code

    @property
    def in_channels(self) -> int:
        return len(self.windows)

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        """(D, H, W) = (z, y, x) sizes of the model tensor."""
        return tuple(int(s) for s in self.size[::-1])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = [asdict(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        try:
            return cls(
                windows=tuple(Window(str(w["name"]), float(w["center"]), float(w["width"])) for w in d["windows"]),
                spacing_mm=tuple(float(s) for s in d["spacing_mm"]),
                size=tuple(int(s) for s in d["size"]),
                orientation=str(d.get("orientation", "LPS")),
                antialias=bool(d.get("antialias", True)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"preprocessing: invalid or missing field ({e!r})") from e


def orientation_direction(code: str) -> np.ndarray:
    """Direction matrix (columns = i, j, k axes in LPS) for a code such as 'LPS' or 'RAS'."""
    code = code.upper()
    if len(code) != 3 or any(c not in _AXIS_VECTORS for c in code):
        raise ConfigError(f"preprocessing.orientation '{code}' is not a 3-letter code like 'LPS' or 'RAS'")
    columns = np.array([_AXIS_VECTORS[c] for c in code], dtype=np.float64).T
    if abs(np.linalg.det(columns)) < 0.5:
        raise ConfigError(f"preprocessing.orientation '{code}' repeats an axis")
    return columns


@dataclass
class Grid:
    """Geometry of a voxel grid, enough to resample onto it."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    @classmethod
    def of(cls, volume: Volume) -> "Grid":
        return cls(volume.size, volume.spacing, volume.origin, volume.direction.copy())

    def resample(self, image: sitk.Image, interpolator: int, default: float) -> np.ndarray:
        out = sitk.Resample(
            image, list(self.size), sitk.Transform(), interpolator, list(self.origin), list(self.spacing),
            self.direction.flatten().tolist(), float(default), sitk.sitkFloat32,
        )
        return sitk.GetArrayFromImage(out)

    def image(self, array: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction.flatten().tolist())
        return img


@dataclass
class ModelInput:
    """The model's input and the two grids that link it to the CT.

    Kept as numpy so reading and preprocessing never import torch (the ONNX path runs without it).
    """

    array: np.ndarray  # [1, C, D, H, W] float32
    model_grid: Grid
    input_grid: Grid
    head_center_mm: tuple[float, float, float]

    @property
    def tensor(self) -> "torch.Tensor":  # noqa: F821
        import torch

        return torch.from_numpy(self.array)


class Preprocessor:
    """Maps a CT Volume to the model grid and maps model-grid maps back (see module docstring)."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.direction = orientation_direction(spec.orientation)

    def __call__(self, volume: Volume) -> ModelInput:
        image = volume.to_sitk()
        if image.GetPixelID() != sitk.sitkFloat32:
            image = sitk.Cast(image, sitk.sitkFloat32)
        if self.spec.antialias:
            image = self._antialias(image)
        center = head_center(image)
        grid = self.model_grid(center)
        hu = grid.resample(image, sitk.sitkLinear, AIR_HU)
        channels = np.stack([w.apply(hu) for w in self.spec.windows]).astype(np.float32)
        return ModelInput(channels[None], grid, Grid.of(volume), center)

    def model_grid(self, center: Sequence[float]) -> Grid:
        spacing = np.asarray(self.spec.spacing_mm, dtype=np.float64)
        size = np.asarray(self.spec.size, dtype=np.float64)
        origin = np.asarray(center) - self.direction @ (spacing * (size - 1) / 2.0)
        return Grid(tuple(int(s) for s in self.spec.size), tuple(spacing), tuple(origin), self.direction.copy())

    def to_input_grid(self, model_map: np.ndarray, model_input: ModelInput, **meta: Any) -> Volume:
        """Resample a [D, H, W] map on the model grid onto the input CT's grid (0 outside)."""
        expected = self.spec.tensor_shape
        if tuple(model_map.shape) != expected:
            raise ValueError(f"model map has shape {model_map.shape}, expected {expected}")
        src = model_input.model_grid.image(model_map)
        dst = model_input.input_grid
        array = dst.resample(src, sitk.sitkLinear, 0.0)
        return Volume(array, dst.spacing, dst.origin, dst.direction.copy(), dict(meta))

    def to_model_grid(self, volume: Volume, model_input: ModelInput, nearest: bool = False) -> np.ndarray:
        """Resample something on the input grid (a lesion mask, say) onto the model grid."""
        interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        return model_input.model_grid.resample(volume.to_sitk(), interp, 0.0)

    def _antialias(self, image: sitk.Image) -> sitk.Image:
        """Average blocks of voxels along input axes much finer than the model grid.

        Plain interpolation of a 0.5 mm series onto a 3 mm grid samples the noise instead of
        averaging it; box-averaging first keeps thin- and thick-slice inputs looking alike to
        the model, and makes the resampling that follows ~30x cheaper on a thin series.
        """
        target = float(min(self.spec.spacing_mm))
        factors = [max(1, int(target // s)) if n >= 4 else 1 for s, n in zip(image.GetSpacing(), image.GetSize())]
        return sitk.BinShrink(image, factors) if any(f > 1 for f in factors) else image

def head_center(image: sitk.Image) -> tuple[float, float, float]:
    """Physical centre of the largest connected non-air object (the head, not the couch).

    Computed on a ~4 mm copy: precise enough to centre a crop, and cheap on 512x512x300.
    """
    factors = [max(1, int(round(4.0 / s))) for s in image.GetSpacing()]
    small = sitk.BinShrink(image, factors) if any(f > 1 for f in factors) else image
    mask = sitk.BinaryThreshold(small, HEAD_THRESHOLD_HU, 1e9, 1, 0)
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    if not stats.HasLabel(1):
        raise InputVolumeError(
            "No head found: no voxel is above -300 HU. Check that the input is a CT in Hounsfield units."
        )
    return tuple(float(c) for c in stats.GetCentroid(1))
