"""Break-it, round two (issue 25): the hostile cases this helper's items cover, one row each.

Each case builds its own input (a tiny random bundle edited on disk, a phantom CT, a manifest
written in a given encoding, a small tmpfs for a full disk where the machine allows one) and
asserts the behaviour the issue names: exit 2 with one line naming the problem before any model
runs, or the correct result. Nothing is mocked but the one place a disk error cannot be made
for real (said where it happens).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from fmct_testing import ball_ct, tiny_bundle

from fmct.cli import main
from fmct.reading.files import write_volume

SHAPE, SPACING = (16, 64, 64), (3.0, 3.0, 6.0)


def small_ct(**kw):
    return ball_ct(shape_zyx=SHAPE, spacing=SPACING, **kw)[0]


@dataclass
class Case:
    id: str
    build: Callable[[Path], Path]  # writes the input under the folder, returns the path to give
    words: str  # a fragment of the one-line message (case-insensitive)
    args: list[str] = field(default_factory=list)

    def param(self):
        return pytest.param(self, id=self.id)


def run_cli(argv: list[str], capfd) -> tuple[int, list[str], str]:
    capfd.readouterr()
    code = main([str(a) for a in argv])
    cap = capfd.readouterr()
    return code, [line for line in cap.err.splitlines() if line.strip()], cap.out


def assert_refused(code: int, lines: list[str], words: str, out: Path | None = None) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines  # one line: no traceback ahead of it
    assert lines[0].startswith("fmct: error: ") and words.lower() in lines[0].lower(), lines[0]
    if out is not None:
        assert not (out / "findings.json").exists()


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ct")
    write_volume(small_ct(), d / "ct.nii.gz")
    return d / "ct.nii.gz"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "b")[0]


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


# ============================================================================ bundles (items 1, 9, 12a, 16)
_ONNX_CACHE: dict[str, Path] = {}


def onnx_bundle(d: Path) -> Path:
    """A tiny bundle with a checked model.onnx (fmct export --onnx), copied from one made once per run."""
    import shutil

    if "b" not in _ONNX_CACHE:
        import tempfile

        src = Path(tempfile.mkdtemp(prefix="fmct-onnx-")) / "b"
        tiny_bundle(src)
        assert main(["export", str(src), "--onnx"]) == 0
        _ONNX_CACHE["b"] = src
    shutil.copytree(_ONNX_CACHE["b"], d / "b")
    return d / "b"


def edited_text(edit: Callable[[str], str]):
    """A checked ONNX bundle whose fmct.json text is edited (what a JSON object cannot hold: duplicates, depth)."""
    def build(d: Path) -> Path:
        path = onnx_bundle(d)
        meta = path / "fmct.json"
        meta.write_text(edit(meta.read_text()))
        return path
    return build


def edited_meta(edit: Callable[[dict], None]):
    def build(d: Path) -> Path:
        path = onnx_bundle(d)
        meta = json.loads((path / "fmct.json").read_text())
        edit(meta)
        (path / "fmct.json").write_text(json.dumps(meta, indent=2))
        return path
    return build


def _task_name(name: str):
    return edited_meta(lambda m: m["tasks"][0].update(name=name))


def _duplicate_tasks(text: str) -> str:
    """A second "tasks" key whose thresholds would make every finding positive (the last one wins in json.loads)."""
    meta = json.loads(text)
    fake = [dict(t, threshold=0.001) for t in meta["tasks"]]
    return text.rstrip().rstrip("}") + ',\n  "tasks": ' + json.dumps(fake) + "\n}"


def _nested(text: str) -> str:
    meta = json.loads(text)
    body = json.dumps(meta)[:-1]
    return body + ', "metrics": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"


def _bigger_encoder(meta: dict) -> None:
    meta["encoder"].update(embed_dim=96, depth=4, num_heads=2)  # over the 48-wide, 2-block weights


BUNDLE_CASES = [
    Case("task-name-path-traversal", _task_name("x/../../../../pwned"), "tasks[0].name"),
    Case("task-name-slash", _task_name("a/b"), "tasks[0].name"),
    Case("task-name-space", _task_name("sub dural"), "tasks[0].name"),
    Case("task-name-escape", _task_name("bleed\x1b[2J"), "tasks[0].name"),
    Case("task-name-dotdot", _task_name(".."), "tasks[0].name"),
    Case("task-name-too-long", _task_name("t" * 101), "tasks[0].name"),
    Case("bundle-name-slash", edited_meta(lambda m: m.update(name="../evil")), "field 'name'"),
    Case("bundle-name-newline", edited_meta(lambda m: m.update(name="fine\nfmct: all clear")), "field 'name'"),
    Case("duplicate-tasks-key", edited_text(_duplicate_tasks), "key 'tasks' twice"),
    Case("duplicate-nested-key", edited_text(lambda t: t.replace('"threshold":', '"threshold": 0.001, "threshold":', 1)),
         "key 'threshold' twice"),
    Case("nested-100000-deep", edited_text(_nested), "nests"),
    Case("encoder-config-over-other-weights", edited_meta(_bigger_encoder), "does not fit the config"),
]


@pytest.mark.parametrize("backend", ["torch", "onnx", "auto"])
@pytest.mark.parametrize("case", [c.param() for c in BUNDLE_CASES])
def test_bad_bundle_is_refused_whatever_the_backend(case: Case, backend: str, tmp_path, ct_file, no_model, capfd):
    path = case.build(tmp_path)
    no_model()
    out = tmp_path / "out"
    code, lines, _ = run_cli(["analyze", ct_file, "--model", path, "--explain", "none", "--backend", backend,
                              "--out", out], capfd)
    assert_refused(code, lines, case.words, out)
    assert not (tmp_path / "pwned.nii.gz").exists() and not list(tmp_path.rglob("*pwned*"))


def test_the_unedited_onnx_bundle_runs_on_every_backend(tmp_path, ct_file, capfd):
    """The cases above fail for their edit alone: the same bundle unedited is analyzed by each backend."""
    path = onnx_bundle(tmp_path)
    for backend in ("torch", "onnx", "auto"):
        code, lines, _ = run_cli(["analyze", ct_file, "--model", path, "--explain", "none", "--backend", backend,
                                  "--out", tmp_path / backend], capfd)
        assert code == 0, lines
        assert json.loads((tmp_path / backend / "findings.json").read_text())["backend"] == (
            "torch" if backend == "torch" else "onnx")


def test_saving_a_bundle_with_a_bad_task_name_is_refused(tmp_path):
    from fmct.conventions.errors import BundleError

    with pytest.raises(BundleError, match="tasks\\[1\\].name"):
        tiny_bundle(tmp_path / "b", tasks=("bleed", "../x"))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("cfg_args, tasks", [({}, 2), ({"qkv_bias": False, "layerscale_init": 0.1, "mlp_ratio": 2.5}, 0),
                                             ({"depth": 3, "patch_size": (4, 8, 8)}, 9)])
def test_weight_table_without_torch_is_the_models_own(cfg_args, tasks):
    """The onnxruntime path checks weights against weight_shapes(); it must be exactly the torch model's table."""
    from fmct.models import FMCTClassifier, preset
    from fmct.models.config import weight_shapes

    cfg = preset("tiny", embed_dim=48, num_heads=2, **cfg_args)
    model = {k: tuple(v.shape) for k, v in FMCTClassifier(cfg, tasks).state_dict().items()}
    assert weight_shapes(cfg, tasks) == model


# ============================================================================ control characters on output (item 2)
def test_printable_strips_control_characters():
    from fmct.conventions.names import printable

    assert printable("a\x1b[31mred\x1b[0m\nforged row\tx\u202eevil\x00") == "a[31mred[0m forged row xevil"
    assert printable("one\ntwo", keep_newlines=True) == "one\ntwo"
    assert printable("Schädel 头部") == "Schädel 头部"  # letters of any script stay


def test_error_line_strips_escape_sequences_and_newlines(tmp_path, bundle, capfd):
    evil = tmp_path / "ct\x1b[2J\nfmct: all clear.nii.gz"  # a file name that clears the screen and forges a line
    evil.write_bytes(b"not an image")
    code, lines, out = run_cli(["analyze", evil, "--model", bundle, "--explain", "none", "--out", tmp_path / "o"], capfd)
    assert code == 2 and len(lines) == 1, lines
    assert "\x1b" not in lines[0] and lines[0].startswith("fmct: error: ") and "[2J fmct: all clear" in lines[0]


def test_batch_table_strips_control_characters(tmp_path, bundle, capfd):
    studies = tmp_path / "in"
    studies.mkdir()
    write_volume(small_ct(), studies / "good.nii.gz")
    bad = studies / "a\x1b]0;owned\x07\nok  forged"  # a study folder whose name would forge a table row
    bad.mkdir()
    (bad / "x.dcm").write_bytes(b"not dicom")
    code, lines, out = run_cli(["analyze", studies, "--batch", "--model", bundle, "--explain", "none",
                                "--workers", "0", "--out", tmp_path / "out"], capfd)
    assert code == 0, lines
    assert "\x1b" not in out and "\x07" not in out and "\x1b" not in "".join(lines)
    errors = [line for line in out.splitlines() if line.strip().startswith("error")]
    assert len(errors) == 1 and "a]0;owned ok  forged" in errors[0], out
    assert not any(line.strip().startswith("ok  forged") for line in out.splitlines())


def test_slicer_findings_table_strips_control_characters():
    pytest.importorskip("vtk")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FMCT"))
    from FMCTLib import outputs

    table = outputs._findingsTable([{"name": "bleed", "description": "Bleed\x1b[2J\nforged\trow", "probability": 0.5,
                                     "threshold": 0.5, "positive": True}])
    assert table.GetColumnByName("description").GetValue(0) == "Bleed[2J forged row"
