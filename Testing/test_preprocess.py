"""Preprocessor: HU windows, model grid, and the exact map back onto the input grid."""
import numpy as np
import pytest

from fmct.conventions.errors import ConfigError
from fmct.preprocessing.preprocessor import Preprocessor, PreprocessSpec, Window, orientation_direction
from fmct_testing import ball_ct, oblique_direction

SPEC = PreprocessSpec(spacing_mm=(3.0, 3.0, 3.0), size=(64, 64, 64))


def test_windows_scale_hu_to_unit_range():
    w = Window("brain", 40, 80)
    np.testing.assert_allclose(w.apply(np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0])), [0, 0, 0.5, 1, 1])


def test_tensor_shape_channels_and_air_is_zero():
    ct, _ = ball_ct()
    mi = Preprocessor(SPEC)(ct)
    assert tuple(mi.tensor.shape) == (1, 3, 64, 64, 64)
    t = mi.tensor[0].numpy()
    assert t.min() == 0.0 and t.max() <= 1.0
    assert t[:, 0, 0, 0].tolist() == [0.0, 0.0, 0.0]  # corner of the model grid is air


@pytest.mark.parametrize("direction", [np.eye(3), oblique_direction(25.0)], ids=["identity", "oblique"])
def test_round_trip_geometry_and_content(direction):
    """Anisotropic spacing + oblique direction: the ball lands where it physically is, and back."""
    ct, ball = ball_ct(spacing=(1.1, 0.8, 4.0), direction=direction, skull_mm=0.0)  # the ball is the only bone
    pre = Preprocessor(SPEC)
    mi = pre(ct)
    # The ball is bright in the bone window and only there; its model-grid centroid must be the
    # same physical point as its input-grid centroid.
    bone = mi.tensor[0, 2].numpy()
    model_ball = bone > 0.35
    assert model_ball.sum() > 50
    def centroid_mm(mask, grid):
        kji = np.argwhere(mask).mean(0)
        ijk = kji[::-1]
        return np.asarray(grid.origin) + np.asarray(grid.direction) @ (ijk * np.asarray(grid.spacing))
    np.testing.assert_allclose(centroid_mm(model_ball, mi.model_grid), centroid_mm(ball, mi.input_grid), atol=2.0)

    back = pre.to_input_grid(model_ball.astype(np.float32), mi)
    assert back.same_grid(ct)  # exactly the CT's size, spacing, origin and direction
    recovered = back.array > 0.5
    dice = 2 * (recovered & ball).sum() / (recovered.sum() + ball.sum())
    assert dice > 0.8


def test_to_model_grid_matches_forward_map():
    ct, ball = ball_ct(direction=oblique_direction(10.0), skull_mm=0.0)  # the ball is the only bone
    pre = Preprocessor(SPEC)
    mi = pre(ct)
    mask_model = pre.to_model_grid(ct.with_array(ball.astype(np.float32)), mi, nearest=True)
    bright = mi.tensor[0, 2].numpy() > 0.35
    overlap = (mask_model > 0.5) & bright
    assert overlap.sum() > 0.7 * bright.sum()


def test_head_is_centred_on_the_model_grid_wherever_it_is_in_the_fov():
    ct, _ = ball_ct(origin=(-300.0, 50.0, 400.0))
    mi = Preprocessor(SPEC)(ct)
    brain = mi.tensor[0, 0].numpy() > 0.4
    centre = np.argwhere(brain).mean(0)
    np.testing.assert_allclose(centre, [31.5, 31.5, 31.5], atol=2.0)


def test_thin_and_thick_inputs_preprocess_alike():
    thick, _ = ball_ct(shape_zyx=(40, 96, 96), spacing=(2.0, 2.0, 4.0))
    thin, _ = ball_ct(shape_zyx=(160, 96, 96), spacing=(2.0, 2.0, 1.0))
    rng = np.random.default_rng(0)
    thin.array = thin.array + rng.normal(0, 20, thin.array.shape).astype(np.float32)
    a = Preprocessor(SPEC)(thick).tensor[0, 0].numpy()
    b = Preprocessor(SPEC)(thin).tensor[0, 0].numpy()
    assert np.abs(a - b).mean() < 0.05


def test_spec_validation_names_the_field():
    with pytest.raises(ConfigError, match="spacing_mm"):
        PreprocessSpec(spacing_mm=(0.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="orientation"):
        orientation_direction("LPQ")
    with pytest.raises(ConfigError, match="repeats"):
        orientation_direction("LLS")
    assert PreprocessSpec.from_dict(SPEC.to_dict()) == SPEC


def test_ras_orientation_flips_axes():
    np.testing.assert_array_equal(orientation_direction("RAS"), np.diag([-1.0, -1.0, 1.0]))


def test_padding_below_air_counts_as_air():
    """Real CTs pad outside the reconstruction circle with -2048 or -3024 HU; the model sees air there."""
    ct, _ = ball_ct(skull_mm=0.0)  # no skull cut by the padded edge
    padded = ct.array.copy()
    outside = np.zeros(padded.shape, bool)
    outside[:, :14, :] = True  # the edge of the field of view, where the head also begins
    padded[outside & (padded < -900)] = -3024.0
    padded[:, 14, :] = np.where(padded[:, 14, :] < -900, -2048.0, padded[:, 14, :])
    assert (padded[:, :14, :] > 0).any()  # the padded rows also cut through the head
    as_air = np.maximum(padded, -1024.0)  # what "treated as air" means: no darker than air
    a = Preprocessor(SPEC)(ct.with_array(as_air)).array
    b = Preprocessor(SPEC)(ct.with_array(padded)).array
    assert np.abs(a - b).max() < 1e-6
    assert np.abs(b - Preprocessor(SPEC)(ct).array).max() < 0.02  # and close to the unpadded CT (air -1000 here)


def test_map_back_as_uint8_is_the_float_map_rounded():
    """levels=255 (what the Analyzer keeps and writes) equals quantising the float map, voxel for voxel."""
    from fmct.inference.study_folder import quantize_saliency

    ct, _ = ball_ct(shape_zyx=(37, 101, 90), spacing=(0.9, 1.3, 4.5), direction=oblique_direction(12.0))
    pre = Preprocessor(SPEC)
    mi = pre(ct)
    model_map = np.random.default_rng(0).random(SPEC.tensor_shape, dtype=np.float32)
    as_uint8 = pre.to_input_grid(model_map, mi, levels=255)
    assert as_uint8.array.dtype == np.uint8 and as_uint8.same_grid(ct)
    rounded = quantize_saliency(pre.to_input_grid(model_map, mi)).array.astype(np.int16)
    assert np.abs(as_uint8.array.astype(np.int16) - rounded).max() <= 1  # float rounding at the .5 boundary
    assert np.mean(as_uint8.array == rounded) > 0.999


# Axis orders and flips a CT may be stored in (direction columns = its index axes in LPS).
_STORAGES = {
    "LPS": np.eye(3),
    "RAS flipped": np.diag([-1.0, -1.0, 1.0]),
    "sagittal (axes permuted)": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "coronal, z flipped": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]]),
}


@pytest.mark.parametrize("name", list(_STORAGES))
@pytest.mark.parametrize("levels", [None, 255], ids=["float32", "uint8"])
def test_separable_map_back_is_itks_resampling(name, levels):
    """The three-pass map back gives ITK's linear resampling (0 outside, edges clamped) on any
    non-oblique storage, to within float rounding: at most one grey level on a few voxels."""
    from fmct.preprocessing.preprocessor import itk_resample
    from fmct.preprocessing.separable import resample_parallel

    # A CT larger than the model grid on one axis and smaller on another: both edges are exercised.
    ct, _ = ball_ct(shape_zyx=(33, 150, 71), spacing=(1.7, 1.4, 4.6), direction=_STORAGES[name], origin=(-60.0, -110.0, -75.0))
    pre = Preprocessor(SPEC)
    mi = pre(ct)
    model_map = np.random.default_rng(1).random(SPEC.tensor_shape, dtype=np.float32)
    fast = resample_parallel(model_map, mi.model_grid, mi.input_grid, levels)
    reference = itk_resample(model_map, mi.model_grid, mi.input_grid, levels)
    assert fast is not None and fast.dtype == reference.dtype and fast.shape == reference.shape == ct.array.shape
    assert (reference == 0).mean() > 0.05 and (reference > 0).mean() > 0.3  # the map is partly outside the CT
    diff = np.abs(fast.astype(np.float64) - reference.astype(np.float64))
    if levels is None:
        assert diff.max() <= 1e-5
    else:
        assert diff.max() <= 1 and np.mean(diff == 0) > 0.9999
    back = pre.to_input_grid(model_map, mi, levels=levels)  # what the Analyzer calls
    np.testing.assert_array_equal(back.array, fast)
    assert back.same_grid(ct)


def test_oblique_grids_are_left_to_itk():
    from fmct.preprocessing.preprocessor import itk_resample
    from fmct.preprocessing.separable import resample_parallel

    ct, _ = ball_ct(direction=oblique_direction(12.0))
    pre = Preprocessor(SPEC)
    mi = pre(ct)
    model_map = np.random.default_rng(2).random(SPEC.tensor_shape, dtype=np.float32)
    assert resample_parallel(model_map, mi.model_grid, mi.input_grid, 255) is None
    np.testing.assert_array_equal(pre.to_input_grid(model_map, mi, levels=255).array,
                                  itk_resample(model_map, mi.model_grid, mi.input_grid, 255))
