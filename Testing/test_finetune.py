"""Fine-tuning on generated phantoms: from a pretrained encoder and from scratch, linear and full."""
import json

import pytest
import torch

from fmct.inference.analyze import Analyzer
from fmct.inference.bundle import load_bundle
from fmct.data.manifests import Study
from fmct.conventions.errors import ConfigError
from fmct.reading.files import read_volume
from fmct.models import FMCTClassifier
from fmct.phantom import write_phantom_set
from fmct.train.finetune import FinetuneConfig, few_label_subset, finetune
from fmct_testing import tiny_bundle, tiny_meta


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    write_phantom_set(root, 12, seed=3, slices="thick", in_plane_size=64)
    return root


def test_linear_probe_from_a_pretrained_encoder_makes_a_working_bundle(tmp_path, phantoms):
    encoder, enc_model, _ = tiny_bundle(tmp_path / "encoder", tasks=())
    cfg = FinetuneConfig(data=str(phantoms), out=str(tmp_path / "ft"), encoder=str(encoder), mode="linear",
                         tasks=["any_hemorrhage", "fracture"], epochs=2, batch_size=4, seed=3,
                         cache_dir=str(tmp_path / "cache"), device="cpu")
    seen = []
    path = finetune(cfg, progress=lambda f, m: seen.append(f)).bundle
    bundle = load_bundle(path)
    assert bundle.meta.task_names == ["any_hemorrhage", "fracture"]
    # linear probe: the encoder is exactly the pretrained one
    for k, v in enc_model.encoder.state_dict().items():
        torch.testing.assert_close(bundle.model.encoder.state_dict()[k], v)
    assert bundle.meta.provenance["config"]["mode"] == "linear"
    assert bundle.meta.metrics["validation"]["any_hemorrhage"]["n"] == 3
    assert seen[-1] == 1.0
    result = Analyzer(path, device="cpu").analyze(read_volume(next(phantoms.glob("*/ct.nii.gz"))), explain_method=None)
    assert len(result.findings) == 2
    # every fine-tuned bundle carries its out-of-distribution statistics, so analyze can judge each CT
    assert result.ood is not None and result.ood["threshold"] > 0


@pytest.mark.slow
def test_full_finetune_from_scratch_moves_every_layer(tmp_path, phantoms):
    cfg = FinetuneConfig(data=str(phantoms), out=str(tmp_path / "ft"), size="tiny", tasks=["any_hemorrhage"], seed=3,
                         epochs=1, batch_size=4, labels_per_class=2, cache_dir=str(tmp_path / "cache"), device="cpu")
    path = finetune(cfg).bundle
    meta = json.loads((path / "fmct.json").read_text())
    assert meta["provenance"]["data"]["n_train"] <= 4  # 2 positives + 2 negatives
    assert meta["provenance"]["initialisation"] == "random (from scratch)"


def test_layer_decay_groups():
    meta = tiny_meta()
    model = FMCTClassifier(meta.encoder, 2)
    groups = model.param_groups(0.05, 0.5)
    depth = meta.encoder.depth
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == sorted(0.5 ** (depth + 1 - layer) for layer in range(depth + 2))
    head = [g for g in groups if any(p is model.head.fc.weight for p in g["params"])][0]
    embed = [g for g in groups if any(p is model.encoder.patch_embed.proj.weight for p in g["params"])][0]
    assert head["lr_scale"] == 1.0 and embed["lr_scale"] == 0.5 ** (depth + 1)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim == 1 for p in g["params"]))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_few_label_subset_is_seeded_and_balanced():
    studies = [Study(f"s{i}", f"/x/{i}", {"a": i % 2, "b": int(i < 3)}) for i in range(20)]
    sub = few_label_subset(studies, ["a", "b"], 2, seed=1)
    assert sub == few_label_subset(studies, ["a", "b"], 2, seed=1)
    assert sum(s.labels["b"] == 1 for s in sub) >= 2 and sum(s.labels["a"] == 1 for s in sub) >= 2
    assert len(sub) <= 8


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="mode"):
        FinetuneConfig(mode="half")
    with pytest.raises(ConfigError, match="unknown field"):
        FinetuneConfig.from_dict({"data": "x", "epoch": 3})
    (tmp_path / "c.yaml").write_text("data: somewhere\nepochs: 3\n")
    assert FinetuneConfig.from_file(tmp_path / "c.yaml").epochs == 3


@pytest.mark.slow
def test_evaluate_bundle_in_and_out_of_distribution(tmp_path, phantoms):
    from fmct.train.evaluate_bundle import evaluate_bundle
    from fmct.inference.bundle import default_bundle_path

    ood = tmp_path / "ood"
    write_phantom_set(ood, 6, seed=4, slices="thin", in_plane_size=64, anatomy="ood")
    reports = evaluate_bundle(str(default_bundle_path()), str(phantoms), tmp_path / "ev", ood_data=str(ood),
                              device="cpu", cache_dir=str(tmp_path / "cache"), n_boot=50)
    assert set(reports) == {"in-distribution", "out-of-distribution"}
    assert reports["in-distribution"]["any_hemorrhage"]["n"] == 12
    assert reports["out-of-distribution"]["any_hemorrhage"]["n"] == 6
    saved = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert saved["reports"]["in-distribution"]["subdural"]["n"] == 12
    assert (tmp_path / "ev" / "roc.png").stat().st_size > 10_000
    assert "out-of-distribution AUROC" in (tmp_path / "ev" / "report.txt").read_text()


@pytest.mark.slow
def test_a_cancelled_finetune_resumes_from_its_checkpoints_to_the_same_bundle(tmp_path, phantoms):
    from fmct.conventions.errors import Cancelled

    encoder, _, _ = tiny_bundle(tmp_path / "encoder", tasks=())             # 2 blocks, small grid: fast

    def cfg(name, checkpoints=None):
        return FinetuneConfig(data=str(phantoms), out=str(tmp_path / name), encoder=str(encoder), tasks=["any_hemorrhage"], seed=3,
                              epochs=2, batch_size=4, augment=0.5, cache_dir=str(tmp_path / "cache"), device="cpu",
                              checkpoints=checkpoints)

    whole = load_bundle(finetune(cfg("whole")).bundle)
    first = tmp_path / "ckpt" / "ckpt-00000001.json"
    with pytest.raises(Cancelled):                         # cut as epoch 2 starts
        finetune(cfg("cut", str(tmp_path / "ckpt")), cancel=first.is_file)
    assert not (tmp_path / "cut").exists() and sorted(p.name for p in first.parent.glob("*.json")) == [first.name, "last.json"]
    resumed = load_bundle(finetune(cfg("cut", str(tmp_path / "ckpt"))).bundle)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert resumed.meta.provenance["training"]["losses"] == whole.meta.provenance["training"]["losses"]
    with pytest.raises(ConfigError, match="other settings"):
        finetune(FinetuneConfig(**{**cfg("x", str(tmp_path / "ckpt")).__dict__, "lr": 1e-3}))
