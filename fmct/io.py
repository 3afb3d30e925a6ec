"""Read and write CT volumes: DICOM series, NIfTI, NRRD and MetaImage, all as `Volume`.

Every reader ends in `validate_ct`, so whatever the format, what reaches the model is a 3D
image in Hounsfield units on a plausible grid; anything else is refused with an error that says
what is wrong and what to do.
"""
from __future__ import annotations

import gzip
import logging
import math
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fmct.dicom import read_dicom_series
from fmct.errors import (
    AbsurdSpacingError,
    ConfigError,
    EmptyInputError,
    NotCTError,
    NotVolumeError,
    UnreadableInputError,
)
from fmct.volume import FORMATS, Volume, format_suffix, validate_ct

log = logging.getLogger("fmct.io")

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SUPPORTED = "a DICOM folder, " + ", ".join(FORMATS)


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read a head CT from a DICOM folder (or one of its files) or an image file, checked and in HU."""
    path = Path(path)
    if not path.exists():
        raise EmptyInputError(f"{path} does not exist. Check the path (and that the drive is mounted).")
    if path.is_dir() or _is_dicom_file(path):
        return read_dicom_series(path, series_uid)
    if series_uid is not None:
        raise ConfigError(f"series_uid (--series) applies to DICOM folders only, but {path.name} is an image file.")
    volume = _read_image_file(path)
    validate_ct(volume, str(path))
    log.info("Read %s image %s: %s voxels, spacing %s mm", volume.meta["format"], path.name,
             " x ".join(map(str, volume.size)), " x ".join(f"{s:g}" for s in volume.spacing))
    return volume


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write NIfTI, NRRD or MetaImage (chosen by extension); parent folders are created."""
    path = Path(path)
    if format_suffix(path) not in FORMATS:
        raise ConfigError(f"Cannot write {path.name}: use one of the extensions {', '.join(FORMATS)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = volume.to_sitk() if volume.array.dtype != bool else volume.with_array(volume.array.astype(np.uint8)).to_sitk()
    sitk.WriteImage(image, str(path), useCompression=format_suffix(path) == ".nii.gz")
    return path


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------

def _is_dicom_file(path: Path) -> bool:
    if format_suffix(path) in DICOM_SUFFIXES:
        return True
    if format_suffix(path) in FORMATS:
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _read_image_file(path: Path) -> Volume:
    fmt = FORMATS.get(format_suffix(path))
    if fmt is None:
        raise UnreadableInputError(f"{path.name}: unsupported format. Give {SUPPORTED}.")
    if path.stat().st_size == 0:
        raise EmptyInputError(f"{path.name} is empty (0 bytes). Copy or export the file again.")
    if fmt == "NIfTI":
        _check_nifti_pixdim(path)
    image = _read_sitk(path, fmt)
    image = _as_3d(image, path.name)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NotCTError(
            f"{path.name} has {image.GetNumberOfComponentsPerPixel()} values per voxel (a colour or vector image), "
            "not a CT. Give the original grey-scale CT.")
    volume = Volume.from_sitk(image, {"source": str(path), "format": fmt})
    volume.array = volume.array.astype(np.float32, copy=False)
    return volume


def _read_sitk(path: Path, fmt: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        if "Zero-valued spacing" in str(error):
            raise AbsurdSpacingError(
                f"{path.name}: the header gives a voxel spacing of zero (or not a number). Re-export the CT, "
                "or fix the spacing in the header.") from None
        raise UnreadableInputError(
            f"{path.name} cannot be read as {fmt}: the file is corrupt, truncated or not really {fmt}. "
            "Copy or export it again.") from None


def _as_3d(image: sitk.Image, name: str) -> sitk.Image:
    """Squeeze a singleton 4th dimension; refuse 2D and true 4D images."""
    size = image.GetSize()
    if image.GetDimension() == 3:
        return image
    if image.GetDimension() == 4 and size[3] == 1:
        return sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    if image.GetDimension() == 2:
        raise NotVolumeError(
            f"{name} is a single 2D image ({size[0]} x {size[1]}), not a 3D CT volume. "
            "Export the complete axial series.")
    raise NotVolumeError(
        f"{name} has {image.GetDimension()} dimensions (size {' x '.join(map(str, size))}): a time series or "
        "multi-channel image, not one CT volume. Extract the single 3D CT volume first.")


def _check_nifti_pixdim(path: Path) -> None:
    """ITK silently replaces a zero or negative NIfTI pixdim, so look at the header ourselves."""
    pixdim = _nifti_pixdim(path)
    if pixdim is None or all(math.isfinite(p) and p > 0 for p in pixdim):
        return
    shown = " x ".join(f"{p:g}" for p in pixdim)
    raise AbsurdSpacingError(
        f"{path.name}: the NIfTI header gives voxel spacing (pixdim) {shown} mm; spacing must be positive and finite. "
        "The header is broken: re-export the CT, or fix pixdim in the header.")


def _nifti_pixdim(path: Path) -> list[float] | None:
    """pixdim of the spatial axes from a NIfTI-1 or NIfTI-2 header, or None if it is not one."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError):
        return None
    for endian in "<>":
        if len(head) < 348:
            return None
        header_size = struct.unpack_from(endian + "i", head, 0)[0]
        if header_size == 348:
            dim, pixdim = struct.unpack_from(endian + "8h", head, 40), struct.unpack_from(endian + "8f", head, 76)
        elif header_size == 540 and len(head) >= 540:
            dim, pixdim = struct.unpack_from(endian + "8q", head, 16), struct.unpack_from(endian + "8d", head, 104)
        else:
            continue
        n_spatial = min(max(int(dim[0]), 0), 3)
        return [float(p) for p in pixdim[1 : 1 + n_spatial]]
    return None
