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


@pytest.mark.slow
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
    assert printable(os.fsdecode(b"Sch\xe4del")) == "Sch\\xe4del"  # a Latin-1 file name's byte, encodable again


def test_error_line_strips_escape_sequences_and_newlines(tmp_path, bundle, capfd):
    evil = tmp_path / "ct\x1b[2J\nfmct: all clear.nii.gz"  # a file name that clears the screen and forges a line
    evil.write_bytes(b"not an image")
    code, lines, out = run_cli(["analyze", evil, "--model", bundle, "--explain", "none", "--out", tmp_path / "o"], capfd)
    assert code == 2 and len(lines) == 1, lines
    assert "\x1b" not in lines[0] and lines[0].startswith("fmct: error: ") and "[2J fmct: all clear" in lines[0]


def test_batch_table_strips_control_characters(tmp_path, bundle, capfd):
    studies = tmp_path / "in"
    (studies / "a").mkdir(parents=True)
    write_volume(small_ct(), studies / "good.nii.gz")
    (studies / "a" / "x\x1b]0;owned\x07\nok  forged.nii.gz").write_bytes(b"not an image")  # named in a's error row
    code, lines, out = run_cli(["analyze", studies, "--batch", "--model", bundle, "--explain", "none",
                                "--workers", "0", "--out", tmp_path / "out"], capfd)
    assert code == 1, lines  # a batch with a failed study exits 1 (issue 29)
    assert "\x1b" not in out and "\x07" not in out and "\x1b" not in "".join(lines)
    errors = [line for line in out.splitlines() if line.strip().startswith("error")]
    assert len(errors) == 1 and errors[0].strip().startswith("error  a:"), out
    assert not any(line.strip().startswith("ok  forged") for line in out.splitlines()), out


def test_study_folder_with_control_characters_is_refused(tmp_path, bundle, capfd):
    studies = tmp_path / "in"
    (studies / "a\x1b[2J\nforged").mkdir(parents=True)
    code, lines, _ = run_cli(["analyze", studies, "--batch", "--model", bundle, "--out", tmp_path / "out"], capfd)
    assert_refused(code, lines, "control characters")
    assert "\x1b" not in lines[0]


def test_slicer_findings_table_strips_control_characters():
    pytest.importorskip("vtk")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FMCT"))
    from FMCTLib import outputs

    table = outputs._findingsTable([{"name": "bleed", "description": "Bleed\x1b[2J\nforged\trow", "probability": 0.5,
                                     "threshold": 0.5, "positive": True}])
    assert table.GetColumnByName("description").GetValue(0) == "Bleed[2J forged row"


# ============================================================================ one study folder, one writer (item 7)
def test_second_analyze_on_the_same_out_is_refused(tmp_path, ct_file, bundle, no_model, capfd):
    """While one `fmct analyze` holds --out (its study lock), a second one exits 2 before its model runs."""
    from fmct.inference.study_folder import locked_study_folder

    out = tmp_path / "out"
    with locked_study_folder(out):  # the first run, writing now
        no_model()
        code, lines, _ = run_cli(["analyze", ct_file, "--model", bundle, "--explain", "none", "--out", out], capfd)
    assert_refused(code, lines, "another fmct process is writing into", out)


def test_single_analyze_takes_the_lock_a_batch_takes(tmp_path, ct_file, bundle, no_model, capfd):
    """A batch analyzing study 'a' into out/a holds out/.fmct-locks/a.lock: `fmct analyze --out out/a` waits its turn."""
    import fcntl

    from fmct.inference.study_folder import LOCK_DIR

    out = tmp_path / "out"
    (out / LOCK_DIR).mkdir(parents=True)
    with open(out / LOCK_DIR / "a.lock", "a+") as held:  # what run_batch holds while it does study a
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        no_model()
        code, lines, _ = run_cli(["analyze", ct_file, "--model", bundle, "--explain", "none", "--out", out / "a"], capfd)
    assert_refused(code, lines, "another fmct process", out / "a")


def test_the_lock_is_released_after_a_run(tmp_path, ct_file, bundle, capfd):
    out = tmp_path / "out"
    for _ in range(2):  # the second run finds the lock free (and the same study: no --overwrite needed)
        code, lines, _ = run_cli(["analyze", ct_file, "--model", bundle, "--explain", "none", "--out", out], capfd)
        assert code == 0, lines


# ============================================================================ names the file system refuses (item 15)
def _study_named_summary(d: Path) -> Path:
    (d / "in").mkdir()
    write_volume(small_ct(), d / "in" / "summary.csv.nii.gz")
    return d / "in"


def _manifest_id_summary(d: Path) -> Path:
    write_volume(small_ct(), d / "ct.nii.gz")
    (d / "m.csv").write_text("study_id,path\nsummary.csv,ct.nii.gz\n")
    return d / "m.csv"


def _link_to_folder_as_ct(d: Path) -> Path:
    (d / "elsewhere").mkdir()
    (d / "out").mkdir()
    (d / "out" / "ct.nii.gz").symlink_to(d / "elsewhere", target_is_directory=True)
    write_volume(small_ct(), d / "ct.nii.gz")
    return d / "ct.nii.gz"


def _folder_as_saliency(d: Path) -> Path:
    (d / "out" / "saliency_bleed.nii.gz").mkdir(parents=True)
    write_volume(small_ct(), d / "ct.nii.gz")
    return d / "ct.nii.gz"


def _plain_ct(d: Path) -> Path:
    write_volume(small_ct(), d / "ct.nii.gz")
    return d / "ct.nii.gz"


NAME_CASES = [
    Case("study-named-summary.csv", _study_named_summary, "summary.csv", ["--batch"]),
    Case("manifest-id-summary.csv", _manifest_id_summary, "summary.csv"),
    Case("out-component-300-chars", _plain_ct, "at most 255", ["--out", "{d}/" + "x" * 300]),
    Case("out-ct.nii.gz-links-to-a-folder", _link_to_folder_as_ct, "ct.nii.gz is a folder", ["--save-ct"]),
    Case("out-saliency-is-a-folder", _folder_as_saliency, "is a folder", ["--findings", "all", "--explain", "attention"]),
]


@pytest.mark.parametrize("case", [c.param() for c in NAME_CASES])
def test_unusable_names_are_refused_before_the_model_runs(case: Case, tmp_path, bundle, no_model, capfd):
    path = case.build(tmp_path)
    no_model()
    args = [a.format(d=tmp_path) for a in case.args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    if "--explain" not in args:
        args += ["--explain", "none"]
    code, lines, _ = run_cli(["analyze", path, "--model", bundle, *args], capfd)
    assert_refused(code, lines, case.words, tmp_path / "out")
    if (tmp_path / "elsewhere").exists():
        assert not any((tmp_path / "elsewhere").iterdir())  # nothing written through the link


def test_a_255_character_study_folder_is_analyzed(tmp_path, bundle, capfd):
    """The study's folder name is legal; its lock, <name>.lock, would not be: it gets a shortened, hashed name."""
    from fmct.reading.dicom import write_dicom_series

    name = "s" * 255
    write_dicom_series(small_ct(), tmp_path / "in" / name)
    out = tmp_path / "out"
    code, lines, stdout = run_cli(["analyze", tmp_path / "in", "--batch", "--model", bundle, "--explain", "none",
                                   "--workers", "0", "--out", out], capfd)
    assert code == 0, lines
    assert (out / name / "findings.json").is_file(), stdout
    assert "1 ok, 0 error" in stdout


# ============================================================================ full disk, verified writes (items 8, 13)
@pytest.fixture
def small_disk(tmp_path):
    """A real small disk: a tmpfs mounted on a folder, so writes fail (or, with SimpleITK, silently stop) with
    ENOSPC exactly as on a full disk. Mounting needs root (the CI machine runs the suite as root); elsewhere
    the tests that need one are skipped with that reason."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"a full disk is a mounted tmpfs, which needs root: {made.stderr.strip()[:100]}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill the disk up to `leave` bytes free."""
    import shutil

    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def noisy_ct():
    """A CT whose gzipped NIfTI is ~100 KB (noise does not compress), more than the disk leaves. The noise
    is in the air around the head only, so the head checks (skull, calibration) still pass and the model runs."""
    ct = small_ct()
    noise = np.random.default_rng(0).normal(0, 200, ct.array.shape)
    return ct.with_array(np.where(ct.array < -500, ct.array + noise, ct.array).astype(np.int16))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_full_disk_in_a_single_analysis(tmp_path, small_disk, bundle, capfd):
    """SimpleITK leaves a truncated ct.nii.gz and returns: the read-back catches it, exit 2, nothing kept."""
    write_volume(noisy_ct(), tmp_path / "ct.nii.gz")
    out = small_disk / "out"
    out.mkdir()
    fill(small_disk, 48 << 10)
    code, lines, _ = run_cli(["analyze", tmp_path / "ct.nii.gz", "--model", bundle, "--explain", "none", "--save-ct",
                              "--out", out], capfd)
    assert code == 2 and lines[-1].startswith("fmct: error: ") and "is full" in lines[-1], lines  # after the model's bar
    assert not any("Traceback" in line for line in lines)
    assert str(out) in lines[-1] and "free there" in lines[-1] and "needs about" in lines[-1]
    assert _leftovers(out) == []  # no ct.nii.gz, no report.png, no temp file


def test_the_same_analysis_with_room_succeeds(tmp_path, small_disk, bundle, capfd):
    """The refusal above is for the full disk alone: with room, the same command writes a verified folder."""
    write_volume(noisy_ct(), tmp_path / "ct.nii.gz")
    out = small_disk / "out"
    code, lines, _ = run_cli(["analyze", tmp_path / "ct.nii.gz", "--model", bundle, "--explain", "none", "--save-ct",
                              "--out", out], capfd)
    assert code == 0, lines
    assert _leftovers(out) == ["ct.nii.gz", "findings.json", "report.png"]


def test_full_disk_when_the_batch_writes_its_summary(tmp_path, small_disk, bundle, capfd):
    studies = tmp_path / "in"
    studies.mkdir()
    for name in ("a", "b"):
        write_volume(small_ct(), studies / f"{name}.nii.gz")
    out = small_disk / "out"
    argv = ["analyze", studies, "--batch", "--model", bundle, "--explain", "none", "--workers", "0", "--out", out]
    assert run_cli(argv, capfd)[0] == 0
    before = (out / "summary.csv").read_bytes()
    fill(small_disk, 0)  # the studies are done (skipped on resume); only summary.csv is written again
    code, lines, _ = run_cli(argv, capfd)
    assert code == 2 and lines[-1].startswith("fmct: error: ") and "is full" in lines[-1], lines
    assert str(out) in lines[-1]
    assert (out / "summary.csv").read_bytes() == before  # the old summary whole, never a half-written one
    assert not [n for n in _leftovers(out) if n.endswith(".tmp")]


@pytest.mark.slow
def test_full_disk_when_pretraining_writes_a_checkpoint(tmp_path, small_disk):
    """`fmct pretrain` into a 1 MB disk: the first checkpoint does not fit; exit 2, one line, no checkpoint kept."""
    import subprocess
    import sys

    import yaml
    from safetensors.torch import save_file

    from fmct.train.pretrain import make_phantom_tensors

    data = tmp_path / "x.safetensors"
    save_file({"x": make_phantom_tensors(4, 0, (6, 6, 6), (32, 32, 32), in_plane_size=64)}, str(data))
    cfg = {"encoder": {"preset": "tiny", "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2,
                                                       "img_size": [32, 32, 32], "patch_size": [8, 8, 8]}},
           "data": {"source": "tensors", "path": str(data), "spacing_mm": [6, 6, 6], "size": [32, 32, 32]},
           "crops": {"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 2},
           "dino": {"out_dim": 4096, "hidden_dim": 64, "bottleneck_dim": 32, "warmup_teacher_temp_steps": 1},
           "optim": {"batch_size": 2, "steps": 2, "warmup_steps": 1},
           "run": {"seed": 0, "checkpoint_every": 1, "num_threads": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = small_disk / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "fmct.cli", "pretrain", "--config", str(tmp_path / "cfg.yaml"),
                           "--out", str(run), "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and "is full" in errors[0] and str(run / "checkpoints") in errors[0], done.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert not [p.name for p in ckpts.iterdir()] if ckpts.exists() else True  # no checkpoint, no temp file


# A written file is read back before it gets its name: each way a file can be cut short is caught.
def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bad_crc(data: bytes) -> bytes:
    return data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]  # the gzip trailer's CRC-32


def _short_stream(data: bytes) -> bytes:
    """A complete gzip stream of a NIfTI that lost its last voxels (a writer that stopped, then closed cleanly)."""
    import gzip

    return gzip.compress(gzip.decompress(data)[:-100])


@pytest.mark.parametrize("damage, words", [(_cut, "does not read back"), (_bad_crc, "does not read back"),
                                           (_short_stream, "header announces")])
def test_a_damaged_nifti_is_caught_on_read_back(tmp_path, damage, words):
    from fmct.inference.study_folder import _Incomplete, verify_written

    path = write_volume(noisy_ct(), tmp_path / "ct.nii.gz")
    verify_written(path)  # whole: passes
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(_Incomplete, match=words):
        verify_written(path)


@pytest.mark.parametrize("damage, words", [(_cut, "end chunk|CRC"), (lambda d: d[:40] + b"\0" + d[41:], "CRC")])
def test_a_damaged_png_is_caught_on_read_back(tmp_path, damage, words):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmct.inference.study_folder import _Incomplete, verify_written

    fig = plt.figure(figsize=(2, 2))
    fig.savefig(tmp_path / "r.png")
    plt.close(fig)
    verify_written(tmp_path / "r.png")
    (tmp_path / "r.png").write_bytes(damage((tmp_path / "r.png").read_bytes()))
    with pytest.raises(_Incomplete, match=words):
        verify_written(tmp_path / "r.png")


# ============================================================================ fine-tuning inputs (items 10, 17)
@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory) -> Path:
    from fmct.phantom import write_phantom_set

    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(root, 12, seed=3, slices="thick", in_plane_size=64)
    return root


def _copy_set(src: Path, d: Path, edit: Callable[[list[list[str]]], None] | None = None) -> Path:
    """The phantom set's labels.csv copied beside links to its CTs, with its rows edited."""
    import csv

    root = d / "set"
    root.mkdir()
    for case in src.iterdir():
        if case.is_dir():
            (root / case.name).symlink_to(case, target_is_directory=True)
    rows = list(csv.reader((src / "labels.csv").open()))
    if edit is not None:
        edit(rows)
    with (root / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def _typo(rows):
    col = rows[0].index("subdural")
    rows[3][col] = "yes"


def _drop_column(name):
    def edit(rows):
        col = rows[0].index(name)
        for r in rows:
            del r[col]
    return edit


def _rename_column(old, new):
    def edit(rows):
        rows[0][rows[0].index(old)] = new
    return edit


FINETUNE_CASES = [
    Case("label-typo-yes", lambda d: _copy_set(d.parent / "src", d, _typo), "line 4: column 'subdural' holds 'yes'"),
    Case("task-without-labels", lambda d: _copy_set(d.parent / "src", d, _drop_column("subdural")),
         "task 'subdural' has no labels", ["--tasks", "subdural"]),
    Case("validation-without-positives", lambda d: _copy_set(d.parent / "src", d), "no positive for task 'any_hemorrhage'",
         ["--tasks", "any_hemorrhage"]),  # seed 0's 3-study validation split holds no bleed (see the test below)
    Case("task-not-an-identifier", lambda d: _copy_set(d.parent / "src", d, _rename_column("subdural", "sub dural")),
         "task 'sub dural'", ["--tasks", "sub dural"]),
    Case("epochs-0", lambda d: _copy_set(d.parent / "src", d), "epochs is 0", ["--epochs", "0"]),
    Case("batch-size-0", lambda d: _copy_set(d.parent / "src", d), "batch_size is 0", ["--batch-size", "0"]),
    Case("lr-negative", lambda d: _copy_set(d.parent / "src", d), "lr is -1", ["--lr", "-1"]),
    Case("lr-nan", lambda d: _copy_set(d.parent / "src", d), "lr is nan", ["--lr", "nan"]),
    Case("name-with-slash", lambda d: _copy_set(d.parent / "src", d), "name", ["--name", "../x"]),
    Case("out-is-the-encoder", lambda d: _copy_set(d.parent / "src", d), "would replace the encoder",
         ["--encoder", "{d}/enc", "--out", "{d}/enc"]),
    Case("out-holds-the-encoder", lambda d: _copy_set(d.parent / "src", d), "would replace the encoder",
         ["--encoder", "{d}/enc", "--out", "{d}"]),
]


@pytest.mark.parametrize("case", [c.param() for c in FINETUNE_CASES])
def test_bad_finetune_input_is_refused_before_training(case: Case, tmp_path, phantom_set, monkeypatch, capfd):
    import fmct.train.finetune

    (tmp_path / "src").symlink_to(phantom_set, target_is_directory=True)
    work = tmp_path / "w"
    work.mkdir()
    data = case.build(work)
    encoder = tiny_bundle(work / "enc", tasks=())[0]
    before = (encoder / "model.safetensors").read_bytes()
    monkeypatch.setattr(fmct.train.finetune, "train_classifier", lambda *a, **k: pytest.fail("training started"))
    args = [a.format(d=work) for a in case.args]
    if "--out" not in args:
        args += ["--out", str(work / "ft")]
    if "--encoder" not in args:
        args += ["--encoder", str(encoder)]
    if "--tasks" not in args:
        args += ["--tasks", "subdural"]
    code, lines, _ = run_cli(["finetune", "--data", data, "--device", "cpu", "--cache-dir", work / "cache", *args], capfd)
    assert code == 2, lines
    assert lines[-1].startswith("fmct: error: ") and case.words.lower() in lines[-1].lower(), lines
    assert not any("Traceback" in line for line in lines)
    assert (encoder / "model.safetensors").read_bytes() == before


def test_the_validation_case_is_about_the_split(phantom_set):
    """The validation case above refuses for its split alone: seed 0 puts no bleed among its 3 validation studies."""
    from fmct.data.manifests import load_manifest
    from fmct.train.finetune import split

    train, val = split(load_manifest(str(phantom_set)), 0.25, 0)
    assert [s.labels["any_hemorrhage"] for s in val] == [0, 0, 0]
    assert sum(s.labels["any_hemorrhage"] for s in train) >= 1


def test_bundle_json_has_no_nan_literals(tmp_path):
    """An undefined metric (AUROC of a one-class split) is written as null: fmct.json stays valid JSON."""
    from fmct.inference.bundle import read_meta, write_meta

    path, _, meta = tiny_bundle(tmp_path / "b")
    meta.metrics = {"validation": {"bleed": {"auroc": float("nan"), "n": 3, "ece": float("inf")}}}
    write_meta(meta, path)

    def refuse(name):
        raise AssertionError(f"{name} literal in fmct.json")
    raw = json.loads((path / "fmct.json").read_text(), parse_constant=refuse)
    assert raw["metrics"]["validation"]["bleed"] == {"auroc": None, "n": 3, "ece": None}
    assert read_meta(path).metrics["validation"]["bleed"]["auroc"] is None


# ============================================================================ manifests as spreadsheets save them (item 14)
def _manifest(text: str, encoding: str, bom: bytes = b""):
    def build(d: Path) -> Path:
        write_volume(small_ct(), d / "ct.nii.gz")
        (d / "m.csv").write_bytes(bom + text.encode(encoding))
        return d / "m.csv"
    return build


MANIFEST_READ = [
    Case("utf-8-bom", _manifest("study_id,path\nA,ct.nii.gz\n", "utf-8", b"\xef\xbb\xbf"), ""),
    Case("utf-16-excel-unicode-text", _manifest("study_id\tpath\r\nA\tct.nii.gz\r\n", "utf-16"), ""),  # BOM included
    Case("utf-16-be-bom", _manifest("study_id,path\nA,ct.nii.gz\n", "utf-16-be", b"\xfe\xff"), ""),
    Case("space-after-comma", _manifest("study_id, path\nA, ct.nii.gz\n", "utf-8"), ""),
]
MANIFEST_REFUSED = [
    Case("semicolons", _manifest("study_id;path\nA;ct.nii.gz\n", "utf-8"), "separates its columns with ';'"),
    Case("latin-1-path", _manifest("study_id,path\nA,Schädel/ct.nii.gz\n", "latin-1"), "latin-1"),
    Case("utf-16-without-bom", _manifest("study_id,path\nA,ct.nii.gz\n", "utf-16-le"), "utf-16"),
]


@pytest.mark.parametrize("case", [c.param() for c in MANIFEST_READ])
def test_spreadsheet_manifests_are_read(case: Case, tmp_path):
    from fmct.inference.batch import discover_studies

    studies = discover_studies(case.build(tmp_path))
    assert [(s.study_id, s.path) for s in studies] == [("A", tmp_path / "ct.nii.gz")]


@pytest.mark.parametrize("case", [c.param() for c in MANIFEST_REFUSED])
def test_unreadable_manifests_say_why(case: Case, tmp_path, bundle, no_model, capfd):
    path = case.build(tmp_path)
    no_model()
    code, lines, _ = run_cli(["analyze", path, "--model", bundle, "--explain", "none", "--out", tmp_path / "out"], capfd)
    assert_refused(code, lines, case.words, tmp_path / "out")
    assert "lacks column" not in lines[0]


def test_training_manifest_reads_the_same_spreadsheets(tmp_path):
    """fmct.data's manifests (finetune, evaluate, embed) go through the same reader."""
    from fmct.conventions.errors import ConfigError
    from fmct.data.manifests import manifest_from_csv

    (tmp_path / "m.csv").write_bytes("path\tsubdural\r\nct.nii.gz\t1\r\n".encode("utf-16"))
    m = manifest_from_csv(tmp_path / "m.csv")
    assert [(s.path, s.labels) for s in m] == [(tmp_path / "ct.nii.gz", {"subdural": 1})]
    (tmp_path / "m.csv").write_text("path;subdural\nct.nii.gz;1\n")
    with pytest.raises(ConfigError, match="';'"):
        manifest_from_csv(tmp_path / "m.csv")


def _latin1_named_ct(d: Path) -> Path:
    """A CT file whose name is Latin-1 bytes ('Schädel' as 0xE4), as copied from an older system."""
    write_volume(small_ct(), d / "ct.nii.gz")
    os.rename(d / "ct.nii.gz", os.fsencode(d) + b"/Sch\xe4del.nii.gz")
    return Path(os.fsdecode(os.fsencode(d) + b"/Sch\xe4del.nii.gz"))


@pytest.mark.skipif(os.name != "posix", reason="file names are bytes on POSIX only")
def test_a_latin1_file_name_is_refused_not_a_crash(tmp_path, bundle, no_model, capfd):
    """SimpleITK aborts the process (SIGABRT) on such a name: refused before it is reached."""
    path = _latin1_named_ct(tmp_path)
    no_model()
    code, lines, _ = run_cli(["analyze", path, "--model", bundle, "--explain", "none", "--out", tmp_path / "o"], capfd)
    assert_refused(code, lines, "byte 0xe4, which is not UTF-8", tmp_path / "o")
    assert "Sch\\xe4del.nii.gz" in lines[0]
    lines[0].encode("utf-8")  # what a terminal's strict UTF-8 encoder gets


@pytest.mark.skipif(os.name != "posix", reason="file names are bytes on POSIX only")
def test_a_latin1_study_is_an_error_row_and_the_batch_goes_on(tmp_path, bundle, capfd):
    studies = tmp_path / "in"
    studies.mkdir()
    _latin1_named_ct(studies)
    write_volume(small_ct(), studies / "plain.nii.gz")
    code, lines, out = run_cli(["analyze", studies, "--batch", "--model", bundle, "--explain", "none", "--workers", "0",
                                "--out", tmp_path / "out"], capfd)
    assert code == 1, lines  # a batch with a failed study exits 1 (issue 29)
    assert "1 ok, 1 error" in out and "not UTF-8" in out


def test_a_utf8_manifest_with_umlauts_reads_the_path_as_written(tmp_path):
    from fmct.inference.batch import discover_studies

    (tmp_path / "Schädel").mkdir()
    write_volume(small_ct(), tmp_path / "Schädel" / "ct.nii.gz")
    (tmp_path / "m.csv").write_text("study_id,path\nA,Schädel/ct.nii.gz\n", encoding="utf-8")
    assert discover_studies(tmp_path / "m.csv")[0].path == tmp_path / "Schädel" / "ct.nii.gz"


def test_log_lines_cannot_be_forged():
    """The CLI's log formatter: a name logged as a value loses its line breaks and escapes; the message keeps its own."""
    import logging

    from fmct.conventions.names import PrintableFormatter

    record = logging.LogRecord("fmct", logging.INFO, __file__, 1, "read %s\nnext line", ("ct\n\x1b[31mfmct: all clear",),
                               None)
    assert PrintableFormatter("%(message)s").format(record) == "read ct [31mfmct: all clear\nnext line"
