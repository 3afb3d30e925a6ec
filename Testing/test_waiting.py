"""Where users wait (issue 27 item 6): torch's threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE
set before torch starts, in the CLI and in the Slicer worker), and the CLI explains the top finding by
default on a CPU, others on request. Fresh processes: the environment at the moment torch is imported
is what counts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fmct_testing import ball_ct, tiny_bundle

from fmct.reading.files import write_volume

REPO = Path(__file__).resolve().parents[1]

# Records OMP_WAIT_POLICY at the moment torch is first imported, then runs the entry point given.
PROBE = r"""
import importlib.abc, json, os, sys
seen = {}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Watch())
kind, args, record = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
if kind == "cli":
    from fmct.cli import main
else:
    sys.path.insert(0, os.path.join(%r, "FMCT", "FMCTLib"))
    from worker import main
code = main(args)
json.dump({"code": code, "torch_imported_with": seen.get("policy", "torch never imported")}, open(record, "w"))
""" % str(REPO)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    bundle, _, _ = tiny_bundle(root / "bundle", tasks=[("bleed", 0.001), ("fracture", 0.001)])
    ct = write_volume(ball_ct()[0], root / "ct.nrrd")
    return bundle, ct


def _run(kind, args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    record = tmp_path / f"{kind}.json"
    run = subprocess.run([sys.executable, "-c", PROBE, kind, json.dumps(args), str(record)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert record.exists(), run.stderr[-3000:]
    return json.loads(record.read_text()), run


@pytest.mark.slow
def test_the_cli_sets_passive_threads_before_torch_starts(inputs, tmp_path):
    bundle, ct = inputs
    got, run = _run("cli", ["analyze", str(ct), "--model", str(bundle), "--out", str(tmp_path / "out")], tmp_path)
    assert got == {"code": 0, "torch_imported_with": "PASSIVE"}, run.stderr[-3000:]


@pytest.mark.slow
def test_the_slicer_worker_sets_passive_threads_before_torch_starts(inputs, tmp_path):
    bundle, ct = inputs
    got, run = _run("worker", ["--input", str(ct), "--out", str(tmp_path / "out"), "--bundle", str(bundle),
                               "--device", "cpu", "--engine-source", str(REPO)], tmp_path)
    assert got == {"code": 0, "torch_imported_with": "PASSIVE"}, run.stderr[-3000:]


def test_a_users_own_wait_policy_is_kept(monkeypatch):
    from fmct.conventions.runtime import passive_threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    passive_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    passive_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_cli_explains_the_top_finding_by_default_on_a_cpu(tmp_path):
    """Both findings positive (thresholds 0.001): auto on a CPU maps only the one furthest above its threshold."""
    from fmct.cli import main
    from fmct.inference.analyze import Analyzer
    path, _, _ = tiny_bundle(tmp_path / "b", tasks=[("bleed", 0.001), ("fracture", 0.001)])
    ct = ball_ct()[0]
    write_volume(ct, tmp_path / "ct.nrrd")
    assert main(["analyze", str(tmp_path / "ct.nrrd"), "--model", str(path), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--explain", "occlusion"]) == 0
    payload = json.loads((tmp_path / "o" / "findings.json").read_text())
    assert all(f["positive"] for f in payload["findings"])
    top = Analyzer(path, device="cpu").analyze(ct, None).primary_finding().name
    assert list(payload["saliency_files"]) == [top]
    assert main(["analyze", str(tmp_path / "ct.nrrd"), "--model", str(path), "--out", str(tmp_path / "o2"),
                 "--device", "cpu", "--explain", "occlusion", "--findings", "positive"]) == 0
    assert sorted(json.loads((tmp_path / "o2" / "findings.json").read_text())["saliency_files"]) == ["bleed", "fracture"]
