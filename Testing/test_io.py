"""fmct.reading.files / fmct.reading.dicom on real files written to tmp_path: DICOM series as scanners write them,
NIfTI/NRRD/MHA, and every refusal with its specific error."""
from __future__ import annotations

import gzip
import logging
import math
import os
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from fmct.reading.dicom import list_series, new_uid, read_dicom_files, read_header, write_dicom_series
from fmct.conventions.errors import (
    AbsurdSpacingError,
    EmptyInputError,
    GantryTiltError,
    MissingSlicesError,
    NonUniformSpacingError,
    NotCTError,
    NotVolumeError,
    UnreadableInputError,
)
from fmct.reading.files import read_volume, write_volume
from fmct.reading.volume import validate_ct
from fmct.reading.volume import Volume

PATIENT_NAME = "DOE^JOHNATHAN"
PATIENT_ID = "PID-8675309"
CORONAL = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # columns: row L, column -S (down), normal P


def oblique(degrees: float = 20.0) -> np.ndarray:
    """Rotation about S then L: an orthonormal, right-handed, clearly oblique direction."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def head_ct(shape_zyx=(24, 64, 64), spacing=(0.8, 0.8, 5.0), origin=(-25.6, -30.0, -60.0), direction=None) -> Volume:
    """Integer-valued CT-like head: air, a bright skull shell, brain whose values change with i and k
    (so a wrong slice order or flip is visible)."""
    k, j, i = np.indices(shape_zyx)
    c = (np.array(shape_zyx) - 1) / 2
    r = ((k - c[0]) / (0.48 * shape_zyx[0])) ** 2 + ((j - c[1]) / (0.45 * shape_zyx[1])) ** 2 \
        + ((i - c[2]) / (0.42 * shape_zyx[2])) ** 2
    array = np.full(shape_zyx, -1000.0, np.float32)
    array[r < 1] = 1200.0
    brain = r < 0.7
    array[brain] = (20 + 2 * k + i // 8)[brain]
    return Volume(array, spacing, origin, np.eye(3) if direction is None else direction)


def test_dicom_int16_shuffled_names_reads_in_position_order(tmp_path):
    ct = head_ct()
    paths = write_dicom_series(ct, tmp_path / "s", shuffle_names_seed=3)
    assert sorted(p.name for p in paths) != [p.name for p in paths]  # names carry no order
    got = read_volume(tmp_path / "s")
    assert got.array.dtype == np.int16  # exact HU keep the stored type: no float32 copy of the series
    np.testing.assert_array_equal(got.array, ct.array)
    assert got.same_grid(ct)
    assert got.meta["format"] == "dicom" and got.meta["n_slices"] == 24


def test_read_dicom_files_picks_one_series_from_a_mixed_file_list(tmp_path):
    """RSNA-style: two series' files in one folder, read by file list rather than by folder."""
    ct = head_ct()
    first = write_dicom_series(ct, tmp_path / "mixed", shuffle_names_seed=1)
    shifted = ct.with_array(ct.array + 10.0)
    second = write_dicom_series(shifted, tmp_path / "other", series_number=2)
    header = read_header(second[0])
    assert header.study_uid and header.series_uid != read_header(first[0]).series_uid
    files = first + second + [tmp_path / "notes.txt"]
    (tmp_path / "notes.txt").write_text("not dicom")
    got = read_dicom_files(files, header.series_uid)
    np.testing.assert_array_equal(got.array, shifted.array)
    assert got.same_grid(ct) and got.meta["series_uid"] == header.series_uid
    np.testing.assert_array_equal(read_dicom_files(first).array, ct.array)
    with pytest.raises(EmptyInputError, match="No DICOM images"):
        read_dicom_files([tmp_path / "notes.txt"])


def test_dicom_uint16_with_intercept_and_oblique_direction(tmp_path):
    """Stored values are HU + 1024 (unsigned), so equal HU back proves the rescale is applied."""
    ct = head_ct(direction=oblique(25.0), origin=(10.0, -40.0, 5.0))
    paths = write_dicom_series(ct, tmp_path / "s", storage="uint16", shuffle_names_seed=7)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(paths[5]))
    reader.ReadImageInformation()
    assert reader.GetMetaData("0028|1052").strip() == "-1024" and reader.GetMetaData("0028|0103").strip() == "0"
    stored_last_row = np.frombuffer(paths[5].read_bytes()[-2 * 64:], np.uint16)
    np.testing.assert_array_equal(stored_last_row, ct.array[5, -1] + 1024)

    got = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(got.array, ct.array)
    assert got.same_grid(ct)


def write_study(folder):
    """A realistic export: localizer, coronal reformat (most slices), bone kernel, soft-tissue axial."""
    study = new_uid()
    uids = {name: new_uid() for name in ("scout", "coronal", "bone", "soft")}
    scout = Volume(np.full((1, 64, 64), -1000.0, np.float32), (0.8, 0.8, 1.0), (-25.6, 0.0, 60.0), CORONAL)
    write_dicom_series(scout, folder, series_description="Scout", series_uid=uids["scout"], study_uid=study,
                       series_number=1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER", shuffle_names_seed=1)
    write_dicom_series(head_ct((40, 24, 64), (0.8, 5.0, 1.0), direction=CORONAL), folder, shuffle_names_seed=2,
                       series_description="Coronal MPR", series_uid=uids["coronal"], study_uid=study, series_number=4,
                       image_type="DERIVED\\SECONDARY\\MPR")
    write_dicom_series(head_ct((12, 64, 64), (0.8, 0.8, 10.0)), folder / "sub" / "bone", shuffle_names_seed=3,
                       series_description="Head bone", series_uid=uids["bone"], study_uid=study, series_number=3)
    write_dicom_series(head_ct(), folder / "sub", series_description="Head soft tissue", series_uid=uids["soft"],
                       study_uid=study, series_number=2, shuffle_names_seed=4)
    (folder / "README.txt").write_text("exported by PACS")
    return uids


def test_single_multiframe_file_is_read_with_its_geometry(tmp_path):
    ct = head_ct(origin=(1.0, 2.0, 3.0))
    image = sitk.Cast(ct.to_sitk(), sitk.sitkInt16)
    image.SetMetaData("0008|0060", "CT")
    sitk.WriteImage(image, str(tmp_path / "enhanced.dcm"))  # GDCM writes one multi-frame file
    got = read_volume(tmp_path)
    assert got.same_grid(ct) and got.meta["n_slices"] == 24
    np.testing.assert_array_equal(got.array, ct.array)


def test_multi_series_folder_picks_axial_soft_tissue_and_says_why(tmp_path, caplog):
    uids = write_study(tmp_path)
    series = {s.uid: s for s in list_series(tmp_path)}
    assert series[uids["scout"]].is_localizer and not series[uids["coronal"]].is_axial
    assert series[uids["soft"]].is_axial and series[uids["soft"]].n_files == 24

    with caplog.at_level(logging.INFO, logger="fmct.reading.files"):
        got = read_volume(tmp_path, keep_descriptions=True)  # the descriptions name the series in the sentence
    assert got.meta["series_uid"] == uids["soft"] and got.meta["series_description"] == "Head soft tissue"
    choice = got.meta["series_choice"]
    assert "axial, non-localizer series with the most slices" in choice and "Coronal MPR" in choice
    assert choice in caplog.text
    np.testing.assert_array_equal(got.array, head_ct().array)


def test_series_override_file_path_and_unknown_uid(tmp_path):
    uids = write_study(tmp_path)
    bone = read_volume(tmp_path, series_uid=uids["bone"])
    assert bone.array.shape[0] == 12 and bone.spacing[2] == pytest.approx(10.0)

    one_bone_file = next((tmp_path / "sub" / "bone").iterdir())
    assert read_volume(one_bone_file).meta["series_uid"] == uids["bone"]

    with pytest.raises(EmptyInputError) as err:
        read_volume(tmp_path, series_uid="1.2.3.999")
    assert "1.2.3.999" in str(err.value) and uids["soft"] in str(err.value) and "24 slices" in str(err.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_image_file_round_trip_keeps_geometry(tmp_path, suffix):
    ct = head_ct(direction=oblique(15.0), spacing=(0.7, 0.9, 4.0), origin=(3.0, -7.5, 12.25))
    path = write_volume(ct, tmp_path / "deep" / f"ct{suffix}")
    got = read_volume(path)
    assert got.same_grid(ct)
    np.testing.assert_array_equal(got.array, ct.array)
    assert got.meta["source"] == str(path) and got.array.dtype == np.float32


def test_4d_with_one_volume_is_squeezed_other_4d_and_2d_refused(tmp_path):
    image = head_ct().to_sitk()
    sitk.WriteImage(sitk.JoinSeries([image]), str(tmp_path / "one.mha"))
    assert read_volume(tmp_path / "one.mha").array.shape == (24, 64, 64)
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(tmp_path / "two.mha"))
    with pytest.raises(NotVolumeError, match="2 x 64 x 64 x 24|64 x 64 x 24 x 2"):
        read_volume(tmp_path / "two.mha")
    sitk.WriteImage(image[:, :, 10], str(tmp_path / "slice.nii.gz"))
    with pytest.raises(NotVolumeError, match="single 2D image"):
        read_volume(tmp_path / "slice.nii.gz")


def test_empty_missing_and_non_dicom_folders_are_refused(tmp_path):
    with pytest.raises(EmptyInputError, match="does not exist"):
        read_volume(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyInputError, match="No DICOM images"):
        read_volume(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "scan.txt").write_text("not an image")
    (tmp_path / "notes" / "IM0001").write_bytes(os.urandom(500))  # no extension, no DICM: not DICOM
    with pytest.raises(EmptyInputError, match="No DICOM images"):
        read_volume(tmp_path / "notes")
    write_volume(head_ct(), tmp_path / "notes" / "ct.nii.gz")
    with pytest.raises(EmptyInputError, match="give one of those files"):
        read_volume(tmp_path / "notes")


def test_truncated_dicom_and_corrupt_nifti_are_named(tmp_path):
    paths = write_dicom_series(head_ct(), tmp_path / "s", shuffle_names_seed=0)
    paths[7].write_bytes(paths[7].read_bytes()[: paths[7].stat().st_size // 2])
    with pytest.raises(UnreadableInputError, match=paths[7].name):
        read_volume(tmp_path / "s")
    (tmp_path / "junk.nii.gz").write_bytes(os.urandom(4000))
    with pytest.raises(UnreadableInputError, match="junk.nii.gz"):
        read_volume(tmp_path / "junk.nii.gz")


def test_mr_modality_is_not_ct(tmp_path):
    write_dicom_series(head_ct(), tmp_path, modality="MR")
    with pytest.raises(NotCTError, match="modality 'MR'"):
        read_volume(tmp_path)


def test_values_that_are_not_hounsfield_are_refused(tmp_path):
    ct = head_ct()
    mr_like = ct.with_array(ct.array + 1000.0)  # a CT without its rescale intercept, or an MR
    with pytest.raises(NotCTError, match="rescale intercept"):
        read_volume(write_volume(mr_like, tmp_path / "mr.nii.gz"))
    unit = ct.with_array(((ct.array + 1000) / 2200).astype(np.float32))
    with pytest.raises(NotCTError, match=r"\[0, 1\]"):
        read_volume(write_volume(unit, tmp_path / "unit.nrrd"))


def test_single_slice_series_and_thin_volume_are_not_volumes(tmp_path):
    write_dicom_series(Volume(head_ct().array[:1], (0.8, 0.8, 5.0)), tmp_path / "one")
    with pytest.raises(NotVolumeError, match="1 slice"):
        read_volume(tmp_path / "one")
    with pytest.raises(NotVolumeError, match="64 x 64 x 2"):
        validate_ct(Volume(head_ct().array[:2], (0.8, 0.8, 5.0)), "thin")


def test_removed_middle_slice_is_reported_with_position(tmp_path):
    paths = write_dicom_series(head_ct(origin=(0.0, 0.0, 0.0)), tmp_path, shuffle_names_seed=5)
    paths[10].unlink()
    with pytest.raises(MissingSlicesError, match=r"About 1 slice.*between 45.00 and 55.00 mm"):
        read_volume(tmp_path)


def test_duplicated_positions_are_refused(tmp_path):
    uid = new_uid()
    write_dicom_series(head_ct(), tmp_path, series_uid=uid, shuffle_names_seed=1)
    write_dicom_series(head_ct(), tmp_path, series_uid=uid, shuffle_names_seed=2)
    with pytest.raises(MissingSlicesError, match="24 slice.*repeat the position"):
        read_volume(tmp_path)


def test_two_segment_spacing_is_non_uniform(tmp_path):
    """Old head protocols: posterior fossa at 2.5 mm, then 5 mm slices, in one series."""
    uid = new_uid()
    fossa = head_ct((10, 64, 64), (0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0))
    brain = head_ct((12, 64, 64), (0.8, 0.8, 5.0), origin=(0.0, 0.0, 27.5))
    write_dicom_series(fossa, tmp_path, series_uid=uid, shuffle_names_seed=1)
    write_dicom_series(brain, tmp_path, series_uid=uid, shuffle_names_seed=2)
    with pytest.raises(NonUniformSpacingError, match="from 2.50 to 5.00 mm"):
        read_volume(tmp_path)


def test_absurd_spacing_is_refused_in_nifti_headers(tmp_path):
    ct = head_ct()
    with pytest.raises(AbsurdSpacingError, match="0.8 x 0.8 x 25"):
        read_volume(write_volume(Volume(ct.array, (0.8, 0.8, 25.0)), tmp_path / "thick.nii"))
    path = write_volume(ct, tmp_path / "zero.nii.gz")
    header = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", header, 76 + 3 * 4, 0.0)  # pixdim[3] = 0
    path.write_bytes(gzip.compress(bytes(header)))
    with pytest.raises(AbsurdSpacingError, match="pixdim"):
        read_volume(path)


def test_gantry_tilt_is_resampled_so_a_marker_lands_where_it_is(tmp_path, caplog):
    ct = head_ct(origin=(0.0, 0.0, 0.0))
    marker_ijk = (31, 21, 18)
    ct.array[17:20, 20:23, 30:33] = 3000.0
    tilt = 15.0
    write_dicom_series(ct, tmp_path, gantry_tilt_deg=tilt, shuffle_names_seed=9)
    dz = ct.spacing[2]
    true_position = np.array([marker_ijk[0] * 0.8, marker_ijk[1] * 0.8 + marker_ijk[2] * dz * math.tan(math.radians(tilt)),
                              marker_ijk[2] * dz])
    naive_position = (ct.index_to_physical @ [*marker_ijk, 1])[:3]
    assert np.linalg.norm(true_position - naive_position) > 20  # what an uncorrected reader would get

    with caplog.at_level(logging.INFO, logger="fmct.reading.files"):
        got = read_volume(tmp_path)
    assert got.meta["gantry_tilt_deg"] == pytest.approx(tilt, abs=0.05)
    assert "Gantry tilt of 15.0 degrees" in caplog.text
    np.testing.assert_allclose(got.direction, np.eye(3), atol=1e-6)
    kji = np.argwhere(got.array > 2000).mean(axis=0)
    found = (got.index_to_physical @ [*kji[::-1], 1])[:3]
    assert np.linalg.norm(found - true_position) < 0.8


def test_varying_tilt_is_refused(tmp_path):
    uid = new_uid()
    part = head_ct((6, 32, 32), origin=(0.0, 0.0, 0.0))
    write_dicom_series(part, tmp_path, series_uid=uid, gantry_tilt_deg=15.0, shuffle_names_seed=1)
    shifted = head_ct((6, 32, 32), origin=(0.0, 6 * 5.0 * math.tan(math.radians(15.0)), 30.0))
    write_dicom_series(shifted, tmp_path, series_uid=uid, gantry_tilt_deg=-15.0, shuffle_names_seed=2)
    with pytest.raises(GantryTiltError, match="not stacked along one direction"):
        read_volume(tmp_path)


def test_no_patient_data_in_meta_or_logs(tmp_path, caplog):
    paths = write_dicom_series(head_ct(), tmp_path / "s", patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                               shuffle_names_seed=2)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(paths[0]))
    reader.ReadImageInformation()
    assert reader.GetMetaData("0010|0010").strip() == PATIENT_NAME  # it really is in the files
    write_dicom_series(head_ct(), tmp_path / "s", modality="MR", patient_name=PATIENT_NAME, patient_id=PATIENT_ID)

    with caplog.at_level(logging.DEBUG, logger="fmct"):
        got = read_volume(tmp_path / "s")
        with pytest.raises(EmptyInputError) as err:
            read_volume(tmp_path / "s", series_uid="1.2.3")
    text = caplog.text + repr(got.meta) + str(err.value)
    for phi in (PATIENT_NAME, PATIENT_ID, "DOE", "8675309"):
        assert phi not in text
