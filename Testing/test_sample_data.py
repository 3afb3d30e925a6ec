"""Slicer's Sample Data CT is the CT `fmct demo` shows, chosen by one rule, and the shipped demo model
answers it right on the headline findings (issue 27 item 8: the old Slicer seed 7 was missed)."""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from slicer_testing import headless_slicer  # noqa: E402

from FMCTLib import selftest  # noqa: E402
from FMCTLib.logic import FMCTLogic  # noqa: E402


@pytest.fixture(scope="module")
def app():
    with headless_slicer() as headless:
        yield headless


@pytest.mark.slow
def test_sample_data_ct_is_the_demo_ct_and_the_shipped_model_finds_its_subdural(app, tmp_path):
    from fmct.inference.analyze import Analyzer
    from fmct.phantom.demo_sample import DEMO_SEED, HEADLINE, demo_sample

    node = FMCTLogic().loadSyntheticHeadCT(app.scene, tmp_path)
    volume = selftest.geometry.volumeFromNode(node)
    phantom = demo_sample(DEMO_SEED)
    assert volume.array.shape == phantom.volume.array.shape
    np.testing.assert_allclose(volume.array, phantom.volume.array, atol=0.5)  # the same CT, through Slicer's reader

    result = Analyzer(device="cpu").analyze(volume, explain_method=None)
    by_name = {f.name: f for f in result.findings}
    for name in HEADLINE:
        assert phantom.labels[name] == 1 and by_name[name].positive, (name, by_name[name].probability)
    assert result.in_distribution is not False
    assert result.primary_finding().name in HEADLINE  # what the overlay shows first is the sample's finding
