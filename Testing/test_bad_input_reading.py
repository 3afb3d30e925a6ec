"""Break-it round two (issue 25), reading: inputs that were read wrongly without a word, or refused
with a misleading message. Each row builds its input (pydicom-written DICOM, enhanced multi-frame
included; NIfTI with edited header bytes; NRRD and MetaImage text headers) and states the behaviour:

- REFUSED: `fmct analyze` exits 2 with one line naming the problem, before any model runs;
- READ_TRUE: the file is read, and its voxels and geometry equal the truth it was built from.
"""
from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bad_input_support import Case, assert_refused, dicom_series, run_cli, small_ct

from fmct.reading.files import read_volume, write_volume
from fmct.reading.volume import Volume

pydicom = pytest.importorskip("pydicom")


def truth_ct() -> Volume:
    """A small CT with integer HU, so that every reader must give it back exactly."""
    ct = small_ct()
    ct.array = ct.array.astype(np.int16)
    ct.array[2, 5, 7] = 1234  # one marker voxel: any flip or reordering moves it
    return ct


def assert_same(got: Volume, want: Volume) -> None:
    assert got.same_grid(want, atol=1e-3), (got.spacing, got.origin, got.direction, want.spacing, want.origin)
    np.testing.assert_array_equal(np.asarray(got.array, np.float32), np.asarray(want.array, np.float32))


# ------------------------------------------------------------------------------------- NIfTI qform / sform (11)
def nifti_with_sform(d: Path, mirror: bool, sform_code: int = 2, qform_code: int = 1) -> tuple[Path, Volume]:
    """ITK writes qform = sform; the sform is then edited. With mirror the sform flips x (left-right):
    the truth is what the sform says (nibabel and FSL follow it), i.e. the same voxels on a grid whose x
    axis points the other way and starts at the other end."""
    ct = truth_ct()
    write_volume(ct, d / "ct.nii")
    data = bytearray((d / "ct.nii").read_bytes())
    srow = np.array(struct.unpack_from("<12f", data, 280)).reshape(3, 4)  # RAS
    truth = Volume(ct.array, ct.spacing, ct.origin, ct.direction.copy())
    if mirror:
        extent = (ct.array.shape[2] - 1) * ct.spacing[0]
        srow[0, 0], srow[0, 3] = -srow[0, 0], srow[0, 3] - extent  # x_RAS = -3 i + 90  ->  3 i + 93 - 3*63
        truth.direction[0, 0] = -truth.direction[0, 0]
        truth.origin = (-srow[0, 3], ct.origin[1], ct.origin[2])
    struct.pack_into("<12f", data, 280, *srow.ravel())
    struct.pack_into("<hh", data, 252, qform_code, sform_code)
    (d / "ct.nii").write_bytes(bytes(data))
    return d / "ct.nii", truth


# ------------------------------------------------------------------------------------- NRRD units (12), MHD (20)
def nrrd_in(d: Path, unit: str, factor: float) -> tuple[Path, Volume]:
    """A detached NRRD header whose space directions and origin are given in `unit`."""
    import SimpleITK as sitk

    ct = truth_ct()
    sitk.WriteImage(ct.to_sitk(), str(d / "ct.nhdr"))
    lines = []
    for line in (d / "ct.nhdr").read_text().splitlines():
        if line.startswith("space directions:"):
            line = "space directions: " + " ".join(
                "(" + ",".join(f"{v / factor:g}" for v in col) + ")" for col in (ct.direction * ct.spacing).T)
            lines += [line, f'space units: "{unit}" "{unit}" "{unit}"']
            continue
        if line.startswith("space origin:"):
            line = "space origin: (" + ",".join(f"{o / factor:g}" for o in ct.origin) + ")"
        lines.append(line)
    (d / "ct.nhdr").write_text("\n".join(lines) + "\n")
    return d / "ct.nhdr", ct


def mhd_without_raw(d: Path) -> Path:
    write_volume(small_ct(), d / "ct.mhd")
    (d / "ct.raw").unlink()
    return d / "ct.mhd"


def nhdr_without_raw(d: Path) -> Path:
    path, _ = nrrd_in(d, "mm", 1.0)
    (d / "ct.raw").unlink()
    return path


def nifti_sheared_sform(d: Path) -> tuple[Path, Volume]:
    """An sform with a shear (an affine registration's output) beside a plain qform: ITK grids cannot
    hold the shear, so the qform's grid is read, with a warning."""
    ct = truth_ct()
    write_volume(ct, d / "ct.nii")
    data = bytearray((d / "ct.nii").read_bytes())
    srow = np.array(struct.unpack_from("<12f", data, 280)).reshape(3, 4)
    srow[0, 1] = 0.5  # x moves with y: sheared
    struct.pack_into("<12f", data, 280, *srow.ravel())
    struct.pack_into("<hh", data, 252, 1, 2)
    (d / "ct.nii").write_bytes(bytes(data))
    return d / "ct.nii", ct


def nrrd_in_furlongs(d: Path) -> Path:
    path, _ = nrrd_in(d, "furlong", 1.0)
    return path


# ------------------------------------------------------------------------------------- free text (3)
def described(text: str, charset: str | None):
    def edit(k, ds):
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.SeriesDescription = text
    return edit


@pytest.mark.parametrize("charset, text", [
    ("ISO_IR 100", "Schädel nativ"), ("ISO_IR 192", "Schädel → nativ"), ("ISO_IR 126", "Κρανίο"),
    ("ISO_IR 144", "Череп"), (None, "Head plain ASCII")])
def test_description_decoded_by_its_character_set(charset, text, tmp_path):
    folder = dicom_series(tmp_path, described(text, charset))
    raw = (sorted(folder.iterdir())[0]).read_bytes()
    codec = {"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8", "ISO_IR 126": "iso8859_7", "ISO_IR 144": "iso8859_5"}
    assert text.encode(codec.get(charset, "ascii")) in raw  # the file holds the text in its own encoding
    assert read_volume(folder, keep_descriptions=True).meta["series_description"] == text


def test_free_text_description_stays_out_of_outputs_unless_asked(tmp_path, bundle, capfd, caplog):
    secret = "CCT DOE JOHN 1970-01-01"
    folder = dicom_series(tmp_path, described(secret, None))
    caplog.set_level(logging.DEBUG)
    code, lines = run_cli(["analyze", str(folder), "--model", bundle, "--explain", "none", "--out", str(tmp_path / "a")],
                          capfd)
    assert code == 0, lines
    findings = (tmp_path / "a" / "findings.json").read_text()
    assert json.loads(findings)["input"]["series_description"] is None
    for text in (findings, "\n".join(lines), caplog.text):
        assert "DOE" not in text and "1970" not in text
    code, lines = run_cli(["analyze", str(folder), "--model", bundle, "--explain", "none", "--out", str(tmp_path / "b"),
                           "--keep-descriptions"], capfd)
    assert code == 0, lines
    assert json.loads((tmp_path / "b" / "findings.json").read_text())["input"]["series_description"] == secret


# ------------------------------------------------------------------------------------- multi-frame DICOM (4, 19)
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _seq(**tags):
    from pydicom.dataset import Dataset

    item = Dataset()
    for key, value in tags.items():
        setattr(item, key, value)
    return [item]


def multiframe(d: Path, ct: Volume, frames: list[tuple[int, int]] | None = None, *, name: str = "mf.dcm",
               enhanced: bool = True, pixel_spacing: bool = True, spacing_between: bool = True,
               series_uid: str | None = None, photometric: str = "MONOCHROME2", slope: float = 1.0,
               intercept: float = 0.0, compress: bool = False) -> Path:
    """One multi-frame file holding the slices `frames` = [(slice index, time point), ...] of ct, in that
    stored order: enhanced CT (per-frame positions in PerFrameFunctionalGroupsSequence) or classic
    multi-frame (one ImagePositionPatient and SpacingBetweenSlices, as GDCM writes a 3D image)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = frames if frames is not None else [(int(k), 1) for k in range(ct.array.shape[0])]
    sop = ENHANCED_CT if enhanced else "1.2.840.10008.5.1.4.1.1.2"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, meta.MediaStorageSOPInstanceUID, "CT"
    ds.SeriesInstanceUID = series_uid or "1.2.826.0.1.3680043.8.498.1"
    ds.StudyInstanceUID, ds.PatientID, ds.ImageType = "1.2.826.0.1.3680043.8.498.2", "P1", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = ct.array.shape[1], ct.array.shape[2], len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    iop = [f"{v:g}" for v in (*ct.direction[:, 0], *ct.direction[:, 1])]
    position = [[f"{v:g}" for v in (ct.index_to_physical @ [0, 0, k, 1])[:3]] for k, _ in frames]
    spacing = [f"{ct.spacing[1]:g}", f"{ct.spacing[0]:g}"]
    if enhanced:
        shared = Dataset()
        shared.PlaneOrientationSequence = _seq(ImageOrientationPatient=iop)
        shared.PixelValueTransformationSequence = _seq(RescaleIntercept=f"{intercept:g}", RescaleSlope=f"{slope:g}",
                                                       RescaleType="HU")
        if pixel_spacing:
            shared.PixelMeasuresSequence = _seq(PixelSpacing=spacing, SliceThickness=f"{ct.spacing[2]:g}")
        ds.SharedFunctionalGroupsSequence = [shared]
        per_frame = []
        for (k, t), pos in zip(frames, position):
            item = Dataset()
            item.PlanePositionSequence = _seq(ImagePositionPatient=pos)
            item.FrameContentSequence = _seq(TemporalPositionIndex=t, InStackPositionNumber=k + 1)
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = per_frame
    else:
        ds.ImageOrientationPatient, ds.ImagePositionPatient = iop, position[0]
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", f"{slope:g}"
        if pixel_spacing:
            ds.PixelSpacing = spacing
        if spacing_between:
            ds.SpacingBetweenSlices = f"{ct.spacing[2]:g}"
    hu = np.stack([ct.array[k] for k, _ in frames]).astype(np.float64)
    ds.PixelData = np.round((hu - intercept) / (slope or 1.0)).astype(np.int16).tobytes()
    if compress:
        from pydicom.uid import RLELossless

        ds.compress(RLELossless)
    (d / "mf").mkdir(exist_ok=True)
    ds.save_as(d / "mf" / name, enforce_file_format=True)
    return d / "mf"


def frames_of(ct: Volume, order=None, drop=(), times=(1,)) -> list[tuple[int, int]]:
    n = ct.array.shape[0]
    ks = [int(k) for k in (order if order is not None else range(n)) if k not in drop]
    return [(k, t) for t in times for k in ks]


def shuffled(n: int) -> list[int]:
    return [int(k) for k in np.random.default_rng(7).permutation(n)]


def mf_read(**kw):
    """A multi-frame case whose truth is truth_ct()."""
    def build(d: Path) -> tuple[Path, Volume]:
        ct = truth_ct()
        order = kw.pop("order", None)
        return multiframe(d, ct, frames_of(ct, shuffled(ct.array.shape[0]) if order == "shuffled" else None), **kw), ct
    return build


def mf_split(d: Path) -> tuple[Path, Volume]:
    """Item 19: one series split over two multi-frame files (the upper half first by name, its frames
    out of order)."""
    ct = truth_ct()
    multiframe(d, ct, frames_of(ct, range(8)), name="b.dcm")
    return multiframe(d, ct, frames_of(ct, [11, 8, 15, 9, 14, 10, 13, 12]), name="a.dcm"), ct


def mf_refused(**kw):
    def build(d: Path) -> Path:
        ct = truth_ct()
        return multiframe(d, ct, frames_of(ct, drop=kw.pop("drop", ()), times=kw.pop("times", (1,))), **kw)
    return build


def mf_overlapping_split(d: Path) -> Path:
    ct = truth_ct()
    multiframe(d, ct, frames_of(ct, range(10)), name="a.dcm")
    return multiframe(d, ct, frames_of(ct, range(6, 16)), name="b.dcm")


# ------------------------------------------------------------------------------------- per-slice DICOM (5, 6, 18)
def slices_read(edit=None, extra: Callable[[Path], None] | None = None):
    """A per-slice series (edited by `edit`, with `extra` objects beside it) whose truth is small_ct()."""
    def build(d: Path) -> tuple[Path, Volume]:
        folder = dicom_series(d, edit)
        if extra is not None:
            extra(folder)
        return folder, small_ct()
    return build


def _monochrome1(bits_stored: int, compress: bool = False):
    def edit(k, ds):
        ds.PhotometricInterpretation = "MONOCHROME1"  # a display convention: the HU stay slope x stored + intercept
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
        if compress:
            from pydicom.uid import RLELossless

            ds.compress(RLELossless)
    return edit


def _slope_zero(k, ds):
    ds.RescaleSlope = "0"


def _second_patient(k, ds):
    if k >= 8:
        ds.PatientID, ds.StudyInstanceUID = "OTHER-PATIENT-ID", "1.2.826.0.1.3680043.8.498.99"


def _second_study(k, ds):
    if k % 2:
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.98"


def _object(folder: Path, name: str, sop_class: str, **tags) -> None:
    """A DICOM object without pixel data, as PACS exports put beside a series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(folder / name, enforce_file_format=True)


def pacs_objects(folder: Path) -> None:
    _object(folder, "csa.dcm", "1.3.12.2.1107.5.9.1", Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "CSA REPORT"])
    _object(folder, "PS_PHILIPS", "1.3.46.670589.11.0.0.12.4", Modality="PR")
    _object(folder, "ecg.dcm", "1.2.840.10008.5.1.4.1.1.9.1.1", Modality="ECG",
            WaveformSequence=_seq(NumberOfWaveformChannels=1, NumberOfWaveformSamples=4, SamplingFrequency="500",
                                  WaveformBitsAllocated=16, WaveformSampleInterpretation="SS",
                                  WaveformData=np.zeros(4, np.int16).tobytes()))


def transfer_syntax(uid: str):
    """A series whose slices claim a transfer syntax GDCM cannot decode (encapsulated, undecodable data).
    pydicom writes only syntaxes it knows or private ones: a private placeholder of the same length is
    written, then replaced by the UID in the file's bytes."""
    def build(d: Path) -> Path:
        from pydicom.encaps import encapsulate

        placeholder = "9" * len(uid)
        folder = dicom_series(d)
        for f in sorted(folder.iterdir()):
            ds = pydicom.dcmread(f)
            ds.file_meta.TransferSyntaxUID = placeholder
            ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
            ds["PixelData"].VR = "OB"
            ds.save_as(f, implicit_vr=False, little_endian=True, enforce_file_format=True)  # as every compressed syntax
            f.write_bytes(f.read_bytes().replace(placeholder.encode(), uid.encode(), 1))
        return folder
    return build


# ------------------------------------------------------------------------------------- the tables
READ_TRUE: list[tuple[str, Callable[[Path], tuple[Path, Volume]]]] = [
    ("enhanced-ct", mf_read()),
    ("enhanced-ct-frames-out-of-order", mf_read(order="shuffled")),
    ("enhanced-ct-rle-out-of-order-intercept", mf_read(order="shuffled", compress=True, intercept=-1024.0)),
    ("enhanced-ct-slope-2", mf_read(slope=2.0)),
    ("enhanced-ct-monochrome1", mf_read(photometric="MONOCHROME1", intercept=-1024.0)),
    ("enhanced-ct-split-over-two-files", mf_split),
    ("classic-multiframe-spacing-between-slices", mf_read(enhanced=False)),
    ("monochrome1-16-bits", slices_read(_monochrome1(16))),
    ("monochrome1-12-bits", slices_read(_monochrome1(12))),
    ("monochrome1-16-bits-rle", slices_read(_monochrome1(16, compress=True))),
    ("enhanced-ct-monochrome1-rle", mf_read(photometric="MONOCHROME1", intercept=-1024.0, compress=True)),
    ("objects-without-pixels-beside-the-series", slices_read(extra=pacs_objects)),
    ("nifti-sform-mirrors-qform", lambda d: nifti_with_sform(d, mirror=True)),
    ("nifti-sform-scanner-mirrors-qform", lambda d: nifti_with_sform(d, mirror=True, sform_code=1)),
    ("nifti-sform-only", lambda d: nifti_with_sform(d, mirror=True, qform_code=0)),
    ("nifti-qform-only", lambda d: nifti_with_sform(d, mirror=False, sform_code=0)),
    ("nifti-sheared-sform", nifti_sheared_sform),
    ("nrrd-space-units-cm", lambda d: nrrd_in(d, "cm", 10.0)),
    ("nrrd-space-units-m", lambda d: nrrd_in(d, "m", 1000.0)),
    ("nrrd-space-units-mm", lambda d: nrrd_in(d, "mm", 1.0)),
]

REFUSED = [
    Case("rescale-slope-0", lambda d: dicom_series(d, _slope_zero), 2, "RescaleSlope (0028,1053) is 0"),
    Case("two-patients-one-series-uid", lambda d: dicom_series(d, _second_patient), 2, "two different patients"),
    Case("two-studies-one-series-uid", lambda d: dicom_series(d, _second_study), 2, "two different studies"),
    Case("jpeg-xl", transfer_syntax("1.2.840.10008.1.2.4.110"), 2, "stored in JPEG XL lossless"),
    Case("vendor-private-syntax", transfer_syntax("1.3.46.670589.33.1.4.1"), 2, "a vendor's private transfer syntax"),
    Case("enhanced-no-pixelspacing", mf_refused(pixel_spacing=False), 2, "PixelSpacing"),
    Case("enhanced-missing-frames", mf_refused(drop=(5, 6)), 2, "About 2 slice(s) are missing"),
    Case("enhanced-two-time-points", mf_refused(times=(1, 2)), 2, "2 time points"),
    Case("enhanced-slope-0", mf_refused(slope=0.0), 2, "RescaleSlope (0028,1053) is 0"),
    Case("enhanced-split-overlapping", mf_overlapping_split, 2, "repeat the position"),
    Case("classic-multiframe-no-spacing", mf_refused(enhanced=False, spacing_between=False), 2, "SpacingBetweenSlices"),
    Case("classic-multiframe-no-pixelspacing", mf_refused(enhanced=False, pixel_spacing=False), 2, "PixelSpacing"),
    Case("mhd-raw-missing", mhd_without_raw, 2, "ct.raw is missing"),
    Case("nhdr-raw-missing", nhdr_without_raw, 2, "ct.raw is missing"),
    Case("nrrd-unknown-units", nrrd_in_furlongs, 2, "space units"),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in READ_TRUE])
def test_read_equals_the_truth(build, tmp_path):
    path, truth = build(tmp_path)
    assert_same(read_volume(path), truth)


@pytest.mark.parametrize("case", [c.param() for c in REFUSED])
def test_refused_with_one_line(case: Case, tmp_path, bundle, no_model, capfd):
    path = case.build(tmp_path)
    no_model()
    out = tmp_path / "out"
    code, lines = run_cli(["analyze", str(path), "--model", bundle, "--explain", "none", "--out", str(out), *case.args],
                          capfd)
    assert_refused(code, lines, case.code, case.words, out if out.is_dir() else tmp_path / "nowhere")


# ------------------------------------------------------------------------------------- warnings reach findings.json
def test_qform_sform_disagreement_is_warned_in_findings(tmp_path, bundle, capfd):
    path, _ = nifti_with_sform(tmp_path, mirror=True)
    assert "qform" in " ".join(read_volume(path).meta["warnings"])
    (tmp_path / "agree").mkdir()
    agree, _ = nifti_with_sform(tmp_path / "agree", mirror=False)
    assert "warnings" not in read_volume(agree).meta
    (tmp_path / "shear").mkdir()
    assert "sheared" in " ".join(read_volume(nifti_sheared_sform(tmp_path / "shear")[0]).meta["warnings"])
    code = run_cli(["analyze", str(path), "--model", bundle, "--explain", "none", "--out", str(tmp_path / "o")], capfd)[0]
    assert code == 0
    warning = json.loads((tmp_path / "o" / "findings.json").read_text())["warning"]
    assert "qform" in warning and "sform" in warning and "mirror" in warning


# ------------------------------------------------------------------------------------- what the log and message say
def test_objects_without_pixels_are_listed_in_the_log(tmp_path, caplog):
    folder, _ = slices_read(extra=pacs_objects)(tmp_path)
    with caplog.at_level(logging.INFO, logger="fmct.reading.files"):
        read_volume(folder)
    skipped = next(r.getMessage() for r in caplog.records if "without pixel data" in r.getMessage())
    for name in ("csa.dcm (Siemens CSA non-image)", "PS_PHILIPS (Philips private object)", "ecg.dcm (waveform (ECG))"):
        assert name in skipped


def test_split_multiframe_series_says_what_was_found(tmp_path, caplog):
    path, truth = mf_split(tmp_path)
    with caplog.at_level(logging.INFO, logger="fmct.reading.files"):
        assert_same(read_volume(path), truth)
    assert "split over 2 multi-frame files (8 + 8 frames)" in caplog.text


def test_two_patients_are_named_by_file_and_study_never_by_id(tmp_path, bundle, no_model, capfd):
    folder = dicom_series(tmp_path, _second_patient)
    no_model()
    code, lines = run_cli(["analyze", str(folder), "--model", bundle, "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and len(lines) == 1
    assert "1.2.826.0.1.3680043.8.498.99" in lines[0] and "IM_0001_0009.dcm" in lines[0] and "IM_0001_0001.dcm" in lines[0]
    assert "OTHER-PATIENT-ID" not in lines[0] and "FMCT-PHANTOM" not in lines[0]
