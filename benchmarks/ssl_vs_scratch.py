"""Does self-supervised pretraining help when labels are scarce? (the FM-CT claim, on phantoms)

    python benchmarks/ssl_vs_scratch.py                      # full run: tiny encoder, under an hour on 2 CPU cores
    python benchmarks/ssl_vs_scratch.py --encoder RUN/bundle # reuse an encoder from `fmct pretrain` (e.g. a GPU run)
    python benchmarks/ssl_vs_scratch.py --quick              # minutes: checks the pipeline, numbers meaningless

1. Pretrain the tiny 3D ViT (DINO + iBOT + masked reconstruction) on unlabeled phantoms
   ("default" anatomy), or take the encoder given with --encoder.
2. For 8, 16 and 32 labels per class (K positives + K negatives for any_hemorrhage, seeded):
   - full fine-tuning (layer-wise lr decay) from the pretrained encoder vs the same recipe from
     random init, on the same labels (one draw per budget: it is the slow arm);
   - linear probe (frozen encoder, L2 logistic regression on [CLS, mean patch token]) on the
     pretrained encoder vs on the randomly initialised one (--probe-draws draws per budget).
3. Test on held-out phantoms made with the "ood" anatomy preset (older, atrophic brains, other
   noise/kernel, larger tilts): AUROC averaged over draws, with a 95% CI from a bootstrap over
   test cases, and the SSL - scratch difference with a paired bootstrap CI.
Prints a table and writes results JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fmct.bundle import load_bundle
from fmct.evaluate import auroc
from fmct.models import FMCTClassifier
from fmct.models.config import ViT3DConfig
from fmct.phantom import make_phantom
from fmct.preprocess import Preprocessor, PreprocessSpec
from fmct.ssl.config import SSLConfig
from fmct.train.finetune import layer_decay_groups
from fmct.train.pretrain import TensorVolumes, pretrain
from fmct.train.supervised import SupervisedConfig, positive_weights, predict_logits, tensor_batches, train_classifier

TASK = "any_hemorrhage"
SEEDS = {"unlabeled": 10_000_000, "labelled": 11_000_000, "test": 12_000_000}
# What learns on 2 CPU cores in ~15 minutes: 48^3 global crops (216 tokens) keep a step at ~1.5 s;
# Sinkhorn-Knopp and a 1024-prototype head resist DINO's uniform collapse at batch 8; the
# masked-reconstruction loss gives the encoder a dense signal from the first step.
PRETRAIN = {
    "encoder": {"preset": "tiny"},
    "crops": {"global_size": [48, 48, 48], "local_size": [24, 24, 24], "n_local": 2},
    "dino": {"out_dim": 1024, "centering": "sinkhorn_knopp"},
    "mae": {"enabled": True},
}


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


def pretrained_encoder(args: argparse.Namespace, spec: PreprocessSpec, out: Path, n_unlabeled: int, steps: int) -> tuple[dict, ViT3DConfig, dict]:
    """The encoder state, its config, and where it came from."""
    if args.encoder:
        bundle = load_bundle(args.encoder)
        return bundle.model.encoder.state_dict(), bundle.meta.encoder, {"encoder": str(args.encoder), **bundle.meta.provenance}
    x_unl, _ = phantom_set(n_unlabeled, SEEDS["unlabeled"], "default", spec)
    cfg = SSLConfig.from_dict({
        **PRETRAIN,
        "data": {"source": "tensors", "path": "in-memory", "spacing_mm": list(spec.spacing_mm), "size": list(spec.size)},
        "optim": {"batch_size": 8, "steps": steps, "warmup_steps": max(1, steps // 15)},
        "run": {"seed": args.seed, "checkpoint_every": max(steps // 4, 1), "device": "cpu"},
    })
    t0 = time.time()
    result = pretrain(cfg, out / "pretrain", dataset=TensorVolumes(x_unl))
    bundle = load_bundle(result.bundle)
    last = result.losses[-1]
    origin = {"pretrain_steps": steps, "n_unlabeled": n_unlabeled, "pretrain_seconds": round(time.time() - t0, 1),
              "final_losses": {k: round(v, 4) for k, v in last.items() if k in ("dino", "ibot", "mae", "teacher_entropy")}}
    return bundle.model.encoder.state_dict(), bundle.meta.encoder, origin


def finetune_scores(encoder_state: dict | None, cfg_enc: ViT3DConfig, x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor,
                    epochs: int, seed: int) -> np.ndarray:
    """Full fine-tuning (the `fmct finetune --mode full` recipe) -> test logits."""
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


@torch.no_grad()
def frozen_features(encoder_state: dict | None, cfg_enc: ViT3DConfig, x: torch.Tensor, seed: int) -> torch.Tensor:
    """[CLS, mean patch token] of the frozen encoder: what the task head of a bundle sees."""
    torch.manual_seed(seed)
    encoder = FMCTClassifier(cfg_enc, 0).encoder.eval()
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    out = []
    for i in range(0, len(x), 16):
        f = encoder.forward_features(x[i:i + 16].float())
        out.append(torch.cat([f["cls"], f["patch"].mean(dim=1)], dim=1))
    return torch.cat(out)


def linear_probe_scores(f_train: torch.Tensor, y: np.ndarray, f_test: torch.Tensor, l2: float = 1e-2) -> np.ndarray:
    """L2-regularised logistic regression on standardised features (LBFGS, deterministic)."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    yt = torch.tensor(y, dtype=torch.float32)
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (b @ w + c).detach().numpy()


def compare(y: np.ndarray, ssl: list[np.ndarray], scratch: list[np.ndarray], n_boot: int, seed: int) -> dict:
    """Mean AUROC over draws for both arms, bootstrap CIs over test cases, paired for the difference."""
    def mean_auc(scores: list[np.ndarray], idx: np.ndarray) -> float:
        return float(np.mean([auroc(y[idx], s[idx]) for s in scores]))

    everyone = np.arange(len(y))
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            boot.append((mean_auc(ssl, idx), mean_auc(scratch, idx)))
    b = np.array(boot)
    ci = lambda v: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]  # noqa: E731
    s, c = mean_auc(ssl, everyone), mean_auc(scratch, everyone)
    return {"ssl": {"auroc": round(s, 4), "ci95": ci(b[:, 0])}, "scratch": {"auroc": round(c, 4), "ci95": ci(b[:, 1])},
            "difference": round(s - c, 4), "difference_ci95": ci(b[:, 0] - b[:, 1]), "draws": len(ssl)}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'arm':>8} {'K':>3} {'SSL AUROC [95% CI]':>24} {'scratch AUROC [95% CI]':>24} {'SSL - scratch [95% CI]':>26}")
    for r in rows:
        for arm in ("finetune", "linear"):
            if arm not in r:
                continue
            a = r[arm]
            s, c, d = a["ssl"], a["scratch"], a["difference_ci95"]
            print(f"{arm:>8} {r['labels_per_class']:>3} {s['auroc']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
                  f"     {c['auroc']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]     {a['difference']:+.3f} [{d[0]:+.3f}, {d[1]:+.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline only")
    ap.add_argument("--out", default="benchmarks/out/ssl_vs_scratch")
    ap.add_argument("--encoder", default=None, help="a pretrained encoder bundle (fmct pretrain's RUN/bundle): skip step 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-unlabeled", type=int, default=600)
    ap.add_argument("--steps", type=int, default=600, help="pretraining steps (batch 8)")
    ap.add_argument("--n-labelled", type=int, default=300, help="labelled pool the K-per-class subsets are drawn from")
    ap.add_argument("--n-test", type=int, default=300, help="out-of-distribution test phantoms")
    ap.add_argument("--epochs", type=int, default=25, help="fine-tuning epochs (both arms)")
    ap.add_argument("--probe-draws", type=int, default=5, help="label draws per budget for the linear probe")
    ap.add_argument("--skip-finetune", action="store_true", help="linear probes only (minutes instead of ~30)")
    ap.add_argument("--n-boot", type=int, default=1000)
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

    enc_state, enc_cfg, origin = pretrained_encoder(args, spec, out, n_unlabeled, steps)
    x_lab, y_lab = phantom_set(n_labelled, SEEDS["labelled"], "default", spec)
    x_test, y_test = phantom_set(n_test, SEEDS["test"], "ood", spec)
    feats = {name: (frozen_features(state, enc_cfg, x_lab, args.seed), frozen_features(state, enc_cfg, x_test, args.seed))
             for name, state in (("ssl", enc_state), ("scratch", None))}
    rows = []
    for k in budgets:
        row: dict = {"labels_per_class": k}
        draws = [few_labels(y_lab, k, args.seed + 1000 * d + k) for d in range(args.probe_draws)]
        probe = {name: [linear_probe_scores(f_lab[idx], y_lab[idx], f_test) for idx in draws] for name, (f_lab, f_test) in feats.items()}
        row["linear"] = compare(y_test, probe["ssl"], probe["scratch"], args.n_boot, args.seed)
        if not args.skip_finetune:
            idx, t0 = draws[0], time.time()
            full = {name: [finetune_scores(state, enc_cfg, x_lab[idx], y_lab[idx], x_test, epochs, args.seed + k)]
                    for name, state in (("ssl", enc_state), ("scratch", None))}
            row["finetune"] = compare(y_test, full["ssl"], full["scratch"], args.n_boot, args.seed)
            row["finetune"]["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print_table([row])
    print_table(rows)
    summary = {
        "task": TASK, "quick": args.quick, "threads": args.threads, "encoder": origin,
        "n_labelled_pool": n_labelled, "n_test_ood": n_test, "finetune_epochs": epochs, "probe_draws": args.probe_draws,
        "test_prevalence": float(y_test.mean()), "rows": rows, "total_seconds": round(time.time() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\ntotal {summary['total_seconds']:.0f} s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
