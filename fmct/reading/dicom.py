"""DICOM series in and out, the way scanners and PACS exports actually write them.

Exports mix series (scout, bone and soft-tissue kernels, reformats), name files arbitrarily,
store unsigned pixels with a rescale intercept and sometimes tilt the gantry. Reading therefore
groups files by series UID, orders slices by their position along the slice normal, checks the
slice positions describe one regular grid (resampling a gantry tilt onto an orthogonal one) and
refuses anything else with an error that says what to do. Patient-identifying tags are never
read into memory we keep, put into `Volume.meta`, or logged.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fmct.conventions.errors import (
    AbsurdSpacingError,
    EmptyInputError,
    InputVolumeError,
    NotCTError,
    NotVolumeError,
    UnreadableInputError,
)
from fmct.reading.dicom_elements import (NotDicomError, check_transfer_syntax, decode_text, native_frames, read_elements,
                                         frame_count, sop_name, transfer_syntax_of,
                                         undo_monochrome1)
from fmct.reading.dicom_writer import new_uid, write_dicom_series  # noqa: F401  (re-exported: the one DICOM module callers know)
from fmct.reading.multiframe import check_slopes, file_frames, read_multiframe_series
from fmct.reading.slice_grid import TILT_MIN_DEG, Grid, check_duplicates, check_gaps_and_spacing, resample_tilted, tilt_deg
from fmct.reading.volume import FORMATS, Volume, check_memory, format_suffix, native_stderr_silenced, validate_ct

log = logging.getLogger("fmct.reading.files")

AXIAL_MAX_DEG = 30.0
READ_CHUNK_SLICES = 32  # slices decoded at a time into the (int16 when exact) volume
LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM")
# Files that sit next to DICOM images in exports but are never images themselves.
NOT_DICOM_SUFFIXES = {
    ".txt", ".xml", ".json", ".html", ".htm", ".pdf", ".jpg", ".jpeg", ".png", ".gif", ".bmp",
    ".exe", ".dll", ".inf", ".ini", ".nii", ".gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".raw", ".zip",
    ".csv", ".md", ".py", ".log",
}
# SOP classes of DICOM objects without pixels (SR dose reports, RT structures, PDFs, DICOMDIR).
NON_IMAGE_SOP_PREFIXES = (
    b"1.2.840.10008.5.1.4.1.1.88.", b"1.2.840.10008.5.1.4.1.1.481.", b"1.2.840.10008.5.1.4.1.1.11.",
    b"1.2.840.10008.5.1.4.1.1.104.", b"1.2.840.10008.5.1.4.1.1.66", b"1.2.840.10008.1.3.10",
)
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


@dataclass
class SliceHeader:
    """What one file says about itself; read without pixels, and without any patient tag."""

    path: Path
    series_uid: str
    modality: str
    image_type: str
    description: str
    series_number: int | None
    instance_number: int | None
    size: tuple[int, int, int]  # columns, rows, frames
    pixel_spacing: tuple[float, float]  # (x, y) = (column step, row step) in mm
    position: np.ndarray | None  # ImagePositionPatient, LPS mm
    row: np.ndarray | None  # direction of increasing column index (first IOP triplet)
    col: np.ndarray | None  # direction of increasing row index (second IOP triplet)
    study_uid: str = ""
    pixel_spacing_tag: tuple[float, float] | None = None  # PixelSpacing (0028,0030) as written, None if missing
    samples_per_pixel: int = 1
    photometric: str = ""
    rescale_exact: bool = True  # slope 1 and an integer intercept: HU are integers
    rescale_slope: float | None = None  # RescaleSlope as written (0 is refused, never read as 1)
    patient_key: str = ""  # a hash of PatientID: tells two patients apart without keeping the ID
    iop_degenerate: bool = False  # ImageOrientationPatient with a zero or parallel row/column vector


@dataclass
class SeriesInfo:
    """One DICOM series in a folder, with its files in slice order."""

    uid: str
    description: str
    number: int | None
    modality: str
    n_files: int
    normal: tuple[float, float, float]
    is_localizer: bool
    is_axial: bool
    files: list[Path]
    image_type: str = ""
    n_slices: int = 0
    headers: list[SliceHeader] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        """One line naming the series; its free-text description only when it was kept (keep_descriptions)."""
        kind = "localizer" if self.is_localizer else ("axial" if self.is_axial else "not axial")
        number = f"series #{self.number}, " if self.number is not None else ""
        described = f"'{self.description}' " if self.description else ""
        return (f"{described}({number}{self.modality or 'no modality'}, "
                f"{self.n_slices} slice{'s' if self.n_slices != 1 else ''}, {kind}, UID {self.uid})")


# --------------------------------------------------------------------------------------------
# Listing series
# --------------------------------------------------------------------------------------------

def list_series(folder: str | Path, keep_descriptions: bool = False) -> list[SeriesInfo]:
    """All image series under `folder` (subfolders included), largest first.

    SeriesDescription is free text that may hold a name or a birth date (DICOM's basic
    de-identification profile removes it): it is left out unless keep_descriptions.
    """
    folder = _existing_folder(folder)
    files = _candidate_files(folder)
    skipped: list[str] = []
    headers = [h for h in (read_header(p, skipped) for p in files) if h is not None]
    if skipped:
        log.info("Skipped %d DICOM object(s) without pixel data: %s%s", len(skipped), ", ".join(skipped[:10]),
                 f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
    if not headers:
        raise EmptyInputError(
            f"No DICOM images found in {folder} ({len(files)} file(s) searched, subfolders included). "
            + _other_images_hint(folder)
            + "Point to the folder that holds the exported CT series, or export it from PACS again.")
    by_uid: dict[str, list[SliceHeader]] = {}
    for h in headers:
        by_uid.setdefault(h.series_uid, []).append(h)
    series = [_series_info(uid, hs, keep_descriptions) for uid, hs in by_uid.items()]
    return sorted(series, key=lambda s: -s.n_slices)


def _existing_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise EmptyInputError(f"{folder} does not exist. Check the path (and that the drive is mounted).")
    if not folder.is_dir():
        raise EmptyInputError(f"{folder} is not a folder. Give the folder that holds the DICOM series.")
    _check_folder_readable(folder)
    return folder


def _check_folder_readable(folder: Path) -> None:
    try:
        next(iter(folder.iterdir()), None)
    except PermissionError:
        raise UnreadableInputError(
            f"{folder}: permission denied: fmct may not list this folder. Fix its permissions (e.g. chmod a+rx) or "
            "copy the series to a place you can read.") from None


def _candidate_files(folder: Path) -> list[Path]:
    for sub in (p for p in folder.rglob("*") if p.is_dir() and not p.name.startswith(".")):
        _check_folder_readable(sub)  # rglob silently skips a folder it may not list
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
        and p.suffix.lower() not in NOT_DICOM_SUFFIXES
    )


def _other_images_hint(folder: Path) -> str:
    images = [p.name for p in folder.rglob("*") if p.is_file() and format_suffix(p) in FORMATS]
    return f"It holds image files ({', '.join(images[:3])}): give one of those files instead. " if images else ""


def read_header(path: Path, skipped: list[str] | None = None) -> SliceHeader | None:
    """Header of one file, or None for a file that is not a DICOM image at all (a DICOM object without
    pixel data is also added to `skipped`, with what it is, for the log).

    Raises UnreadableInputError for a file that looks like DICOM but cannot be parsed, naming an
    unsupported transfer syntax as such.
    """
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    _check_file_readable(path)
    try:
        with native_stderr_silenced():
            reader.ReadImageInformation()
    except RuntimeError:
        return _not_an_image(path, skipped)
    tag = functools.partial(_tag, reader)
    iop, position = _floats(tag("0020|0037"), 6), _floats(tag("0020|0032"), 3)
    size = reader.GetSize()
    if iop is None and len(size) > 2 and size[2] > 1:  # enhanced multi-frame: plane tags are per frame
        direction = np.array(reader.GetDirection()).reshape(3, 3)
        iop, position = np.concatenate([direction[:, 0], direction[:, 1]]), np.array(reader.GetOrigin())
    spacing_tag = _floats(tag("0028|0030"), 2)
    slope, intercept = _floats(tag("0028|1053"), 1), _floats(tag("0028|1052"), 1)
    return SliceHeader(
        path=path,
        series_uid=tag("0020|000e") or "(no series UID)",
        modality=tag("0008|0060").upper(),
        image_type=tag("0008|0008").upper(),
        description=decode_text(tag("0008|103e"), tag("0008|0005")),
        series_number=_int(tag("0020|0011")),
        instance_number=_int(tag("0020|0013")),
        size=(int(size[0]), int(size[1]), int(size[2]) if len(size) > 2 else 1),
        pixel_spacing=(float(reader.GetSpacing()[0]), float(reader.GetSpacing()[1])),
        position=position,
        row=None if iop is None else _unit(iop[:3]),
        col=None if iop is None else _unit(iop[3:]),
        study_uid=tag("0020|000d"),
        pixel_spacing_tag=None if spacing_tag is None else (float(spacing_tag[0]), float(spacing_tag[1])),
        samples_per_pixel=max(_int(tag("0028|0002")) or 1, reader.GetNumberOfComponents()),
        photometric=tag("0028|0004").upper(),
        rescale_exact=(slope is None or float(slope[0]) == 1.0) and (intercept is None or float(intercept[0]).is_integer()),
        rescale_slope=None if slope is None else float(slope[0]),
        patient_key=hashlib.sha256(tag("0010|0020").encode("utf-8", "surrogateescape")).hexdigest()[:12],
        iop_degenerate=iop is not None and _degenerate(iop),
    )


def _not_an_image(path: Path, skipped: list[str] | None) -> None:
    """What a file GDCM cannot read as an image is: not DICOM (None), a DICOM object without pixels
    (None, listed in `skipped`), an image in a transfer syntax GDCM cannot decode, or damaged."""
    if not _looks_like_dicom(path):
        log.debug("skipping %s: not a DICOM image", path.name)
        return None
    try:
        elements = read_elements(path)
    except (NotDicomError, OSError, ValueError, IndexError, struct.error, zlib.error):
        elements = None
    if elements is not None and not elements.has_pixels:
        if skipped is not None:
            skipped.append(f"{path.name} ({sop_name(elements.text(0x00080016))})")
        return None
    check_transfer_syntax(path, transfer_syntax_of(path))
    if elements is not None:
        check_slopes(np.array(elements.floats(0x00281053) or [1.0]), path.name)
        if frame_count(elements) > 1:
            file_frames(path)  # says what is wrong with a multi-frame header (no spacing, slope 0, ...)
    if _is_non_image_dicom(path):
        return None
    raise UnreadableInputError(
        f"{path.name} looks like DICOM but cannot be read (truncated or corrupt). "
        "Re-export the complete series from PACS, or remove this file from the folder.")


def _degenerate(iop: np.ndarray) -> bool:
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    return bool(nr < 1e-3 or nc < 1e-3 or abs(row @ col) / (nr * nc) > 0.01)


def _check_file_readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise UnreadableInputError(
            f"{path}: permission denied: fmct may not read this file of the DICOM folder. Fix its permissions "
            "(e.g. chmod a+r) or copy the series to a place you can read.") from None


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _is_non_image_dicom(path: Path) -> bool:
    """SR dose reports, RT structures and the like: valid DICOM, no pixels, not our business."""
    data = path.read_bytes()
    return PIXEL_DATA_TAG not in data and any(p in data[:4096] for p in NON_IMAGE_SOP_PREFIXES)


def _floats(text: str, n: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return values if values.size == n and np.all(np.isfinite(values)) else None


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _series_info(uid: str, headers: list[SliceHeader], keep_descriptions: bool = False) -> SeriesInfo:
    first = headers[0]
    oriented = first.row is not None and first.col is not None
    normal = _unit(np.cross(first.row, first.col)) if oriented else np.zeros(3)
    headers = sorted(headers, key=lambda h: (_along(h.position, normal), h.instance_number or 0))
    n_slices = sum(h.size[2] for h in headers)  # every frame of every file (a series may be split over files)
    is_localizer = any(w in first.image_type for w in LOCALIZER_WORDS) or n_slices < 3
    return SeriesInfo(
        uid=uid, description=first.description if keep_descriptions else "", number=first.series_number, modality=first.modality,
        n_files=len(headers), normal=tuple(float(x) for x in normal), is_localizer=is_localizer,
        is_axial=bool(abs(normal[2]) >= math.cos(math.radians(AXIAL_MAX_DEG))),
        files=[h.path for h in headers], image_type=first.image_type, n_slices=n_slices, headers=headers,
    )


def _along(position: np.ndarray | None, normal: np.ndarray) -> float:
    return float(position @ normal) if position is not None else 0.0


# --------------------------------------------------------------------------------------------
# Choosing a series
# --------------------------------------------------------------------------------------------

def choose_series(series: list[SeriesInfo], series_uid: str | None = None,
                  reason_for_uid: str = "series_uid was given") -> tuple[SeriesInfo, str]:
    """The series to analyze and a sentence saying why, so the user can check or override it."""
    if series_uid is not None:
        match = [s for s in series if s.uid == series_uid]
        if not match:
            raise EmptyInputError(
                f"No series with UID {series_uid} here. Available series: "
                + "; ".join(s.summary() for s in series) + ". Pass one of these UIDs as series_uid (--series).")
        return match[0], f"Picked series {match[0].summary()} because {reason_for_uid}."
    chosen = max(series, key=lambda s: (s.modality == "CT", not s.is_localizer, s.is_axial, s.n_slices))
    others = [s for s in series if s is not chosen]
    if not others:
        why = "the only series found"
    elif chosen.is_axial and not chosen.is_localizer:
        why = "the axial, non-localizer series with the most slices"
    else:
        why = "no axial non-localizer series was found, so the largest remaining one"
    sentence = f"Picked series {chosen.summary()}: {why}."
    if others:
        sentence += " Other series: " + "; ".join(s.summary() for s in others) + ". Pass series_uid (--series) to choose another."
    return chosen, sentence


# --------------------------------------------------------------------------------------------
# Reading a series
# --------------------------------------------------------------------------------------------

def read_dicom_series(folder: str | Path, series_uid: str | None = None, keep_descriptions: bool = False) -> Volume:
    """Read one series as a float32 HU Volume in LPS; a file path means that file's series.

    The free-text SeriesDescription reaches volume.meta and the log only with keep_descriptions.
    """
    source = str(folder)
    folder, series_uid, reason = _folder_and_uid(Path(folder), series_uid)
    series, sentence = choose_series(list_series(folder, keep_descriptions), series_uid, reason)
    log.debug(sentence)
    volume = _read_series(series, source)
    log.info(sentence)  # after the checks: a refused series gets one line, the error
    volume.meta["series_choice"] = sentence
    return volume


def read_dicom_files(files: list[Path], series_uid: str | None = None, source: str = "") -> Volume:
    """Read one series from explicit files rather than a folder (RSNA keeps every study in one folder).

    The series is series_uid, or the one the first readable file belongs to; the checks are
    those of read_dicom_series.
    """
    source = source or (str(files[0].parent) if files else "(no files)")
    headers = [h for h in (read_header(Path(p)) for p in files) if h is not None]
    if series_uid is not None:
        headers = [h for h in headers if h.series_uid == series_uid]
    if not headers:
        raise EmptyInputError(f"No DICOM images among the {len(files)} file(s) given in {source}.")
    return _read_series(_series_info(headers[0].series_uid, headers), source)


def _read_series(series: SeriesInfo, source: str) -> Volume:
    _check_is_ct(series)
    _check_one_patient(series)
    _check_enough_slices(series)
    _check_grey(series)
    multiframe = _multiframe_files(series)
    if not multiframe:
        _check_pixel_spacing(series)
        check_slopes(np.array([h.rescale_slope for h in series.headers if h.rescale_slope is not None]),
                     series.headers[0].path.name)
    first = series.headers[0]
    check_memory((first.size[0], first.size[1], series.n_slices), 2 if _exact_integers(series) and not multiframe else 4,
                 source, "HU")
    volume = read_multiframe_series(series.files) if multiframe else _read_slices(series)
    volume.meta.update({
        "source": source, "format": "dicom", "series_uid": series.uid,
        "series_description": series.description or None, "series_number": series.number, "n_slices": series.n_slices,
    })
    validate_ct(volume, source)
    return volume


def _folder_and_uid(path: Path, series_uid: str | None) -> tuple[Path, str | None, str]:
    if not path.is_file():
        return path, series_uid, "series_uid was given"
    if series_uid is not None:
        return path.parent, series_uid, "series_uid was given"
    header = read_header(path)
    if header is None:
        raise UnreadableInputError(f"{path.name} is not a DICOM image. Give a DICOM file or the folder of the series.")
    return path.parent, header.series_uid, f"it holds the file you gave ({path.name})"


def _multiframe_files(series: SeriesInfo) -> bool:
    """True when the series is stored as multi-frame files (one or several); refuses a mixture."""
    frames = [h.size[2] for h in series.headers]
    multi = sum(n > 1 for n in frames)
    if multi and multi != len(frames):
        raise InputVolumeError(
            f"Series {series.summary()} mixes {multi} multi-frame file(s) ({sum(n for n in frames if n > 1)} frames) "
            f"and {len(frames) - multi} single-image file(s) under one series UID, so which images form the volume is "
            "unclear. Export the series again as one kind (one file per slice, or enhanced CT).")
    return multi > 0


def _check_one_patient(series: SeriesInfo) -> None:
    """One series UID must not gather the files of two patients or studies (a UID collision or a bad
    anonymiser): refuse, naming a file and the study of each, never the patient's ID."""
    first = series.headers[0]
    other = next((h for h in series.headers if (h.study_uid, h.patient_key) != (first.study_uid, first.patient_key)), None)
    if other is None:
        return
    what = "patients (different PatientID)" if other.patient_key != first.patient_key else "studies"
    raise InputVolumeError(
        f"Series UID {series.uid} gathers files of two different {what}: {first.path.name} (study "
        f"{first.study_uid or 'without UID'}) and {other.path.name} (study {other.study_uid or 'without UID'}). One "
        "volume must come from one patient and study: export each study separately, or pass the files of one.")


def _check_is_ct(series: SeriesInfo) -> None:
    if series.modality != "CT":
        raise NotCTError(
            f"Series {series.summary()} has modality '{series.modality or 'missing'}', not CT. "
            "FMCT analyzes head CTs only; pick the CT series (series_uid / --series) or export the CT study.")


def _check_grey(series: SeriesInfo) -> None:
    h = series.headers[0]
    if h.samples_per_pixel > 1 or h.photometric.startswith(("RGB", "YBR", "PALETTE")):
        raise NotCTError(
            f"Series {series.summary()} is a colour image ({h.photometric or f'{h.samples_per_pixel} samples per pixel'}), "
            "although it is tagged CT: a screenshot, secondary capture or rendered view, not the CT's Hounsfield "
            "units. Export the original grey-scale CT series.")


def _check_pixel_spacing(series: SeriesInfo) -> None:
    for h in series.headers:
        spacing = h.pixel_spacing_tag
        if spacing is None or not all(math.isfinite(v) and v > 0 for v in spacing):
            shown = "missing" if spacing is None else "\\".join(f"{v:g}" for v in spacing)
            raise AbsurdSpacingError(
                f"{h.path.name}: PixelSpacing (0028,0030) is {shown}; without a positive pixel spacing the size of "
                "the head is unknown (fmct does not assume 1 mm). Export the original CT series from the scanner or "
                "PACS, or fix PixelSpacing in the files.")


def _exact_integers(series: SeriesInfo) -> bool:
    return all(h.rescale_exact for h in series.headers)


def _check_enough_slices(series: SeriesInfo) -> None:
    if series.n_slices < 3:
        files = f" in {series.n_files} file(s)" if series.n_files > 1 else ""
        raise NotVolumeError(
            f"Series {series.summary()} is not a 3D volume (only {series.n_slices} slice(s){files}; localizers and "
            "single images are skipped). Export the complete axial head CT series from PACS.")


def _read_slices(series: SeriesInfo) -> Volume:
    grid = _slice_grid(series)
    if any(h.photometric == "MONOCHROME1" for h in series.headers):
        array = _read_monochrome1(series.files)
    else:
        array = _read_pixels(series.files, exact_integers=_exact_integers(series))
    if grid.tilt_deg >= TILT_MIN_DEG:
        log.info("Gantry tilt of %.1f degrees detected; resampled the slices onto an orthogonal grid.", grid.tilt_deg)
        volume = resample_tilted(array, grid)
        volume.meta["gantry_tilt_deg"] = round(grid.tilt_deg, 2)
        return volume
    direction = np.column_stack([grid.row, grid.col, grid.normal])
    return Volume(array, (*grid.pixel_spacing, grid.slice_spacing), tuple(grid.origin), direction)


def _read_pixels(files: list[Path], exact_integers: bool = False) -> np.ndarray:
    """Pixels in the given order, rescaled to HU by GDCM (slope/intercept of each file).

    Decoded READ_CHUNK_SLICES slices at a time into one preallocated array: int16 when every file's
    rescale gives integer HU that fit (the usual CT), so a large series is never held as float32;
    float32 otherwise (it switches when a chunk holds values int16 cannot represent).
    """
    out: np.ndarray | None = None
    for lo in range(0, len(files), READ_CHUNK_SLICES):
        chunk = _read_chunk(files[lo : lo + READ_CHUNK_SLICES])
        if out is None:
            out = np.empty((len(files), *chunk.shape[1:]), np.int16 if exact_integers else np.float32)
        if chunk.shape[1:] != out.shape[1:]:
            raise InputVolumeError(f"{files[lo].name} has a different image size from {files[0].name}. "
                                   "Export a single reconstruction of the CT.")
        if out.dtype == np.int16 and not _fits_int16(chunk):
            out = out.astype(np.float32)
        out[lo : lo + len(chunk)] = chunk
    return out


def _read_monochrome1(files: list[Path]) -> np.ndarray:
    """MONOCHROME1 only says how to display the values (white is low); HU are still slope x stored +
    intercept. GDCM inverts the stored values (and fails on 12 bits stored), so uncompressed pixels
    are decoded here and GDCM's inversion of compressed 16-bit ones is undone."""
    slices = []
    for path in files:
        elements = read_elements(path)
        slope = (elements.floats(0x00281053) or [1.0])[0]
        intercept = (elements.floats(0x00281052) or [0.0])[0]
        stored = native_frames(path, elements)
        if stored is not None:
            slices.append((stored * slope + intercept).astype(np.float32))
            continue
        hu = undo_monochrome1(_read_chunk([path]), elements, slope, intercept)
        if hu is None:
            raise UnreadableInputError(
                f"{path.name} is a compressed MONOCHROME1 image with {elements.uint(0x00280101)} bits stored, which "
                "fmct's decoder cannot read without inverting it. Decompress the series first (e.g. gdcmconv --raw) "
                "or export it uncompressed.")
        slices.append(hu)
    return np.concatenate(slices)


def _read_chunk(files: list[Path]) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.SetFileNames([str(p) for p in files])
    try:
        with native_stderr_silenced():
            image = reader.Execute()
    except RuntimeError:
        bad = _first_unreadable(files)
        if bad is not None:
            check_transfer_syntax(bad, transfer_syntax_of(bad))  # GDCM cannot decode it: say so, not "corrupt"
        raise UnreadableInputError(
            f"{bad.name if bad else 'a file of the series'} cannot be read (truncated or corrupt pixel data). "
            "Re-export the complete series from PACS.") from None
    array = sitk.GetArrayViewFromImage(image)
    return np.array(array.reshape(-1, *array.shape[-2:]), np.float32)


def _fits_int16(chunk: np.ndarray) -> bool:
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.isfinite(chunk)) and chunk.min() >= -32768 and chunk.max() <= 32767
                    and np.array_equal(chunk, np.round(chunk)))


def _first_unreadable(files: list[Path]) -> Path | None:
    for path in files:
        try:
            with native_stderr_silenced():
                sitk.ReadImage(str(path), imageIO="GDCMImageIO")
        except RuntimeError:
            return path
    return None


# --------------------------------------------------------------------------------------------
# Slice geometry: one regular grid, or a clear refusal
# --------------------------------------------------------------------------------------------

def _slice_grid(series: SeriesInfo) -> Grid:
    headers = series.headers
    _check_plane_tags(headers)
    _check_same_plane_and_size(headers)
    row, col = headers[0].row, headers[0].col
    normal = _unit(np.cross(row, col))
    positions = np.stack([h.position for h in headers])
    along = positions @ normal
    check_duplicates(along)
    check_gaps_and_spacing(along)
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    return Grid(positions[0], row, col, normal, headers[0].pixel_spacing, step, tilt_deg(positions, normal))


def _check_plane_tags(headers: list[SliceHeader]) -> None:
    for h in headers:
        if h.position is None or h.row is None:
            raise UnreadableInputError(
                f"{h.path.name} has no usable Image Position/Orientation (Patient), so its slice cannot be placed. "
                "Export the original CT series (not secondary captures or screenshots).")
        if h.iop_degenerate:
            raise InputVolumeError(
                f"{h.path.name}: ImageOrientationPatient (0020,0037) gives a zero or parallel row and column direction, "
                "so the slice plane is undefined. The files were damaged or badly anonymised: export the original "
                "CT series again.")


def _check_same_plane_and_size(headers: list[SliceHeader]) -> None:
    first = headers[0]
    for h in headers[1:]:
        if not (np.allclose(h.row, first.row, atol=1e-3) and np.allclose(h.col, first.col, atol=1e-3)):
            raise InputVolumeError(
                f"{h.path.name} is oriented differently from {first.path.name}: the series mixes image planes. "
                "Export a single reconstruction (one orientation) of the CT.")
        if h.size != first.size or not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise InputVolumeError(
                f"{h.path.name} has a different image size or pixel spacing from {first.path.name}. "
                "Export a single reconstruction of the CT.")


