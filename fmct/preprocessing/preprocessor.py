"""Volume <-> model tensor, both directions through one object.

The forward map resamples the CT onto a fixed model grid (canonical orientation, target
spacing, fixed size, centred on the head) and turns HU into one channel per window. The
inverse map resamples anything computed on that grid (saliency, attention) back onto the
input's own grid. Both use the same geometry record, so an overlay cannot drift from the
CT it explains.

The same physical CT gives the same tensor however it is stored (axis order, flips, format,
origin moved with the grid): the array is first reoriented losslessly to the canonical axes
(a transpose and flips, which numpy does as a view, no copy), and the block averaging, the head
centre and the resampling all happen there. Only a truly oblique grid is interpolated, after the
same lossless step has brought it within 45 degrees of the canonical axes. The block averaging
runs over slabs, so a 2 GB int16 CT is never copied whole to float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from fmct.conventions.errors import ConfigError, InputVolumeError
from fmct.preprocessing.grid import Grid, ModelInput
from fmct.preprocessing.separable import resample_parallel
from fmct.preprocessing.spec import (  # noqa: F401 (re-exported: the names callers know from here)
    CROP_MODES, DEFAULT_WINDOWS, SPEC_OPTIONAL_DEFAULTS, PreprocessSpec, Window, orientation_direction)
from fmct.reading.volume import Volume

AIR_HU = -1024.0  # the value of air: fill outside the CT and the floor of block averages (reading.volume.AIR_CEILING_HU is a limit)
HEAD_THRESHOLD_HU = -300.0

class Preprocessor:
    """Maps a CT Volume to the model grid and maps model-grid maps back (see module docstring)."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.direction = orientation_direction(spec.orientation)
        if spec.crop == "foreground":  # needs MONAI: refuse now (exit 2), not study by study later
            from fmct.preprocessing.foreground import require_monai

            require_monai()

    def __call__(self, volume: Volume) -> ModelInput:
        if self.spec.crop == "foreground":
            from fmct.preprocessing.foreground import foreground_model_input

            return foreground_model_input(volume, self.spec)
        hu, grid, center, extent = self.model_hu(volume)
        channels = np.stack([w.apply(hu) for w in self.spec.windows]).astype(np.float32)
        return ModelInput(channels[None], grid, Grid.of(volume), center, extent,
                          tuple(volume.meta.get("warnings", ())))

    def model_hu(self, volume: Volume) -> tuple[np.ndarray, "Grid", tuple[float, float, float], float]:
        """The CT in HU on the model grid, before the windows: (float32 [D, H, W], model grid, head
        centre, head extent). A prepared training cache (fmct.data.cache) stores this, so the
        windows can be applied when a batch is made. The canonical recipe only: the foreground
        recipe (FM-HCT's) crops and resizes per CT, which the cache does not store."""
        if self.spec.crop == "foreground":
            raise ConfigError("a prepared cache holds the canonical preprocessing only; this bundle's "
                              "'foreground' preprocessing (FM-HCT's) reads its CTs directly: give the data folder")
        canonical = canonical_view(volume, self.direction)
        image = self.reduced_image(canonical)
        center, extent = head_geometry(image)
        grid = self.model_grid(center)
        return grid.resample(image, sitk.sitkLinear, AIR_HU), grid, center, extent

    def block_factors(self, canonical: "CanonicalView") -> tuple[int, int, int]:
        """Voxels averaged per block along each canonical (x, y, z) axis.

        Plain interpolation of a 0.5 mm series onto a 3 mm grid samples the noise instead of
        averaging it; box-averaging first keeps thin- and thick-slice inputs looking alike to
        the model, and makes the resampling that follows ~30x cheaper on a thin series.
        """
        if not self.spec.antialias:
            return (1, 1, 1)
        target = float(min(self.spec.spacing_mm))
        return tuple(max(1, int(target // s)) if n >= 4 else 1 for s, n in zip(canonical.spacing, canonical.size))

    def reduced_image(self, canonical: "CanonicalView") -> sitk.Image:
        """The canonical CT block-averaged (float32 HU, values below air clamped to air), as an image."""
        factors = self.block_factors(canonical)
        array = block_average(canonical.array, factors[::-1], floor=AIR_HU)
        spacing = np.asarray(canonical.spacing) * np.asarray(factors)
        # A block's value sits at the centre of the voxels it averages.
        origin = np.asarray(canonical.origin) + canonical.direction @ (np.asarray(canonical.spacing) * (np.asarray(factors) - 1) / 2.0)
        return Grid(tuple(int(n) for n in array.shape[::-1]), tuple(spacing), tuple(origin), canonical.direction).image(array)

    def model_grid(self, center: Sequence[float]) -> Grid:
        spacing = np.asarray(self.spec.spacing_mm, dtype=np.float64)
        size = np.asarray(self.spec.size, dtype=np.float64)
        origin = np.asarray(center) - self.direction @ (spacing * (size - 1) / 2.0)
        return Grid(tuple(int(s) for s in self.spec.size), tuple(spacing), tuple(origin), self.direction.copy())

    def to_input_grid(self, model_map: np.ndarray, model_input: ModelInput, levels: int | None = None,
                      **meta: Any) -> Volume:
        """Resample a [D, H, W] map on the model grid onto the input CT's grid (0 outside).

        Linear interpolation straight onto the CT's own grid in its own storage order: as three
        1-D passes when the two grids' axes are parallel (fmct.preprocessing.separable; any CT that is not
        oblique), else ITK's resampling. levels=255 gives a [0, 1] map as uint8 0..255, rounded
        half up, with no float32 map on the CT's grid: a quarter of its memory (1 GB instead of
        4 GB on a 1024x1024x1000 CT) and no second pass to quantise it.
        """
        expected = self.spec.tensor_shape
        if tuple(model_map.shape) != expected:
            raise ValueError(f"model map has shape {model_map.shape}, expected {expected}")
        dst = model_input.input_grid
        array = resample_parallel(model_map, model_input.model_grid, dst, levels)
        if array is None:
            array = itk_resample(model_map, model_input.model_grid, dst, levels)
        return Volume(array, dst.spacing, dst.origin, dst.direction.copy(), dict(meta))

    def to_model_grid(self, volume: Volume, model_input: ModelInput, nearest: bool = False) -> np.ndarray:
        """Resample something on the input grid (a lesion mask, say) onto the model grid."""
        interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        return model_input.model_grid.resample(volume.to_sitk(), interp, 0.0)


def itk_resample(array: np.ndarray, src: Grid, dst: Grid, levels: int | None = None) -> np.ndarray:
    """ITK's linear resampling of `array` on src onto dst (0 outside): the path for oblique grids,
    and the reference fmct.preprocessing.separable is tested against. levels as in Preprocessor.to_input_grid."""
    if levels is None:
        return dst.resample(src.image(array), sitk.sitkLinear, 0.0)
    # linear interpolation commutes with the affine scaling; ITK clamps and truncates into uint8
    scaled = np.clip(array, 0.0, 1.0) * np.float32(levels) + np.float32(0.5)
    return dst.resample(src.image(scaled), sitk.sitkLinear, 0.0, sitk.sitkUInt8)


def head_center(image: sitk.Image) -> tuple[float, float, float]:
    """Physical centre of the largest connected non-air object (the head, not the couch)."""
    return head_geometry(image)[0]


def head_geometry(image: sitk.Image) -> tuple[tuple[float, float, float], float]:
    """Centre of the largest connected non-air object (the head, not the couch), and its extent in
    mm from bottom to top (along the grid axis closest to superior).

    Computed on a ~4 mm copy of the canonical, block-averaged CT: precise enough to centre a crop,
    cheap on 512x512x300, and the same for every storage of the same CT. The extent tells a whole
    head (130 mm or more with the skull base) from a partial scan, which the model's features alone
    may not: a model trained with field-of-view augmentations learns to shrug at missing slices.
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
    superior_axis = int(np.argmax(np.abs(np.asarray(small.GetDirection()).reshape(3, 3)[2])))  # LPS: row 2 is S
    extent = stats.GetBoundingBox(1)[3 + superior_axis] * small.GetSpacing()[superior_axis]
    return tuple(float(c) for c in stats.GetCentroid(1)), float(extent)


# --------------------------------------------------------------------------------------------
# Lossless reorientation and slab-wise block averaging
# --------------------------------------------------------------------------------------------

AXIS_ALIGNED_TOLERANCE = 1e-4  # |cos| of the axis angles within this of 1 counts as axis-aligned (< 0.9 degree)


@dataclass
class CanonicalView:
    """The CT's voxels with their axes permuted and flipped to follow the canonical axes.

    array is a numpy view of the Volume's array (no copy), indexed [z, y, x] along the canonical
    axes; direction equals the canonical direction exactly when the input grid is axis-aligned,
    and is the residual (< 45 degree) rotation otherwise.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    axis_aligned: bool

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[::-1])


def canonical_view(volume: Volume, canonical_direction: np.ndarray) -> CanonicalView:
    """Reorient a Volume to the canonical axes by permuting and flipping its array (lossless)."""
    # Column j of m: input axis j expressed along the canonical axes.
    m = np.asarray(canonical_direction).T @ volume.direction
    axes = np.argmax(np.abs(m), axis=1)  # canonical axis a takes input axis axes[a]
    if sorted(axes.tolist()) != [0, 1, 2]:  # two canonical axes closest to the same input axis: 45 degrees
        axes = np.array(_best_permutation(m))
    signs = np.sign(m[np.arange(3), axes])
    size = np.asarray(volume.size)
    spacing = np.asarray(volume.spacing)
    # Index along each input axis of the canonical first voxel: 0, or the last index where flipped.
    first = np.zeros(3)
    for a in range(3):
        if signs[a] < 0:
            first[axes[a]] = size[axes[a]] - 1
    origin = np.asarray(volume.origin) + volume.direction @ (spacing * first)
    # numpy axis of ITK axis j is 2 - j; the canonical array is [z, y, x] = ITK axes (2, 1, 0).
    array = np.transpose(volume.array, [2 - axes[2], 2 - axes[1], 2 - axes[0]])
    flip = tuple(2 - a for a in range(3) if signs[a] < 0)
    if flip:
        array = np.flip(array, axis=flip)
    aligned = bool(np.all(np.abs(np.abs(m[np.arange(3), axes]) - 1.0) <= AXIS_ALIGNED_TOLERANCE))
    direction = np.asarray(canonical_direction, dtype=np.float64).copy() if aligned else volume.direction[:, axes] * signs
    return CanonicalView(array, tuple(float(x) for x in spacing[axes]), tuple(float(x) for x in origin), direction, aligned)


def _best_permutation(m: np.ndarray) -> tuple[int, int, int]:
    """The axis assignment with the largest total |cos| (for grids near 45 degrees)."""
    from itertools import permutations

    return max(permutations(range(3)), key=lambda p: sum(abs(m[a, p[a]]) for a in range(3)))


def block_average(array: np.ndarray, factors_zyx: Sequence[int], floor: float | None = None,
                  slab_bytes: int = 64 << 20) -> np.ndarray:
    """Mean of each factors_zyx block of array, as float32, reading the input one slab at a time.

    Blocks start at index 0 of each axis; a last, partial block averages the voxels it has.
    Values below floor (padding outside the field of view, e.g. -2048 or -3024 HU) count as floor
    (air), so padding neither darkens the blocks at the edge of the field of view nor needs a copy.
    Works on any strided view (a transposed or flipped array) and any numeric dtype.
    """
    fz, fy, fx = (int(f) for f in factors_zyx)
    nz, ny, nx = array.shape
    bz, by, bx = -(-nz // fz), -(-ny // fy), -(-nx // fx)
    out = np.empty((bz, by, bx), np.float32)
    count_y = np.minimum(fy, ny - fy * np.arange(by)).astype(np.float32)
    count_x = np.minimum(fx, nx - fx * np.arange(bx)).astype(np.float32)
    blocks_per_slab = max(1, slab_bytes // max(1, fz * ny * nx * 4))
    slab = np.zeros((fz * blocks_per_slab, by * fy, bx * fx), np.float32)
    for z0 in range(0, bz, blocks_per_slab):
        z1 = min(bz, z0 + blocks_per_slab)
        lo, hi = z0 * fz, min(nz, z1 * fz)
        view = slab[: (z1 - z0) * fz]
        view[:] = 0.0
        view[: hi - lo, :ny, :nx] = array[lo:hi]
        if floor is not None:
            np.maximum(view[: hi - lo, :ny, :nx], floor, out=view[: hi - lo, :ny, :nx])
        sums = view.reshape(z1 - z0, fz, by, fy, bx, fx).sum(axis=(1, 3, 5), dtype=np.float64)
        count_z = np.minimum(fz, nz - fz * np.arange(z0, z1)).astype(np.float64)
        out[z0:z1] = sums / (count_z[:, None, None] * count_y[None, :, None] * count_x[None, None, :])
    return out

