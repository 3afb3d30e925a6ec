"""Explanations that hold up (issue 27 items 1-4, issue 24 item 8): an IG baseline the model calls
normal, completeness recorded and met, one scale per study, one finding-agnostic attention map, and
FMCT's IG equal to Captum's with the same baseline.

The demo model's checks use fresh phantoms (seeds outside training and the benchmarks'); the
plumbing checks use the tiny random bundle of the other explanation tests.
"""
import json

import numpy as np
import pytest
import torch
from fmct_testing import ball_ct, tiny_bundle

from fmct.conventions.tasks import TASKS
from fmct.inference.analyze import Analyzer
from fmct.inference.baselines import hu_from_channels, make_baseline, skull_and_intracranial
from fmct.inference.explain import COMPLETENESS_TOLERANCE, DEFAULT_IG_STEPS, explain_captum, explain_study
from fmct.phantom import make_phantom

TEST_SEED = 4_900_000  # not a training (1-3 M) nor a benchmark (4.0-4.8 M) seed


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return Analyzer(device="cpu")


@pytest.fixture(scope="module")
def head(demo):
    """A subdural hematoma with mass effect, and a fracture: the baseline must undo all of them."""
    ph = make_phantom(TEST_SEED, findings=["subdural", "mass_effect", "fracture"], slices="thick", in_plane_size=256)
    return ph, demo.preprocessor(ph.volume)


@pytest.mark.slow
def test_the_baseline_is_normal_for_every_demo_task(demo, head):
    ph, mi = head
    p_ct = demo.probabilities(mi.array)[0]
    base = make_baseline("normal_head", mi.array[0], demo.bundle.meta.preprocessing.windows)
    p_base = demo.probabilities(base[None])[0]
    names = demo.bundle.meta.task_names
    assert names == list(TASKS)
    for task, p, pc in zip(demo.bundle.meta.tasks, p_base, p_ct):
        assert p < task.threshold, f"the baseline scores {task.name} {p:.3f} >= its threshold {task.threshold}"
    assert p_ct[names.index("subdural")] >= demo.bundle.meta.tasks[names.index("subdural")].threshold  # the CT is not
    zero = demo.probabilities(np.zeros_like(mi.array))[0]
    assert zero[names.index("any_hemorrhage")] > demo.bundle.meta.tasks[0].threshold  # why air is not a baseline


def test_the_baseline_keeps_the_outside_and_normalises_the_inside():
    ct, ball = ball_ct()
    hu = ct.array.copy()
    # a skull ring around the head-like ellipsoid, so the baseline has an inside to replace
    from fmct.preprocessing.spec import DEFAULT_WINDOWS

    windows = DEFAULT_WINDOWS
    k, j, i = np.indices(hu.shape)
    r = np.sqrt(((i - 47.5) * 2 / 60) ** 2 + ((j - 47.5) * 2 / 70) ** 2)
    hu[(r > 0.9) & (r < 1.0)] = 1000.0
    hu[r >= 1.0] = -1000.0
    x = np.stack([w.apply(hu) for w in windows]).astype(np.float32)
    np.testing.assert_allclose(hu_from_channels(x, windows)[hu > -50], hu[hu > -50], atol=0.05)
    skull, inside = skull_and_intracranial(hu_from_channels(x, windows))
    assert inside[ball].all() and not (inside & skull).any()
    b = make_baseline("normal_head", x, windows)
    assert np.array_equal(b[:, ~(skull | inside)], x[:, ~(skull | inside)])  # scalp and air are the CT's own
    normal = np.array([w.apply(np.float32(30.0)) for w in windows], np.float32)[:, None]
    np.testing.assert_allclose(b[:, inside], np.broadcast_to(normal, b[:, inside].shape), atol=1e-6)
    assert not np.array_equal(b, x)


@pytest.mark.slow
def test_completeness_is_recorded_and_met_on_a_phantom(demo, head, tmp_path):
    from fmct.inference.study_folder import write_study_outputs

    ph, _ = head
    result = demo.analyze(ph.volume, "integrated_gradients", ["subdural", "fracture"])
    payload, _ = write_study_outputs(tmp_path, ph.volume, result, "demo", "cpu", report=False)
    record = json.loads((tmp_path / "findings.json").read_text())["explanation"]
    assert record == payload["explanation"] and record["baseline"]["name"] == "normal_head"
    for name in ("subdural", "fracture"):
        c = record["maps"][name]["completeness"]
        assert abs(c["sum_of_attributions"] - c["logit_difference"]) <= COMPLETENESS_TOLERANCE * abs(c["logit_difference"])
        assert c["converged"] and c["relative_error"] <= COMPLETENESS_TOLERANCE
        threshold = demo.bundle.meta.tasks[demo.bundle.meta.task_names.index(name)].threshold
        assert record["baseline"]["probability"][name] < threshold
    assert record["warnings"] == []
    # one scale per study: the grey level means the same attribution in both maps, the stronger reaches 255
    peaks = {n: record["maps"][n]["peak_attribution"] for n in ("subdural", "fracture")}
    per_level = record["scale"]["attribution_per_grey_level"]
    assert record["scale"]["shared"] and max(peaks.values()) == pytest.approx(255 * per_level, rel=1e-4)
    for n in peaks:
        assert float(result.model_saliency[n].max()) == pytest.approx(peaks[n] / max(peaks.values()), rel=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, model, meta = tiny_bundle(tmp_path_factory.mktemp("b") / "bundle", tasks=["bleed", "fracture", "mass"])
    return path, model.eval(), meta


def test_fmct_ig_equals_captum_ig_with_the_same_baseline_and_completeness_is_captums(tiny):
    """What the README says: FMCT's shared IG is Captum's IntegratedGradients (Gauss-Legendre) for each finding."""
    from captum.attr import IntegratedGradients

    from fmct.preprocessing.preprocessor import Preprocessor

    _, model, meta = tiny
    x = Preprocessor(meta.preprocessing)(ball_ct()[0]).tensor
    base = x * 0.5  # any non-zero baseline: the bookkeeping must be Captum's for it
    ex = explain_study(model, x, [0, 2], ig_steps=8, baseline=base)
    for task, f in zip([0, 2], ex.findings):
        want = explain_captum(model, x, task, ig_steps=8, baseline=base)
        np.testing.assert_allclose(f.saliency / f.peak, want, atol=2e-4)
        _, delta = IntegratedGradients(lambda t: model(t)[:, task]).attribute(
            x, baselines=base, target=None, n_steps=8, method="gausslegendre", return_convergence_delta=True)
        c = f.completeness
        # Captum's delta is sum(attributions) - (f(x) - f(baseline)): the same bookkeeping
        assert c["sum_of_attributions"] - c["logit_difference"] == pytest.approx(float(delta), abs=2e-3)
        assert c["nodes"] == 8


def test_adaptive_nodes_double_until_completeness_or_the_cap(tiny):
    from fmct.preprocessing.preprocessor import Preprocessor

    _, model, meta = tiny
    x = Preprocessor(meta.preprocessing)(ball_ct()[0]).tensor
    ex = explain_study(model, x, [0, 1], ig_steps=None, max_steps=2 * DEFAULT_IG_STEPS, tolerance=0.0)  # never met
    assert [f.completeness["nodes"] for f in ex.findings] == [2 * DEFAULT_IG_STEPS] * 2
    assert not any(f.completeness["converged"] for f in ex.findings)
    ex = explain_study(model, x, [0], ig_steps=None, tolerance=10.0)  # met at once
    assert ex.findings[0].completeness["converged"] and ex.findings[0].completeness["nodes"] == DEFAULT_IG_STEPS


def test_a_single_finding_occlusion_is_captums(tiny):
    from fmct.preprocessing.preprocessor import Preprocessor

    _, model, meta = tiny
    x = Preprocessor(meta.preprocessing)(ball_ct()[0]).tensor
    single = explain_study(model, x, [1], "occlusion").findings[0].saliency
    shared = explain_study(model, x, [1, 0], "occlusion").findings[0].saliency  # FMCT's own shared pass
    np.testing.assert_allclose(single, shared, rtol=1e-4, atol=1e-6)


def test_attention_is_one_finding_agnostic_file(tiny, tmp_path):
    from fmct.inference.study_folder import write_study_outputs

    path, _, _ = tiny
    analyzer = Analyzer(path, device="cpu")
    ct, _ = ball_ct()
    result = analyzer.analyze(ct, "attention_rollout", "all")
    payload, written = write_study_outputs(tmp_path, ct, result, "m", "cpu")
    assert payload["saliency_files"] == {"attention": "attention.nii.gz"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.nii.gz", "findings.json", "report.png"]
    assert payload["explanation"]["maps"]["attention"]["finding_agnostic"] is True
    assert "normalised on its own" in payload["saliency_scale"]
