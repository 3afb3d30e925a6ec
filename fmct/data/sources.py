"""A manifest Study's source files, and reading them into a Volume: torch-free, so the processes of
`fmct prepare` (fmct.data.prepare) start without importing torch."""
from __future__ import annotations

from pathlib import Path

from fmct.conventions.errors import EmptyInputError
from fmct.data.manifests import Study
from fmct.reading.dicom import read_dicom_files
from fmct.reading.files import read_volume


def read_study(study: Study):
    """The study's CT as a Volume: a DICOM folder or image file, or an explicit list of DICOM files."""
    if study.files is None:
        return read_volume(study.path, study.series_uid)
    return read_dicom_files(list(study.files), study.series_uid, str(study.path))


def source_files(study: Study) -> list[Path]:
    """The files a study is read from (for cache keys and --verify)."""
    if study.files is not None:
        return sorted(study.files)
    if study.path.is_dir():
        return sorted(p for p in study.path.rglob("*") if p.is_file())
    if not study.path.exists():
        raise EmptyInputError(f"{study.path} does not exist.")
    return [study.path]
