"""report.png shows the radiological view whatever the storage, through the shown finding's saliency."""
import matplotlib.image as mpimg
import numpy as np

from fmct.inference.analyze import AnalysisResult, Finding
from fmct.inference.report_png import radiological_view, write_report
from fmct.reading.volume import Volume
from fmct_testing import stored


def marked_ct() -> Volume:
    """Air with a head-sized block and a bright marker at the patient's right, anterior, superior corner."""
    array = np.full((30, 60, 50), -1000.0, np.float32)  # [z, y, x] in LPS: x to the left, y posterior, z up
    array[3:27, 5:55, 5:45] = 30.0
    array[22:26, 8:14, 7:12] = 1000.0  # small x = right, small y = anterior, large z = superior
    return Volume(array, (0.9, 0.8, 3.0), (-20.0, -30.0, 10.0), np.eye(3))


def test_radiological_view_puts_anterior_up_and_patient_right_on_the_left():
    for axes, signs in [((0, 1, 2), (1, 1, 1)), ((1, 2, 0), (1, -1, -1)), ((2, 0, 1), (-1, 1, -1))]:
        view, aspect = radiological_view(stored(marked_ct(), axes, signs))
        k, row, col = np.argwhere(view > 500).mean(0)
        assert k > view.shape[0] / 2, "superior slices must come last"
        assert row < view.shape[1] / 4, "anterior must be at the top"
        assert col < view.shape[2] / 4, "the patient's right must be on the image's left"
        assert aspect == 0.8 / 0.9


def test_report_is_the_same_picture_for_every_storage(tmp_path):
    ct = marked_ct()
    saliency = ct.with_array((ct.array > 500).astype(np.float32))
    finding = Finding("bleed", "a bleed", 0.9, 0.5, True)
    pictures = []
    for n, (axes, signs) in enumerate([((0, 1, 2), (1, 1, 1)), ((1, 2, 0), (1, -1, -1))]):
        result = AnalysisResult([finding], saliency={"bleed": stored(saliency, axes, signs)}, method="attention")
        pictures.append(mpimg.imread(write_report(stored(ct, axes, signs), result, tmp_path / f"r{n}.png", "m")))
    np.testing.assert_array_equal(pictures[0], pictures[1])
