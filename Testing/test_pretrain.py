"""Pretraining loop: checkpoints, exact resume after SIGKILL, Ctrl-C, the task-less bundle, and a
real two-process gloo DDP job. Runs the loop as `python -m fmct.train.pretrain` subprocesses."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fmct.conventions.errors import ConfigError
from fmct.train import checkpoint as ckpt
from fmct.train.pretrain import make_phantom_tensors

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
STEPS = 8


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A dozen phantoms preprocessed to 32^3 at 6 mm, stored once for every run of this module."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("pretrain-data") / "phantoms.safetensors"
    save_file({"x": make_phantom_tensors(12, 0, (6, 6, 6), (32, 32, 32), in_plane_size=64)}, str(path))
    return path


def write_config(folder: Path, data: Path, steps: int = STEPS, **run) -> Path:
    cfg = {
        "encoder": {"preset": "tiny", "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2,
                                                    "img_size": [32, 32, 32], "patch_size": [8, 8, 8]}},
        "data": {"source": "tensors", "path": str(data), "spacing_mm": [6, 6, 6], "size": [32, 32, 32]},
        "crops": {"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 2},
        "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "warmup_teacher_temp_steps": 4},
        "mae": {"enabled": True},
        "optim": {"batch_size": 2, "steps": steps, "warmup_steps": 2},
        "run": {"seed": 3, "checkpoint_every": 2, "num_threads": 1, **run},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


# `python -m fmct.train.pretrain` with each step paced by main()'s on_step hook, so a kill lands mid-run
PACED = ("import sys, time; from fmct.train.pretrain import main; "
         "sys.exit(main(sys.argv[2:], on_step=lambda f, m: time.sleep(float(sys.argv[1]))))")


def start(config: Path, out: Path, *extra: str, sleep: float = 0.0) -> subprocess.Popen:
    program = ["-c", PACED, str(sleep)] if sleep else ["-m", "fmct.train.pretrain"]
    return subprocess.Popen([sys.executable, *program, "--config", str(config), "--out", str(out),
                             "--no-progress", *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the expected point: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


# ----------------------------------------------------------------------------------- checkpoint unit tests
def test_optimizer_and_rng_roundtrip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
    o_tensors, o_meta = ckpt.optimizer_state(opt)
    assert "optim.state.0.exp_avg" in o_tensors and "optim.state.0.exp_avg_sq" in o_tensors
    r_tensors, r_meta = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.save_checkpoint(tmp_path, 5, {**{f"model.{k}": v for k, v in model.state_dict().items()}, **o_tensors, **r_tensors},
                         {"optimizer": o_meta, "rng": r_meta})
    found = ckpt.load_checkpoint(tmp_path)
    assert found.step == 5 and json.loads((tmp_path / "last.json").read_text())["step"] == 5
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt.load_optimizer_state(opt2, found.tensors, found.meta["optimizer"])
    for p in model.parameters():
        a, b = opt.state[p], opt2.state[p]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    ckpt.set_rng_state(found.tensors, found.meta["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_checkpoint_keeps_newest_and_ignores_temp_files(tmp_path):
    assert ckpt.load_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {}, keep=2)
    (tmp_path / ".ckpt-00000008.safetensors.abc.tmp").write_bytes(b"half a file")  # what a kill can leave
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.json")) == ["ckpt-00000004.json", "ckpt-00000006.json"]
    found = ckpt.load_checkpoint(tmp_path)
    assert found.step == 6 and torch.equal(found.tensors["w"], torch.full((2,), 6.0))
    (tmp_path / "ckpt-00000006.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="not a complete"):
        ckpt.load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------- the loop, end to end
@pytest.mark.slow
def test_sigkill_resume_gives_the_same_losses(tmp_path, data_file):
    """Kill -9 right after a checkpoint, resume, and match an uninterrupted run with the same seed."""
    config = write_config(tmp_path, data_file)
    full = start(config, tmp_path / "full")  # runs alongside the one we kill
    killed_run = tmp_path / "killed"
    killed = start(config, killed_run, sleep=0.3)
    last = killed_run / "checkpoints" / "last.json"
    wait_for(last.exists, killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    k = json.loads(last.read_text())["step"]
    assert 2 <= k < STEPS - 3, k
    rc, log = finish(full)
    assert rc == 0, log

    rc, log = finish(start(config, killed_run, "--resume"))
    assert rc == 0, log
    expected, resumed = losses(tmp_path / "full"), losses(killed_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # no step lost or repeated in the log
    steps = [k + 1, k + 2, k + 3]
    np.testing.assert_allclose([resumed[s] for s in steps], [expected[s] for s in steps], rtol=1e-6)

    # the run's outputs: resolved config with seed, and a task-less bundle of encoder.* weights
    from fmct.inference.bundle import load_bundle

    config_record = json.loads((killed_run / "config.json").read_text())
    assert config_record["seed"] == 3 and config_record["encoder_resolved"]["embed_dim"] == 48
    bundle = load_bundle(killed_run / "bundle")
    assert bundle.meta.tasks == [] and bundle.model.head is None
    assert all(k.startswith("encoder.") for k in bundle.model.state_dict())
    assert bundle.meta.provenance["steps"] == STEPS


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(tmp_path, data_file):
    config = write_config(tmp_path, data_file, checkpoint_every=100)
    run = tmp_path / "run"
    proc = start(config, run, sleep=0.3)
    wait_for(lambda: (run / "losses.jsonl").is_file() and (run / "losses.jsonl").read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGINT)
    rc, log = finish(proc)
    assert rc == 130, log
    assert "--resume" in log
    saved = json.loads((run / "checkpoints" / "last.json").read_text())["step"]
    assert 1 <= saved < STEPS and max(losses(run)) == saved


@pytest.mark.slow
def test_in_process_progress_and_cancel(tmp_path):
    """pretrain() as a library: progress callback, cancel -> checkpoint + Cancelled, then resume to the end."""
    from fmct.conventions.errors import Cancelled
    from fmct.ssl.config import SSLConfig
    from fmct.train.pretrain import TensorVolumes, pretrain

    import yaml

    raw = yaml.safe_load(write_config(tmp_path, tmp_path / "unused.safetensors", steps=4, num_threads=0).read_text())
    raw["data"] = {"spacing_mm": [6, 6, 6], "size": [32, 32, 32]}
    cfg = SSLConfig.from_dict(raw)
    data = TensorVolumes(torch.rand(4, 3, 32, 32, 32).half())
    seen: list[tuple[float, str]] = []
    with pytest.raises(Cancelled, match="--resume"):
        pretrain(cfg, tmp_path / "run", dataset=data, progress=lambda f, m: seen.append((f, m)), cancel=lambda: len(seen) >= 1)
    assert seen[0][0] == 0.25 and "step 1/4" in seen[0][1]
    assert json.loads((tmp_path / "run" / "checkpoints" / "last.json").read_text())["step"] == 1
    result = pretrain(cfg, tmp_path / "run", resume=True, dataset=data)
    assert result.steps == 4 and [r["step"] for r in result.losses] == [1, 2, 3, 4] and result.bundle.is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_DRIVER = '''
import hashlib, os, sys
from fmct.ssl.config import SSLConfig
from fmct.train.distributed import shutdown
from fmct.train.pretrain import pretrain

res = pretrain(SSLConfig.from_file(sys.argv[1]), sys.argv[2])
h = hashlib.sha256()
for k, v in sorted(res.model.state_dict().items()):
    h.update(k.encode())
    h.update(v.detach().cpu().contiguous().numpy().tobytes())
open(os.path.join(sys.argv[2], "hash-rank%s.txt" % os.environ["RANK"]), "w").write(h.hexdigest())

from fmct.train.finetune import FinetuneConfig, finetune
ft = finetune(FinetuneConfig(data=sys.argv[3], out=os.path.join(sys.argv[2], "ft"), encoder=os.path.join(sys.argv[2], "bundle"),
                             tasks=["any_hemorrhage"], epochs=2, batch_size=2, device="cpu",
                             cache_dir=os.path.join(sys.argv[2], "cache")))
h = hashlib.sha256()
for k, v in sorted(ft.model.state_dict().items()):
    h.update(k.encode())
    h.update(v.detach().cpu().contiguous().numpy().tobytes())
open(os.path.join(sys.argv[2], "ft-hash-rank%s.txt" % os.environ["RANK"]), "w").write(h.hexdigest())
shutdown()
'''


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path, data_file):
    """A real torchrun job on CPU (gloo, loopback) pretrains, then fine-tunes from that encoder;
    after each, both ranks hold the same weights, and only rank 0 writes."""
    from fmct.phantom import write_phantom_set

    labelled = write_phantom_set(tmp_path / "labelled", 8, seed=5, slices="thick", in_plane_size=64)
    config = write_config(tmp_path, data_file, steps=3)
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(config), str(out), str(labelled)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hashes = [(out / f"hash-rank{r}.txt").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    assert sorted(losses(out)) == [1, 2, 3]  # rank 0 alone writes the log and checkpoints
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert json.loads((out / "checkpoints" / "last.json").read_text())["step"] == 3
    ft_hashes = [(out / f"ft-hash-rank{r}.txt").read_text() for r in (0, 1)]
    assert ft_hashes[0] == ft_hashes[1] and ft_hashes[0] != hashes[0]
    tuned = json.loads((out / "ft" / "fmct.json").read_text())
    assert tuned["provenance"]["training"]["world_size"] == 2


# ----------------------------------------------------------------------------------- does DINO learn?
@pytest.fixture(scope="module")
def mixed_phantoms() -> torch.Tensor:
    """16 phantoms of both anatomy presets at 32^3 / 6 mm (12 of the default anatomy alone are too alike to
    tell apart at this size: the view gap stays 0; benchmarks/HISTORY.md#history-15)."""
    return make_phantom_tensors(16, 0, (6, 6, 6), (32, 32, 32), in_plane_size=64, anatomy="default,ood")


@pytest.mark.slow
def test_self_distillation_learns_on_cpu(tmp_path, mixed_phantoms):
    """The shipped recipe scaled down (a 2-block encoder, 32^3 crops, a fast teacher): within 32 seeded CPU
    steps the two views of one phantom become more alike than two phantoms (view gap), the features spread
    apart, and the DINO loss falls below log K."""
    from fmct.ssl.config import SSLConfig, recipe
    from fmct.train.pretrain import TensorVolumes, pretrain

    raw = recipe("tiny")
    raw["encoder"] = {"preset": "tiny", "overrides": {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": [32, 32, 32]}}
    raw["data"] = {"spacing_mm": [6, 6, 6], "size": [32, 32, 32]}
    raw["crops"].update({"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 0})
    raw["dino"].update({"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 64, "sinkhorn_queue": 64,
                        "warmup_teacher_temp": 0.01, "teacher_temp": 0.01})
    raw["optim"].update({"batch_size": 8, "steps": 32, "warmup_steps": 5, "freeze_last_layer_steps": 5, "lr": 1e-3,
                         "momentum_teacher": 0.9, "final_momentum_teacher": 0.95})
    raw["run"].update({"num_threads": 1, "device": "cpu", "checkpoint_every": 1000, "seed": 0})
    result = pretrain(SSLConfig.from_dict(raw), tmp_path / "run", dataset=TensorVolumes(mixed_phantoms))
    logged = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 33))
    assert {"teacher_entropy", "view_gap", "view_retrieval", "feature_spread", "dino_over_log_k", "pixel_view_ratio",
            "teacher_logit_spread", "weight_decay"} <= set(logged[0])

    def mean(key: str, rows: list[dict]) -> float:
        return sum(r[key] for r in rows) / len(rows)

    first, last = logged[:4], logged[-4:]
    assert mean("view_gap", last) > mean("view_gap", first) + 0.01
    assert mean("feature_spread", last) > 1.4 * mean("feature_spread", first)
    assert mean("dino_over_log_k", last) < 0.95
    assert json.loads((tmp_path / "run" / "view_check.json").read_text())["pixel_view_ratio"] < 0.95
    assert logged[-1]["weight_decay"] > logged[0]["weight_decay"]  # the cosine weight-decay schedule
    assert result.model.teacher.training is False


@pytest.mark.slow
def test_crops_from_dataloader_workers_are_the_crops_of_the_step(tmp_path):
    """Workers make exactly the batches the training process would (a batch is a pure function of step and seed)."""
    from fmct.ssl.config import SSLConfig
    from fmct.train import distributed as ddp
    from fmct.train.pretrain import StepBatches, TensorVolumes, step_batches

    import yaml

    raw = yaml.safe_load(write_config(tmp_path, tmp_path / "unused.safetensors", steps=6).read_text())
    raw["data"] = {"spacing_mm": [6, 6, 6], "size": [32, 32, 32]}
    raw["crops"]["local_start_step"] = 3
    cfg = SSLConfig.from_dict(raw)
    batches = StepBatches(TensorVolumes(torch.rand(6, 3, 32, 32, 32).half()), cfg, ddp.DistInfo())
    here = list(step_batches(batches, 2, 6, workers=0))
    there = list(step_batches(batches, 2, 6, workers=2))
    assert len(here) == len(there) == 4
    for a, b in zip(here, there):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert here[0]["local"].shape[0] == 0 and here[1]["local"].shape[0] == 2 * 2  # local crops from step 3 on
