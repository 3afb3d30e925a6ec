"""Reading CTs: the `Volume` (HU array + LPS geometry), NIfTI / NRRD / MHA files and DICOM series.

The first step of every data flow: whatever the format, a `Volume` comes out. Modules: volume (the
Volume, validate_ct), files (image files, read_volume), headers (what ITK hides in NIfTI / NRRD /
MetaImage headers), dicom (per-slice series), multiframe (enhanced and classic multi-frame),
slice_grid (the grid checks both share), dicom_elements (a file's own elements), dicom_writer.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "Volume": "fmct.reading.volume",
    "validate_ct": "fmct.reading.volume",
    "read_volume": "fmct.reading.files",
    "write_volume": "fmct.reading.files",
    "read_dicom_series": "fmct.reading.dicom",
    "list_series": "fmct.reading.dicom",
    "write_dicom_series": "fmct.reading.dicom",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
