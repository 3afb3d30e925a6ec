"""Recipe for the bundled demo model: a tiny 3D ViT trained on synthetic head CTs.

    python -m fmct.train.demo_model --out Resources/DemoModel
    python -m fmct.train.demo_model --encoder runs/pretrain/bundle --out Resources/DemoModel
    python -m fmct.train.demo_model --out Resources/DemoModel --resume runs/demo   # hours on a CPU: resumable

Trains on phantoms (random findings, thick and thin slices, varied anatomy), from scratch or
from a self-supervised encoder made by `fmct pretrain` (with layer-wise lr decay), calibrates a
temperature and picks a threshold per task on a validation split, and measures AUROC and
saliency-in-lesion on test phantoms whose seeds never appear in training, of every --test-anatomy
(AUROC with a bootstrap CI, ECE and sensitivity / specificity at the chosen threshold, per anatomy:
the real-CT issue's targets are on "default" and "ood"). Everything it did is written into the
bundle's fmct.json.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fmct.conventions.atomic import write_bytes_atomic, write_text_atomic
from fmct.data.rescan import random_variation
from fmct.inference.bundle import BundleMeta, Task, load_bundle, save_bundle, write_meta
from fmct.inference.onnx_runner import onnx_summary
from fmct.inference.ood import DEFAULT_QUANTILE, fit_reference
from fmct.conventions.errors import ConfigError
from fmct.features.metrics import auroc, evaluation_report, pointing_game, saliency_in_mask
from fmct.inference.explain import explain
from fmct.models import FMCTClassifier, preset
from fmct.phantom import ANATOMY_PRESETS, make_phantom
from fmct.preprocessing.preprocessor import Preprocessor, PreprocessSpec
from fmct.inference.calibration import calibrated_probabilities
from fmct.train.calibration import calibrate_tasks
from fmct.train.reference import write_reference
from fmct.train.supervised import (SupervisedConfig, positive_weights, predict_logits, predict_with_features, tensor_batches,
                                   train_classifier)
from fmct.conventions.runtime import EXPLAIN_METHODS, torch_device
from fmct.conventions.tasks import HEMORRHAGE_TYPES, TASKS

log = logging.getLogger("fmct.train.demo_model")

SEED_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000, "saliency": 4_000_000,
             "reference": 5_000_000, "calibration": 6_000_000}  # the last two: out-of-distribution statistics
IN_PLANE_SIZES = (128, 160, 256)  # a 512-px CT block-averages like 256 at 3 mm, with less noise
TEST_ANATOMY_OFFSET = 100_000     # test seeds of the i-th --test-anatomies preset: SEED_BASE["test"] + i * this
Split = tuple[torch.Tensor, torch.Tensor, np.ndarray]   # preprocessed phantoms, labels, "thick"/"thin" per case
_DATA_SOURCES = ("fmct/phantom", "fmct/data/rescan.py", "fmct/preprocessing/preprocessor.py")  # the code a split's voxels come from
SPLIT_FORMAT = 1  # bump when _one_case / make_split change what a split holds: kept splits are then made again


def _presets(text: str) -> list[str]:
    """Comma-separated anatomy presets; an unknown one fails before any phantom is made."""
    names = [a.strip() for a in text.split(",") if a.strip()] or ["default"]
    unknown = [n for n in names if n not in ANATOMY_PRESETS]
    if unknown:
        raise ConfigError(f"unknown anatomy preset {', '.join(unknown)}: use {', '.join(ANATOMY_PRESETS)}")
    return names


def _one_case(args: tuple) -> tuple[np.ndarray, np.ndarray, str]:
    seed, slices, in_plane, spec_dict, augment, anatomy = args
    phantom = make_phantom(seed, slices=slices, in_plane_size=in_plane, anatomy=anatomy)
    volume = phantom.volume
    if augment:  # a label-preserving rescan (pose, FOV, kernel, noise, slices), seeded by the case
        volume, _ = random_variation(volume, np.random.default_rng([seed, 12]))
    x = Preprocessor(PreprocessSpec.from_dict(spec_dict))(volume).tensor[0].half().numpy()
    y = np.array([phantom.labels[t] for t in TASKS], dtype=np.uint8)
    return x, y, slices


def make_split(split: str, n: int, spec: PreprocessSpec, workers: int, augment: bool = False,
               anatomies: list[str] | None = None, seed_offset: int = 0) -> Split:
    """n preprocessed phantoms; half thick, half thin slices, so both are always measured.

    augment: each phantom rescanned with one random CT-level variation (`fmct.data.rescan`), seeded by
    its seed; for the training split only, so validation and test measure clean phantoms.
    anatomies: presets taken in turn, in runs of 2 x len(IN_PLANE_SIZES) cases so every preset gets
    every slice kind and in-plane size.
    """
    base, anatomies = SEED_BASE[split] + seed_offset, anatomies or ["default"]
    run = 2 * len(IN_PLANE_SIZES)
    jobs = [
        (base + i, "thick" if i % 2 == 0 else "thin", IN_PLANE_SIZES[(i // 2) % len(IN_PLANE_SIZES)], spec.to_dict(), augment,
         anatomies[(i // run) % len(anatomies)])
        for i in range(n)
    ]
    # spawn, not fork: a forked child of a process whose torch thread pool is running can hang
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        cases = []
        for case in pool.map(_one_case, jobs, chunksize=4):
            cases.append(case)
            if len(cases) % max(n // 10, 1) == 0 or len(cases) == n:
                log.info("%s split: %d/%d phantoms", split, len(cases), n)
    x = torch.from_numpy(np.stack([c[0] for c in cases]))
    y = torch.from_numpy(np.stack([c[1] for c in cases]))
    return x, y, np.array([c[2] for c in cases])


def _data_code_hash() -> str:
    """The source of everything that makes a split: a cache made by other code is never reused."""
    root, h = Path(__file__).resolve().parents[2], hashlib.sha256()
    for src in _DATA_SOURCES:
        for f in sorted((root / src).rglob("*.py")) if (root / src).is_dir() else [root / src]:
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def cached_split(folder: Path | None, name: str, key: dict, make: Callable[[], Split]) -> Split:
    """A split from folder/<name>.safetensors when it was made with this key, else made (and kept there)."""
    from safetensors.torch import load_file, save

    if folder is None:
        return make()
    key = {**key, "format": SPLIT_FORMAT, "seed_base": SEED_BASE, "in_plane": IN_PLANE_SIZES, "code": _data_code_hash()}
    path, key_text = folder / f"split-{name}.safetensors", json.dumps(key, sort_keys=True)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("key")
        if stored == key_text:
            t = load_file(str(path))
            log.info("split %s: %d phantoms from %s", name, len(t["x"]), path)
            return t["x"], t["y"], np.where(t["thin"].numpy() == 1, "thin", "thick")
        log.info("split %s: %s was made with other settings or code; making it again", name, path)
    x, y, slices = make()
    thin = torch.from_numpy((slices == "thin").astype(np.uint8))
    write_bytes_atomic(path, save({"x": x.contiguous(), "y": y.contiguous(), "thin": thin}, metadata={"key": key_text}))
    return x, y, slices


def _check_resume_recipe(folder: Path, recipe: dict) -> None:
    """A --resume folder serves one recipe: continuing it with other settings would mix two trainings."""
    path = folder / "recipe.json"
    if path.is_file() and json.loads(path.read_text()) != recipe:
        raise ConfigError(f"--resume {folder} holds a run of another recipe ({path}); use the same options, "
                          "or another --resume folder (its split-*.safetensors phantoms may be moved there: they are reused "
                          "when their data settings match)")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(recipe, indent=1, sort_keys=True))


def measure_saliency(model: FMCTClassifier, spec: PreprocessSpec, device: torch.device, n_per_task: int, methods: list[str]) -> dict:
    """Share of saliency in the lesion vs the lesion's share of the head, and pointing-game hits."""
    pre = Preprocessor(spec)
    results: dict[str, dict] = {}
    for method in methods:
        rows: dict[str, list] = {t: [] for t in HEMORRHAGE_TYPES}
        for t_i, task in enumerate(HEMORRHAGE_TYPES):
            for k in range(n_per_task):
                seed = SEED_BASE["saliency"] + 100 * t_i + k
                phantom = make_phantom(seed, findings=[task], slices="thick" if k % 2 == 0 else "thin", in_plane_size=256)
                mi = pre(phantom.volume)
                model_map = explain(model, mi.tensor.to(device), TASKS.index(task), method)
                sal = pre.to_input_grid(model_map, mi).array
                head = phantom.volume.array > -300
                mask = phantom.masks[task]
                stats = saliency_in_mask(sal, mask, head)
                stats["hit"] = pointing_game(sal, mask, phantom.volume.spacing[::-1])
                rows[task].append(stats)
        results[method] = {
            task: {
                "n": len(r),
                "share_in_mask": float(np.mean([s["share_in_mask"] for s in r])),
                "mask_share_of_head": float(np.mean([s["mask_share_of_head"] for s in r])),
                "enrichment": float(np.mean([s["enrichment"] for s in r])),
                "pointing_game": float(np.mean([s["hit"] for s in r])),
            }
            for task, r in rows.items()
        }
    return results


def test_metrics(model: FMCTClassifier, tests: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]],
                 tasks: list[Task], device: torch.device) -> dict:
    """Per test anatomy: every task's AUROC with its CI, ECE of the calibrated probabilities and
    sensitivity / specificity at the bundle's threshold; the first anatomy also as test_auroc
    (all / thick / thin), the bundle's headline numbers."""
    temps = np.array([t.temperature for t in tasks])
    metrics: dict = {"test": {}}
    for n, (anatomy, (x, y, slices)) in enumerate(tests.items()):
        logits, labels = predict_logits(model, x, device), y.numpy()
        report = evaluation_report(labels.astype(np.float64), calibrated_probabilities(logits, temps), TASKS,
                                   [t.threshold for t in tasks])
        for i, name in enumerate(TASKS):
            for kind in ("thick", "thin"):
                report[name][f"auroc_{kind}"] = auroc(labels[slices == kind, i], logits[slices == kind, i])
            log.info("test %-9s %-18s AUROC %.3f [%.3f, %.3f] thick %.3f thin %.3f ECE %.3f", anatomy, name,
                     report[name]["auroc"], *report[name]["auroc_ci95"], report[name]["auroc_thick"],
                     report[name]["auroc_thin"], report[name]["ece"])
        metrics["test"][anatomy] = report
        if n == 0:
            metrics["test_anatomy"] = anatomy
            metrics["test_auroc"] = {name: {"all": r["auroc"], "thick": r["auroc_thick"], "thin": r["auroc_thin"]}
                                     for name, r in report.items()}
            metrics["test_prevalence"] = {name: float(labels[:, i].mean()) for i, name in enumerate(TASKS)}
            metrics["n_test"] = int(len(labels))
    return metrics


def initial_model(encoder: str | None, spec: PreprocessSpec, layer_decay: float, weight_decay: float,
                  init: str | None = None) -> tuple[FMCTClassifier, list[dict] | None, dict]:
    """Random init, the given pretrained encoder with layer-wise lr decay, or (init) a trained
    demo-model bundle whose every weight, head included, training continues from; plus provenance.

    init exists because a CPU cannot afford the recipe from scratch (hours): a retrain on new phantoms
    can start from the previous model and say so in its provenance."""
    if encoder is not None and init is not None:
        raise ConfigError("--encoder and --init both name a starting point; give one")
    if encoder is None and init is None:
        cfg = preset("tiny", img_size=spec.tensor_shape, in_chans=spec.in_channels)
        return FMCTClassifier(cfg, len(TASKS)), None, {"kind": "supervised from scratch"}
    start = encoder or init
    pretrained = load_bundle(start)
    if pretrained.meta.preprocessing.to_dict() != spec.to_dict():
        raise ConfigError(f"{start} was trained with preprocessing {pretrained.meta.preprocessing.to_dict()}, "
                          f"the demo model uses {spec.to_dict()}; " + (
                              "continue from a demo model made with the same preprocessing" if init is not None else
                              f"pretrain with data.spacing_mm {list(spec.spacing_mm)} and data.size {list(spec.size)}"))
    if init is not None:
        names = [t.name for t in pretrained.meta.tasks]
        if names != list(TASKS):
            raise ConfigError(f"--init {init} predicts {names or 'no tasks'}, the demo model {list(TASKS)}; "
                              "use a demo-model bundle (or --encoder for a pretrained encoder)")
        model = FMCTClassifier(pretrained.meta.encoder, len(TASKS))
        model.load_state_dict(pretrained.model.state_dict())
        return model, None, {"kind": "continued from an earlier demo model", "init_bundle": pretrained.meta.name,
                             "init_sha256": pretrained.weights_sha256, "init_provenance": pretrained.meta.provenance}
    model = FMCTClassifier(pretrained.meta.encoder, len(TASKS))
    model.encoder.load_state_dict(pretrained.model.encoder.state_dict())
    model.encoder.mask_token.requires_grad_(False)
    origin = {"kind": "fine-tuned from a self-supervised encoder", "layer_decay": layer_decay,
              "encoder_bundle": pretrained.meta.name, "encoder_provenance": pretrained.meta.provenance}
    return model, model.param_groups(weight_decay, layer_decay), origin


def reference_main(argv: list[str]) -> int:
    """`python -m fmct.train.demo_model reference BUNDLE`: OOD statistics for a bundle of this recipe,
    on fresh phantoms of its distribution (ood.safetensors is added; the weights are not touched)."""
    ap = argparse.ArgumentParser(prog="python -m fmct.train.demo_model reference",
                                 description="Out-of-distribution statistics of a demo-recipe bundle, from fresh phantoms")
    ap.add_argument("bundle", help="a bundle folder made by the demo recipe (phantoms are its training distribution)")
    ap.add_argument("--n-reference", type=int, default=400)
    ap.add_argument("--n-calibration", type=int, default=200)
    ap.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    ap.add_argument("--anatomy", default="default",
                    help="phantom anatomy presets, comma-separated, taken in turn (the bundle's training anatomies)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = load_bundle(args.bundle)
    device = torch_device(args.device)
    spec = bundle.meta.preprocessing
    anatomies = [a.strip() for a in args.anatomy.split(",") if a.strip()]
    x_ref, _, _ = make_split("reference", args.n_reference, spec, args.workers, anatomies=anatomies)
    x_cal, _, _ = make_split("calibration", args.n_calibration, spec, args.workers, anatomies=anatomies)
    _, f_ref = predict_with_features(bundle.model, x_ref, device)
    _, f_cal = predict_with_features(bundle.model, x_cal, device)
    stats = fit_reference(f_ref, f_cal, args.quantile, source=(
        f"demo-recipe phantoms (anatomy {', '.join(anatomies)}, not augmented): reference = split 'reference' "
        f"({len(f_ref)}), threshold = split 'calibration' ({len(f_cal)}), fmct.train.demo_model seeds"))
    path = write_reference(args.bundle, stats)
    log.info("wrote %s: %d reference and %d calibration phantoms, threshold %.3f", path, len(f_ref), len(f_cal),
             stats.threshold)
    return 0


def _demo_meta(args: argparse.Namespace, model: FMCTClassifier, spec: PreprocessSpec, tasks: list[Task], metrics: dict,
               origin: dict, train_cfg: SupervisedConfig, losses: list[float], train_s: float,
               device: torch.device) -> BundleMeta:
    """The demo bundle's fmct.json: the recipe as a command line, the training, the data and its seeds."""
    train_anatomies, test_anatomies = _presets(args.anatomy), _presets(args.test_anatomies)
    return BundleMeta(
        name="fmct-demo-tiny",
        description=f"Demo model: tiny 3D ViT, {origin['kind']}, on synthetic head CTs (fmct.phantom). "
        "For trying the software, not for clinical use.",
        encoder=model.encoder.cfg,
        preprocessing=spec,
        tasks=tasks,
        provenance={
            "recipe": "python -m fmct.train.demo_model " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                    if k not in ("out", "resume") and v is not None),
            "training": {**origin, **asdict(train_cfg), "final_loss": losses[-1], "train_seconds": round(train_s, 1),
                         "device": str(device)},
            "data": {
                "source": f"fmct.phantom, anatomy presets {train_anatomies} in turn (test: {test_anatomies}, one split each), "
                          f"half thick (4-5 mm) / half thin (0.5-1 mm) slices, in-plane sizes {IN_PLANE_SIZES}",
                "seeds": {**{s: f"{SEED_BASE[s]}..{SEED_BASE[s] + n - 1}" for s, n in (("train", args.n_train), ("val", args.n_val))},
                          **{f"test {a}": f"{SEED_BASE['test'] + i * TEST_ANATOMY_OFFSET}.."
                                          f"{SEED_BASE['test'] + i * TEST_ANATOMY_OFFSET + args.n_test - 1}"
                             for i, a in enumerate(test_anatomies)}},
                "saliency_seeds": f"{SEED_BASE['saliency']}.. (100 per hemorrhage type)",
                "augmentation": "training split: one random label-preserving CT-level variation per phantom "
                                "(fmct.data.rescan.random_variation, seeded by the phantom seed)" if args.augment else "none",
            },
            "seed": args.seed,
        },
        metrics=metrics,
    )


def _parser() -> argparse.ArgumentParser:
    """The recipe's options (its defaults are the shipped model's)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="Resources/DemoModel")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-val", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--saliency-cases", type=int, default=10, help="test phantoms per hemorrhage type for saliency metrics (0: skip)")
    ap.add_argument("--encoder", default=None, help="start from this pretrained encoder bundle (fmct pretrain's RUN/bundle)")
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="rescan each training phantom with one random CT-level variation (fmct.data.rescan); val/test stay clean")
    ap.add_argument("--anatomy", default="default,realistic",
                    help="anatomy presets of the training and validation phantoms, comma-separated, taken in turn")
    ap.add_argument("--test-anatomies", default="default,ood",
                    help="one test split of --n-test phantoms per preset; metrics per preset (the first also as test_auroc)")
    ap.add_argument("--init", default=None, metavar="BUNDLE",
                    help="continue training this demo-model bundle (all weights, head included) instead of starting afresh")
    ap.add_argument("--layer-decay", type=float, default=0.75, help="lr shrink per block below the head, with --encoder")
    ap.add_argument("--resume", type=Path, default=None, metavar="DIR",
                    help="keep the phantom splits and a checkpoint per epoch in DIR, and continue from what is there")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    device = torch_device(args.device)
    spec = PreprocessSpec()
    train_anatomies, test_anatomies = _presets(args.anatomy), _presets(args.test_anatomies)
    train_cfg = SupervisedConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    # a bad bundle fails before the phantoms
    model, groups, origin = initial_model(args.encoder, spec, args.layer_decay, train_cfg.weight_decay, args.init)
    work = args.resume
    if work is not None:
        _check_resume_recipe(work, {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                    if k not in ("out", "device", "workers", "resume")})

    t0 = time.time()
    splits = {s: cached_split(work, s, {"n": n, "augment": args.augment and s == "train", "anatomies": train_anatomies},
                              lambda s=s, n=n: make_split(s, n, spec, args.workers, augment=args.augment and s == "train",
                                                          anatomies=train_anatomies))
              for s, n in (("train", args.n_train), ("val", args.n_val))}
    tests = {a: cached_split(work, f"test-{a}", {"n": args.n_test, "offset": i * TEST_ANATOMY_OFFSET},
                             lambda a=a, i=i: make_split("test", args.n_test, spec, args.workers, anatomies=[a],
                                                         seed_offset=i * TEST_ANATOMY_OFFSET))
             for i, a in enumerate(test_anatomies)}
    log.info("%d phantoms ready (made or kept) in %.0f s", sum(len(v[0]) for v in [*splits.values(), *tests.values()]), time.time() - t0)

    t0 = time.time()
    x_train, y_train = splits["train"][0], splits["train"][1].float()
    if device.type == "cuda":
        x_train, y_train = x_train.to(device), y_train.to(device)  # a phantom set fits in GPU memory
    batches, steps = tensor_batches(x_train, y_train, args.batch_size, args.seed)
    losses = train_classifier(model, batches, steps, positive_weights(y_train, train_cfg.max_pos_weight), train_cfg,
                              device, groups, progress=lambda f, m: log.info(m),
                              checkpoints=work / "checkpoints" if work is not None else None)
    train_s = time.time() - t0

    val_logits, val_features = predict_with_features(model, splits["val"][0], device)
    val_y = splits["val"][1].numpy()
    tasks = calibrate_tasks(TASKS, val_logits, val_y.astype(np.float64))

    metrics = test_metrics(model, tests, tasks, device)

    meta = _demo_meta(args, model, spec, tasks, metrics, origin, train_cfg, losses, train_s, device)
    _, train_features = predict_with_features(model, x_train, device)
    reference = fit_reference(train_features, val_features, source="demo recipe: training split (reference), "
                                                                    "validation split (threshold)")
    save_bundle(model.cpu(), meta, args.out, reference=reference)  # before the slow part: a cut-off run keeps its model
    log.info("wrote %s", args.out)
    if args.saliency_cases >= 1:
        meta.metrics["saliency"] = measure_saliency(model.to(device), spec, device, args.saliency_cases,
                                                    [m for m in EXPLAIN_METHODS if m != "attention_rollout"])
        write_meta(meta, args.out)
        log.info("saliency metrics added to %s", args.out)
    # Last, since it records itself in fmct.json: findings-only analysis then runs without torch
    # (fmct.inference.runners.choose_backend), half the cold start.
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        log.warning("model.onnx not written: install fmct[onnx], then run `fmct export %s --onnx`", args.out)
        return
    from fmct.export.onnx import export_onnx

    log.info("model.onnx: %s", onnx_summary(export_onnx(args.out)))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["reference"]:
        raise SystemExit(reference_main(sys.argv[2:]))
    main()
