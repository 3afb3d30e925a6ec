"""The second step after the demo (issue 29 item 5): what a user does next works, or says what to do."""
import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmct.cli import build_parser, main
from fmct.conventions.runtime import parse_device
from fmct.data.manifests import load_manifest
from fmct.inference.batch import discover_studies
from fmct.reading.files import write_volume
from fmct_testing import ball_ct, tiny_bundle

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def nifti_set(tmp_path_factory):
    """The NIfTI set `fmct phantom --format nifti` writes: one folder per case (ct.nii.gz, masks), labels.csv."""
    out = tmp_path_factory.mktemp("second") / "set"
    assert main(["phantom", str(out), "--n", "3", "--seed", "5", "--size", "64", "--slices", "thick", "--format", "nifti"]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("second-bundle") / "b")[0]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("second-encoder") / "enc", tasks=())[0]


@pytest.fixture
def cts_with_unrelated_csv(nifti_set, tmp_path):
    """A folder of CTs that also holds a spreadsheet unrelated to them (no path, no id column)."""
    import shutil

    folder = tmp_path / "cts"
    folder.mkdir()
    for case in sorted(p for p in nifti_set.iterdir() if p.is_dir()):
        shutil.copy(case / "ct.nii.gz", folder / f"{case.name}.nii.gz")
    (folder / "labels.csv").write_text("patient_group,score\nA,3.5\nB,1.0\n")
    return folder


def test_an_unrelated_labels_csv_is_named_as_ignored_not_fatal(cts_with_unrelated_csv, caplog):
    with caplog.at_level(logging.WARNING):
        manifest = load_manifest(cts_with_unrelated_csv)
    assert [s.study_id for s in manifest] == ["phantom_00000", "phantom_00001", "phantom_00002"]
    assert all(s.path.suffix == ".gz" and s.labels == {} for s in manifest)
    assert any("labels.csv: ignored" in r.getMessage() for r in caplog.records)


def test_embed_on_a_folder_with_an_unrelated_labels_csv(cts_with_unrelated_csv, encoder, tmp_path):
    out = tmp_path / "f.npz"
    assert main(["embed", str(cts_with_unrelated_csv), "--model", str(encoder), "--out", str(out), "--device", "cpu"]) == 0
    with np.load(out) as f:
        assert sorted(str(s) for s in f["study_id"]) == ["phantom_00000", "phantom_00001", "phantom_00002"]


@pytest.mark.slow
def test_pretrain_on_a_folder_with_an_unrelated_labels_csv(cts_with_unrelated_csv, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", str(cts_with_unrelated_csv), "--out", str(run), "--max-steps", "1", "--batch-size", "2",
                 "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "crops.n_local=0",
                 "--device", "cpu"]) == 0
    assert len((run / "losses.jsonl").read_text().splitlines()) == 1


def test_one_folder_rule_for_batch_and_training(nifti_set, bundle, tmp_path):
    """`fmct analyze DIR --batch` reads the set `fmct phantom --format nifti` writes, as training does."""
    training = load_manifest(nifti_set)
    batch = discover_studies(nifti_set)
    assert [(s.study_id, s.path) for s in batch] == [(s.study_id, s.path) for s in training]
    assert all(s.path.name == "ct.nii.gz" for s in batch)
    # without labels.csv, each case folder is still a study: its ct.nii.gz, not its masks
    bare = tmp_path / "bare"
    for case in sorted(p for p in nifti_set.iterdir() if p.is_dir()):
        (bare / case.name).mkdir(parents=True)
        for f in case.iterdir():
            (bare / case.name / f.name).write_bytes(f.read_bytes())
    assert [s.path.name for s in discover_studies(bare)] == ["ct.nii.gz"] * 3
    assert [s.path for s in discover_studies(bare)] == [s.path for s in load_manifest(bare)]
    out = tmp_path / "out"
    assert main(["analyze", str(nifti_set), "--batch", "--model", str(bundle), "--out", str(out), "--explain", "none",
                 "--workers", "0", "--device", "cpu"]) == 0
    assert [r["status"] for r in _rows(out / "summary.csv")] == ["ok"] * 3
    # a manifest with case_id (what `fmct phantom` writes) is accepted like one with study_id
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case_id,path\n" + "".join(f"{s.study_id},{s.path}\n" for s in batch))
    assert [s.study_id for s in discover_studies(manifest)] == [s.study_id for s in batch]


def test_a_batch_with_failures_exits_1_and_no_rate_when_nothing_ran(bundle, tmp_path, capsys):
    root = tmp_path / "in"
    (root / "broken").mkdir(parents=True)
    (root / "broken" / "0001.dcm").write_bytes(b"DICM" + os.urandom(2000))
    args = ["analyze", str(root), "--batch", "--model", str(bundle), "--explain", "none", "--workers", "0", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 1
    printed = capsys.readouterr().out
    assert "0 ok, 1 error" in printed and "studies/h" not in printed
    ct, _ = ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0))
    write_volume(ct, root / "good.nii.gz")
    assert main([*args, "--out", str(tmp_path / "o2")]) == 1  # 0 only when every study succeeded
    printed = capsys.readouterr().out
    assert "1 ok, 1 error" in printed and "studies/h" in printed
    (root / "broken" / "0001.dcm").unlink()
    (root / "broken").rmdir()
    assert main([*args, "--out", str(tmp_path / "o2")]) == 0  # resumed: the good study skipped, nothing failed
    assert "studies/h" not in capsys.readouterr().out  # nothing ran


def test_analyze_on_a_folder_of_studies_suggests_batch(nifti_set, bundle, tmp_path, capsys):
    assert main(["analyze", str(nifti_set), "--model", str(bundle), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds 3 studies" in err and f"fmct analyze {nifti_set} --batch" in err and "--series" not in err
    loose = tmp_path / "loose"
    loose.mkdir()
    ct, _ = ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0))
    write_volume(ct, loose / "a.nii.gz")
    write_volume(ct, loose / "b.nrrd")
    assert main(["analyze", str(loose), "--model", str(bundle), "--out", str(tmp_path / "o")]) == 2
    assert "holds 2 studies" in capsys.readouterr().err
    assert not (tmp_path / "o" / "findings.json").exists()


def test_training_never_overwrites(nifti_set, encoder, tmp_path, capsys):
    bundle_dir = tmp_path / "ft"
    tiny_bundle(bundle_dir)
    before = (bundle_dir / "model.safetensors").read_bytes()
    assert main(["finetune", str(nifti_set), "--encoder", str(encoder), "--out", str(bundle_dir), "--epochs", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "already holds an earlier run" in err and "--overwrite" in err
    assert (bundle_dir / "model.safetensors").read_bytes() == before

    run = tmp_path / "run"
    run.mkdir()
    (run / "losses.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "notes.txt").write_text("mine")
    assert main(["pretrain", str(nifti_set), "--out", str(run), "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert (run / "losses.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'  # not truncated
    assert main(["pretrain", str(nifti_set), "--out", str(run), "--resume", "--overwrite"]) == 2

    from fmct.train.run_folder import check_training_out, clear_run

    check_training_out(tmp_path / "new", "pretrain")  # a new or empty folder is fine
    clear_run(run, ("losses.jsonl", "checkpoints"))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only the run's own files go


def test_export_onnx_without_onnxruntime_names_the_extra(bundle):
    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None\n"  # as if not installed
        "from fmct.cli import main\n"
        f"sys.exit(main(['export', {str(bundle)!r}, '--onnx']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'fmct[onnx]'" in proc.stderr and "onnxruntime" in proc.stderr and "Traceback" not in proc.stderr
    assert not (bundle / "model.onnx").exists()


def test_data_is_the_positional_argument_of_every_command_and_data_an_alias():
    parser = build_parser()
    for command, extra in (("analyze", []), ("embed", ["--model", "m", "--out", "o.npz"]), ("finetune", []),
                           ("evaluate", []), ("pretrain", ["--out", "r"])):
        from fmct.cli import _settle_data

        positional = parser.parse_args([command, "DIR", *extra])
        alias = parser.parse_args([command, "--data", "DIR", *extra])
        _settle_data(parser, positional)
        _settle_data(parser, alias)
        field = "input" if command == "analyze" else "data"
        assert getattr(positional, field) == getattr(alias, field) == "DIR", command
    with pytest.raises(SystemExit) as twice:
        main(["embed", "a", "--data", "b", "--model", "m", "--out", "o.npz"])
    assert twice.value.code == 2


@pytest.mark.slow
def test_device_gpu_debug_after_the_command_and_options_before_the_ct(bundle, tmp_path):
    assert parse_device("gpu") == "cuda" and parse_device("GPU:1") == "cuda:1"
    assert build_parser().parse_args(["demo", "--device", "gpu"]).device == "cuda"
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a CT at all")
    # a misspelt finding and a missing model are reported, not the unreadable CT: options come first
    proc = subprocess.run([sys.executable, "-m", "fmct.cli", "analyze", str(broken), "--model", str(bundle),
                           "--findings", "subdurall", "--out", str(tmp_path / "o"), "--debug"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2 and "unknown finding(s) subdurall" in proc.stderr
    assert "Traceback" in proc.stderr  # --debug after the command works as before it
    assert main(["analyze", str(tmp_path), "--batch", "--model", str(bundle), "--findings", "subdurall", "--out",
                 str(tmp_path / "batch")]) == 2  # a batch too: refused before any study is read
    assert not (tmp_path / "batch" / "summary.csv").exists()
    proc = subprocess.run([sys.executable, "-m", "fmct.cli", "analyze", str(broken), "--model", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2 and "Model bundle not found" in proc.stderr


def test_the_configs_the_readme_and_training_panel_name_exist_and_load():
    import re

    from fmct.conventions.config_file import EvaluateConfig
    from fmct.ssl.config import SSLConfig
    from fmct.train.finetune import FinetuneConfig
    from fmct.conventions.config_file import read_config_file

    named = set()
    for doc in (REPO / "README.md", REPO / "FMCTTraining" / "FMCTTraining.py"):
        named |= set(re.findall(r"Resources/Configs/[\w.-]+\.ya?ml", doc.read_text(encoding="utf-8")))
    assert {"Resources/Configs/finetune_tiny.yaml", "Resources/Configs/evaluate.yaml"} <= named
    for name in named:
        assert (REPO / name).is_file(), name
    FinetuneConfig.from_file(REPO / "Resources/Configs/finetune_tiny.yaml")
    EvaluateConfig.from_file_and_flags(REPO / "Resources/Configs/evaluate.yaml")
    SSLConfig.from_dict(read_config_file(REPO / "Resources/Configs/pretrain_tiny.yaml"))


def test_evaluate_table_header_and_probe_help():
    from fmct.features.metrics import format_table

    report = {"n": 4, "n_positive": 2, "auroc": 0.75, "auroc_ci95": [0.5, 1.0], "auprc": 0.8, "sensitivity": 1.0,
              "specificity": 0.5, "ece": 0.1}
    table = format_table({"in-distribution": {"any_hemorrhage": report}, "out-of-distribution": {"any_hemorrhage": report}})
    head = table.splitlines()[0]
    assert "ECEout" not in head and " ECE   out-of-distribution AUROC" in head
    assert len({len(line) for line in table.splitlines()}) == 1  # rows line up under the header
    probe_help = subprocess.run([sys.executable, "-m", "fmct.cli", "probe", "--help"], capture_output=True, text=True,
                                env={**_env(), "COLUMNS": "200"}, timeout=60).stdout
    assert "95% CI" in probe_help and "%%" not in probe_help


def test_report_png_outlines_the_saliency_with_a_colour_bar_and_an_honest_title(tmp_path):
    """The lesion stays visible under the saliency: inside it, most pixels are those of the CT alone."""
    from fmct.inference.analyze import Analyzer
    from fmct.inference.report_png import radiological_view, report_figure
    from fmct.inference.study_folder import SALIENCY_MAX

    ct, ball = ball_ct(shape_zyx=(24, 96, 96), spacing=(2.5, 2.5, 6.0), ball_radius_mm=22.0)
    bundle = tiny_bundle(tmp_path / "rb")[0]
    result = Analyzer(bundle, device="cpu").analyze(ct, explain_method="integrated_gradients", explain_findings="all")
    focus = result.primary_finding().name
    # a saliency map that covers the ball, peaking at its centre (the explanation of a found lesion)
    k, j, i = np.indices(ball.shape)
    centre = [np.mean(np.nonzero(ball)[a]) for a in range(3)]
    dist = np.sqrt(((k - centre[0]) * 6.0) ** 2 + ((j - centre[1]) * 2.5) ** 2 + ((i - centre[2]) * 2.5) ** 2)
    sal = np.clip(1.0 - dist / 30.0, 0, 1)
    result.saliency = {focus: ct.with_array((sal * SALIENCY_MAX).astype(np.uint8))}
    fig = report_figure(ct, result, "m")
    fig.canvas.draw()
    with_map = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    title = fig._suptitle.get_text()
    assert f"saliency outlines: {focus} (integrated_gradients)" in title and "(None)" not in title

    plain = dict(result.saliency)
    result.saliency = {}
    fig_ct = report_figure(ct, result, "m")
    fig_ct.canvas.draw()
    ct_only = np.asarray(fig_ct.canvas.buffer_rgba())[..., :3]
    result.saliency = plain
    # pixels of the ball's interior on the first slice panel: mostly unchanged by the overlay
    ax = fig.axes[0]
    view_ball = radiological_view(ct.with_array(ball.astype(np.uint8)))[0]
    k_shown = int(ax.get_title().split()[1].split("/")[0]) - 1
    rows, cols = np.nonzero(view_ball[k_shown])
    inside = [(r, c) for r, c in zip(rows, cols) if view_ball[k_shown][max(r - 2, 0):r + 3, max(c - 2, 0):c + 3].all()]
    assert len(inside) > 20
    height = with_map.shape[0]
    unchanged = 0
    for r, c in inside:
        x, y = ax.transData.transform((c, r))
        px, py = int(round(x)), int(round(height - y))
        unchanged += np.abs(with_map[py, px].astype(int) - ct_only[py, px].astype(int)).max() <= 8
    assert unchanged / len(inside) >= 0.7, unchanged / len(inside)  # a filled heat map changes them all


def test_report_title_without_a_saliency_map(tmp_path):
    from fmct.inference.analyze import Analyzer
    from fmct.inference.report_png import report_figure

    ct, _ = ball_ct(shape_zyx=(24, 64, 64), spacing=(3.0, 3.0, 6.0))
    bundle = tiny_bundle(tmp_path / "rb")[0]
    result = Analyzer(bundle, device="cpu").analyze(ct, explain_method=None)
    fig = report_figure(ct, result, "m")
    title = fig._suptitle.get_text()
    assert "(None)" not in title and "None" not in title
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)  # the CT's own scale then
