"""fmct.checks: model-independent plausibility checks of a head CT, each hostile case built from phantoms.

Every hostile case must end in a refusal (HeadCheckError, exit 2, naming the check) or a named flag;
every clean phantom (each anatomy preset, thick and thin slices) and the test suite's own CTs pass.
"""
import json

import numpy as np
import pytest

from fmct.checks.runner import run_checks
from fmct.cli import main
from fmct.conventions.errors import FMCTError, HeadCheckError
from fmct.phantom import ANATOMY_PRESETS, make_phantom
from fmct.phantom.variations import cut, noise, rigid, thicker_slices, vertex_only
from fmct.reading.files import write_volume
from fmct.reading.volume import Volume
from fmct_testing import ball_ct, oblique_direction, tiny_bundle

SEED = 2  # a head whose skull base shows clearly (a posterior fossa 25 mm behind the cavity's centre)


@pytest.fixture(scope="module")
def head() -> Volume:
    return make_phantom(SEED, slices="thick", in_plane_size=128).volume


def _refused(volume: Volume, check: str, match: str = "") -> HeadCheckError:
    with pytest.raises(HeadCheckError, match=match) as info:
        run_checks(volume)
    assert f"{check} check failed" in str(info.value)
    failed = [c for c in info.value.checks if not c["passed"]]
    assert failed and failed[0]["name"] == check and failed[0]["refuses"]
    return info.value


def _flagged(volume: Volume, check: str):
    report = run_checks(volume)  # no refusal
    assert [c.name for c in report.flagged] == [check]
    return report.flagged[0]


def _same_header(volume: Volume, array: np.ndarray) -> Volume:
    return Volume(np.ascontiguousarray(array), volume.spacing, volume.origin, volume.direction)


# ---------------------------------------------------------------- clean CTs pass every check

@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(ANATOMY_PRESETS))
@pytest.mark.parametrize("slices,size", [("thick", 96), ("thin", 128)])
def test_clean_phantoms_of_every_preset_and_slice_thickness_pass(preset, slices, size):
    for seed in (0, 1, 3):
        report = run_checks(make_phantom(seed, slices=slices, in_plane_size=size, anatomy=preset).volume)
        assert report.passed, [c.to_dict() for c in report.checks if not c.passed]
        assert report.crop is None
        names = [c.name for c in report.checks]
        assert names == ["direction matrix", "calibrated CT", "head found", "head inside the field of view",
                         "plausible head size", "orientation"]


@pytest.mark.parametrize("kw", [{}, dict(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0)),
                                dict(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0), ball_radius_mm=25.0),
                                dict(shape_zyx=(160, 96, 96), spacing=(2.0, 2.0, 1.0)),
                                dict(direction=oblique_direction(12.0)), dict(origin=(-300.0, 50.0, 400.0)),
                                dict(shape_zyx=(32, 64, 64), spacing=(3.0, 3.0, 6.0))])
def test_the_suites_own_test_cts_are_never_refused(kw):
    assert run_checks(ball_ct(**kw)[0]).passed


@pytest.mark.slow
def test_the_suites_other_phantoms_are_never_refused():
    for v in [make_phantom(77, findings=["subdural"], slices="thick", in_plane_size=183, fov_mm=230.0).volume,
              make_phantom(90, slices="thick", in_plane_size=64, anatomy="realistic").volume,
              make_phantom(3_000_000, slices="thick", in_plane_size=128).volume,
              make_phantom(7_000_000, slices="thick", in_plane_size=160).volume,
              make_phantom(7, findings=["subdural", "fracture"], slices="thin", in_plane_size=96).volume]:
        report = run_checks(v)
        assert report.passed, [c.to_dict() for c in report.checks if not c.passed]


def test_benign_variants_pass(head):
    rng = np.random.default_rng(0)
    for name, v in [("noise 40 HU", noise(head, 40.0, rng)), ("noise 5 HU", noise(head, 5.0, rng)),
                    ("rotation 5 degrees", rigid(head, 5.0, np.array([0.3, 1.0, 0.2]), np.zeros(3))),
                    ("field of view from the skull base up", cut(head, inferior_mm=10.0)),
                    ("8-9 mm slices", thicker_slices(head, 2))]:
        report = run_checks(v)
        assert report.passed, (name, [c.to_dict() for c in report.checks if not c.passed])


# ---------------------------------------------------------------- 1. the head, found by its skull

def _trunk_under(head: Volume, length_mm: float = 520.0) -> Volume:
    """A body under the head: a neck with a vertebra, then a trunk with fat, air-filled lungs, a spine and
    dashed ribs (a bone ring with gaps), on the head's grid, stacked below it (k grows superior)."""
    nz = int(length_mm / head.spacing[2])
    ny, nx = head.array.shape[1:]
    sx, sy = head.spacing[:2]
    j, i = np.indices((ny, nx))
    x = head.origin[0] + i * sx
    y = head.origin[1] + j * sy
    slices = np.full((nz, ny, nx), -1000.0, np.float32)
    rng = np.random.default_rng(5)
    for k in range(nz):
        from_top = (nz - k) * head.spacing[2]
        if from_top < 90:  # neck
            body = (x / 55) ** 2 + (y / 55) ** 2 < 1
            s = np.where(body, 40.0, -1000.0)
            s[(x / 11) ** 2 + ((y - 25) / 11) ** 2 < 1] = 1100.0
        else:
            body = (x / 165) ** 2 + (y / 105) ** 2 < 1
            s = np.where(body, 45.0, -1000.0)
            s[body & ((x / 150) ** 2 + (y / 92) ** 2 >= 1)] = -100.0  # subcutaneous fat
            lungs = ((np.abs(x) - 70) / 55) ** 2 + (y / 75) ** 2 < 1
            if from_top < 400:
                s[lungs] = -850.0
            s[(x / 14) ** 2 + ((y - 70) / 14) ** 2 < 1] = 1100.0  # vertebra
            ring = np.abs((x / 140) ** 2 + (y / 85) ** 2 - 1) < 0.06
            ribs = ring & (np.sin(np.arctan2(y, x) * 9) > 0) if from_top < 400 else np.zeros_like(ring)
            s[ribs] = 900.0
        slices[k] = s + rng.normal(0, 8, s.shape)
    array = np.concatenate([slices, head.array], axis=0)
    origin = np.asarray(head.origin) - np.array([0.0, 0.0, nz * head.spacing[2]])
    return Volume(array, head.spacing, origin, head.direction)


@pytest.fixture(scope="module")
def pan_scan() -> tuple[Volume, Volume]:
    wide = make_phantom(SEED, findings=["subdural"], slices="thick", in_plane_size=192, fov_mm=460.0).volume
    return wide, _trunk_under(wide)


@pytest.mark.slow
def test_a_head_on_a_trunk_is_cropped_to_the_head_and_says_so(pan_scan, tmp_path):
    head, body = pan_scan
    assert body.array.shape[0] * body.spacing[2] > 650  # a trauma pan-scan, head to pelvis
    report = run_checks(body)
    assert report.passed and report.crop is not None
    cropped = report.crop.apply(body)
    top = body.origin[2] + body.spacing[2] * (body.array.shape[0] - 1)
    assert cropped.origin[2] >= head.origin[2] - 60.0  # no trunk left but the upper neck
    assert abs(cropped.origin[2] + cropped.spacing[2] * (cropped.array.shape[0] - 1) - top) < 25.0  # the vertex kept
    head_found = next(c for c in report.checks if c.name == "head found")
    assert head_found.value["cropped"] and "analyzed the head only" in head_found.message
    # end to end: the study folder says it, and the maps come back on the whole scan's grid
    bundle, _, _ = tiny_bundle(tmp_path / "bundle", tasks=[("bleed", 1e-6)])
    write_volume(body, tmp_path / "pan.nii.gz")
    assert main(["analyze", str(tmp_path / "pan.nii.gz"), "--model", str(bundle), "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    payload = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert payload["cropped_to_head"]["slices"][0] > 0
    assert [c["name"] for c in payload["checks"]][2] == "head found" and all(c["passed"] for c in payload["checks"])
    import SimpleITK as sitk

    saliency = Volume.from_sitk(sitk.ReadImage(str(tmp_path / "out" / "saliency_bleed.nii.gz")))
    assert saliency.array.shape == body.array.shape
    k = np.nonzero(saliency.array.reshape(saliency.array.shape[0], -1).max(1))[0]
    assert saliency.origin[2] + k.min() * saliency.spacing[2] >= head.origin[2] - 60.0  # nothing in the trunk


def test_a_trunk_without_a_head_is_refused_no_head_found(pan_scan):
    head, body = pan_scan
    trunk = Volume(body.array[: body.array.shape[0] - head.array.shape[0] - 25], body.spacing, body.origin,
                   body.direction)
    _refused(trunk, "head found", "no head found")


def test_implausible_extent_is_refused(head):
    _refused(vertex_only(head), "plausible head size", "too short")
    tall = Volume(head.array, (head.spacing[0], head.spacing[1], head.spacing[2] * 1.8), head.origin, head.direction)
    _refused(tall, "plausible head size", "too tall")


# ---------------------------------------------------------------- 2. the field of view

def _cut_in_plane(volume: Volume, share: float, axis: int) -> Volume:
    """The image cropped so that `share` of the head's width (numpy axis 2: left-right, 1: front-back) is gone."""
    other = 1 if axis == 2 else 2
    present = np.nonzero((volume.array > -300).any(axis=(0, other)))[0]
    start = int(present.min() + share * (present.max() - present.min()))
    index = [slice(None)] * 3
    index[axis] = slice(start, None)
    origin = np.asarray(volume.origin, float)
    origin[2 - axis] += start * volume.spacing[2 - axis]
    return Volume(volume.array[tuple(index)].copy(), volume.spacing, origin, volume.direction)


@pytest.mark.parametrize("share", [0.15, 0.25, 0.35, 0.45])
@pytest.mark.parametrize("axis", [2, 1])
def test_a_head_cut_by_the_field_of_view_is_flagged_with_the_missing_share(head, share, axis):
    flag = _flagged(_cut_in_plane(head, share, axis), "head inside the field of view")
    assert "head cut by the field of view" in flag.message
    assert flag.value["cut_edge_voxels"] > 0
    if share >= 0.25:
        assert flag.value["missing_outline_share"] >= 0.1


def test_a_cut_head_is_never_in_distribution(head, tmp_path):
    from fmct.inference.analyze import Analyzer
    from fmct.inference.ood import fit_reference

    bundle, _, _ = tiny_bundle(tmp_path / "bundle")
    analyzer = Analyzer(bundle, device="cpu")
    features = analyzer.runner.run(analyzer.preprocessor(head).array)[1]
    analyzer.reference = fit_reference(np.repeat(features, 4, 0) + np.random.default_rng(0).normal(0, 1, (4, features.shape[1])),
                                       np.repeat(features, 2, 0) * 1.0)
    analyzer.reference.threshold = 1e9  # any score passes: only the flag can say no
    result = analyzer.analyze(_cut_in_plane(head, 0.35, 2), explain_method=None)
    assert result.in_distribution is False and result.ood["flagged_by_checks"] == ["head inside the field of view"]
    assert result.warning.startswith("WARNING: head cut by the field of view")


# ---------------------------------------------------------------- 3. orientation against the header

@pytest.mark.parametrize("turns,words", [(1, "turned about 90 degrees"), (2, "face points posterior"),
                                         (3, "turned about 90 degrees")])
def test_an_in_plane_rotation_behind_an_identity_header_is_refused(head, turns, words):
    _refused(_same_header(head, np.rot90(head.array, turns, axes=(1, 2))), "orientation", words)


def test_upside_down_and_prone_under_supine_are_refused(head):
    _refused(_same_header(head, head.array[::-1]), "orientation", "upside down")
    _refused(_same_header(head, head.array[:, ::-1]), "orientation", "face points posterior")
    # left-right mirroring cannot be told from a symmetric head: it passes (not judged as wrong)
    assert run_checks(_same_header(head, head.array[:, :, ::-1])).passed


def test_a_true_reorientation_in_the_header_passes(head):
    """The same voxels turned 90 degrees with a header that says so are a correctly described head."""
    turned = np.rot90(head.array, 1, axes=(1, 2))  # new [j, i] = old [i, n - 1 - j]
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # columns: new i = +y, new j = -x
    sx, sy, sz = head.spacing
    origin = np.asarray(head.origin) + np.array([(head.array.shape[2] - 1) * sx, 0.0, 0.0])
    report = run_checks(Volume(np.ascontiguousarray(turned), (sy, sx, sz), origin, direction))
    assert report.passed, [c.to_dict() for c in report.checks if not c.passed]


# ---------------------------------------------------------------- 4. calibration

def test_uncalibrated_intensities_are_refused(head):
    a = head.array
    _refused(_same_header(head, a * 10.0), "calibrated CT", "not a calibrated CT: air lies at")
    _refused(_same_header(head, -a), "calibrated CT", "not a calibrated CT")
    mr = np.interp(a, [-1024, -100, 0, 15, 25, 45, 100, 400, 1500, 3000],
                   [-1000, -1000, 600, 550, 250, 300, 300, 100, 50, 50]).astype(np.float32)  # T2-like: CSF bright, bone dark
    error = _refused(_same_header(head, mr), "calibrated CT", "no bone above 700 HU")
    assert "Hounsfield" in str(error)


def test_cli_refuses_with_exit_2_and_one_line(head, tmp_path, capsys):
    bundle, _, _ = tiny_bundle(tmp_path / "bundle")
    write_volume(_same_header(head, head.array * 10.0), tmp_path / "x10.nii.gz")
    assert main(["analyze", str(tmp_path / "x10.nii.gz"), "--model", str(bundle), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--explain", "none"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fmct:")]
    assert len(err) == 1 and "calibrated CT check failed: not a calibrated CT" in err[0]
    assert not (tmp_path / "o" / "findings.json").exists()


# ---------------------------------------------------------------- 5. size for the header's spacing, direction

@pytest.mark.parametrize("factor,words", [(0.7, "too small"), (1.5, "too large")])
def test_a_wrong_in_plane_spacing_is_refused_naming_the_measured_size(head, factor, words):
    sx, sy, sz = head.spacing
    error = _refused(Volume(head.array, (sx * factor, sy * factor, sz), head.origin, head.direction),
                     "plausible head size", words)
    assert "mm wide" in str(error) and "mm long" in str(error)


def test_a_sheared_direction_matrix_is_refused(head):
    sheared = np.eye(3)
    sheared[0, 1] = 0.3
    _refused(Volume(head.array, head.spacing, head.origin, sheared), "direction matrix", "not orthonormal")


def test_checks_refuse_before_any_model_runs(head, tmp_path):
    from fmct.inference.analyze import Analyzer

    analyzer = Analyzer(tiny_bundle(tmp_path / "bundle")[0], device="cpu")
    calls = []
    analyzer.runner.run = lambda *a, **k: calls.append(1)  # would fail loudly if it were reached
    with pytest.raises(FMCTError, match="orientation check failed"):
        analyzer.analyze(_same_header(head, head.array[::-1]), explain_method=None)
    assert calls == []
