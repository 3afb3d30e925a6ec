"""Self-supervised pretraining step throughput, peak memory and (on a GPU) model FLOPs utilization.

    python benchmarks/bench_pretrain.py --device cpu --threads 2 --sizes tiny small
    python benchmarks/bench_pretrain.py --device cuda --sizes tiny small base

One step = multi-crop augmentation already done (random tensors in the crop shapes), student
forward on 2 global + n local views, teacher forward on the global views, DINO + iBOT losses,
backward, AdamW, EMA teacher update. Baseline in the same run: a supervised step (forward +
backward + AdamW of the same encoder with a linear head) on the same global crops; the ratio
says what self-distillation costs on top. MFU counts the encoder matmul FLOPs actually needed
(student fwd+bwd = 3x forward, teacher 1x) against the GPU's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import resource
import time

from common import emit, machine, set_threads, sync

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def encoder_flops(cfg, size) -> float:
    """Forward FLOPs of the ViT on one volume of shape size (multiply-adds x 2)."""
    tokens = 1
    for s, p in zip(size, cfg.patch_size):
        tokens *= s // p
    n, d = tokens + 1, cfg.embed_dim
    patch = 2 * tokens * d * cfg.in_chans * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * int(d * cfg.mlp_ratio)
    return patch + cfg.depth * per_block


def bench_size(name: str, device: str, batch: int, steps: int) -> dict:
    """Time SSL and supervised steps of one preset; everything it allocates is freed on return."""
    import torch

    from fmct.models import preset
    from fmct.models.classifier import FMCTClassifier
    from fmct.ssl.config import SSLConfig
    from fmct.ssl.ema import update_teacher
    from fmct.ssl.masking import sample_masks
    from fmct.ssl.meta_arch import SelfDistillation

    gpu = device.startswith("cuda")
    enc = preset(name)
    size = list(enc.img_size)
    local = [s // 2 for s in size]
    cfg = SSLConfig.from_dict({
        "encoder": {"preset": name},
        "data": {"source": "tensors", "path": "bench", "size": size[::-1]},
        "crops": {"global_size": size, "local_size": local, "n_local": 4},
    })
    model = SelfDistillation(cfg).to(device)
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-4)
    grid = tuple(s // p for s, p in zip(size, enc.patch_size))
    gen = torch.Generator().manual_seed(0)
    data = {
        "global": torch.rand(2 * batch, enc.in_chans, *size, generator=gen).to(device),
        "local": torch.rand(4 * batch, enc.in_chans, *local, generator=gen).to(device),
        "masks": sample_masks(2 * batch, grid, (0.1, 0.5), 0.5, gen).to(device),
    }
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu)

    def ssl_step() -> None:
        with amp:
            losses = model(data, teacher_temp=0.04)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        update_teacher(model.teacher, model.student, 0.996)

    sup = FMCTClassifier(enc, 9).to(device)
    sup_opt = torch.optim.AdamW(sup.parameters(), lr=1e-4)
    target = torch.rand(2 * batch, 9, device=device)

    def sup_step() -> None:
        with amp:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(sup(data["global"]).float(), target)
        sup_opt.zero_grad(set_to_none=True)
        loss.backward()
        sup_opt.step()

    row = {"size": name, "img_size": size, "embed_dim": enc.embed_dim, "depth": enc.depth}
    for label, fn in (("ssl", ssl_step), ("supervised", sup_step)):
        fn()  # warm-up
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        seconds = (time.perf_counter() - t0) / steps
        row[label] = {"step_s": seconds, "volumes_per_s": batch / seconds}
        if gpu:
            row[label]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["cpu_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    flops = batch * (3 * (2 * encoder_flops(enc, size) + 4 * encoder_flops(enc, local)) + 2 * encoder_flops(enc, size))
    row["model_tflop_per_step"] = flops / 1e12
    if gpu:
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            row["mfu"] = flops / row["ssl"]["step_s"] / peak
    row["ssl_cost_vs_supervised_step"] = row["ssl"]["step_s"] / row["supervised"]["step_s"]
    return row


def monai_views(cfg, volume, seed: int):
    """The two global views with MONAI's randomizable transforms (RandAffine + per-channel intensity + noise),
    seeded per sample from the same key, so it too would be a pure function of the step."""
    import math

    import numpy as np
    from monai.transforms import Compose, RandAffine, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity

    c = cfg.crops
    side = [g / s for g, s in zip(c.global_size, volume.shape[1:])]  # output voxel -> input voxels at full scale
    t = Compose([
        RandAffine(prob=1.0, spatial_size=c.global_size, rotate_range=[math.radians(c.max_rotation_deg)] * 3,
                   scale_range=[(1 / s) * (1 - c.global_scale[0] ** (1 / 3)) for s in side],
                   translate_range=[0.1 * s for s in volume.shape[1:]], padding_mode="zeros", mode="bilinear"),
        RandScaleIntensity(factors=c.window_scale, prob=1.0, channel_wise=True),
        RandShiftIntensity(offsets=c.window_shift, prob=1.0, channel_wise=True),
        RandGaussianNoise(prob=1.0, std=c.noise_std),
    ])
    t.set_random_state(seed=int(np.random.SeedSequence([seed]).generate_state(1)[0]))
    return [t(volume) for _ in range(2)]


def bench_pipeline(steps: int, workers: list[int]) -> dict:
    """samples/s of the crop pipeline alone (the shipped tiny recipe, batch 8) vs the model's step rate."""
    import torch

    from fmct.ssl.config import SSLConfig, recipe
    from fmct.train import distributed as ddp
    from fmct.train.pretrain import StepBatches, TensorVolumes, step_batches

    raw = recipe("tiny")
    raw["run"]["device"] = "cpu"
    cfg = SSLConfig.from_dict(raw)
    data = TensorVolumes(torch.rand(32, 3, 64, 64, 64, generator=torch.Generator().manual_seed(0)).half())
    batches = StepBatches(data, cfg, ddp.DistInfo())
    b = cfg.optim.batch_size
    out = {"batch": b, "steps": steps, "pipeline": {}}
    for w in workers:
        feed = step_batches(batches, 0, steps + 1, w)
        next(feed)  # start-up (spawned workers import torch) is not throughput
        t0 = time.perf_counter()
        for _ in range(steps):
            next(feed)
        dt = time.perf_counter() - t0
        out["pipeline"][f"fmct_workers{w}"] = {"samples_per_s": steps * b / dt, "s_per_step": dt / steps}
        del feed
    t0 = time.perf_counter()
    for i in range(steps * b):
        monai_views(cfg, data[i % len(data)].float(), i)
    dt = time.perf_counter() - t0
    out["pipeline"]["monai_workers0"] = {"samples_per_s": steps * b / dt, "s_per_step": dt * b / (steps * b)}

    from fmct.ssl.meta_arch import SelfDistillation
    from fmct.train.pretrain import param_groups

    torch.manual_seed(0)
    model = SelfDistillation(cfg)
    opt = torch.optim.AdamW(param_groups(model.student, cfg), lr=cfg.optim.lr)
    batch = batches(0)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        losses = model(batch, 0.01)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        model.update_teacher(0.99)
        times.append(time.perf_counter() - t0)
    step_s = sum(times[1:]) / steps
    out["model"] = {"s_per_step": step_s, "samples_per_s": b / step_s}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=None, help="volumes per step (default 8 on GPU, 2 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 2 on CPU)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--pipeline", action="store_true",
                    help="instead: samples/s of the crop pipeline alone (fmct in 0..N DataLoader workers, and MONAI's "
                         "transforms) against the model's step rate, tiny recipe on the CPU")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    threads = set_threads(args.threads)
    if args.pipeline:
        res = {"machine": machine("cpu", threads), **bench_pipeline(args.steps or 4, args.workers)}
        for k, v in res["pipeline"].items():
            print(f"{k:>16}: {v['samples_per_s']:.1f} samples/s ({v['s_per_step']:.2f} s per batch of {res['batch']})")
        print(f"{'model step':>16}: {res['model']['samples_per_s']:.1f} samples/s ({res['model']['s_per_step']:.2f} s per step)")
        emit(res, args.json)
        return
    gpu = args.device.startswith("cuda")
    batch = args.batch or (8 if gpu else 2)
    steps = args.steps or (10 if gpu else 2)
    results = {"machine": machine(args.device, threads), "batch": batch, "rows": []}
    for name in args.sizes:
        row = bench_size(name, args.device, batch, steps)
        results["rows"].append(row)
        print(f"{name:>5}: SSL step {row['ssl']['step_s']:.3f} s ({row['ssl']['volumes_per_s']:.2f} volumes/s), "
              f"supervised step {row['supervised']['step_s']:.3f} s, ratio {row['ssl_cost_vs_supervised_step']:.2f}x"
              + (f", MFU {row['mfu']:.1%}" if "mfu" in row else "")
              + (f", peak {row['ssl'].get('peak_gib', 0):.1f} GiB" if gpu else f", peak RSS {row['cpu_peak_rss_gib']:.1f} GiB"),
              flush=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
