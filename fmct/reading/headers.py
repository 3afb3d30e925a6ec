"""What image-file headers say that ITK's readers get wrong or hide, read from the header itself.

- NIfTI: a file holds two orientations, the qform and the sform. ITK follows the qform unless the
  sform's code is "scanner", nibabel and FSL follow the sform whenever its code is set; when the two
  disagree (a mirror in x, for example) left and right differ between tools. fmct follows nibabel
  and records a warning.
- NRRD: `space units` may be cm or m; ITK ignores them and reads centimetres as millimetres.
- MetaImage and detached NRRD: an .mhd or .nhdr whose data file is missing is reported by ITK as a corrupt file.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from fmct.conventions.errors import AbsurdSpacingError, EmptyInputError, UnreadableInputError

XFORM_NAMES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}
AFFINE_ATOL_MM = 0.01  # float32 headers: closer than this the two transforms are the same
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
UNIT_MM = {"mm": 1.0, "millimeter": 1.0, "millimeters": 1.0, "cm": 10.0, "centimeter": 10.0, "centimeters": 10.0,
           "m": 1000.0, "meter": 1000.0, "meters": 1000.0, "um": 1e-3, "µm": 1e-3, "micron": 1e-3, "microns": 1e-3}


# --------------------------------------------------------------------------------------------- NIfTI
def qform_affine(header: dict) -> np.ndarray:
    """The qform's index -> RAS affine (NIfTI-1 standard, method 2)."""
    b, c, d = header["quatern"]
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])
    pixdim = header["pixdim"]
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([pixdim[1], pixdim[2], qfac * pixdim[3]])
    affine[:3, 3] = header["qoffset"]
    return affine


def sform_affine(header: dict) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :] = np.array(header["srow"], dtype=np.float64).reshape(3, 4)
    return affine


def nifti_lps_affine(header: dict, name: str) -> tuple[np.ndarray | None, str | None]:
    """(index -> LPS affine to use, or None for ITK's own; a warning when qform and sform disagree).

    Like nibabel: the sform when its code is set, else the qform when its code is set.
    """
    q_code, s_code = int(header["qform_code"]), int(header["sform_code"])
    if s_code <= 0 and q_code <= 0:
        return None, None
    sform = sform_affine(header) if s_code > 0 else None
    qform = qform_affine(header) if q_code > 0 else None
    chosen = sform if sform is not None else qform
    if not np.all(np.isfinite(chosen)):
        return None, None  # ITK's reader and validate_ct say what is wrong
    warning = None
    if sform is not None and qform is not None and not np.allclose(sform, qform, atol=AFFINE_ATOL_MM):
        mirrored = np.linalg.det(sform[:3, :3]) * np.linalg.det(qform[:3, :3]) < 0
        warning = (f"{name}: the NIfTI header's qform ({XFORM_NAMES.get(q_code, q_code)}) and sform "
                   f"({XFORM_NAMES.get(s_code, s_code)}) disagree"
                   f"{' (one is the mirror image of the other: left and right differ)' if mirrored else ''}; "
                   "fmct follows the sform, as nibabel and FSL do. Check the laterality of the findings, and fix the header.")
    return RAS_TO_LPS @ chosen, warning


def geometry_of(affine: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray] | None:
    """(spacing, origin, direction) of an index -> LPS affine, or None when its axes are sheared (ITK
    images have orthogonal axes) or degenerate."""
    columns = affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(spacing > 0):
        return None
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        return None
    return tuple(float(s) for s in spacing), tuple(float(o) for o in affine[:3, 3]), direction


# ---------------------------------------------------------------------------------------------- NRRD
def nrrd_fields(path: Path) -> dict[str, str]:
    """The `key: value` fields of a NRRD header (text up to the first blank line)."""
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return fields
    if not head.startswith(b"NRRD"):
        return fields
    for raw in head.split(b"\n")[1:]:
        line = raw.decode("latin-1").rstrip("\r")
        if not line.strip():
            break
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    return fields


def nrrd_unit_scale(path: Path) -> float:
    """Millimetres per unit of the NRRD's `space units` (1 when absent); refuses units it cannot convert."""
    text = nrrd_fields(path).get("space units")
    if not text:
        return 1.0
    units = [u.strip().lower() for u in re.findall(r'"([^"]*)"', text)] or text.lower().split()
    scales = {UNIT_MM.get(u) for u in units if u}
    if None in scales or len(scales) > 1:
        raise AbsurdSpacingError(
            f"{path.name}: the NRRD header gives space units {text}; fmct converts mm, cm, m and um, the same unit "
            "on every axis. Re-export the CT in millimetres, or fix 'space units' in the header.")
    return scales.pop() if scales else 1.0


# ----------------------------------------------------------------------------------------- MetaImage
def check_mhd_data_file(path: Path) -> None:
    """Name the missing data file of a detached MetaImage header (instead of 'corrupt')."""
    try:
        text = path.read_text(encoding="latin-1", errors="replace")[: 1 << 16]
    except OSError:
        return
    match = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
    if match is None:
        return
    name = match.group(1)
    if name.upper() == "LOCAL" or name.upper().startswith("LIST") or "%" in name:
        return  # data in the header file itself, or a list / pattern of slice files ITK resolves
    data = path.parent / name
    if not data.exists():
        raise EmptyInputError(
            f"{path.name} is a MetaImage header whose voxel data file {name} is missing (looked for {data}). "
            f"Copy {name} next to {path.name}, or give a single-file .mha instead.")
    if data.is_dir():
        raise UnreadableInputError(f"{path.name}: its voxel data file {data} is a folder. Give the .raw file's folder intact.")


def check_nrrd_data_file(path: Path) -> None:
    """Name the missing data file of a detached NRRD header (.nhdr) instead of 'corrupt'."""
    name = nrrd_fields(path).get("data file") or nrrd_fields(path).get("datafile")
    if not name or name.upper().startswith("LIST") or "%" in name or " " in name.strip():
        return  # none, or a list / pattern of files ITK resolves
    data = path.parent / name
    if not data.exists():
        raise EmptyInputError(
            f"{path.name} is a NRRD header whose voxel data file {name} is missing (looked for {data}). "
            f"Copy {name} next to {path.name}, or give a single-file .nrrd instead.")
