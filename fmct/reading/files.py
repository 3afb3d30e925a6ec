"""Read and write CT volumes: DICOM series, NIfTI, NRRD and MetaImage, all as `Volume`.

Every reader ends in `validate_ct`, so whatever the format, what reaches the model is a 3D
image in Hounsfield units on a plausible grid; anything else is refused with an error that says
what is wrong and what to do.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import SimpleITK as sitk

from fmct.reading.dicom import read_dicom_series
from fmct.conventions.errors import (
    AbsurdSpacingError,
    ConfigError,
    EmptyInputError,
    NotCTError,
    NotVolumeError,
    UnreadableInputError,
)
from fmct.reading.headers import (
    AFFINE_ATOL_MM,
    check_mhd_data_file,
    check_nrrd_data_file,
    geometry_of,
    nifti_lps_affine,
    nrrd_unit_scale,
)
from fmct.reading.volume import (
    FORMATS,
    Volume,
    check_memory,
    format_suffix,
    native_stderr_silenced,
    nonfinite_message,
    quiet_readers,
    validate_ct,
)

log = logging.getLogger("fmct.reading.files")

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SUPPORTED = "a DICOM folder, " + ", ".join(FORMATS)


def read_volume(path: str | Path, series_uid: str | None = None, keep_descriptions: bool = False) -> Volume:
    """Read a head CT from a DICOM folder (or one of its files) or an image file, checked and in HU.

    keep_descriptions: keep the DICOM SeriesDescription (free text that may identify the patient)
    in volume.meta and the log; left out by default.
    """
    path = Path(path)
    if not path.exists():
        raise EmptyInputError(f"{path} does not exist. Check the path (and that the drive is mounted).")
    check_readable(path)
    with quiet_readers():
        if path.is_dir() or _is_dicom_file(path):
            return read_dicom_series(path, series_uid, keep_descriptions)
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


def check_readable(path: Path) -> None:
    """Refuse a file or folder we have no permission to read, naming it (not 'corrupt' or 'no DICOM')."""
    try:
        if path.is_dir():
            next(os.scandir(path), None)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        raise UnreadableInputError(
            f"{path}: permission denied: fmct may not read this {'folder' if path.is_dir() else 'file'}. Fix its "
            f"permissions (e.g. chmod {'a+rx' if path.is_dir() else 'a+r'}) or copy it to a place you can read.") from None


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------

# Integer pixel types that hold exact HU: kept as they are (no float32 copy of a large CT).
_KEEP_INTEGER = {np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.uint16)}

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
    if format_suffix(path) == ".mhd":
        check_mhd_data_file(path)
    if format_suffix(path) == ".nhdr":
        check_nrrd_data_file(path)
    reader = _check_header(path, fmt)
    meta = {"source": str(path), "format": fmt}
    if fmt == "NIfTI":
        array = _read_nifti_voxels(path, reader)
        if array is not None:  # read straight from the file: no second buffer inside ITK's reader
            direction = np.array(reader.GetDirection()).reshape(3, 3)
            return _nifti_geometry(path, Volume(_hu_dtype(array), reader.GetSpacing(), reader.GetOrigin(), direction, meta))
        _check_nifti_data(path)
    image = _read_sitk(path, fmt)
    image = _as_3d(image, path.name)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NotCTError(
            f"{path.name} has {image.GetNumberOfComponentsPerPixel()} values per voxel (a colour or vector image), "
            "not a CT. Give the original grey-scale CT.")
    volume = Volume(_hu_dtype(array_of(image)), image.GetSpacing(), image.GetOrigin(),
                    np.array(image.GetDirection()).reshape(3, 3), meta)
    if fmt == "NIfTI":
        return _nifti_geometry(path, volume)
    if fmt == "NRRD":
        return _nrrd_units(path, volume)
    return volume


def _nifti_geometry(path: Path, volume: Volume) -> Volume:
    """The geometry nibabel and FSL read (the sform when its code is set), with a warning in
    volume.meta["warnings"] when the header's qform and sform disagree."""
    header = _nifti_header(path)
    if header is None:
        return volume
    affine, warning = nifti_lps_affine(header, path.name)
    if affine is not None and not np.allclose(affine, volume.index_to_physical, atol=AFFINE_ATOL_MM):
        geometry = geometry_of(affine)
        if geometry is None:  # a shear (affine registration output): ITK's grid is the closest one without it
            warning = (f"{path.name}: the NIfTI header's sform has sheared axes, which a CT grid cannot hold; fmct "
                       "follows the qform instead, so positions may differ from those nibabel and FSL show. Resample "
                       "the CT to an orthogonal grid.")
        else:
            volume.spacing, volume.origin, volume.direction = geometry
    if warning is not None:
        log.warning(warning)
        volume.meta.setdefault("warnings", []).append(warning)
    return volume


def _nrrd_units(path: Path, volume: Volume) -> Volume:
    """ITK reads a NRRD's spacing and origin as millimetres whatever its `space units`: convert them."""
    scale = nrrd_unit_scale(path)
    if scale != 1.0:
        volume.spacing = tuple(s * scale for s in volume.spacing)
        volume.origin = tuple(o * scale for o in volume.origin)
        log.info("%s: converted the header's space units to millimetres (x %g)", path.name, scale)
    return volume


class _ImageBuffer:
    """Exposes a SimpleITK image's own buffer to numpy and keeps the image alive as the array's base."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        interface = dict(sitk.GetArrayViewFromImage(image).__array_interface__)
        interface["data"] = (interface["data"][0], False)  # writable: this image is ours alone
        self.__array_interface__ = interface


def array_of(image: sitk.Image) -> np.ndarray:
    """The voxels of image as a writable numpy array [z, y, x] without copying them."""
    return np.asarray(_ImageBuffer(image))


def _hu_dtype(array: np.ndarray) -> np.ndarray:
    """Integer types that hold exact HU stay as they are; anything else becomes float32 HU."""
    if array.dtype in _KEEP_INTEGER or array.dtype == np.float32:
        return array
    return array.astype(np.float32)  # float64 or 64-bit integer files (rare)


def _check_header(path: Path, fmt: str) -> sitk.ImageFileReader | None:
    """From the header alone: the volume fits in memory (before any pixel is read). Returns the reader
    holding the header's geometry, or None when ITK cannot read the header (it says why later)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with native_stderr_silenced():
            reader.ReadImageInformation()
    except RuntimeError:
        return None  # _read_sitk gives the precise message
    size = reader.GetSize()
    pixel = reader.GetPixelID()
    nbytes = max(1, sitk.Image(1, 1, pixel).GetSizeOfPixelComponent() if pixel != sitk.sitkUnknown else 4)
    components = reader.GetNumberOfComponents()
    # scaled integer files (NIfTI scl_slope) come out as float32 or float64
    check_memory(size, max(nbytes, 4 if _nifti_scaled(path) else nbytes) * components, str(path),
                 sitk.GetPixelIDValueAsString(pixel))
    return reader


def _read_sitk(path: Path, fmt: str) -> sitk.Image:
    try:
        with native_stderr_silenced():
            return sitk.ReadImage(str(path))
    except PermissionError:
        check_readable(path)
        raise
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
    header = _nifti_header(path)
    if header is None:
        return None
    n_spatial = min(max(int(header["dim"][0]), 0), 3)
    return [float(p) for p in header["pixdim"][1 : 1 + n_spatial]]


def _nifti_header(path: Path) -> dict | None:
    """dim, pixdim, bitpix, vox_offset and scaling of a NIfTI-1 or NIfTI-2 header, or None if it is not one."""
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
            return {"size": 348, "endian": endian, "datatype": struct.unpack_from(endian + "h", head, 70)[0],
                    "dim": struct.unpack_from(endian + "8h", head, 40), "pixdim": struct.unpack_from(endian + "8f", head, 76),
                    "bitpix": struct.unpack_from(endian + "h", head, 72)[0],
                    "vox_offset": struct.unpack_from(endian + "f", head, 108)[0],
                    "scl": struct.unpack_from(endian + "2f", head, 112),
                    "qform_code": struct.unpack_from(endian + "h", head, 252)[0],
                    "sform_code": struct.unpack_from(endian + "h", head, 254)[0],
                    "quatern": struct.unpack_from(endian + "3f", head, 256),
                    "qoffset": struct.unpack_from(endian + "3f", head, 268),
                    "srow": struct.unpack_from(endian + "12f", head, 280)}
        if header_size == 540 and len(head) >= 540:
            return {"size": 540, "endian": endian, "datatype": struct.unpack_from(endian + "h", head, 12)[0],
                    "dim": struct.unpack_from(endian + "8q", head, 16), "pixdim": struct.unpack_from(endian + "8d", head, 104),
                    "bitpix": struct.unpack_from(endian + "h", head, 14)[0],
                    "vox_offset": struct.unpack_from(endian + "q", head, 168)[0],
                    "scl": struct.unpack_from(endian + "2d", head, 176),
                    "qform_code": struct.unpack_from(endian + "i", head, 344)[0],
                    "sform_code": struct.unpack_from(endian + "i", head, 348)[0],
                    "quatern": struct.unpack_from(endian + "3d", head, 352),
                    "qoffset": struct.unpack_from(endian + "3d", head, 376),
                    "srow": struct.unpack_from(endian + "12d", head, 400)}
    return None


def _nifti_scaled(path: Path) -> bool:
    header = _nifti_header(path) if format_suffix(path) in (".nii", ".nii.gz") else None
    if header is None:
        return False
    slope, inter = header["scl"]
    return math.isfinite(slope) and slope not in (0.0, 1.0) or (math.isfinite(inter) and inter != 0.0)


def _check_nifti_data(path: Path) -> None:
    """What ITK's NIfTI reader hides, checked by streaming through the file (never holding it):

    a truncated file (ITK fills the rest with zeros), a corrupt .nii.gz stream or CRC (ITK reads
    the garbage), and NaN / infinite voxels (ITK turns them into 0 HU).
    """
    header = _nifti_header(path)
    if header is None:
        return  # not NIfTI-1/2: ITK's reader decides
    dim, bitpix = header["dim"], int(header["bitpix"])
    n = min(max(int(dim[0]), 0), 7)
    if bitpix <= 0 or bitpix % 8 or any(int(d) < 0 for d in dim[1 : 1 + n]):
        return  # a broken header: ITK's reader gives the message
    offset = header["vox_offset"]
    offset = int(offset) if math.isfinite(offset) and offset >= header["size"] else header["size"] + 4
    expected = offset + math.prod(int(d) for d in dim[1 : 1 + n]) * bitpix // 8
    dtype = _NIFTI_FLOATS.get(int(header["datatype"]))
    if dtype is not None:
        dtype = np.dtype(dtype).newbyteorder(header["endian"])
    counter = _NonFiniteCounter(offset, expected, dtype)
    with _nifti_stream(path, expected) as f:
        while chunk := f.read(1 << 24):
            counter.feed(chunk)  # reading to the end also makes gzip check the CRC
    _check_complete(path, expected, counter.seen)
    if counter.bad:
        raise NotCTError(nonfinite_message(str(path), counter.bad, counter.voxels))


_NIFTI_FLOATS = {16: np.float32, 64: np.float64}
_NIFTI_TYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8, 512: np.uint16,
                768: np.uint32, 1024: np.int64, 1280: np.uint64}
READ_CHUNK_BYTES = 1 << 24


def _read_nifti_voxels(path: Path, reader: sitk.ImageFileReader | None) -> np.ndarray | None:
    """The voxels of an unscaled 3D NIfTI, decoded while streaming through the file straight into the
    array (ITK's reader holds a second full-size buffer); None when ITK must read it (scaled data,
    4D, unusual types). Refuses a truncated file or a .nii.gz whose stream or CRC is damaged.

    NIfTI stores x fastest, then y, then z, which is the [z, y, x] array ITK would give: ITK expresses
    the orientation in the direction matrix, never by reordering voxels.
    """
    header = _nifti_header(path)
    if header is None or reader is None or reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        return None
    dtype = _NIFTI_TYPES.get(int(header["datatype"]))
    dim = [int(d) for d in header["dim"]]
    if dtype is None or _nifti_scaled(path) or not 3 <= dim[0] <= 7 or any(d != 1 for d in dim[4 : 1 + dim[0]]) \
            or not np.dtype(dtype).newbyteorder(header["endian"]).isnative:
        return None  # ITK reads it (byte-swapped files included)
    shape = (dim[3], dim[2], dim[1])
    if shape != tuple(reader.GetSize())[::-1] or np.dtype(dtype).itemsize * 8 != int(header["bitpix"]):
        return None
    offset = header["vox_offset"]
    offset = int(offset) if math.isfinite(offset) and offset >= header["size"] else header["size"] + 4
    array = np.empty(shape, np.dtype(dtype).newbyteorder(header["endian"]))
    buf = memoryview(array.reshape(-1).view(np.uint8))
    expected = offset + len(buf)
    with _nifti_stream(path, expected) as f:
        got = len(f.read(offset))
        while got < expected:
            n = f.readinto(buf[got - offset : min(len(buf), got - offset + READ_CHUNK_BYTES)])
            if not n:
                break
            got += n
        if format_suffix(path) == ".nii.gz":
            while f.read(READ_CHUNK_BYTES):  # to the end of the stream, so that gzip checks the CRC
                pass
    _check_complete(path, expected, got)
    return array


@contextlib.contextmanager
def _nifti_stream(path: Path, expected: int) -> Iterator[BinaryIO]:
    """The NIfTI file's bytes (decompressed for .nii.gz); a cut or corrupt stream is one clear error."""
    compressed = format_suffix(path) == ".nii.gz"
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            yield f
    except EOFError:
        raise UnreadableInputError(
            f"{path.name} is truncated: the compressed data ends before the {expected} bytes its header describes. "
            "Copy or export the file again.") from None
    except (OSError, zlib.error) as e:
        raise UnreadableInputError(
            f"{path.name} is corrupt: its compressed data fails the integrity check ({e}). "
            "Copy or export the file again.") from None


def _check_complete(path: Path, expected: int, got: int) -> None:
    if got < expected:
        raise UnreadableInputError(
            f"{path.name} is truncated: the header describes {expected} bytes but the file holds {got}"
            f"{' once decompressed' if format_suffix(path) == '.nii.gz' else ''}. Copy or export the file again.")


class _NonFiniteCounter:
    """Counts bytes, and the non-finite values of float voxel data, over a stream of chunks."""

    def __init__(self, offset: int, end: int, dtype: np.dtype | None) -> None:
        self.offset, self.end, self.dtype = offset, end, dtype
        self.seen = self.bad = self.voxels = 0
        self.carry = b""

    def feed(self, chunk: bytes) -> None:
        lo, hi = self.seen, self.seen + len(chunk)
        self.seen = hi
        if self.dtype is None or hi <= self.offset or lo >= self.end:
            return
        data = self.carry + chunk[max(0, self.offset - lo) : len(chunk) - max(0, hi - self.end)]
        usable = len(data) - len(data) % self.dtype.itemsize
        self.carry = data[usable:]
        values = np.frombuffer(data, self.dtype, usable // self.dtype.itemsize)
        self.voxels += values.size
        self.bad += values.size - int(np.count_nonzero(np.isfinite(values)))
