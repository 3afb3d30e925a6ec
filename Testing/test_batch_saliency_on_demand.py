"""The batch maps each study's saliency back onto the CT's grid one map at a time (issue 27 item 6).

fmct.inference.batch now hands the study writer an fmct.inference.saliency.SaliencyOnCTGrid, as the
CLI does: each map is mapped back when its file is written, and freed after. The files must be
exactly what the eager path (every map mapped back first, Analyzer.analyze's default) writes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fmct.inference.batch import run_batch
from fmct.inference.saliency import SaliencyOnCTGrid
from fmct.inference.study_folder import write_study_outputs
from fmct.reading.files import read_volume, write_volume
from fmct_testing import ball_ct


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_batch_maps_are_identical_to_the_eager_map_back(analyzer, tmp_path):
    studies = tmp_path / "in"
    studies.mkdir()
    ct, _ = ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0))
    write_volume(ct, studies / "a.nii.gz")
    out = tmp_path / "out"
    run_batch(analyzer, studies, out, explain_method="occlusion", explain_findings="all", num_workers=0)
    payload = json.loads((out / "a" / "findings.json").read_text())
    assert len(payload["saliency_files"]) == len(analyzer.bundle.meta.task_names) >= 2  # one map per finding

    volume = read_volume(studies / "a.nii.gz")
    eager = analyzer.analyze(volume, explain_method="occlusion", explain_findings="all")  # every map mapped back first
    assert not isinstance(eager.saliency, SaliencyOnCTGrid) and set(eager.saliency) == set(payload["saliency_files"])
    reference = tmp_path / "eager"
    write_study_outputs(reference, volume, eager, analyzer.bundle.meta.name, str(analyzer.device), report=False)
    for name, file in payload["saliency_files"].items():
        assert digest(out / "a" / file) == digest(reference / file), name
    assert "map_back_s" not in payload["timings"]  # mapped back while writing: no longer a stage of its own
