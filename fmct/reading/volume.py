"""The one in-memory CT representation every part of fmct speaks, and what makes one a head CT.

Geometry follows ITK/DICOM (LPS physical space), so a Volume converts to and from SimpleITK
without loss; Slicer's RAS is handled only at the Slicer boundary. `validate_ct` holds the sanity
checks every reader (and every caller of the Analyzer) ends in, whatever the format.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fmct.conventions.errors import AbsurdSpacingError, NotCTError, NotVolumeError, VolumeTooLargeError

FORMATS = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}
MAX_SPACING_MM = 20.0
MIN_SPACING_MM = 0.05  # finer than any clinical CT (micro-CT is not a head CT)
MIN_EXTENT_MM = 30.0  # along every axis: a head CT covers at least this much
AIR_CEILING_HU = -500.0  # a head CT holds air below this (the value air takes is preprocessor.AIR_HU, -1024)
MIN_SLICES = 3
# No scanner writes values outside the 16-bit range (padding of -3024 or -32768 and extended-scale
# metal included): beyond it the file is damaged (flipped bytes give values like 3.4e38).
MIN_PLAUSIBLE_HU, MAX_PLAUSIBLE_HU = -32768.0, 65535.0
SLAB_VOXELS = 1 << 24  # finiteness is counted slab by slab: no whole-volume temporary
MEMORY_ENV = "FMCT_MAX_MEMORY_GB"
MEMORY_FACTOR = 2.0  # reading + preprocessing need about twice the voxels' own size


@dataclass
class Volume:
    """A 3D image with physical geometry.

    array: voxel values indexed [k, j, i] = [z, y, x] (numpy/SimpleITK order), in HU for CTs: float32,
        or the stored integer type (int16, int32) when the values are exact HU, so that reading a
        large CT never makes a float32 copy of it.
    spacing, origin: (x, y, z) in mm, LPS.
    direction: 3x3 matrix whose columns are the physical directions of the i, j, k axes.
    meta: non-identifying facts about the source (path, series description); never patient data.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D, got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def size(self) -> tuple[int, int, int]:
        """Size in (x, y, z) voxels, ITK order."""
        return tuple(int(s) for s in self.array.shape[::-1])

    @property
    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k) indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction.flatten().tolist())
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, meta: dict[str, Any] | None = None) -> "Volume":
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            meta=dict(meta or {}),
        )

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """Same geometry, other voxels (e.g. a mask or a saliency map on this grid)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match volume {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(), {**self.meta, **meta})

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


def format_suffix(path: Path) -> str:
    """The extension that decides the format ('.nii.gz' counts as one)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def validate_ct(volume: Volume, source: str) -> None:
    """Refuse what cannot be a head CT in HU, whatever format it came from."""
    _check_spacing(volume.spacing, source)
    _check_is_3d(volume.array.shape, source)
    _check_hounsfield(volume.array, source)
    _check_extent(volume.array.shape, volume.spacing, source)


def check_memory(size_xyz: tuple[int, ...], bytes_per_voxel: int, source: str, kind: str = "") -> None:
    """Refuse, from the header alone, a volume that would need more memory than is available.

    The limit is the memory available now (cgroup limit included), or $FMCT_MAX_MEMORY_GB when set.
    """
    voxels = math.prod(int(n) for n in size_xyz)
    need = voxels * bytes_per_voxel * MEMORY_FACTOR
    limit, where = memory_limit()
    if limit is None or need <= limit:
        return
    size = " x ".join(str(int(n)) for n in size_xyz)
    raise VolumeTooLargeError(
        f"{source}: {size} voxels{f' of {kind}' if kind else ''} ({_size(voxels * bytes_per_voxel)}) need about "
        f"{_size(need)} of memory to analyze, but {where} is {_size(limit)}. Free memory, crop or downsample the CT, "
        f"or set the environment variable {MEMORY_ENV} (in GB) to raise the limit.")


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def memory_limit() -> tuple[float | None, str]:
    """(bytes, what it is): $FMCT_MAX_MEMORY_GB, else the memory available to this process, else (None, '')."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            from fmct.conventions.errors import ConfigError

            raise ConfigError(f"{MEMORY_ENV}={text!r} must be a positive number of gigabytes")
        return value * 1e9, f"the limit {MEMORY_ENV}={text}"
    available = _available_memory()
    return (available, "the memory available") if available else (None, "")


def _available_memory() -> float | None:
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:  # a container's cgroup (v2) limit may be far below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            available = min(available or math.inf, float(limit) - float(used))
    except (OSError, ValueError):
        pass
    return available


@contextlib.contextmanager
def native_stderr_silenced():
    """Discard what C++ libraries print straight to the stderr file descriptor (MetaIO's "data not read
    completely", GDCM's notes) while ITK reads: the user gets fmct's one line instead."""
    import sys
    import tempfile

    fd = 2  # what C++ writes to, whatever Python's sys.stderr is now
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):  # no stderr descriptor (some GUIs)
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), fd)
            try:
                yield
            finally:
                os.dup2(saved, fd)
    finally:
        os.close(saved)


@contextlib.contextmanager
def quiet_readers():
    """No ITK or numpy warning lines on the terminal while a file is read and checked: a bad file
    gets one clear message from fmct, not library chatter ahead of it."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


# --------------------------------------------------------------------------------------------
# Checks shared by all formats
# --------------------------------------------------------------------------------------------

def _check_spacing(spacing: tuple[float, ...], source: str) -> None:
    if all(math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        return
    shown = " x ".join(f"{s:g}" for s in spacing)
    raise AbsurdSpacingError(
        f"{source}: voxel spacing {shown} mm is not plausible for a head CT (each axis must be between "
        f"{MIN_SPACING_MM:g} and {MAX_SPACING_MM:g} mm). The file header is probably broken: re-export the CT, "
        "or fix the spacing in the header.")


def _check_extent(shape_zyx: tuple[int, ...], spacing: tuple[float, ...], source: str) -> None:
    extent = [n * s for n, s in zip(shape_zyx[::-1], spacing)]
    if min(extent) >= MIN_EXTENT_MM:
        return
    shown = " x ".join(f"{e:g}" for e in extent)
    raise NotVolumeError(
        f"{source}: the image covers {shown} mm, too small for a head CT (at least {MIN_EXTENT_MM:g} mm along "
        "every axis). Is it a crop, a thumbnail or a test image? Give the complete head CT.")


def _check_is_3d(shape_zyx: tuple[int, ...], source: str) -> None:
    if min(shape_zyx) >= MIN_SLICES:
        return
    size = " x ".join(str(n) for n in shape_zyx[::-1])
    raise NotVolumeError(
        f"{source}: {size} voxels is a single slice or too thin to be a 3D head CT (at least {MIN_SLICES} voxels "
        "are needed along every axis). Export the complete axial series, not a single image.")


def count_nonfinite(array: np.ndarray) -> int:
    """NaN and infinite voxels, counted slab by slab (integer arrays have none)."""
    if array.dtype.kind not in "fc":
        return 0
    flat = array.reshape(array.shape[0], -1)
    step = max(1, SLAB_VOXELS // max(1, flat.shape[1]))
    return int(sum(flat[k : k + step].size - np.count_nonzero(np.isfinite(flat[k : k + step]))
                   for k in range(0, flat.shape[0], step)))


def nonfinite_message(source: str, bad: int, total: int) -> str:
    return (f"{source}: {bad} voxel(s) are not finite (NaN or infinity) out of {total}. No scanner writes them: the "
            "file is damaged or came from a faulty conversion, and fmct does not guess what they should be. "
            "Re-export the CT in Hounsfield units.")


def _check_hounsfield(array: np.ndarray, source: str) -> None:
    with np.errstate(all="ignore"):
        bad = count_nonfinite(array)
        if bad:
            raise NotCTError(nonfinite_message(source, bad, array.size))
        low, high = float(array.min()), float(array.max())
    if low < MIN_PLAUSIBLE_HU or high > MAX_PLAUSIBLE_HU:
        raise NotCTError(
            f"{source}: voxel values range from {low:.4g} to {high:.4g}, beyond what any scanner writes in Hounsfield "
            f"units ({MIN_PLAUSIBLE_HU:g} to {MAX_PLAUSIBLE_HU:g}): the file is corrupt (damaged bytes) or not a CT. "
            "Copy or export it again.")
    if 0.0 <= low and high <= 1.0:
        raise NotCTError(
            f"{source}: all values lie in [0, 1]: this looks like a normalised image, a probability map or a mask, "
            "not a CT in Hounsfield units. Give the original CT.")
    if low > AIR_CEILING_HU:
        raise NotCTError(
            f"{source}: no voxel is below {AIR_CEILING_HU:g} HU (lowest {low:g}), but every head CT contains air at about "
            "-1000 HU. Is this an MR, or a CT exported without rescale intercept? Export the original CT in "
            "Hounsfield units.")
