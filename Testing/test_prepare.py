"""`fmct prepare` (issue 30): the sharded int16 cache built once, in parallel, resumable; training reads it.

Real phantom CTs written as NIfTI studies, the real CLI in subprocesses (spawned workers, SIGKILL,
torchrun with gloo), a real full file system (a small tmpfs when this test may mount one)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fmct.data.cache import PreparedCache, hu_to_int16, windows_to_channels
from fmct.preprocessing.preprocessor import DEFAULT_WINDOWS, Preprocessor, PreprocessSpec

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
GRID = {"spacing_mm": [6, 6, 6], "size": [32, 32, 32]}
SPEC = PreprocessSpec(spacing_mm=(6.0, 6.0, 6.0), size=(32, 32, 32))


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Seven small phantom studies and an unreadable eighth (a broken NIfTI listed in labels.csv)."""
    from fmct.phantom import write_phantom_set

    root = tmp_path_factory.mktemp("prepare-data") / "studies"
    write_phantom_set(root, 7, seed=11, slices="thick", in_plane_size=64)
    (root / "zz_broken").mkdir()
    (root / "zz_broken" / "ct.nii.gz").write_bytes(b"not a NIfTI file")
    labels = root / "labels.csv"
    columns = labels.read_text().splitlines()[0].split(",")
    row = {"case_id": "zz_broken", "path": "zz_broken/ct.nii.gz"}
    labels.write_text(labels.read_text() + ",".join(row.get(c, "0") for c in columns) + "\n")
    return root


def grid_config(folder: Path, data: Path | None = None, steps: int = 3) -> Path:
    """A tiny pretraining config at 32^3 / 6 mm (the settings of Testing/test_pretrain.py)."""
    cfg = {
        "encoder": {"preset": "tiny", "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2,
                                                    "img_size": [32, 32, 32], "patch_size": [8, 8, 8]}},
        "data": {**GRID, **({"source": "manifest", "path": str(data), "cache_dir": str(folder / "cache")} if data else {})},
        "crops": {"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 2},
        "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "warmup_teacher_temp_steps": 2},
        "optim": {"batch_size": 2, "steps": steps, "warmup_steps": 1},
        "run": {"seed": 5, "checkpoint_every": 100, "num_threads": 1, "device": "cpu", "workers": 0},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmct.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 300), **kw)


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, sorted (what 'byte for byte after sorting' compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------- format
def test_int16_hu_and_windows_at_batch_time_match_the_preprocessor():
    """The cache stores HU rounded to whole HU; windowing it on the batch gives the preprocessor's
    channels to within half a HU over the narrowest window's width."""
    from fmct.phantom import make_phantom

    volume = make_phantom(3, slices="thick", in_plane_size=64).volume
    pre = Preprocessor(SPEC)
    hu, *_ = pre.model_hu(volume)
    stored = hu_to_int16(hu)
    assert stored.dtype == np.dtype("<i2") and np.abs(stored - hu).max() <= 0.5
    channels = windows_to_channels(torch.from_numpy(stored.copy()), SPEC.windows)
    expected = pre(volume).array[0]
    assert channels.shape == expected.shape and channels.dtype == torch.float32
    assert float((channels - torch.from_numpy(expected)).abs().max()) <= 0.5 / min(w.width for w in DEFAULT_WINDOWS) + 1e-6


# ----------------------------------------------------------------------------------- parallel, sharded, errors
@pytest.mark.slow
def test_two_workers_and_two_shards_give_the_cache_of_one(tmp_path, studies):
    config = grid_config(tmp_path)
    one = cli("prepare", str(studies), "--out", str(tmp_path / "one"), "--config", str(config), "--unit-size", "3")
    assert one.returncode == 0, one.stderr
    two = cli("prepare", str(studies), "--out", str(tmp_path / "two"), "--config", str(config), "--unit-size", "3",
              "--workers", "2")
    assert two.returncode == 0, two.stderr
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    for k in ("1", "2"):  # two array jobs into one folder
        job = cli("prepare", str(studies), "--out", str(tmp_path / "jobs"), "--config", str(config), "--unit-size", "3",
                  "--shard", f"{k}/2")
        assert job.returncode == 0, job.stderr
    assert tree(tmp_path / "jobs") == tree(tmp_path / "one")

    cache = PreparedCache.open(tmp_path / "one")
    assert cache.complete and cache.meta["units"] == 3 and len(cache.entries) == 7
    errors = [json.loads(line) for line in (tmp_path / "one" / "errors.jsonl").read_text().splitlines()]
    assert [e["study_id"] for e in errors] == ["zz_broken"] and errors[0]["reason"]
    assert "1 unreadable" in one.stdout
    first = cache.read_hu(0)  # what the index says is what was stored
    assert first.shape == (32, 32, 32) and hashlib.sha256(first.tobytes()).hexdigest() == cache.entries[0].sha256
    assert cache.verify() == []
    again = cli("prepare", str(studies), "--out", str(tmp_path / "one"), "--config", str(config), "--unit-size", "3")
    assert again.returncode == 0 and "3 unit(s) already done" in again.stdout


def test_bad_shard_and_other_grid_are_refused(tmp_path, studies):
    bad = cli("prepare", str(studies), "--out", str(tmp_path / "c"), "--shard", "3/2")
    assert bad.returncode == 2 and bad.stderr.startswith("fmct: error: --shard 3/2") and bad.stderr.count("\n") == 1
    ok = cli("prepare", str(studies), "--out", str(tmp_path / "c"), "--config", str(grid_config(tmp_path)), "--unit-size", "8")
    assert ok.returncode == 0, ok.stderr
    other = cli("prepare", str(studies), "--out", str(tmp_path / "c"), "--size", "tiny")
    assert other.returncode == 2 and "spacing_mm: cache [6.0, 6.0, 6.0], wanted [3.0, 3.0, 3.0]" in other.stderr
    from fmct.data.cache import CacheMismatchError, open_for

    with pytest.raises(CacheMismatchError, match="size: cache"):
        open_for(tmp_path / "c", PreprocessSpec(spacing_mm=(6.0, 6.0, 6.0), size=(48, 48, 48)))


# ----------------------------------------------------------------------------------- killed, full disk
PACED = ("import sys, time, argparse; from fmct.data.prepare import add_arguments, run_from_args; "
         "a = add_arguments(argparse.ArgumentParser()).parse_args(sys.argv[1:]); "
         "sys.exit(run_from_args(a, progress=lambda f, m: time.sleep(2)))")


@pytest.mark.slow
def test_a_killed_prepare_resumes_and_finishes(tmp_path, studies):
    config = grid_config(tmp_path)
    args = [str(studies), "--out", str(tmp_path / "killed"), "--config", str(config), "--unit-size", "1"]
    proc = subprocess.Popen([sys.executable, "-c", PACED, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = tmp_path / "killed" / "shards" / "unit-00000.json"
    end = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not PreparedCache.open(tmp_path / "killed").complete
    resumed = cli("prepare", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stdout and not resumed.stdout.startswith("prepared 7 ")
    fresh = cli("prepare", str(studies), "--out", str(tmp_path / "fresh"), "--config", str(config), "--unit-size", "1")
    assert fresh.returncode == 0
    assert tree(tmp_path / "killed") == tree(tmp_path / "fresh")  # no temp file left, nothing torn


def _small_filesystem(folder: Path, size: str):
    """A real full disk: a tmpfs of `size` (root may mount one). None where mounting is not permitted."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return folder if done.returncode == 0 else None


def test_a_write_to_a_full_disk_fails_loudly(tmp_path, studies):
    """Each study is 64 KiB at this grid; a 100 KiB file system fills during the first unit of 3."""
    config = grid_config(tmp_path)
    disk = _small_filesystem(tmp_path / "disk", "100k")
    args = ["prepare", str(studies), "--out", str((disk or tmp_path / "disk") / "cache"), "--config", str(config),
            "--unit-size", "3"]
    if disk is not None:
        try:
            done = cli(*args)
        finally:
            subprocess.run(["umount", str(disk)], check=False)
    else:
        # Not permitted to mount: the OS's file-size limit (RLIMIT_FSIZE) makes write() fail with EFBIG
        # at the same boundary, a real OS error rather than a mocked one.
        import resource

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, 100 * 1024))

        done = subprocess.run([sys.executable, "-m", "fmct.cli", *args], env=ENV, capture_output=True, text=True,
                              timeout=300, preexec_fn=limit)
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fmct: error: cannot write") and "free space or choose another --out" in last
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------- training from the cache
def test_pretraining_from_the_cache_equals_pretraining_from_the_sources(tmp_path, studies):
    """Same seed, same losses: training from `fmct prepare`'s cache (read through its index) and from the
    study folder (prepared inside the run) see the same tensors. --verify passes on a sound cache."""
    from fmct.ssl.config import SSLConfig
    from fmct.train.pretrain import pretrain

    config = grid_config(tmp_path / "a", data=studies)
    from_sources = pretrain(SSLConfig.from_file(config), tmp_path / "a" / "run")
    made = cli("prepare", str(studies), "--out", str(tmp_path / "cache"), "--config", str(config))
    assert made.returncode == 0, made.stderr
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {**GRID, "source": "prepared", "path": str(tmp_path / "cache"), "verify": True}
    from_cache = pretrain(SSLConfig.from_dict(raw), tmp_path / "b" / "run")
    assert [r["loss"] for r in from_cache.losses] == [r["loss"] for r in from_sources.losses]
    assert len(from_cache.losses) == 3


# ----------------------------------------------------------------------------------- torchrun
RANK_DRIVER = '''
import json, os, sys
from fmct.data.manifests import load_manifest
from fmct.data.prepare import prepare
from fmct.conventions.runtime import torchrun_rank
from fmct.preprocessing.spec import PreprocessSpec

place = torchrun_rank()
res = prepare(load_manifest(sys.argv[1]), PreprocessSpec(spacing_mm=(6.0, 6.0, 6.0), size=(32, 32, 32)), sys.argv[2],
              rank=place.rank, world=place.world, unit_size=2)
record = {"done": res.units_done_now, "mine": res.units_mine}

# pretraining from the folder: each rank prepares its share into data.cache_dir, waits, then reads it all
import yaml
from fmct.ssl.config import SSLConfig
from fmct.train import distributed as ddp
from fmct.train.pretrain_data import load_dataset

raw = yaml.safe_load(open(sys.argv[3]).read())
raw["data"]["cache_dir"] = sys.argv[2] + "-pretrain"
info = ddp.init_from_env("cpu")
record["pretrain_items"] = len(load_dataset(SSLConfig.from_dict(raw), info))
from fmct.data.cache import PreparedCache
import glob
caches = glob.glob(sys.argv[2] + "-pretrain/prepared-*")
record["pretrain_caches"] = len(caches)
ddp.shutdown()
json.dump(record, open(sys.argv[2] + ".rank%d.json" % place.rank, "w"))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_ranks_prepare_disjoint_shares(tmp_path, studies):
    driver = tmp_path / "driver.py"
    driver.write_text(RANK_DRIVER)
    out = tmp_path / "cache"
    config = grid_config(tmp_path, data=studies)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(studies), str(out), str(config)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["done"] == [0, 2] and ranks[1]["done"] == [1, 3]  # 8 studies in units of 2, dealt round-robin
    assert set(ranks[0]["done"]).isdisjoint(ranks[1]["done"])
    cache = PreparedCache.open(out)
    assert cache.complete and len(cache.entries) == 7
    # pretraining from the folder under torchrun: one cache, complete, and every rank reads all 7 studies
    assert [r["pretrain_items"] for r in ranks] == [7, 7] and ranks[0]["pretrain_caches"] == 1


# ----------------------------------------------------------------------------------- fine-tune and embed
def _tiny_encoder_bundle(folder: Path) -> Path:
    """A task-less encoder bundle at the test grid (what `fmct pretrain` writes), untrained."""
    from fmct.inference.bundle import BundleMeta, save_bundle
    from fmct.models import FMCTClassifier
    from fmct.ssl.config import SSLConfig

    enc = SSLConfig.from_file(grid_config(folder)).encoder_config
    torch.manual_seed(0)
    meta = BundleMeta(name="tiny-encoder", encoder=enc, preprocessing=SPEC, tasks=[], description="test encoder")
    return save_bundle(FMCTClassifier(enc, 0), meta, folder / "encoder")


@pytest.mark.slow
def test_finetune_and_embed_read_a_prepared_cache(tmp_path, studies):
    from fmct.features.embed import embed, read_features
    from fmct.train.finetune import FinetuneConfig, finetune

    bundle = _tiny_encoder_bundle(tmp_path)
    made = cli("prepare", str(studies), "--out", str(tmp_path / "cache"), "--model", str(bundle))
    assert made.returncode == 0, made.stderr
    from_cache = embed(tmp_path / "cache", bundle, tmp_path / "cache.npz", device="cpu", verify=True)
    from_sources = embed(studies, bundle, tmp_path / "sources.npz", device="cpu")
    assert from_cache["rows"] == from_sources["rows"] == 7 and len(from_sources["skipped"]) == 1
    a, b = read_features(tmp_path / "cache.npz"), read_features(tmp_path / "sources.npz")
    assert list(a["study_id"]) == list(b["study_id"])
    np.testing.assert_allclose(a["cls"], b["cls"], atol=2e-2)  # int16 HU: the inputs differ by < 0.5 HU / window width

    tuned = finetune(FinetuneConfig(data=str(tmp_path / "cache"), out=str(tmp_path / "ft"), encoder=str(bundle),
                                    tasks=["any_hemorrhage"], epochs=1, batch_size=2, device="cpu", verify=True))
    assert tuned.bundle.is_dir()
    provenance = json.loads((tmp_path / "ft" / "fmct.json").read_text())["provenance"]["data"]
    assert provenance["n_train"] + provenance["n_val"] == 7

    from fmct.conventions.errors import ConfigError

    with pytest.raises(ConfigError, match="other preprocessing .*size: cache"):
        finetune(FinetuneConfig(data=str(tmp_path / "cache"), out=str(tmp_path / "ft2"), size="tiny",
                                tasks=["any_hemorrhage"], epochs=1, device="cpu"))


def test_the_fine_tuning_cache_stops_on_a_full_disk_instead_of_skipping_the_study(tmp_path, studies):
    """CachedVolumeDataset (fine-tuning's per-study cache): a failed write raises; it used to be logged as an
    unreadable study and the study silently left the training set."""
    from fmct.data.cache import CacheWriteError
    from fmct.data.datasets import CachedVolumeDataset
    from fmct.data.manifests import load_manifest

    disk = _small_filesystem(tmp_path / "disk", "100k")
    if disk is None:
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        ds = CachedVolumeDataset(list(load_manifest(studies))[:3], SPEC, disk / "cache", tasks=[])
        with pytest.raises(CacheWriteError, match="cannot write the training cache"):
            ds.prepare()
        assert ds.skipped == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_cache_is_read_without_its_sources_and_verify_checks_them(tmp_path, studies):
    import shutil

    from fmct.data.cache import CacheMismatchError, PreparedVolumes, open_for

    copy = tmp_path / "copy"
    shutil.copytree(studies, copy)
    made = cli("prepare", str(copy), "--out", str(tmp_path / "cache"), "--config", str(grid_config(tmp_path)))
    assert made.returncode == 0, made.stderr
    shutil.rmtree(copy)  # the sources are gone: training reads the index and the shards only
    items = PreparedVolumes(open_for(tmp_path / "cache", SPEC), SPEC.windows)
    assert len(items) == 7 and items[0]["image"].shape == (3, 32, 32, 32) and items[0]["study_id"] == "phantom_00000"
    with pytest.raises(CacheMismatchError, match="--verify: 7 problem"):
        open_for(tmp_path / "cache", SPEC, verify=True)

    from fmct.train.pretrain_args import build_parser, config_from_args  # `fmct pretrain CACHE` takes it as the data

    cfg = config_from_args(build_parser().parse_args([str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--verify"]))
    assert (cfg.data.source, cfg.data.path, cfg.data.verify) == ("prepared", str(tmp_path / "cache"), True)
