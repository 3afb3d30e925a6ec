"""Shared explanations (fmct.inference.explain.explain_findings) against the per-finding reference (Captum).

A tiny random-weights model on the 32^3 test grid: the shared computation must give the same maps
as explaining each finding on its own, report progress, and stop when cancelled, between findings
and inside the shared pass.
"""
import itertools

import numpy as np
import pytest
import torch
from fmct_testing import ball_ct, tiny_bundle

from fmct.conventions.errors import Cancelled
from fmct.inference.explain import explain, explain_captum, explain_findings, gauss_legendre


@pytest.fixture(scope="module")
def model_and_input(tmp_path_factory):
    from fmct.preprocessing.preprocessor import Preprocessor

    torch.set_num_threads(2)
    _, model, meta = tiny_bundle(tmp_path_factory.mktemp("b") / "bundle", tasks=["bleed", "fracture", "mass"])
    with torch.no_grad():  # a head whose tasks differ clearly, so a mix-up of targets would show
        model.head.fc.weight.mul_(50.0)
    x = Preprocessor(meta.preprocessing)(ball_ct(skull_mm=0.0)[0]).tensor  # the CT these reference maps were tuned on
    return model.eval(), x


@pytest.mark.slow
@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_shared_maps_equal_the_per_finding_reference(model_and_input, method):
    model, x = model_and_input
    shared = explain_findings(model, x, [2, 0, 1], method, ig_steps=8)
    for task, got in zip([2, 0, 1], shared):
        want = explain_captum(model, x, task, method, ig_steps=8)
        assert got.shape == want.shape == tuple(x.shape[2:]) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-4)
        assert got.max() == pytest.approx(1.0)
    assert np.abs(shared[0] - shared[1]).max() > 0.05  # different findings, different maps


def test_token_space_path_equals_the_input_space_path(model_and_input, monkeypatch):
    """The exact shortcut through the linear patch embedding changes nothing but the cost."""
    import fmct.inference.explain as ex

    model, x = model_and_input
    fast = explain_findings(model, x, [0, 1], ig_steps=4)
    monkeypatch.setattr(ex, "_linear_patch_embedding", lambda m: None)
    slow = explain_findings(model, x, [0, 1], ig_steps=4)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_batching_and_single_finding_agree(model_and_input):
    model, x = model_and_input
    together = explain_findings(model, x, [0, 1], ig_steps=6, batch_size=6)
    apart = [explain(model, x, t, ig_steps=6) for t in (0, 1)]
    for a, b in zip(together, apart):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert explain_findings(model, x, []) == []


def test_parameters_keep_requires_grad(model_and_input):
    model, x = model_and_input
    before = [p.requires_grad for p in model.parameters()]
    explain_findings(model, x, [0], ig_steps=2)
    assert [p.requires_grad for p in model.parameters()] == before


def test_gauss_legendre_weights_integrate_polynomials():
    a, w = gauss_legendre(4)
    assert float(w.sum()) == pytest.approx(1.0) and 0 < float(a.min()) < float(a.max()) < 1
    assert float((w * a**7).sum()) == pytest.approx(1 / 8)  # exact up to degree 2n - 1


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_progress_names_each_finding_and_reaches_one(model_and_input, method):
    model, x = model_and_input
    seen = []
    explain_findings(model, x, [0, 1], method, lambda f, m: seen.append((f, m)), ig_steps=4, names=["bleed", "fracture"])
    fractions = [f for f, _ in seen]
    assert fractions[-1] == 1.0 and all(b >= a for a, b in itertools.pairwise(fractions))
    if method == "integrated_gradients":
        assert {m for _, m in seen} == {"explaining bleed", "explaining fracture"}


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_cancel_inside_the_shared_pass_and_between_findings(model_and_input, stop_after):
    """Checks come before each forward batch (1) and before each finding's backward (2, 3)."""
    model, x = model_and_input
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > stop_after

    with pytest.raises(Cancelled):
        explain_findings(model, x, [0, 1, 2], ig_steps=4, batch_size=4, cancel=cancel)
    assert calls["n"] == stop_after + 1
    assert all(p.requires_grad for p in model.parameters())  # restored on the way out


def test_cancel_stops_occlusion(model_and_input):
    model, x = model_and_input
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        explain_findings(model, x, [0, 1], "occlusion", cancel=cancel)


def test_attention_is_computed_once_for_all_findings(model_and_input):
    model, x = model_and_input
    maps = explain_findings(model, x, [0, 1, 2], "attention_rollout")
    assert len(maps) == 3 and all(np.array_equal(maps[0], m) for m in maps)
    maps[0][:] = 0  # independent arrays: one caller's edit does not change another finding's map
    assert maps[1].max() == pytest.approx(1.0)
