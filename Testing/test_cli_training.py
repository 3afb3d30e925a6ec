"""The README's training example end to end through the `fmct` command, on generated phantoms:
phantom -> pretrain (self-supervised, on the CTs as a manifest) -> finetune from that encoder -> evaluate."""
import json

from fmct.bundle import load_bundle
from fmct.cli import main

PRETRAIN_YAML = """
encoder: {preset: tiny, overrides: {embed_dim: 48, depth: 2, num_heads: 2, img_size: [32, 32, 32]}}
data: {source: manifest, path: PHANTOMS, cache_dir: CACHE, spacing_mm: [6, 6, 6], size: [32, 32, 32]}
crops: {global_size: [32, 32, 32], local_size: [16, 16, 16], n_local: 2}
dino: {out_dim: 128, hidden_dim: 64, bottleneck_dim: 32}
optim: {batch_size: 2, steps: 4}
run: {seed: 1, checkpoint_every: 2}
"""


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
