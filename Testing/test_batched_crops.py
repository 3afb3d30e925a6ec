"""Batched multi-crop (issue 30 item 3): the device path draws the per-sample path's parameters, so
without noise it gives the same views; with noise it stays a pure function of (seed, epoch, index, step).
Runs on CPU tensors here (the code is device-agnostic; the GPU figure is in benchmarks/run_gpu.sh)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fmct.data.cache import hu_to_int16, windows_to_channels
from fmct.preprocessing.spec import DEFAULT_WINDOWS
from fmct.ssl.augment import MultiCropAugmentation, collate_crops, sample_generator
from fmct.ssl.batched_crops import BatchedMultiCrop
from fmct.ssl.config import CropSection

CROPS = CropSection(global_size=(16, 16, 16), local_size=(8, 8, 8), n_local=3)
KEYS = [(7, 2, 11), (7, 2, 3), (7, 2, 5)]


def volumes() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 3, 24, 24, 24)


def test_without_noise_the_batch_equals_the_per_sample_views():
    cfg = dataclasses.replace(CROPS, noise_std=0.0)
    x = volumes()
    per_sample = collate_crops([MultiCropAugmentation(cfg)(x[b], sample_generator(*KEYS[b]), 3) for b in range(3)])
    batched = BatchedMultiCrop(cfg)(x, KEYS, 3)
    assert batched["global"].shape == (6, 3, 16, 16, 16) and batched["local"].shape == (9, 3, 8, 8, 8)
    for key in ("global", "local"):
        torch.testing.assert_close(batched[key], per_sample[key], rtol=0, atol=1e-6)
    no_local = BatchedMultiCrop(cfg)(x, KEYS, 0)
    assert no_local["local"].shape[0] == 0 and torch.equal(no_local["global"], batched["global"])


def test_with_noise_the_views_are_a_pure_function_of_the_keys():
    x = volumes()
    crop = BatchedMultiCrop(CROPS)
    a, b = crop(x, KEYS, 3, noise_key=(7, 40, 0)), crop(x, KEYS, 3, noise_key=(7, 40, 0))
    assert all(torch.equal(a[k], b[k]) for k in a)  # what a resumed run makes
    c = crop(x, KEYS, 3, noise_key=(7, 41, 0))
    assert not torch.equal(a["global"], c["global"])
    # the crops are the keys' (same parameters); only the noise fields differ, at levels below noise_std
    assert 0.0 < float((a["global"] - c["global"]).std()) < 2 ** 0.5 * CROPS.noise_std


def test_hu_input_gets_the_windows_on_its_device():
    torch.manual_seed(1)
    hu = torch.from_numpy(hu_to_int16((torch.rand(3, 24, 24, 24) * 1500 - 500).numpy()))
    cfg = dataclasses.replace(CROPS, noise_std=0.0)
    from_hu = BatchedMultiCrop(cfg, DEFAULT_WINDOWS)(hu, KEYS, 1)
    from_channels = BatchedMultiCrop(cfg)(windows_to_channels(hu, DEFAULT_WINDOWS), KEYS, 1)
    assert all(torch.equal(from_hu[k], from_channels[k]) for k in from_hu)


@pytest.mark.slow
def test_pretraining_with_device_crops_logs_the_losses_of_loader_crops(tmp_path):
    """run.crops: device (what CUDA runs pick by default) against loader, here on the CPU: without noise the
    same views reach the model, so the same losses; with noise a rerun repeats itself (resume stays exact)."""
    import numpy as np

    from fmct.ssl.config import SSLConfig
    from fmct.train.pretrain import TensorVolumes, pretrain

    raw = {"encoder": {"preset": "tiny", "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2,
                                                       "img_size": [32, 32, 32], "patch_size": [8, 8, 8]}},
           "data": {"spacing_mm": [6, 6, 6], "size": [32, 32, 32]},
           "crops": {"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 2, "noise_std": 0.0},
           "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "warmup_teacher_temp_steps": 2},
           "optim": {"batch_size": 2, "steps": 3, "warmup_steps": 1},
           "run": {"seed": 3, "checkpoint_every": 100, "num_threads": 1, "device": "cpu", "workers": 0}}
    torch.manual_seed(0)
    data = TensorVolumes(torch.rand(4, 3, 32, 32, 32).half())

    def losses(crops: str, noise: float, name: str) -> list[float]:
        cfg = {**raw, "crops": {**raw["crops"], "noise_std": noise}, "run": {**raw["run"], "crops": crops}}
        return [r["loss"] for r in pretrain(SSLConfig.from_dict(cfg), tmp_path / name, dataset=data).losses]

    np.testing.assert_allclose(losses("device", 0.0, "d"), losses("loader", 0.0, "l"), rtol=1e-5)
    assert losses("device", 0.01, "n1") == losses("device", 0.01, "n2")


@pytest.mark.slow
def test_device_crops_resume_exactly(tmp_path):
    """Cancelled after 2 of 4 steps and resumed, a run with device crops (and noise) logs the losses of one
    that never stopped: the crops come from (seed, epoch, index) and the noise from (seed, step, rank)."""
    from fmct.conventions.errors import Cancelled
    from fmct.ssl.config import SSLConfig
    from fmct.train.pretrain import TensorVolumes, pretrain

    raw = {"encoder": {"preset": "tiny", "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2,
                                                       "img_size": [32, 32, 32], "patch_size": [8, 8, 8]}},
           "data": {"spacing_mm": [6, 6, 6], "size": [32, 32, 32]},
           "crops": {"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 2},
           "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "warmup_teacher_temp_steps": 2},
           "optim": {"batch_size": 2, "steps": 4, "warmup_steps": 1},
           "run": {"seed": 3, "checkpoint_every": 100, "num_threads": 1, "device": "cpu", "workers": 0, "crops": "device"}}
    cfg = SSLConfig.from_dict(raw)
    torch.manual_seed(0)
    data = TensorVolumes(torch.rand(6, 3, 32, 32, 32).half())
    full = [r["loss"] for r in pretrain(cfg, tmp_path / "full", dataset=data).losses]
    done: list[float] = []
    with pytest.raises(Cancelled):
        pretrain(cfg, tmp_path / "cut", dataset=data, progress=lambda f, m: done.append(f), cancel=lambda: len(done) >= 2)
    resumed = pretrain(cfg, tmp_path / "cut", resume=True, dataset=data).losses
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == full
