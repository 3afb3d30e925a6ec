"""Fixtures shared by the test modules, each built once per test run (session scope).

Builders that are not fixtures (ball_ct, stored, tiny_bundle, ...) live in fmct_testing.py; the
headless Slicer in slicer_testing.py. Test modules import from those two, never from each other.

Shared objects are read-only for the tests: a test that changes a bundle or an analyzer builds its own.
"""
from __future__ import annotations

import locale

import pytest
import torch

from fmct_testing import tiny_bundle


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> str:
    """The engine's tiny random-weights bundle (fmct.phantom.fixtures.tiny_bundle with its defaults), as a path string."""
    return str(tiny_bundle(tmp_path_factory.mktemp("tiny-bundle") / "bundle")[0])


@pytest.fixture(scope="session")
def analyzer(bundle):
    """An Analyzer of the tiny bundle on the CPU."""
    from fmct.inference.analyze import Analyzer

    return Analyzer(bundle, device="cpu")


@pytest.fixture(scope="session")
def demo_analyzer():
    """An Analyzer of the shipped demo model on the CPU (loaded once for every module that needs it)."""
    from fmct.inference.analyze import Analyzer
    from fmct.inference.bundle import default_bundle_path

    torch.manual_seed(0)
    return Analyzer(default_bundle_path(), device="cpu")


@pytest.fixture
def no_model(monkeypatch):
    """Call it to make any model run from then on (torch or onnxruntime) fail the test."""
    from fmct.inference.onnx_runner import OnnxModel
    from fmct.inference.runners import TorchRunner

    def refuse(*a, **k):
        raise AssertionError("a model ran on bad input")

    def arm() -> None:
        for runner in (TorchRunner, OnnxModel):
            for name in ("logits", "run"):
                if hasattr(runner, name):
                    monkeypatch.setattr(runner, name, refuse)
    return arm


_LOCALE = locale.setlocale(locale.LC_ALL)


@pytest.fixture(autouse=True)
def _locale_restored():
    """Native libraries some tests load (slicer-core's ITK/VTK, GDCM) set the process locale to "C" and
    leave it; later tests would then decode UTF-8 text (subprocess output, the README) as ASCII. Each test
    starts from the locale the run started with (the engine's own DICOM writer restores it itself)."""
    if locale.setlocale(locale.LC_ALL) != _LOCALE:
        locale.setlocale(locale.LC_ALL, _LOCALE)
    yield
