"""Multi-crop throughput: batched on a device (fmct.ssl.batched_crops) vs per sample on the CPU (issue 30).

    python benchmarks/bench_crops.py --device cuda --size base --batch 64 --json crops_gpu.json
    python benchmarks/bench_crops.py --device cpu --size tiny --batch 4          (a CPU trial)

Input: int16 HU volumes of the preset's grid, as a prepared cache's loader hands them over (random
HU; the cost of the crops does not depend on the values). Baseline in the same run: the
per-sample path on one CPU core (what one loader worker does). Also checks, without noise, that
the device's views equal the per-sample path's (max abs difference).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from common import emit, machine, set_threads, sync


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "base"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    set_threads(1)
    import torch

    from fmct.ssl.augment import MultiCropAugmentation, collate_crops, sample_generator
    from fmct.ssl.batched_crops import BatchedMultiCrop
    from fmct.ssl.config import SSLConfig, recipe
    from fmct.train.pretrain import preprocess_spec

    cfg = SSLConfig.from_dict(recipe(args.size))
    spec = preprocess_spec(cfg)
    d = spec.tensor_shape
    torch.manual_seed(0)
    hu = (torch.rand(args.batch, *d) * 1600 - 600).round().to(torch.int16)
    keys = [(0, 0, i) for i in range(args.batch)]
    n_local = cfg.crops.n_local
    dev = torch.device(args.device)
    batched = BatchedMultiCrop(cfg.crops, spec.windows)

    def on_device():
        out = batched(hu.to(dev, non_blocking=True), keys, n_local, (0, 1, 0))
        sync(args.device)
        return out

    per_sample = MultiCropAugmentation(cfg.crops)
    from fmct.data.cache import windows_to_channels

    def on_cpu():
        return collate_crops([per_sample(windows_to_channels(hu[b], spec.windows), sample_generator(*keys[b]), n_local)
                              for b in range(args.batch)])

    def rate(fn, reps: int) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return reps * args.batch / (time.perf_counter() - t0)

    device_rate, cpu_rate = rate(on_device, args.reps), rate(on_cpu, 1)
    clean = dataclasses.replace(cfg.crops, noise_std=0.0)
    a = BatchedMultiCrop(clean, spec.windows)(hu.to(dev), keys, n_local)
    b = collate_crops([MultiCropAugmentation(clean)(windows_to_channels(hu[i], spec.windows), sample_generator(*keys[i]), n_local)
                       for i in range(args.batch)])
    diff = max(float((a[k].cpu() - b[k]).abs().max()) for k in ("global", "local") if b[k].numel())
    results = {"machine": machine(args.device, 1), "size": args.size, "batch": args.batch, "n_local": n_local,
               "batched_device_samples_per_s": round(device_rate, 2), "per_sample_cpu_core_samples_per_s": round(cpu_rate, 2),
               "ratio_device_over_one_core": round(device_rate / cpu_rate, 1), "max_abs_diff_without_noise": diff}
    if args.device.startswith("cuda"):
        results["peak_gpu_mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    emit(results, args.json)


if __name__ == "__main__":
    main()
