"""`fmct pretrain`'s options, torch-free (the `fmct` parser is built before any command imports torch).

Precedence: the --size recipe (fmct.ssl.config.recipe), or the --config file, < the flags < --set.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fmct.conventions.errors import ConfigError
from fmct.ssl.config import SIZES, SSLConfig, apply_size, recipe

USAGE_EXAMPLES = """examples:
  fmct pretrain studies/ --out runs/pretrain                    a folder of CTs, the tiny CPU recipe
  fmct pretrain studies/ --out runs/p --size base --batch-size 64 --max-steps 50000 --device cuda
  fmct pretrain --config Resources/Configs/pretrain_tiny.yaml --out runs/p --set dino.teacher_temp=0.03
  fmct prepare studies/ --out cache --workers 8 && fmct pretrain cache --out runs/p   decode once, then train
  fmct pretrain studies/ --out runs/pretrain --resume           continue a stopped run
  torchrun --nproc_per_node 4 -m fmct.train.pretrain studies/ --out runs/p --size base
Watch RUN/losses.jsonl: view_gap and feature_spread should rise and dino_over_log_k fall below 1."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `fmct pretrain` (also `python -m fmct.train.pretrain`, e.g. under torchrun)."""
    parser.add_argument("data", nargs="?", default=None,
                        help="unlabelled CTs: a folder of DICOM/NIfTI studies, a manifest CSV, the RSNA or CQ500 layout, "
                             "a cache from `fmct prepare`, or a .safetensors file of preprocessed tensors 'x' [N, C, D, H, W] "
                             "(default: the config's data, "
                             "else synthetic phantoms)")
    parser.add_argument("--out", required=True, help="run folder: config.json, losses.jsonl, view_check.json, checkpoints/, bundle/")
    parser.add_argument("--config", default=None,
                        help="YAML or JSON SSL config (fields of fmct.ssl.config.SSLConfig; e.g. "
                             "Resources/Configs/pretrain_tiny.yaml); default: the --size recipe. Flags override it")
    parser.add_argument("--size", default=None, choices=sorted(SIZES),
                        help="encoder size and its recipe: tiny (default; learns on a CPU in ~20 min), small, base (a GPU)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimisation steps (optim.steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="volumes per step per process (optim.batch_size)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (optim.lr)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda (or gpu), cuda:N or mps (run.device)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader worker processes making the crops ahead of the model (run.workers; 0: in the "
                             "training process). Crops stay a pure function of the step and seed either way")
    parser.add_argument("--seed", type=int, default=None, help="run.seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field, e.g. --set dino.teacher_temp=0.03 --set crops.n_local=4 (repeatable)")
    parser.add_argument("--verify", action="store_true",
                        help="with a prepared cache: check every study's bytes and source files first (stats every source)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out (same config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an --out that holds an earlier run (its files are removed first); without "
                             "it, or --resume, such an --out is refused")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def config_from_args(args: argparse.Namespace) -> SSLConfig:
    """Recipe of --size (or --config's file) < flags < --set, as one typed SSLConfig."""
    import yaml

    from fmct.conventions.config_file import read_config_file
    from fmct.conventions.runtime import parse_device

    if args.config:
        raw = read_config_file(args.config)
        if args.size:
            raw = apply_size(raw, args.size, changes=False)
    else:
        raw = recipe(args.size or "tiny")
    sections = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}

    def put(dotted: str, value: Any) -> None:
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"--set {dotted}: give section.key=value, e.g. optim.lr=1e-4")
        node = sections.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{section}' is not a config section")
        node[key] = value

    if args.data:
        path = Path(args.data)
        if not path.exists():
            raise ConfigError(f"pretraining data {path} does not exist; give a folder of CTs, a manifest CSV or a .safetensors file")
        from fmct.data.cache import is_prepared_cache

        put("data.source", "tensors" if path.suffix == ".safetensors" else "prepared" if is_prepared_cache(path) else "manifest")
        put("data.path", str(path))
    if getattr(args, "device", None) is not None and args.device.strip().lower() != "mps":
        args.device = parse_device(args.device)  # the one device-name check (gpu, gpu:N accepted as cuda)
    if getattr(args, "verify", False):
        put("data.verify", True)
    for flag, key in (("max_steps", "optim.steps"), ("batch_size", "optim.batch_size"), ("lr", "optim.lr"),
                      ("device", "run.device"), ("workers", "run.workers"), ("seed", "run.seed")):
        if getattr(args, flag, None) is not None:
            put(key, getattr(args, flag))
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        put(key.strip(), value)
    return SSLConfig.from_dict(sections)


def build_parser(prog: str = "fmct pretrain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Self-supervised pretraining of the encoder (DINO + iBOT + "
                                     "masked reconstruction) on unlabelled head CTs; writes a task-less bundle to fine-tune.",
                                     epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


