"""The FMCT Slicer module shows the engine's plausibility checks and the model's banner (issue 26 items 7-8),
and refuses a CT whose anatomy disagrees with its header before any model runs (slicer-core, headless)."""
from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from slicer_testing import headless_slicer  # noqa: E402

from FMCTLib import outputs, selftest  # noqa: E402
from FMCTLib.logic import FMCTLogic  # noqa: E402
from fmct.conventions.errors import HeadCheckError  # noqa: E402
from fmct.reading.volume import Volume  # noqa: E402


@pytest.mark.slow
def test_panel_gets_every_check_and_the_banner_and_a_flipped_head_is_refused(tmp_path):
    bundle = selftest.tinyBundle(tmp_path / "bundle")
    meta = json.loads((bundle / "fmct.json").read_text())
    meta["banner"] = "Test model: trained on synthetic heads only."
    (bundle / "fmct.json").write_text(json.dumps(meta))
    ph = selftest.phantom(seed=2, findings=["subdural"])
    with headless_slicer() as app:
        ct = selftest.loadAsNRRD(app.scene, ph.volume, tmp_path / "ct", volumes=app.volumesLogic)
        result = FMCTLogic().analyze(ct, bundlePath=bundle, device="CPU", explain="none")
        assert result.banner == "Test model: trained on synthetic heads only."
        assert [c["name"] for c in result.checks] == ["direction matrix", "calibrated CT", "head found",
                                                     "head inside the field of view", "plausible head size",
                                                     "orientation"]
        assert all(line.split(": ")[1].startswith("ok") for line in result.checkLines())
        assert json.loads(result.tableNode.GetAttribute(outputs.CHECKS_ATTRIBUTE)) == result.checks
        assert result.tableNode.GetAttribute(outputs.BANNER_ATTRIBUTE) == result.banner
        v = ph.volume
        upside_down = Volume(np.ascontiguousarray(v.array[::-1]), v.spacing, v.origin, v.direction)
        flipped = selftest.loadAsNRRD(app.scene, upside_down, tmp_path / "flipped", name="flipped",
                                      volumes=app.volumesLogic)
        with pytest.raises(HeadCheckError, match="upside down"):
            FMCTLogic().analyze(flipped, bundlePath=bundle, device="CPU", explain="none")
