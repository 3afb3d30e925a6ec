"""The supervised loop behind `fmct finetune` and the demo recipe: a killed run resumes exactly."""
import pytest
import torch

from fmct.conventions.errors import Cancelled, ConfigError
from fmct.models import FMCTClassifier, preset
from fmct.train.supervised import SupervisedConfig, positive_weights, tensor_batches, train_classifier

CFG = SupervisedConfig(epochs=3, batch_size=4, lr=1e-3, warmup_epochs=1, seed=5)


def _model() -> FMCTClassifier:
    torch.manual_seed(0)
    return FMCTClassifier(preset("tiny", img_size=(16, 16, 16), in_chans=2, patch_size=(8, 8, 8), embed_dim=32, depth=2,
                                 num_heads=2, drop_path_rate=0.1), 3)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 2, 16, 16, 16, generator=g)
    y = (torch.rand(10, 3, generator=g) < 0.5).float()
    y[0, 1] = float("nan")                                             # an unknown label, masked out
    return x, y


def _train(folder, cfg=CFG, cancel=None):
    x, y = _data()
    batches, steps = tensor_batches(x, y, cfg.batch_size, cfg.seed)
    model = _model()
    losses = train_classifier(model, batches, steps, positive_weights(y, cfg.max_pos_weight), cfg,
                              torch.device("cpu"), cancel=cancel, checkpoints=folder)
    return model, losses


def test_a_killed_run_resumes_exactly_where_it_stopped(tmp_path):
    whole, whole_losses = _train(tmp_path / "whole")
    calls = iter(range(10_000))
    with pytest.raises(Cancelled):                                     # killed in epoch 2 (3 batches per epoch)
        _train(tmp_path / "cut", cancel=lambda: next(calls) >= 4)
    assert sorted(p.name for p in (tmp_path / "cut").glob("ckpt-*.json")) == ["ckpt-00000001.json"]
    resumed, resumed_losses = _train(tmp_path / "cut")
    assert resumed_losses == whole_losses and len(whole_losses) == 3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name                                 # bit for bit, DropPath and augmentation included
    again, again_losses = _train(tmp_path / "cut")                     # a finished run resumes to its end at once
    assert again_losses == whole_losses and torch.equal(next(again.parameters()), next(whole.parameters()))


def test_a_checkpoint_from_other_settings_is_refused(tmp_path):
    _train(tmp_path / "run")
    with pytest.raises(ConfigError, match="other settings"):
        _train(tmp_path / "run", cfg=SupervisedConfig(**{**CFG.__dict__, "lr": 2e-3}))
