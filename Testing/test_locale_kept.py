"""Writing a DICOM series (GDCM, through SimpleITK) leaves the process locale as it found it: GDCM sets it
to "C", after which text-mode files without an encoding read ASCII only, in the engine and its callers."""
import locale

import numpy as np

from fmct.reading.dicom import write_dicom_series
from fmct.reading.volume import Volume


def test_writing_dicom_keeps_the_locale(tmp_path):
    before = locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)
    write_dicom_series(Volume(np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3)), tmp_path / "s")
    assert (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)) == before
