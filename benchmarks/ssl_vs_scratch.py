"""Does self-supervised pretraining help when labels are scarce? (the FM-CT claim, on phantoms)

    python benchmarks/ssl_vs_scratch.py                 # full run: tiny encoder, about an hour on 2 CPU cores
    python benchmarks/ssl_vs_scratch.py --quick         # minutes: checks the pipeline, numbers meaningless

1. Pretrain the tiny 3D ViT (DINO + iBOT) on unlabeled phantoms ("default" anatomy).
2. For 8, 16 and 32 labels per class (K positives + K negatives for any_hemorrhage, seeded),
   fine-tune (full, layer-wise lr decay) from the pretrained encoder, and train the same
   encoder from scratch on the same labels with the same recipe.
3. Test both on held-out phantoms made with the "ood" anatomy preset (older, atrophic brains,
   other noise/kernel, larger tilts): AUROC with a bootstrap 95% CI, and the difference.
Prints a table with the SSL - scratch difference per budget and writes results JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fmct.bundle import load_bundle
from fmct.evaluate import auroc, auroc_ci
from fmct.models import FMCTClassifier
from fmct.phantom import make_phantom
from fmct.preprocess import Preprocessor, PreprocessSpec
from fmct.ssl.config import SSLConfig
from fmct.train.finetune import layer_decay_groups
from fmct.train.pretrain import TensorVolumes, pretrain
from fmct.train.supervised import SupervisedConfig, positive_weights, predict_logits, tensor_batches, train_classifier

TASK = "any_hemorrhage"
SEEDS = {"unlabeled": 10_000_000, "labelled": 11_000_000, "test": 12_000_000}


def phantom_set(n: int, seed: int, anatomy: str, spec: PreprocessSpec) -> tuple[torch.Tensor, np.ndarray]:
    pre = Preprocessor(spec)
    xs, ys = [], []
    for i in range(n):
        ph = make_phantom(seed + i, slices=("thick", "thin")[i % 2], in_plane_size=128, anatomy=anatomy)
        xs.append(pre(ph.volume).tensor[0].half())
        ys.append(ph.labels[TASK])
    return torch.stack(xs), np.array(ys)


def few_labels(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return np.concatenate([rng.choice(pos, min(k, len(pos)), replace=False), rng.choice(neg, min(k, len(neg)), replace=False)])


def train_and_test(encoder_state: dict | None, cfg_enc, x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor,
                   epochs: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    model = FMCTClassifier(cfg_enc, 1)
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
    model.encoder.mask_token.requires_grad_(False)
    yt = torch.tensor(y, dtype=torch.float32)[:, None]
    batches, steps = tensor_batches(x, yt, 8, seed)
    cfg = SupervisedConfig(epochs=epochs, batch_size=8, lr=5e-4, warmup_epochs=2, seed=seed)
    train_classifier(model, batches, steps, positive_weights(yt, 10.0), cfg, torch.device("cpu"),
                     layer_decay_groups(model, 0.75, cfg.weight_decay))
    return predict_logits(model, x_test, torch.device("cpu"))[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline only")
    ap.add_argument("--out", default="benchmarks/out/ssl_vs_scratch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-unlabeled", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps (batch 8)")
    ap.add_argument("--n-labelled", type=int, default=300, help="labelled pool the K-per-class subsets are drawn from")
    ap.add_argument("--n-test", type=int, default=300, help="out-of-distribution test phantoms")
    ap.add_argument("--epochs", type=int, default=25, help="fine-tuning epochs (both arms)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        n_unlabeled, steps, n_labelled, n_test, epochs = 16, 4, 40, 24, 2
    else:
        n_unlabeled, steps, n_labelled, n_test, epochs = args.n_unlabeled, args.steps, args.n_labelled, args.n_test, args.epochs
    budgets = (2, 4) if args.quick else (8, 16, 32)
    spec = PreprocessSpec()
    out = Path(args.out)
    t_start = time.time()

    x_unl, _ = phantom_set(n_unlabeled, SEEDS["unlabeled"], "default", spec)
    ssl_cfg = SSLConfig.from_dict({
        "encoder": {"preset": "tiny"},
        "data": {"source": "tensors", "path": "in-memory", "spacing_mm": list(spec.spacing_mm), "size": list(spec.size)},
        "crops": {"global_size": [64, 64, 64], "local_size": [32, 32, 32], "n_local": 2},
        "optim": {"batch_size": 8, "steps": steps, "warmup_steps": max(1, steps // 10)},
        "run": {"seed": args.seed, "checkpoint_every": max(steps // 4, 1), "device": "cpu"},
    })
    t0 = time.time()
    result = pretrain(ssl_cfg, out / "pretrain", dataset=TensorVolumes(x_unl))
    pretrain_s = time.time() - t0
    encoder = load_bundle(result.bundle)
    enc_state, enc_cfg = encoder.model.encoder.state_dict(), encoder.meta.encoder

    x_lab, y_lab = phantom_set(n_labelled, SEEDS["labelled"], "default", spec)
    x_test, y_test = phantom_set(n_test, SEEDS["test"], "ood", spec)
    rows = []
    for k in budgets:
        idx = few_labels(y_lab, k, args.seed + k)
        row = {"labels_per_class": k, "n_train": int(len(idx))}
        for name, state in (("ssl", enc_state), ("scratch", None)):
            t0 = time.time()
            scores = train_and_test(state, enc_cfg, x_lab[idx], y_lab[idx], x_test, epochs, args.seed + k)
            lo, hi = auroc_ci(y_test, scores, n_boot=1000, seed=args.seed)
            row[name] = {"auroc": auroc(y_test, scores), "ci95": [lo, hi], "seconds": round(time.time() - t0, 1)}
        row["difference"] = row["ssl"]["auroc"] - row["scratch"]["auroc"]
        rows.append(row)
        print(f"K={k:>3}  SSL {row['ssl']['auroc']:.3f} [{lo:.3f}..]  scratch {row['scratch']['auroc']:.3f}  "
              f"SSL - scratch {row['difference']:+.3f}", flush=True)

    print(f"\n{'labels/class':>12} {'SSL AUROC [95% CI]':>26} {'scratch AUROC [95% CI]':>26} {'SSL - scratch':>14}")
    for r in rows:
        s, c = r["ssl"], r["scratch"]
        print(f"{r['labels_per_class']:>12} {s['auroc']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]".ljust(40)
              + f" {c['auroc']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]      {r['difference']:+.3f}")
    summary = {
        "task": TASK, "quick": args.quick, "threads": args.threads, "pretrain_steps": steps, "pretrain_seconds": round(pretrain_s, 1),
        "n_unlabeled": n_unlabeled, "n_labelled_pool": n_labelled, "n_test_ood": n_test, "finetune_epochs": epochs,
        "test_prevalence": float(y_test.mean()), "rows": rows, "total_seconds": round(time.time() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\ntotal {summary['total_seconds']:.0f} s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
