"""The same physical CT gives the same model input, probabilities and maps however it is stored.

Every one of the 48 axis-aligned storages of one phantom (6 axis orders x 8 flips, including the
left-handed ones), the three image formats, a DICOM series of the same voxels and an origin moved
with the grid must give the same tensor up to float rounding, hence the same probabilities.
"""
from itertools import permutations, product

import numpy as np
import pytest

from fmct.reading.dicom import write_dicom_series
from fmct.reading.files import read_volume, write_volume
from fmct.phantom import make_phantom
from fmct.reading.volume import Volume

from fmct_testing import stored

STORAGES = [(axes, signs) for axes in permutations(range(3)) for signs in product((1, -1), repeat=3)]


@pytest.fixture(scope="module")
def ct() -> Volume:
    """A small thick-slice phantom with a finding, rounded to integer HU so every format stores the same voxels.

    183 voxels across: not a multiple of the block size, so a block average that starts at index 0 of
    whatever axis order the file has (the code before this test) gives another tensor per storage.
    """
    volume = make_phantom(77, findings=["subdural"], slices="thick", in_plane_size=183, fov_mm=230.0).volume
    return volume.with_array(np.round(volume.array).astype(np.int16))


def test_stored_helper_keeps_every_voxel_at_its_physical_place(ct):
    other = stored(ct, (2, 0, 1), (-1, 1, -1))
    ijk = np.array([5, 7, 3])
    p = ct.index_to_physical @ np.append(ijk, 1.0)
    back = np.linalg.solve(other.index_to_physical, p)[:3].round().astype(int)
    assert ct.array[ijk[2], ijk[1], ijk[0]] == other.array[back[2], back[1], back[0]]


@pytest.mark.slow
def test_all_48_axis_aligned_storages_give_the_same_input_and_probabilities(ct, demo_analyzer):
    reference = demo_analyzer.preprocessor(ct)
    p_ref = demo_analyzer.probabilities(reference.array)[0]
    worst_x, worst_p = 0.0, 0.0
    for axes, signs in STORAGES:
        mi = demo_analyzer.preprocessor(stored(ct, axes, signs))
        np.testing.assert_allclose(mi.model_grid.origin, reference.model_grid.origin, atol=1e-6)
        worst_x = max(worst_x, float(np.abs(mi.array - reference.array).max()))
        worst_p = max(worst_p, float(np.abs(demo_analyzer.probabilities(mi.array)[0] - p_ref).max()))
    assert worst_x <= 1e-5, f"model input differs by {worst_x:g} between storages"
    assert worst_p <= 1e-4, f"probabilities differ by {worst_p:g} between storages"


@pytest.mark.slow
def test_formats_and_dicom_of_the_same_voxels_give_the_same_probabilities(ct, demo_analyzer, tmp_path):
    p_ref = demo_analyzer.probabilities(demo_analyzer.preprocessor(ct).array)[0]
    pir = stored(ct, (1, 2, 0), (1, -1, -1))  # a sagittal-like layout on disk
    paths = [write_volume(ct, tmp_path / "ct.nii.gz"), write_volume(pir, tmp_path / "pir.nii.gz"),
             write_volume(pir, tmp_path / "pir.nrrd"), write_volume(ct, tmp_path / "ct.mha")]
    write_dicom_series(ct, tmp_path / "dicom")
    paths.append(tmp_path / "dicom")
    for path in paths:
        p = demo_analyzer.probabilities(demo_analyzer.preprocessor(read_volume(path)).array)[0]
        assert np.abs(p - p_ref).max() <= 1e-4, f"{path.name}: max |dp| = {np.abs(p - p_ref).max():g}"


def test_origin_moved_with_the_grid_gives_the_same_input(ct, demo_analyzer):
    reference = demo_analyzer.preprocessor(ct)
    shift = ct.direction @ (np.asarray(ct.spacing) * np.array([7, -3, 2]))  # whole voxels
    moved = Volume(ct.array, ct.spacing, np.asarray(ct.origin) + shift, ct.direction)
    mi = demo_analyzer.preprocessor(moved)
    assert np.abs(mi.array - reference.array).max() <= 1e-5
    np.testing.assert_allclose(np.asarray(mi.head_center_mm) - reference.head_center_mm, shift, atol=1e-6)


@pytest.mark.slow
def test_saliency_maps_agree_after_mapping_back(ct, demo_analyzer):
    """A map computed on one storage and mapped back lands on the same physical voxels as on another."""
    other_storage = ((2, 1, 0), (-1, 1, -1))
    a = demo_analyzer.analyze(ct, explain_method="attention", explain_findings=["any_hemorrhage"])
    b = demo_analyzer.analyze(stored(ct, *other_storage), explain_method="attention", explain_findings=["any_hemorrhage"])
    key = "attention"  # the one finding-agnostic attention map (issue 27)
    map_a = a.saliency[key]
    map_b_as_a = stored(map_a, *other_storage)
    assert b.saliency[key].same_grid(map_b_as_a)
    difference = np.abs(b.saliency[key].array.astype(np.int16) - map_b_as_a.array.astype(np.int16))
    assert difference.max() <= 1  # uint8 levels: at most one rounding step apart
