"""In Slicer, attention is one finding-agnostic map (issue 27 item 4) and every map says what its grey
levels mean (item 3): through the real worker, real MRML nodes."""
from __future__ import annotations

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from slicer_testing import headless_slicer  # noqa: E402

from FMCTLib import outputs, selftest  # noqa: E402
from FMCTLib.logic import FMCTLogic  # noqa: E402


@pytest.mark.slow
def test_attention_is_one_map_shown_for_every_finding(tmp_path):
    bundle = selftest.tinyBundle(tmp_path / "bundle")
    ph = selftest.phantom(seed=3, findings=["subdural"])
    with headless_slicer() as app:
        ct = selftest.loadAsNRRD(app.scene, ph.volume, tmp_path / "ct", volumes=app.volumesLogic)
        logic = FMCTLogic()
        result = logic.analyze(ct, bundlePath=bundle, device="CPU", explain="attention", explainFindings="all")
        assert set(result.saliencyNodes) == {"attention"}
        node = result.saliencyNodes["attention"]
        assert "finding-agnostic" in node.GetName()
        assert "normalised on its own" in node.GetAttribute(outputs.SCALE_ATTRIBUTE)
        table = logic.findingsTableNode(ct)
        assert "finding-agnostic" in table.GetAttribute(outputs.MAPS_NOTE_ATTRIBUTE)
        assert result.shownFinding == "attention"
        for row in range(table.GetNumberOfRows()):  # whichever finding is selected, the one map is shown
            logic.showFindingAtRow(table, row)
            assert logic.shownFinding(ct) == "attention"

        result = logic.analyze(ct, bundlePath=bundle, device="CPU", explain="occlusion", explainFindings="all")
        assert set(result.saliencyNodes) == {f["name"] for f in result.findings}  # the attention map is replaced
        for node in result.saliencyNodes.values():
            assert "one scale shared by all of them" in node.GetAttribute(outputs.SCALE_ATTRIBUTE)
        assert "share one scale" in logic.findingsTableNode(ct).GetAttribute(outputs.MAPS_NOTE_ATTRIBUTE)
