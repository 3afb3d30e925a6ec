"""Does self-supervised pretraining help when labels are scarce, and do both halves earn their place?

    python benchmarks/ssl_vs_scratch.py                      # four arms, tiny encoder, CPU (hours on 2 cores)
    python benchmarks/ssl_vs_scratch.py --arms scratch all   # two arms
    python benchmarks/ssl_vs_scratch.py --encoder RUN/bundle # arm "given": an encoder from `fmct pretrain` vs scratch
    python benchmarks/ssl_vs_scratch.py --quick              # minutes: checks the pipeline, numbers meaningless
    python benchmarks/ssl_vs_scratch.py --resume             # a killed run goes on where it stopped

--resume continues each arm's pretraining from its last checkpoint and skips the fine-tunes whose test
logits are already in OUT/finetune_cache.json (written atomically after each one; refused when the
run's settings differ), so a CPU run of several hours survives being stopped.

Arms: scratch (random init), mae (masked voxel reconstruction only), dino (DINO + iBOT only), all
(DINO + iBOT + reconstruction: the shipped recipe). Every pretrained arm is the shipped tiny recipe
(fmct.ssl.config.recipe) with the other losses switched off, on unlabeled phantoms of both anatomy
presets, same steps and seed.
For 8, 16 and 32 labels per class (K positives + K negatives for any_hemorrhage), several seeded
label draws:
   - linear probe (frozen encoder, L2 logistic regression on [CLS, mean patch token]), --probe-draws draws;
   - full fine-tuning (layer-wise lr decay; the `fmct finetune --mode full` recipe), --finetune-draws draws.
Test on held-out phantoms of the "ood" anatomy preset. AUROC averaged over draws, a 95% CI from a
bootstrap over test cases, and paired differences (same resampled cases): every arm - scratch, and
all - mae (does self-distillation add to masked reconstruction?).
Prints a table and writes results JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import bootstrap_aurocs, ci95

from fmct.conventions.atomic import write_text_atomic
from fmct.inference.bundle import load_bundle
from fmct.features.metrics import auroc
from fmct.models import FMCTClassifier
from fmct.models.config import ViT3DConfig
from fmct.phantom import make_phantom
from fmct.preprocessing.preprocessor import Preprocessor, PreprocessSpec
from fmct.ssl.config import SSLConfig
from fmct.train.pretrain import TensorVolumes, pretrain
from fmct.train.supervised import SupervisedConfig, positive_weights, predict_logits, tensor_batches, train_classifier

TASK = "any_hemorrhage"
SEEDS = {"unlabeled": 10_000_000, "labelled": 11_000_000, "test": 12_000_000}
ARMS = ("scratch", "mae", "dino", "all")
ARM_LOSSES = {  # what each pretrained arm switches on, over the shipped tiny recipe
    "mae": {"dino": {"loss_weight": 0.0}, "ibot": {"enabled": False}, "mae": {"enabled": True}},
    "dino": {"mae": {"enabled": False}, "ibot": {"enabled": True}},
    "all": {},
}
PAIRS = (("mae", "scratch"), ("dino", "scratch"), ("all", "scratch"), ("all", "mae"), ("given", "scratch"))


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


def pretrained_encoder(arm: str, args: argparse.Namespace, spec: PreprocessSpec, out: Path, x_unl: torch.Tensor,
                       steps: int) -> tuple[dict, ViT3DConfig, dict]:
    """One arm's encoder state, its config, and where it came from."""
    from fmct.ssl.config import recipe

    raw = recipe("tiny")
    for section, values in ARM_LOSSES[arm].items():
        raw.setdefault(section, {}).update(values)
    raw["data"] = {"source": "tensors", "path": "in-memory", "spacing_mm": list(spec.spacing_mm), "size": list(spec.size)}
    raw["optim"]["steps"] = steps
    raw["run"] = {"seed": args.seed, "checkpoint_every": max(steps // 4, 1), "device": "cpu"}
    cfg = SSLConfig.from_dict(raw)
    t0 = time.time()
    result = pretrain(cfg, out / f"pretrain-{arm}", resume=args.resume, dataset=TensorVolumes(x_unl))
    bundle = load_bundle(result.bundle)
    tail = result.losses[-10:]
    keys = ("dino", "ibot", "mae", "teacher_entropy", "view_gap", "feature_spread", "dino_over_log_k")
    origin = {"arm": arm, "pretrain_steps": steps, "n_unlabeled": len(x_unl), "pretrain_seconds": round(time.time() - t0, 1),
              "last10_mean": {k: round(sum(r[k] for r in tail) / len(tail), 4) for k in keys if k in tail[-1]}}
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
                     model.param_groups(cfg.weight_decay, 0.75))
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


def compare(y: np.ndarray, arms: dict[str, list[np.ndarray]], n_boot: int, seed: int) -> dict:
    """Mean AUROC over draws per arm with bootstrap CIs over test cases, and paired differences (PAIRS)."""
    names = list(arms)
    b = bootstrap_aurocs(y, [arms[n] for n in names], n_boot, seed)
    out = {"arms": {n: {"auroc": round(float(np.mean([auroc(y, s) for s in arms[n]])), 4), "ci95": ci95(b[:, i]),
                        "draws": len(arms[n])} for i, n in enumerate(names)}, "differences": {}}
    for a, c in PAIRS:
        if a in arms and c in arms:
            i, j = names.index(a), names.index(c)
            out["differences"][f"{a} - {c}"] = {"difference": round(out["arms"][a]["auroc"] - out["arms"][c]["auroc"], 4),
                                                "ci95": ci95(b[:, i] - b[:, j])}
    return out


class FinetuneCache:
    """Test logits of finished fine-tunes, keyed by arm, budget and draw, for --resume."""

    def __init__(self, path: Path, settings: dict, resume: bool):
        self.path, self.settings, self.done = path, settings, {}
        if resume and path.exists():
            stored = json.loads(path.read_text())
            if stored["settings"] != settings:
                raise SystemExit(f"--resume: {path} was made with other settings ({stored['settings']}); "
                                 "use another --out or drop --resume")
            self.done = stored["logits"]

    def get(self, key: str, compute) -> np.ndarray:
        if key not in self.done:
            self.done[key] = [float(v) for v in compute()]
            write_text_atomic(self.path, json.dumps({"settings": self.settings, "logits": self.done}))
        return np.array(self.done[key])


def print_table(rows: list[dict]) -> None:
    for r in rows:
        for kind in ("finetune", "linear"):
            if kind not in r:
                continue
            arms = "  ".join(f"{n} {v['auroc']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" for n, v in r[kind]["arms"].items())
            diffs = "  ".join(f"{n} {v['difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                              for n, v in r[kind]["differences"].items())
            print(f"{kind:>8} K={r['labels_per_class']:>2}  {arms}\n{'':>14}{diffs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline only")
    ap.add_argument("--out", default="benchmarks/out/ssl_vs_scratch")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--encoder", default=None, help="a pretrained encoder bundle (fmct pretrain's RUN/bundle): arm 'given'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-unlabeled", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per arm (batch 8)")
    ap.add_argument("--n-labelled", type=int, default=300, help="labelled pool the K-per-class subsets are drawn from")
    ap.add_argument("--n-test", type=int, default=300, help="out-of-distribution test phantoms")
    ap.add_argument("--epochs", type=int, default=25, help="fine-tuning epochs (every arm)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32], help="labels per class")
    ap.add_argument("--probe-draws", type=int, default=5, help="label draws per budget for the linear probe")
    ap.add_argument("--finetune-draws", type=int, default=3, help="label draws per budget for full fine-tuning")
    ap.add_argument("--skip-finetune", action="store_true", help="linear probes only")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--resume", action="store_true", help="continue a killed run in the same --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        n_unlabeled, steps, n_labelled, n_test, epochs, budgets = 16, 4, 40, 24, 2, (2, 4)
    else:
        n_unlabeled, steps, n_labelled, n_test, epochs = args.n_unlabeled, args.steps, args.n_labelled, args.n_test, args.epochs
        budgets = tuple(args.budgets)
    spec = PreprocessSpec()
    out = Path(args.out)
    t_start = time.time()

    encoders: dict[str, tuple[dict | None, ViT3DConfig | None, dict]] = {}
    pretrained = [a for a in args.arms if a != "scratch"]
    if pretrained:
        half = n_unlabeled // 2  # both anatomy presets: more varied data (benchmarks/HISTORY.md#history-15)
        x_unl = torch.cat([phantom_set(half, SEEDS["unlabeled"], "default", spec)[0],
                           phantom_set(n_unlabeled - half, SEEDS["unlabeled"] + half, "ood", spec)[0]])
        for arm in pretrained:
            encoders[arm] = pretrained_encoder(arm, args, spec, out, x_unl, steps)
            print(f"pretrained {arm}: {encoders[arm][2]}", flush=True)
    if args.encoder:
        bundle = load_bundle(args.encoder)
        encoders["given"] = (bundle.model.encoder.state_dict(), bundle.meta.encoder, {"encoder": str(args.encoder)})
    from fmct.ssl.config import recipe

    enc_cfg = next((e[1] for e in encoders.values()), None) or SSLConfig.from_dict(recipe("tiny")).encoder_config
    if "scratch" in args.arms:
        encoders = {"scratch": (None, enc_cfg, {"arm": "scratch"}), **encoders}

    x_lab, y_lab = phantom_set(n_labelled, SEEDS["labelled"], "default", spec)
    x_test, y_test = phantom_set(n_test, SEEDS["test"], "ood", spec)
    feats = {name: (frozen_features(state, cfg, x_lab, args.seed), frozen_features(state, cfg, x_test, args.seed))
             for name, (state, cfg, _) in encoders.items()}
    settings = {"arms": list(encoders), "seed": args.seed, "n_unlabeled": n_unlabeled, "steps": steps,
                "n_labelled": n_labelled, "n_test": n_test, "epochs": epochs, "encoder": args.encoder}
    out.mkdir(parents=True, exist_ok=True)
    cache = FinetuneCache(out / "finetune_cache.json", settings, args.resume)
    rows = []
    for k in budgets:
        row: dict = {"labels_per_class": k}
        draws = [few_labels(y_lab, k, args.seed + 1000 * d + k) for d in range(max(args.probe_draws, args.finetune_draws))]
        probe = {name: [linear_probe_scores(f_lab[idx], y_lab[idx], f_test) for idx in draws[:args.probe_draws]]
                 for name, (f_lab, f_test) in feats.items()}
        row["linear"] = compare(y_test, probe, args.n_boot, args.seed)
        if not args.skip_finetune:
            t0 = time.time()
            full = {name: [cache.get(f"{name}/K{k}/draw{d}", lambda: finetune_scores(
                               state, cfg, x_lab[idx], y_lab[idx], x_test, epochs, args.seed + k + 7 * d))
                           for d, idx in enumerate(draws[:args.finetune_draws])]
                    for name, (state, cfg, _) in encoders.items()}
            row["finetune"] = compare(y_test, full, args.n_boot, args.seed)
            row["finetune"]["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print_table([row])
    print("\nall budgets:")
    print_table(rows)
    summary = {
        "task": TASK, "quick": args.quick, "threads": args.threads, "arms": {n: e[2] for n, e in encoders.items()},
        "n_unlabeled": n_unlabeled, "pretrain_steps": steps, "n_labelled_pool": n_labelled, "n_test_ood": n_test,
        "finetune_epochs": epochs, "probe_draws": args.probe_draws, "finetune_draws": args.finetune_draws,
        "test_prevalence": float(y_test.mean()), "rows": rows, "total_seconds": round(time.time() - t_start, 1),
    }
    write_text_atomic(out / "results.json", json.dumps(summary, indent=2))
    print(f"\ntotal {summary['total_seconds']:.0f} s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
