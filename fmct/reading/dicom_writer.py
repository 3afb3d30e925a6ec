"""Writing DICOM series the way scanners do (one file per slice), so readers can be tested on them."""
from __future__ import annotations

import contextlib
import locale
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fmct.reading.volume import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SOP_CLASS_BY_MODALITY = {"CT": CT_IMAGE_STORAGE, "MR": "1.2.840.10008.5.1.4.1.1.4"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    series_description: str = "FMCT phantom",
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    storage: str = "int16",
    shuffle_names_seed: int | None = None,
    gantry_tilt_deg: float = 0.0,
    patient_name: str = "ANONYMOUS",
    patient_id: str = "FMCT-PHANTOM",
) -> list[Path]:
    """Write one file per slice, as a scanner would, so readers can be tested on realistic series.

    storage="uint16" stores HU + 1024 with RescaleIntercept -1024, which proves a reader applies
    the rescale. GDCM applies the inverse rescale itself when writing, so it is given HU values
    (as float32) together with the rescale and pixel-representation tags. With a gantry tilt,
    slice k keeps array[k] but its position moves along the column direction by k*dz*tan(tilt),
    as in tilted acquisitions. Returns the paths in slice order.
    """
    if storage not in ("int16", "uint16"):
        raise ValueError(f"storage must be 'int16' or 'uint16', got {storage!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = volume.array.shape[0]
    names = _file_names(n, series_number, shuffle_names_seed)
    series_uid = series_uid or new_uid()
    study_uid = study_uid or f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, series_uid).int}"  # parts of one series: one study
    shared = _series_tags(volume, modality, series_uid, study_uid, series_number,
                          series_description, image_type, storage, gantry_tilt_deg, patient_name, patient_id)
    shift = volume.spacing[2] * math.tan(math.radians(gantry_tilt_deg)) * volume.direction[:, 1]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    with _locale_kept():
        for k in range(n):
            position = (volume.index_to_physical @ [0.0, 0.0, k, 1.0])[:3] + k * shift
            image = _slice_image(volume, k, position, storage)
            for key, value in {**shared, **_slice_tags(k, position)}.items():
                image.SetMetaData(key, value)
            writer.SetFileName(str(folder / names[k]))
            writer.Execute(image)
            paths.append(folder / names[k])
    return paths


@contextlib.contextmanager
def _locale_kept() -> Iterator[None]:
    """GDCM's DICOM writer sets the process locale to "C" and leaves it there: every later text-mode open()
    without an encoding then reads ASCII only (a UTF-8 README, a subprocess's output). Put it back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def new_uid() -> str:
    """A globally unique DICOM UID under the 2.25 (UUID-derived) root."""
    return f"2.25.{uuid.uuid4().int}"


def _file_names(n: int, series_number: int, seed: int | None) -> list[str]:
    if seed is None:
        return [f"IM_{series_number:04d}_{k + 1:04d}.dcm" for k in range(n)]
    rng = np.random.default_rng(seed)
    return [f"{uuid.UUID(bytes=rng.bytes(16))}.dcm" for _ in range(n)]


def _series_tags(volume: Volume, modality: str, series_uid: str, study_uid: str, series_number: int,
                 description: str, image_type: str, storage: str, tilt_deg: float,
                 patient_name: str, patient_id: str) -> dict[str, str]:
    row, col = volume.direction[:, 0], volume.direction[:, 1]
    tags = {
        "0008|0016": SOP_CLASS_BY_MODALITY.get(modality.upper(), SECONDARY_CAPTURE),
        "0008|0060": modality,
        "0008|0008": image_type,
        "0008|103e": description,
        "0010|0010": patient_name,
        "0010|0020": patient_id,
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0011": str(series_number),
        "0020|0052": study_uid + ".1",  # frame of reference shared by the study's series
        "0020|0037": "\\".join(_ds(v) for v in (*row, *col)),
        "0018|0050": _ds(volume.spacing[2]),
        "0018|1120": _ds(tilt_deg),
        "0028|1053": "1",
    }
    if storage == "uint16":
        tags.update({"0028|1052": "-1024", "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "0"})
    else:
        tags["0028|1052"] = "0"
    return tags


def _slice_tags(k: int, position: np.ndarray) -> dict[str, str]:
    return {
        "0008|0018": new_uid(),
        "0020|0013": str(k + 1),
        "0020|0032": "\\".join(_ds(v) for v in position),
    }


def _slice_image(volume: Volume, k: int, position: np.ndarray, storage: str) -> sitk.Image:
    hu = np.round(volume.array[k : k + 1].astype(np.float64))
    if storage == "uint16":
        pixels = np.clip(hu, -1024, 65535 - 1024).astype(np.float32)  # GDCM stores it as HU + 1024
    else:
        pixels = np.clip(hu, -32768, 32767).astype(np.int16)
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(position.tolist())
    image.SetDirection(volume.direction.ravel().tolist())
    return image


def _ds(value: float) -> str:
    """A DICOM decimal string: at most 16 characters."""
    value = 0.0 if abs(value) < 1e-9 else float(value)
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return "0"
