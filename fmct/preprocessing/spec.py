"""How a bundle's model sees a CT, as data: the HU windows and the preprocessing spec (stored in
fmct.json under "preprocessing"), and orientation codes. numpy only, no image library: bundle
metadata, the ONNX path and the crop-mode modules read it without pulling in SimpleITK or MONAI.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fmct.conventions.errors import ConfigError

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


CROP_MODES = ("head", "foreground")
SPEC_OPTIONAL_DEFAULTS: dict[str, Any] = {"crop": "head", "foreground_hu": 0.0, "spline_order": 1}
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
    # crop "head": a fixed-size grid at `spacing_mm` centred on the head (fmct's own models).
    # crop "foreground": MONAI's pipeline of encoders trained with it (FM-HCT; fmct.preprocessing.foreground):
    # orientation, resampling to `spacing_mm` with a spline of `spline_order`, crop to the voxels above
    # `foreground_hu`, windows clipped at c -/+ w//2, then the box resized to `size` (MONAI's "area").
    crop: str = "head"
    foreground_hu: float = 0.0
    spline_order: int = 1

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
        if self.crop not in CROP_MODES:
            raise ConfigError(f"preprocessing.crop '{self.crop}' is not one of {list(CROP_MODES)}")
        if not 0 <= int(self.spline_order) <= 5:
            raise ConfigError(f"preprocessing.spline_order {self.spline_order} must be 0..5")

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
        for key, default in SPEC_OPTIONAL_DEFAULTS.items():  # specs written before these fields read and hash the same
            if d[key] == default:
                del d[key]
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
                crop=str(d.get("crop", "head")),
                foreground_hu=float(d.get("foreground_hu", 0.0)),
                spline_order=int(d.get("spline_order", 1)),
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
