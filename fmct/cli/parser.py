"""The `fmct` argument parsers: one _add_<command> function per command, each pointing at its
fmct.cli.commands.cmd_<command>. Building the parser imports no numerical library (the CLI starts
in tenths of a second); the data is every command's positional argument, --data its alias.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from fmct.cli.commands import (DEVICE_HELP, EXPLAIN_CHOICES, PATH_PREFIX_HELP, _device_arg, cmd_analyze, cmd_demo,
                               cmd_embed, cmd_evaluate, cmd_export, cmd_fetch, cmd_finetune, cmd_import, cmd_phantom,
                               cmd_prepare, cmd_pretrain, cmd_probe)
from fmct.conventions.runtime import DEFAULT_EXPLAIN_FINDINGS
from fmct.inference.runners import BACKEND_CHOICES
from fmct.phantom.demo_sample import DEMO_SEED


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it may call git): other commands start without it."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from fmct.conventions.version import code_version

        print(f"fmct {code_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def _data_argument(sp: argparse.ArgumentParser, help: str, dest: str = "data", required: bool = False) -> None:
    """The data as the positional argument of every command, --data kept as an alias (merged by _settle_data)."""
    sp.add_argument(dest, nargs="?", default=None, metavar=dest.upper(), help=f"{help}; or --data")
    sp.add_argument("--data", dest="data_option", default=None, metavar=dest.upper(), help=f"the same as the positional {dest.upper()}")
    sp.set_defaults(data_dest=dest, data_required=required)


def _settle_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One value for the data, whether given as the positional argument or as --data."""
    dest = getattr(args, "data_dest", None)
    if dest is None:
        return
    positional, option = getattr(args, dest), args.data_option
    if positional is not None and option is not None and positional != option:
        parser.error(f"{args.command}: the data given twice ({positional} and --data {option}); give it once")
    setattr(args, dest, positional if positional is not None else option)
    if getattr(args, dest) is None and args.data_required:
        parser.error(f"{args.command}: the data ({dest.upper()}) is required, as the first argument or --data")


def _model_options(sp: argparse.ArgumentParser) -> None:
    """The options of the commands that run a bundle on a CT (demo, analyze)."""
    sp.add_argument("--model", default=None, help="model bundle folder or .zip (default: the bundled demo model)")
    sp.add_argument("--device", default="auto", type=_device_arg, help=DEVICE_HELP)
    sp.add_argument("--explain", default=None, choices=EXPLAIN_CHOICES,
                    help="saliency method for positive findings (default: integrated_gradients; none with --backend onnx)")
    sp.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                    help="auto (default): onnx for findings only (--explain none) on the CPU when the bundle "
                         "carries a checked model.onnx, else torch; torch; or onnx: the bundle's checked "
                         "model.onnx on onnxruntime, without torch (findings only; see `fmct export --onnx`)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on a GPU over many studies)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """demo: a synthetic head CT analyzed with the bundled model."""
    d = sub.add_parser("demo", help="make a sample head CT and analyze it with the bundled model")
    d.add_argument("--out", default="fmct_demo", help="output folder (default: ./fmct_demo)")
    d.add_argument("--seed", type=int, default=DEMO_SEED, help="seed of the sample CT (chosen by benchmarks/pick_demo_seed.py)")
    d.add_argument("--overwrite", action="store_true", help="replace the results of another study in --out")
    _model_options(d)
    d.set_defaults(func=cmd_demo)


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    """analyze: one CT, or a batch of studies (--batch or a manifest .csv)."""
    a = sub.add_parser("analyze", help="analyze a head CT (DICOM folder, NIfTI, NRRD or MHA), or a batch of them")
    _data_argument(a, "DICOM series folder or a .nii/.nii.gz/.nrrd/.mha file; with --batch a folder of studies; or a "
                      "manifest .csv (columns study_id or case_id, and path)", dest="input", required=True)
    a.add_argument("--out", default="fmct_out", help="output folder (default: ./fmct_out); a batch writes one "
                                                     "folder per study and summary.csv")
    a.add_argument("--batch", action="store_true", help="INPUT is a folder of studies: each subfolder or image file is "
                                                        "one study. Studies already in --out are skipped (resume)")
    a.add_argument("--report", action="store_true", help="batch: also write report.png per study (one is always "
                                                         "written for a single CT)")
    a.add_argument("--workers", type=int, default=None,
                   help="batch: processes decoding studies ahead of the model (default min(4, CPUs) with a GPU, "
                        "CPUs/4 without; 0: decode in this process)")
    a.add_argument("--series", default=None, help="SeriesInstanceUID to use when the folder holds several series")
    a.add_argument("--keep-descriptions", action="store_true",
                   help="copy the DICOM SeriesDescription (free text that may name the patient) into findings.json and "
                        "the log; left out by default, as DICOM's basic de-identification profile does")
    a.add_argument("--findings", default=DEFAULT_EXPLAIN_FINDINGS,
                   help="which findings get a saliency map: auto (default: every positive finding on a GPU, the top "
                        "one on a CPU, where a map takes tens of seconds), top, positive, all, or a comma-separated list")
    a.add_argument("--save-ct", action="store_true", help="also write the CT as ct.nii.gz (to overlay the saliency in any viewer)")
    a.add_argument("--overwrite", action="store_true", help="replace the results of another study in --out (without it, "
                                                           "a folder holding another CT's findings.json is refused)")
    _model_options(a)
    a.set_defaults(func=cmd_analyze)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """export: model.onnx written into a bundle and checked against torch."""
    e = sub.add_parser("export", help="export a bundle's model: --onnx writes model.onnx checked against torch")
    e.add_argument("bundle", help="model bundle folder")
    e.add_argument("--onnx", action="store_true", help="write model.onnx and record the torch/onnxruntime check in fmct.json")
    e.add_argument("--check", action="store_true", help="re-check the bundle's model.onnx against its torch weights "
                                                       "on a generated head CT (exit 2 when they disagree)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    e.add_argument("--monai", action="store_true", help="write the encoder as a monai.networks.nets.ViT state dict "
                                                        "(vit.safetensors + vit.json) into BUNDLE-monai or --out")
    e.add_argument("--hf", action="store_true", help="write a Hugging Face-style folder (config.json, model.safetensors, "
                                                     "README.md model card) into BUNDLE-hf or --out")
    e.add_argument("--out", help="output folder of --monai or --hf")
    e.set_defaults(func=cmd_export)



def _add_import(sub: argparse._SubParsersAction) -> None:
    """import: an encoder trained elsewhere (FM-HCT's released weights) as an FMCT bundle."""
    im = sub.add_parser("import", help="import an encoder trained elsewhere as a bundle: fm-hct (FM-HCT's released weights)")
    im.add_argument("source", choices=["fm-hct"], help="whose checkpoint: fm-hct (NYUMedML/HeadCT-Foundation)")
    im.add_argument("checkpoint", help="the state dict: model_weights.pth (read with torch.load(weights_only=True), "
                                       "tensors only) or a .safetensors")
    im.add_argument("--out", required=True, help="bundle folder (or .zip) to write")
    im.set_defaults(func=cmd_import)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    """pretrain: its options live beside the training code (fmct.train.pretrain_args)."""
    from fmct.train.pretrain_args import USAGE_EXAMPLES, add_arguments

    pt = sub.add_parser("pretrain", help="self-supervised pretraining of the encoder (DINO + iBOT + masked reconstruction)",
                        description="Self-supervised pretraining of the encoder on unlabelled head CTs; writes a task-less "
                                    "bundle (RUN/bundle) to embed with or fine-tune. Flags override --config.",
                        epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(pt)  # its positional DATA, as every command's
    pt.add_argument("--data", dest="data_option", default=None, metavar="DATA", help="the same as the positional DATA")
    pt.set_defaults(func=cmd_pretrain, data_dest="data", data_required=False)



def _add_prepare(sub: argparse._SubParsersAction) -> None:
    """prepare: the training cache built once, in parallel, before training (fmct.data.prepare)."""
    from fmct.data.prepare import add_arguments as prepare_arguments

    pp = sub.add_parser("prepare", help="decode and resample every study once into a sharded int16 cache to train from",
                        description="A separate, resumable, parallel step before training: every study decoded and "
                                    "resampled once into CACHE (int16 HU shards + index). Rerun to resume; --shard K/M "
                                    "for array jobs; under torchrun each rank takes its own share.")
    prepare_arguments(pp)
    pp.set_defaults(func=cmd_prepare)


def _add_embed(sub: argparse._SubParsersAction) -> None:
    """embed: one feature row per study from an encoder bundle."""
    em = sub.add_parser("embed", help="features of every study from an encoder bundle (CLS, mean patch token, last layers)",
                        description="One feature row per study: the encoder's CLS token and mean patch token (and with "
                                    "--layers N those of the last N blocks). Resumable: a rerun skips studies already "
                                    "embedded with the same model and options.")
    _data_argument(em, "studies: a folder (e.g. from `fmct phantom`), a manifest CSV, the RSNA or CQ500 layout, "
                       "or a cache from `fmct prepare --model BUNDLE`", required=True)
    em.add_argument("--verify", action="store_true", help="with a prepared cache: check its bytes and source files first")
    em.add_argument("--model", required=True, help="encoder bundle: from `fmct pretrain` (RUN/bundle) or any fine-tuned bundle")
    em.add_argument("--out", required=True, help="features.npz (arrays per feature, study_id, labels) or features.csv (one row per study)")
    em.add_argument("--layers", type=int, default=0, help="also the CLS and mean patch token of the last N blocks (default 0)")
    em.add_argument("--device", default="auto", type=_device_arg, help=DEVICE_HELP)
    em.add_argument("--overwrite", action="store_true", help="start again when --out holds features of another model or options")
    em.add_argument("--path-prefix", metavar="OLD=NEW", help=PATH_PREFIX_HELP)
    em.set_defaults(func=cmd_embed)


def _add_probe(sub: argparse._SubParsersAction) -> None:
    """probe: cross-validated kNN / logistic regression on saved embeddings."""
    pb = sub.add_parser("probe", help="kNN / logistic-regression AUROC of saved embeddings on labels, cross-validated",
                        description="Evaluate an encoder on your labels in minutes: stratified k-fold kNN and L2 logistic "
                                    "regression on features from `fmct embed`; AUROC per fold and pooled with a 95% CI.")
    pb.add_argument("features", help="features.npz or .csv from `fmct embed`")
    pb.add_argument("--labels", help="labels CSV (study_id + 0/1 task columns); default: the labels the features file carries")
    pb.add_argument("--tasks", help="comma-separated tasks (default: all)")
    pb.add_argument("--method", default="both", help="knn, logreg or both (default)")
    pb.add_argument("--features-set", default="cls+patch_mean",
                    help="which features, '+'-joined: cls, patch_mean, blockK_cls, ... (default cls+patch_mean)")
    pb.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    pb.add_argument("--k", type=int, default=20, help="neighbours for kNN (default 20)")
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--out", help="write the report as JSON here")
    pb.set_defaults(func=cmd_probe)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    """finetune: task heads on labelled CTs; flags override --config."""
    ft = sub.add_parser("finetune", help="fine-tune task heads on labelled CTs (from a pretrained encoder or from scratch)",
                        description="Fine-tune task heads. Options override the --config file (YAML or JSON with the same names).")
    _data_argument(ft, "labelled studies: a manifest CSV, a folder (e.g. from `fmct phantom`), RSNA or CQ500 layout, "
                       "or a cache from `fmct prepare --model ENCODER` (default: the --config's data)")
    ft.add_argument("--config", help="YAML/JSON config (fields of fmct.train.finetune.FinetuneConfig)")
    ft.add_argument("--verify", action="store_true", default=None,
                    help="with a prepared cache: check its bytes and source files first (stats every source)")
    ft.add_argument("--out", help="output bundle folder (refused when it holds an earlier run, unless --overwrite)")
    ft.add_argument("--overwrite", action="store_true", help="replace the bundle (or anything else) in --out")
    ft.add_argument("--encoder", help="pretrained encoder bundle (from `fmct pretrain`); omit to train from scratch")
    ft.add_argument("--mode", choices=("full", "linear"), help="full fine-tuning with layer-wise lr decay (default) or a linear probe")
    ft.add_argument("--labels-per-class", type=int, help="use only K positive and K negative studies per task (seeded)")
    ft.add_argument("--tasks", help="comma-separated tasks (default: every task the data labels)")
    ft.add_argument("--epochs", type=int)
    ft.add_argument("--batch-size", type=int)
    ft.add_argument("--lr", type=float)
    ft.add_argument("--device", type=_device_arg, help=DEVICE_HELP)
    ft.add_argument("--seed", type=int)
    ft.add_argument("--cache-dir", help="where preprocessed volumes are cached (default .fmct_cache)")
    ft.add_argument("--augment", type=float, metavar="P",
                    help="share of training studies rescanned at random each epoch (pose, field of view, kernel, "
                         "noise, slice thickness; fmct.data.rescan), 0 (default) to 1; validation stays as stored")
    ft.add_argument("--name", help="model name written into the bundle")
    ft.add_argument("--checkpoints", metavar="DIR",
                    help="keep a checkpoint per epoch in DIR; rerunning the same command continues after the last one "
                         "(exactly; refused if the settings differ)")
    ft.add_argument("--path-prefix", metavar="OLD=NEW", help=PATH_PREFIX_HELP)
    ft.set_defaults(func=cmd_finetune)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    """evaluate: a bundle on labelled studies; flags override --config."""
    ev = sub.add_parser("evaluate", help="AUROC with 95%% CIs, AUPRC, sensitivity/specificity, ECE; in- vs out-of-distribution",
                        description="Evaluate a bundle on labelled studies; writes report.json, report.txt and roc.png.")
    _data_argument(ev, "labelled test set: a manifest CSV or a folder (default: the --config's data)")
    ev.add_argument("--config", help="YAML/JSON with any of: model, data, ood_data, out, device, cache_dir, n_boot")
    ev.add_argument("--model", help="model bundle (default: the bundled demo model)")
    ev.add_argument("--ood", help="a second, out-of-distribution test set")
    ev.add_argument("--out", help="output folder (default ./fmct_eval)")
    ev.add_argument("--device", type=_device_arg, help=DEVICE_HELP)
    ev.add_argument("--path-prefix", metavar="OLD=NEW", help=PATH_PREFIX_HELP)
    ev.add_argument("--cache-dir")
    ev.add_argument("--n-boot", type=int, help="bootstrap resamples for the CIs (default 1000)")
    ev.set_defaults(func=cmd_evaluate)


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    """phantom: synthetic head CTs with findings, masks and labels.csv."""
    ph = sub.add_parser("phantom", help="write synthetic head CTs with findings, lesion masks and a labels CSV")
    ph.add_argument("out", help="output folder")
    ph.add_argument("--n", type=int, default=10, help="number of CTs (default 10)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--format", default="nifti", choices=("nifti", "dicom"))
    ph.add_argument("--slices", default="random", choices=("random", "thick", "thin"))
    ph.add_argument("--size", type=int, default=512, help="in-plane matrix size (default 512)")
    ph.add_argument("--anatomy", default="default", help="anatomy preset: default or ood")
    ph.set_defaults(func=cmd_phantom)


def _add_fetch(sub: argparse._SubParsersAction) -> None:
    """fetch: a model published as a release asset, kept only when its SHA-256 is the published one."""
    fe = sub.add_parser("fetch", help="download a published model bundle (.zip) and verify its SHA-256",
                        description="Models over ~25 MB are release assets, not in the repository; fmct never downloads "
                                    "on its own. This fetches one on request and keeps it only if its SHA-256 matches.")
    fe.add_argument("url", help="https:// (or file://) URL of the bundle .zip")
    fe.add_argument("--sha256", required=True, help="the SHA-256 published with the model (64 hex digits)")
    fe.add_argument("--out", default=".", help="file or folder to write (default: the current folder)")
    fe.add_argument("--overwrite", action="store_true", help="replace an existing --out that is another file")
    fe.set_defaults(func=cmd_fetch)


#: one function per command, in the order `fmct --help` lists them
_COMMANDS = (_add_demo, _add_analyze, _add_export, _add_import, _add_prepare, _add_pretrain, _add_embed, _add_probe,
             _add_finetune, _add_evaluate, _add_phantom, _add_fetch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmct", description="FMCT head-CT foundation model: analyze head CTs, make synthetic CTs.")
    p.add_argument("--version", action=_VersionAction, help="show the version (from git) and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    for command in sub.choices.values():  # --debug after the command too (`fmct analyze CT --debug`)
        command.add_argument("--debug", dest="debug_after", action="store_true", help="the same as fmct --debug")
    return p
