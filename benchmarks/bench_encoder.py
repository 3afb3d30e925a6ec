"""Encoder throughput: fmct's ViT3D against MONAI's ViT with the same width, depth, patch size and input.

Both run on the same device in the same run: forward (inference, no grad) and forward+backward
(training step without the optimizer), in float32 on CPU and under bf16 autocast on CUDA.
MONAI's ViT is used as shipped (classification=False, qkv_bias=True to match; it computes attention
with explicit einsum/softmax), fmct's uses PyTorch SDPA. Ratio = fmct samples/s / MONAI samples/s.

    python benchmarks/bench_encoder.py --device cpu --threads 2
    python benchmarks/bench_encoder.py --device cuda --compile --json out/encoder_gpu.json
"""
from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

from common import emit, machine, set_threads, timeit

SIZES = {  # name: (width, depth, heads, patch, input edge); tiny = the demo model, base = ViT-B/16 on 128^3
    "tiny": (192, 6, 3, 8, 64),
    "base": (768, 12, 12, 16, 128),
}


def build(kind: str, size: str, device: str):
    import torch
    from monai.networks.nets import ViT

    from fmct.models import ViT3D, ViT3DConfig

    width, depth, heads, patch, edge = SIZES[size]
    if kind == "fmct":
        cfg = ViT3DConfig(img_size=(edge,) * 3, patch_size=(patch,) * 3, in_chans=3, embed_dim=width, depth=depth,
                          num_heads=heads)
        model = ViT3D(cfg)
        fwd = model.forward_features
    else:
        model = ViT(in_channels=3, img_size=(edge,) * 3, patch_size=(patch,) * 3, hidden_size=width,
                    mlp_dim=4 * width, num_layers=depth, num_heads=heads, qkv_bias=True, classification=False)
        fwd = model
    torch.manual_seed(0)
    return model.to(device), fwd


def measure_pair(size: str, batch: int, device: str, compile: bool, repeat: int) -> dict:
    """Time fmct and MONAI alternately, round by round, so drifting load on a shared machine hits both alike."""
    import torch

    edge = SIZES[size][4]
    x = torch.randn(batch, 3, edge, edge, edge, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    gpu = device.startswith("cuda")

    def out_sum(y):
        return y["patch"].float().mean() + y["cls"].float().mean() if isinstance(y, dict) else y[0].float().mean()

    steps = {}
    for kind in ("fmct", "monai"):
        model, fwd = build(kind, size, device)
        if compile:
            fwd = torch.compile(fwd)

        def forward(model=model, fwd=fwd):
            model.eval()
            with torch.no_grad(), amp:
                fwd(x)

        def train_step(model=model, fwd=fwd):
            model.train()
            with amp:
                loss = out_sum(fwd(x))
            loss.backward()
            model.zero_grad(set_to_none=True)

        steps[kind] = {"forward": forward, "train": train_step}
    times: dict = {k: {"forward": [], "train": []} for k in steps}
    for mode in ("forward", "train"):
        for kind in steps:  # warm-up (and compilation)
            timeit(steps[kind][mode], device, warmup=2, repeat=1)
        for _ in range(repeat):
            for kind in steps:
                times[kind][mode].append(timeit(steps[kind][mode], device, warmup=0, repeat=1,
                                                min_time=0.5 if gpu else 0.0))
    out = {}
    for kind in steps:
        fwd_s, step_s = statistics.median(times[kind]["forward"]), statistics.median(times[kind]["train"])
        out[kind] = {"forward_samples_per_s": batch / fwd_s, "train_samples_per_s": batch / step_s,
                     "forward_s_per_batch": fwd_s, "train_s_per_batch": step_s}
    if gpu:
        out["peak_gib_both"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--sizes", default="tiny,base")
    ap.add_argument("--batch", default=None, help="batch per size, e.g. tiny=2,base=1 (default: 2/1 on CPU, 32/8 on GPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure both models under torch.compile")
    ap.add_argument("--compile-sizes", default=None, help="sizes to compile (default: all of --sizes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    gpu = args.device.startswith("cuda")
    batches = {"tiny": 32 if gpu else 2, "base": 8 if gpu else 1}
    if args.batch:
        batches.update({k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(","))})
    results = {"benchmark": "encoder", "machine": machine(args.device, threads), "precision": "bf16 autocast" if gpu else "fp32",
               "rows": []}
    for compiled in ([False, True] if args.compile else [False]):
        for size in (args.compile_sizes or args.sizes).split(",") if compiled else args.sizes.split(","):
            row = {"size": size, "batch": batches[size], "compiled": compiled,
                   "width_depth_heads_patch_edge": SIZES[size]}
            try:
                row.update(measure_pair(size, batches[size], args.device, compiled, args.repeat))
            except Exception as e:  # torch.compile can fail on a machine without a compiler: keep the other rows
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                results["rows"].append(row)
                print(f"[{args.device}] {size} compiled={compiled}: FAILED {row['error']}", flush=True)
                continue
            row["ratio_forward"] = row["fmct"]["forward_samples_per_s"] / row["monai"]["forward_samples_per_s"]
            row["ratio_train"] = row["fmct"]["train_samples_per_s"] / row["monai"]["train_samples_per_s"]
            results["rows"].append(row)
            print(f"[{args.device}{' compiled' if compiled else ''}] {size:5s} batch {batches[size]:3d}: "
                  f"forward fmct {row['fmct']['forward_samples_per_s']:8.2f} /s vs MONAI "
                  f"{row['monai']['forward_samples_per_s']:8.2f} /s = {row['ratio_forward']:.2f}x | "
                  f"fwd+bwd {row['fmct']['train_samples_per_s']:8.2f} vs {row['monai']['train_samples_per_s']:8.2f} "
                  f"= {row['ratio_train']:.2f}x", flush=True)
    emit(results, args.json)


if __name__ == "__main__":
    main()
