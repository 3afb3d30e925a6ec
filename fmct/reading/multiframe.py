"""Multi-frame DICOM (enhanced CT, classic multi-frame), held to the same rules as per-slice series.

GDCM reads a multi-frame file as one block: frames in stored order, a 1 mm spacing when it finds
none, and no word about missing frames or a second time point. The standard lets frames be stored
in any order and gives each its own position (PerFrameFunctionalGroupsSequence), so the frames are
placed here from their own positions, sorted, and checked exactly like the slices of a per-slice
series (duplicates, gaps, uneven spacing, tilt); a series split over several multi-frame files is
read as one. Nothing is assumed: no pixel spacing or no slice positions is a refusal.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fmct.conventions.errors import AbsurdSpacingError, InputVolumeError, NotVolumeError, UnreadableInputError
from fmct.reading.dicom_elements import (Elements, NotDicomError, check_transfer_syntax, frame_count, native_frames,
                                         read_elements, undo_monochrome1)
from fmct.reading.slice_grid import TILT_MIN_DEG, Grid, check_duplicates, check_gaps_and_spacing, resample_tilted, tilt_deg
from fmct.reading.volume import Volume, native_stderr_silenced

log = logging.getLogger("fmct.reading.files")

SHARED, PER_FRAME = 0x52009229, 0x52009230
PIXEL_MEASURES, PLANE_POSITION, PLANE_ORIENTATION = 0x00289110, 0x00209113, 0x00209116
PIXEL_VALUE_TRANSFORM, FRAME_CONTENT = 0x00289145, 0x00209111
PIXEL_SPACING, POSITION, ORIENTATION = 0x00280030, 0x00200032, 0x00200037
SLOPE, INTERCEPT, TEMPORAL_INDEX = 0x00281053, 0x00281052, 0x00209128
SPACING_BETWEEN_SLICES, FRAME_OFFSETS, NUMBER_OF_FRAMES, PHOTOMETRIC = 0x00180088, 0x3004000C, 0x00280008, 0x00280004


@dataclass
class FileFrames:
    """One multi-frame file: where each of its frames lies, and how its stored values become HU."""

    path: Path
    elements: Elements
    row: np.ndarray
    col: np.ndarray
    pixel_spacing: tuple[float, float]  # (x, y) = (column step, row step) in mm
    positions: np.ndarray  # [frames, 3] LPS mm, in stored order
    times: list[int | None]
    slopes: np.ndarray
    intercepts: np.ndarray
    monochrome1: bool


def file_frames(path: Path) -> FileFrames:
    """The frame geometry of one multi-frame file, from its own elements; refuses what is missing."""
    try:
        e = read_elements(path)
    except (NotDicomError, OSError, ValueError, IndexError, struct.error):
        raise UnreadableInputError(
            f"{path.name} cannot be read (truncated or corrupt multi-frame DICOM). Re-export the complete series.") from None
    n = frame_count(e)
    per, shared = e.items(PER_FRAME), (e.items(SHARED) or [{}])[0]
    if per and len(per) != n:
        raise UnreadableInputError(
            f"{path.name} has {n} frames but {len(per)} per-frame descriptions: the file is damaged. Re-export the series.")

    def value(k: int, sequence: int, tag: int, kind: str = "floats"):
        for where in ([per[k]] if per else []) + [shared]:
            for item in e.items(sequence, where)[:1]:
                if tag in item:
                    return getattr(e, kind)(tag, item)
        return getattr(e, kind)(tag) if tag in e.values else None

    iop = value(0, PLANE_ORIENTATION, ORIENTATION)
    if iop is None or len(iop) != 6:
        raise UnreadableInputError(f"{path.name} has no usable ImageOrientationPatient, so its frames cannot be placed. "
                                   "Export the original CT series.")
    row, col = _unit(np.array(iop[:3])), _unit(np.array(iop[3:]))
    if per and any((value(k, PLANE_ORIENTATION, ORIENTATION) or iop) != iop for k in range(n)):
        raise InputVolumeError(f"{path.name}: its frames have different orientations (the file mixes image planes). "
                               "Export a single reconstruction (one orientation) of the CT.")
    spacing = value(0, PIXEL_MEASURES, PIXEL_SPACING)
    if spacing is None or len(spacing) != 2 or not all(v > 0 for v in spacing):
        raise AbsurdSpacingError(
            f"{path.name}: PixelSpacing (0028,0030) is {'missing' if spacing is None else spacing} in this multi-frame "
            "file; without a positive pixel spacing the size of the head is unknown (fmct does not assume 1 mm). "
            "Export the original CT series from the scanner or PACS.")
    slopes = np.array([_number(value(k, PIXEL_VALUE_TRANSFORM, SLOPE), 1.0) for k in range(n)])
    intercepts = np.array([_number(value(k, PIXEL_VALUE_TRANSFORM, INTERCEPT), 0.0) for k in range(n)])
    check_slopes(slopes, path.name)
    times = [value(k, FRAME_CONTENT, TEMPORAL_INDEX, "uint") for k in range(n)] if per else [None] * n
    return FileFrames(path, e, row, col, (float(spacing[1]), float(spacing[0])), _positions(e, path, n, per, value, row, col),
                      times, slopes, intercepts, e.text(PHOTOMETRIC).upper() == "MONOCHROME1")


def check_slopes(slopes: np.ndarray, name: str) -> None:
    if np.any(slopes == 0):
        raise UnreadableInputError(
            f"{name}: RescaleSlope (0028,1053) is 0, which would make every voxel the same value; the header is broken "
            "(fmct does not read it as 1). Export the original CT series, or fix RescaleSlope.")


def _number(values: list[float] | None, default: float) -> float:
    return float(values[0]) if values else default


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _positions(e: Elements, path: Path, n: int, per: list, value, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Per-frame ImagePositionPatient; for classic multi-frame, the first position stepped along the
    normal by SpacingBetweenSlices (or GridFrameOffsetVector); refused when neither is there."""
    if per:
        positions = [value(k, PLANE_POSITION, POSITION) for k in range(n)]
        missing = [k + 1 for k, p in enumerate(positions) if p is None or len(p) != 3]
        if missing:
            raise UnreadableInputError(
                f"{path.name}: frame(s) {', '.join(map(str, missing[:5]))} have no ImagePositionPatient, so they cannot be "
                "placed. Export the original CT series.")
        return np.array(positions, dtype=np.float64)
    first = e.floats(POSITION)
    normal = _unit(np.cross(row, col))
    offsets = e.floats(FRAME_OFFSETS)
    if offsets is None or len(offsets) != n:
        step = e.floats(SPACING_BETWEEN_SLICES)
        offsets = None if step is None or step[0] <= 0 else [k * step[0] for k in range(n)]
    if first is None or len(first) != 3 or offsets is None:
        raise AbsurdSpacingError(
            f"{path.name} is a multi-frame image with no position per frame and no "
            f"{'ImagePositionPatient' if first is None else 'SpacingBetweenSlices (0018,0088)'}, so the slice spacing is "
            "unknown (fmct does not assume 1 mm). Export the series as one file per slice, or as enhanced CT.")
    return np.array(first) + np.outer(offsets, normal)


def read_multiframe_series(paths: list[Path]) -> Volume:
    """One volume from one or more multi-frame files of a series, checked like a per-slice series."""
    files = [file_frames(p) for p in paths]
    first = files[0]
    for f in files[1:]:
        if not (np.allclose(f.row, first.row, atol=1e-3) and np.allclose(f.col, first.col, atol=1e-3)
                and np.allclose(f.pixel_spacing, first.pixel_spacing, rtol=1e-3)):
            raise InputVolumeError(f"{f.path.name} and {first.path.name} hold frames of different planes or pixel "
                                   "spacing under one series UID. Export a single reconstruction of the CT.")
    _check_time_points(files)
    normal = _unit(np.cross(first.row, first.col))
    positions = np.concatenate([f.positions for f in files])
    order = np.argsort(positions @ normal, kind="stable")
    if np.any(np.diff(order) != 1):
        log.info("The frames are stored out of position order; sorted by their positions.")
    positions = positions[order]
    along = positions @ normal
    check_duplicates(along)
    check_gaps_and_spacing(along)
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    grid = Grid(positions[0], first.row, first.col, normal, first.pixel_spacing, step, tilt_deg(positions, normal))
    array = _sorted_frames(files, order)
    if len(files) > 1:
        log.info("The series is split over %d multi-frame files (%s frames); read as one volume.", len(files),
                 " + ".join(str(len(f.positions)) for f in files))
    if grid.tilt_deg >= TILT_MIN_DEG:
        volume = resample_tilted(array, grid)
        volume.meta["gantry_tilt_deg"] = round(grid.tilt_deg, 2)
        return volume
    return Volume(array, (*grid.pixel_spacing, grid.slice_spacing), tuple(grid.origin),
                  np.column_stack([grid.row, grid.col, normal]))


def _sorted_frames(files: list[FileFrames], order: np.ndarray) -> np.ndarray:
    """The HU frames of all files in position order, placed straight into one array (no sorted copy)."""
    destination = np.empty_like(order)
    destination[order] = np.arange(len(order))
    array: np.ndarray | None = None
    start = 0
    for f in files:
        hu = _hounsfield(f)
        if array is None:
            array = np.empty((len(order), *hu.shape[1:]), np.float32)
        if hu.shape[1:] != array.shape[1:]:
            raise InputVolumeError(f"{f.path.name} has a different image size from {files[0].path.name}. "
                                   "Export a single reconstruction of the CT.")
        array[destination[start : start + len(hu)]] = hu
        start += len(hu)
    return array


def _check_time_points(files: list[FileFrames]) -> None:
    times = sorted({t for f in files for t in f.times if t is not None})
    if len(times) > 1:
        shown = ", ".join(map(str, times[:5])) + (", ..." if len(times) > 5 else "")
        raise NotVolumeError(
            f"The multi-frame series holds {len(times)} time points (TemporalPositionIndex {shown}): a dynamic or "
            "perfusion acquisition, not one CT volume. Export a single time point (one 3D volume).")


def _hounsfield(f: FileFrames) -> np.ndarray:
    """The frames of one file in HU, in stored order: from the stored values with each frame's own
    rescale when uncompressed (MONOCHROME1 included: its values are not inverted), else decoded by GDCM."""
    stored = native_frames(f.path, f.elements)
    if stored is not None:
        hu = np.empty(stored.shape, np.float32)
        for k in range(len(stored)):  # frame by frame: no float64 copy of the whole file
            hu[k] = stored[k] * f.slopes[k] + f.intercepts[k]
        return hu
    if np.ptp(f.slopes) or np.ptp(f.intercepts):
        raise UnreadableInputError(
            f"{f.path.name}: a compressed multi-frame file that rescales each frame differently; fmct reads such files "
            "only uncompressed. Decompress it first (e.g. gdcmconv --raw) or export it uncompressed.")
    try:
        with native_stderr_silenced():
            image = sitk.ReadImage(str(f.path), outputPixelType=sitk.sitkFloat32, imageIO="GDCMImageIO")
    except RuntimeError:
        check_transfer_syntax(f.path, f.elements.transfer_syntax)  # GDCM cannot decode it: say so, not "corrupt"
        raise UnreadableInputError(
            f"{f.path.name} cannot be read (truncated or corrupt). Re-export the complete series from PACS.") from None
    # GDCM applies the rescale of the functional groups (the same for every frame here)
    hu = sitk.GetArrayFromImage(image).reshape(-1, *image.GetSize()[1::-1]).astype(np.float32, copy=False)
    if not f.monochrome1:
        return hu
    hu = undo_monochrome1(hu, f.elements, float(f.slopes[0]), float(f.intercepts[0]))
    if hu is None:
        raise UnreadableInputError(
            f"{f.path.name} is a compressed MONOCHROME1 file with fewer than 16 bits stored, which fmct's decoder cannot "
            "read without inverting it. Decompress it first (e.g. gdcmconv --raw) or export it uncompressed.")
    return hu
