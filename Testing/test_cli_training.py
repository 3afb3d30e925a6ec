"""The README's training example end to end through the `fmct` command, on generated phantoms:
phantom -> pretrain (self-supervised, on the CTs as a manifest) -> finetune from that encoder -> evaluate."""
import json

import pytest

from fmct.inference.bundle import load_bundle
from fmct.cli import main

PRETRAIN_YAML = """
encoder: {preset: tiny, overrides: {embed_dim: 48, depth: 2, num_heads: 2, img_size: [32, 32, 32]}}
data: {source: manifest, path: PHANTOMS, cache_dir: CACHE, spacing_mm: [6, 6, 6], size: [32, 32, 32]}
crops: {global_size: [32, 32, 32], local_size: [16, 16, 16], n_local: 2}
dino: {out_dim: 128, hidden_dim: 64, bottleneck_dim: 32}
optim: {batch_size: 2, steps: 4}
run: {seed: 1, checkpoint_every: 2}
"""


@pytest.mark.slow
def test_pretrain_finetune_evaluate(tmp_path, capsys):
    phantoms, cache = tmp_path / "phantoms", tmp_path / "cache"
    assert main(["phantom", str(phantoms), "--n", "10", "--seed", "8", "--size", "64", "--slices", "thick"]) == 0
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(PRETRAIN_YAML.replace("PHANTOMS", str(phantoms)).replace("CACHE", str(cache)))

    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    encoder = tmp_path / "run" / "bundle"
    assert load_bundle(encoder).meta.tasks == []

    assert main(["finetune", "--data", str(phantoms), "--encoder", str(encoder), "--out", str(tmp_path / "ft"),
                 "--tasks", "any_hemorrhage,subdural", "--epochs", "2", "--batch-size", "4", "--device", "cpu",
                 "--cache-dir", str(cache)]) == 0
    tuned = load_bundle(tmp_path / "ft")
    assert tuned.meta.task_names == ["any_hemorrhage", "subdural"]
    assert tuned.meta.provenance["encoder_bundle"] == load_bundle(encoder).meta.name

    assert main(["evaluate", "--model", str(tmp_path / "ft"), "--data", str(phantoms), "--out", str(tmp_path / "ev"),
                 "--device", "cpu", "--cache-dir", str(cache), "--n-boot", "50"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["reports"]["in-distribution"]["any_hemorrhage"]["n"] == 10
    assert "AUROC [95% CI]" in capsys.readouterr().out


def test_training_commands_refuse_bad_configs(tmp_path, capsys):
    assert main(["finetune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["evaluate", "--model", "x"]) == 2
    assert "needs --data" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: manifest}\n")
    assert main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "data.path" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_data_out_max_steps_with_defaults(tmp_path, capsys):
    """The training door a researcher guesses: `fmct pretrain DATA --out RUN`, the tiny recipe by default."""
    from fmct.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    assert help_text.startswith("usage: fmct pretrain") and "--max-steps" in help_text and "--config" in help_text
    phantoms = tmp_path / "phantoms"
    assert main(["phantom", str(phantoms), "--n", "4", "--seed", "3", "--size", "64", "--slices", "thick"]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", str(phantoms), "--out", str(run), "--max-steps", "2", "--batch-size", "2", "--no-progress",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "crops.n_local=0", "--device", "cpu"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["source"] == "manifest" and config["data"]["path"] == str(phantoms)
    assert config["optim"]["steps"] == 2 and config["optim"]["batch_size"] == 2 and config["crops"]["n_local"] == 0
    assert config["dino"]["sinkhorn_queue"] == 256 and config["crops"]["global_size"] == [48, 48, 48]  # the tiny recipe
    assert len((run / "losses.jsonl").read_text().splitlines()) == 2
    bundle = load_bundle(run / "bundle")
    assert bundle.meta.tasks == [] and list(bundle.meta.preprocessing.size) == config["data"]["size"]
    assert "fmct embed" in capsys.readouterr().out
    assert main(["embed", str(phantoms), "--model", str(run / "bundle"), "--out", str(tmp_path / "f.npz"), "--device", "cpu"]) == 0
    assert main(["pretrain", str(tmp_path / "nowhere"), "--out", str(run)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(run), "--set", "optim.lr"]) == 2


def test_typed_config_converts_yaml_number_strings_and_refuses_the_rest(tmp_path, capsys):
    """PyYAML reads `lr: 1e-4` as the string '1e-4': converted; `lr: fast` refused naming the key."""
    from fmct.ssl.config import SSLConfig
    from fmct.train.finetune import FinetuneConfig

    good = tmp_path / "ft.yaml"
    good.write_text("data: somewhere\nlr: 1e-4\nepochs: 3\ntasks: any_hemorrhage,subdural\n")
    cfg = FinetuneConfig.from_file(good)
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.epochs == 3 and cfg.tasks == ["any_hemorrhage", "subdural"]
    assert SSLConfig.from_dict({"optim": {"lr": "1e-4", "steps": "20"}}).optim.lr == 1e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: somewhere\nlr: fast\n")
    assert main(["finetune", "--config", str(bad)]) == 2
    assert "'finetune.lr' must be a number" in capsys.readouterr().err
    bad.write_text("data: somewhere\nepochs: 2.5\n")
    assert main(["finetune", "--config", str(bad)]) == 2
    assert "whole number" in capsys.readouterr().err
