"""The `fmct` command line: demo, analyze (one CT or a batch), export, import, fetch, phantom, prepare, pretrain, embed, probe,
finetune, evaluate.

User mistakes (bad input, bad bundle, bad option, an unusable output folder) exit with code 2 and
one line saying what to do, before any model runs; --debug adds the traceback, and the exit code
stays 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

from fmct.conventions.errors import Cancelled, ConfigError, FMCTError
from fmct.conventions.names import PrintableFormatter, printable
from fmct.inference.runners import BACKEND_CHOICES, choose_backend
from fmct.phantom.demo_sample import DEMO_SEED
from fmct.conventions.runtime import (DEFAULT_EXPLAIN, DEFAULT_EXPLAIN_FINDINGS, EXPLAIN_FINDINGS_CHOICES, EXPLAIN_METHODS,
                                      explain_method_or_none, parse_device, passive_threads)

log = logging.getLogger("fmct")
EXPLAIN_CHOICES = (*EXPLAIN_METHODS, "none")
PROGRESS_ENV = "FMCT_PROGRESS"  # "json": progress as JSON lines on stderr instead of a bar
DEVICE_HELP = "auto (CUDA when present), cpu, cuda (or gpu) or cuda:N"
PATH_PREFIX_HELP = ("FM-HCT's split CSVs (img_path, ICH, ..., name): replace OLD at the start of every img_path by NEW, "
                    "the folder of your copy")


class TqdmProgress:
    """Adapts the engine's progress(fraction, message) callback to a tqdm bar on stderr, or, with
    FMCT_PROGRESS=json in the environment, to JSON lines on stderr (fmct.conventions.runtime.JsonLinesProgress)
    for programs that follow a run (the FMCTTraining Slicer module), so nobody parses a bar."""

    def __init__(self, desc: str) -> None:
        import os

        self.desc = desc
        self.bar = self.lines = None
        if os.environ.get(PROGRESS_ENV, "").strip().lower() == "json":
            from fmct.conventions.runtime import JsonLinesProgress

            self.lines = JsonLinesProgress(sys.stderr, min_interval_s=0.2)
        else:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc=desc, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}", file=sys.stderr)

    def __call__(self, fraction: float, message: str) -> None:
        if self.lines is not None:
            self.lines(fraction, f"{self.desc}: {message}" if message else self.desc)
            return
        self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _device_arg(text: str) -> str:
    """argparse type for --device: the one device-name check (fmct.conventions.runtime.parse_device)."""
    try:
        return parse_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _explain_method(args: argparse.Namespace) -> str | None:
    """--explain, defaulting to integrated_gradients, except with --backend onnx (which has no gradients)."""
    explain = args.explain or ("none" if getattr(args, "backend", "torch") == "onnx" else DEFAULT_EXPLAIN)
    return explain_method_or_none(explain)


def _settle_backend(args: argparse.Namespace) -> None:
    """--backend auto made concrete once, before anything is loaded: what findings.json records and a resumed batch compares."""
    args.backend = choose_backend(args.backend, args.model, args.device, _explain_method(args))


def _make_analyzer(args: argparse.Namespace, device: str | None = None):
    from fmct.inference.analyze import Analyzer

    return Analyzer(args.model, device=device or args.device, backend=getattr(args, "backend", "torch"),
                    compile=getattr(args, "compile", False))


def _output_options(args: argparse.Namespace, method: str | None, save_ct: bool, report: bool) -> dict:
    """The options that change what a study's folder holds (recorded in findings.json; a resumed batch compares them)."""
    from fmct.inference.study_folder import output_options

    return output_options(getattr(args, "backend", "torch"), method, args.findings, save_ct, report)


def _checked_analyzer(args: argparse.Namespace):
    """The analyzer, with every option that concerns it checked (model bundle, backend, explanation
    method, the finding names of --findings): done before the CT is read, so a typo costs nothing."""
    return _check_options(_make_analyzer(args), args)


def _check_options(analyzer, args: argparse.Namespace):
    """(analyzer, explanation method) once the method and the --findings names fit the model."""
    method = _explain_method(args)
    analyzer.check_explain_method(method)
    if isinstance(args.findings, list):
        names = analyzer.bundle.meta.task_names
        unknown = [n for n in args.findings if n not in names]
        if unknown:
            raise ConfigError(f"--findings: unknown finding(s) {', '.join(unknown)}; this model predicts {', '.join(names)}")
    return analyzer, method


def _run_analysis(volume, args, out: Path, save_ct: bool, checked=None, t_start: float | None = None) -> int:
    """Analyze one CT into out; checked: (analyzer, method) from _checked_analyzer when already made."""
    from fmct.inference.study_folder import locked_study_folder

    with locked_study_folder(out):  # a second fmct on the same --out is refused, never mixed in
        return _analyze_into(volume, args, out, save_ct, checked, t_start)


def _analyze_into(volume, args, out: Path, save_ct: bool, checked, t_start: float | None) -> int:
    from fmct.inference.bundle import model_identity
    from fmct.inference.saliency import SaliencyOnCTGrid
    from fmct.inference.study_folder import check_study_folder, study_fingerprint, write_study_outputs

    t_start = time.perf_counter() if t_start is None else t_start
    overwrite = getattr(args, "overwrite", False)
    check_study_folder(out, study_fingerprint(volume), overwrite)  # before the model runs
    analyzer, method = checked if checked is not None else _checked_analyzer(args)
    with TqdmProgress("analyze") as progress:
        result = analyzer.analyze(volume, explain_method=method, explain_findings=args.findings, progress=progress,
                                  map_back=False)
    result.saliency = SaliencyOnCTGrid(analyzer, result)  # mapped back, written and freed one at a time
    timings = {**result.timings, "total_s": time.perf_counter() - t_start}
    payload, written = write_study_outputs(out, volume, result, analyzer.bundle.meta.name, str(analyzer.device),
                                           analyzer.backend, save_ct=save_ct, timings=timings, overwrite=overwrite,
                                           model_id=model_identity(analyzer.bundle),
                                           options=_output_options(args, method, save_ct, True), threads=None)
    _print_summary(result, analyzer.bundle.meta.name, written, payload["timings"])
    return 0


def _print_summary(result, model_name: str, written: Sequence[Path], timings: dict) -> None:
    print(f"\nFMCT findings ({printable(model_name)}; research use only, not for diagnosis)")
    if getattr(result, "banner", ""):
        print(f"  {printable(result.banner)}")
    if result.warning:
        print(f"  {printable(result.warning)}")
    elif result.ood is not None:
        print(f"  In-distribution check passed: score {result.ood['score']:.3f} <= {result.ood['threshold']:.3f} "
              "(this CT is like the model's training data)")
    else:
        print("  (this model carries no out-of-distribution statistics: it cannot say when a CT is unlike its training data)")
    if getattr(result, "checks", None) is not None:
        print("  Checks of the CT (before the model ran):")
        for line in result.checks.lines():
            print(f"    {line}")
    print(f"  {'finding':<20}{'probability':>12}{'threshold':>11}  result")
    agnostic = "attention" in result.model_saliency  # one map for every finding (fmct.inference.saliency)
    primary = None if agnostic else result.primary_finding()
    for f in result.findings:
        shown = "  <- shown in report.png" if primary is not None and f.name == primary.name else ""
        print(f"  {printable(f.name):<20}{f.probability:>12.3f}{f.threshold:>11.3f}  {f.shown}{shown}")
    if agnostic:
        print("  attention map (finding-agnostic: the same for every finding) shown in report.png")
    for warning in (result.explanation or {}).get("warnings", []):
        print(f"  WARNING: {printable(warning)}")
    print("\nWrote:")
    for p in written:
        print(f"  {printable(p)}")
    print(f"\nTime: {timings['total_s']:.1f} s (preprocess {timings.get('preprocess_s', 0):.1f} s, "
          f"predict {timings.get('predict_s', 0):.1f} s, explain {timings.get('explain_s', 0):.1f} s)")


def cmd_demo(args: argparse.Namespace) -> int:
    from fmct.inference.study_folder import check_output_folder
    from fmct.phantom.demo_sample import demo_sample

    check_output_folder(args.out)
    args.findings = "positive"
    _settle_backend(args)
    t_start = time.perf_counter()
    checked = _checked_analyzer(args)  # the model and options before the CT is made
    print("Making a sample head CT (synthetic, 512 x 512, 4-5 mm slices, a subdural hematoma) ...", file=sys.stderr)
    phantom = demo_sample(args.seed)
    code = _run_analysis(phantom.volume, args, Path(args.out), save_ct=True, checked=checked, t_start=t_start)
    truth = [t for t, v in phantom.labels.items() if v]
    print(f"Ground truth of the sample CT: {', '.join(truth) or 'normal'}")
    if code == 0:
        _print_against_truth(json.loads((Path(args.out) / "findings.json").read_text())["findings"], phantom.labels)
    return code


def _print_against_truth(findings: list[dict], labels: dict[str, int]) -> None:
    """The sample's answer checked against what the phantom holds: the demo shows the model's errors too."""
    wrong_pos = [f["name"] for f in findings if f["positive"] and not labels.get(f["name"])]
    missed = [f["name"] for f in findings if not f["positive"] and labels.get(f["name"])]
    right = len(findings) - len(wrong_pos) - len(missed)
    print(f"The model against it: {right}/{len(findings)} findings right; false positive: {', '.join(wrong_pos) or 'none'}; "
          f"missed: {', '.join(missed) or 'none'}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from fmct.inference.batch import is_manifest
    from fmct.inference.study_folder import check_output_folder

    findings = args.findings if args.findings in EXPLAIN_FINDINGS_CHOICES else args.findings.split(",")
    args.findings = findings
    _settle_backend(args)
    check_output_folder(args.out)  # before reading the CT
    if args.batch or is_manifest(args.input):
        return _run_batch(args)
    if args.workers is not None:
        raise ConfigError("--workers applies to a batch (a folder of studies with --batch, or a manifest .csv)")
    from fmct.conventions.names import check_utf8_path
    from fmct.data.manifests import refuse_several_studies

    check_utf8_path(args.input)  # SimpleITK aborts the process on a non-UTF-8 file name
    refuse_several_studies(Path(args.input))  # a folder of studies without --batch: say so
    t_start = time.perf_counter()
    checked = _checked_analyzer(args)  # options and model before the CT is read
    from fmct.reading.files import read_volume

    volume = read_volume(args.input, series_uid=args.series, keep_descriptions=args.keep_descriptions)
    return _run_analysis(volume, args, Path(args.out), save_ct=args.save_ct, checked=checked, t_start=t_start)


def _run_batch(args: argparse.Namespace) -> int:
    from fmct.inference.batch import discover_studies, rank_device, rank_from_env, run_batch

    if args.series is not None:
        raise ConfigError("--series applies to one DICOM folder, not to a batch; give each study its own folder")
    if args.keep_descriptions:
        raise ConfigError("--keep-descriptions applies to one study, not to a batch (a batch never copies free text)")
    if args.workers is not None and args.workers < 0:
        raise ConfigError("--workers must be 0 (decode in this process) or more")
    rank = rank_from_env()
    out = Path(args.out)
    studies = discover_studies(args.input, exclude=[out])
    analyzer, method = _check_options(_make_analyzer(args, device=rank_device(args.device, args.backend, rank)), args)
    where = f" (rank {rank.rank} of {rank.world}: {len(studies[rank.rank::rank.world])} studies)" if rank.world > 1 else ""
    print(f"Batch: {len(studies)} studies from {printable(args.input)} -> {printable(out)}{where}", file=sys.stderr)
    with TqdmProgress("batch") if rank.rank == 0 else contextlib.nullcontext() as progress:
        report = run_batch(analyzer, args.input, out, explain_method=method, explain_findings=args.findings,
                           save_ct=args.save_ct, report=args.report, num_workers=args.workers, rank=rank,
                           progress=progress, studies=studies,
                           options=_output_options(args, method, args.save_ct, args.report))
    print(f"\nFMCT batch ({printable(analyzer.bundle.meta.name)}; research use only, not for diagnosis)")
    if analyzer.bundle.meta.banner:
        print(f"  {printable(analyzer.bundle.meta.banner)}")
    print(f"  {report.line()}")
    for row in report.rows:
        if row["status"] == "error":
            print(f"  error  {printable(row['study_id'])}: {printable(row['error'])}")
    print(f"  summary: {printable(report.summary_path)}")
    return 1 if report.failed else 0  # 0 only when every study of the run succeeded


def cmd_export(args: argparse.Namespace) -> int:
    if not (args.onnx or args.check or args.monai or args.hf):
        raise ConfigError("nothing to do: give --onnx (writes model.onnx into the bundle and checks it), --check "
                          "(re-checks an existing model.onnx against the torch weights), --monai or --hf")
    if args.monai or args.hf:
        from fmct.export.hf import export_hf
        from fmct.export.monai_vit import export_monai

        stem = str(Path(args.bundle)).rstrip("/").removesuffix(".zip")
        for wanted, suffix, write in ((args.monai, "monai", export_monai), (args.hf, "hf", export_hf)):
            if wanted:
                print(f"Wrote {write(args.bundle, args.out or f'{stem}-{suffix}')}")
    from fmct.inference.onnx_runner import onnx_summary
    from fmct.export.onnx import check_onnx_parity, export_onnx

    if args.onnx:
        with TqdmProgress("export") as progress:
            record = export_onnx(args.bundle, opset=args.opset, progress=progress)
        print(f"Wrote {Path(args.bundle) / 'model.onnx'}: {onnx_summary(record)} (recorded in fmct.json)")
    if args.check:
        with TqdmProgress("check") as progress:
            from fmct.export.onnx_cache import onnx_for_bundle

            diff = check_onnx_parity(args.bundle, progress=progress, supply=onnx_for_bundle)
        print(f"{Path(args.bundle) / 'model.onnx'} agrees with the torch weights: max |p_onnx - p_torch| = {diff:.2e}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from fmct.importers.fm_hct import import_fm_hct

    start = time.perf_counter()
    out = import_fm_hct(args.checkpoint, args.out)
    print(f"Wrote encoder bundle {out} from {Path(args.checkpoint).name} in {time.perf_counter() - start:.1f} s; "
          f"embed with: fmct embed DATA --model {out} --out features.npz")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from fmct.phantom import write_phantom_set

    with TqdmProgress("phantom") as progress:
        out = write_phantom_set(args.out, args.n, args.seed, fmt=args.format, slices=args.slices,
                                in_plane_size=args.size, anatomy=args.anatomy, progress=progress)
    print(f"Wrote {args.n} phantom(s) and labels.csv to {out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fmct.train.pretrain import run_from_args

    return run_from_args(args)


def cmd_prepare(args: argparse.Namespace) -> int:
    from fmct.data.prepare import check_args, run_from_args

    check_args(args)  # option mistakes before the bar starts
    with TqdmProgress("prepare") as progress:
        return run_from_args(args, progress)


def cmd_embed(args: argparse.Namespace) -> int:
    from fmct.features.embed import embed

    with TqdmProgress("embed") as progress:
        result = embed(args.data, args.model, args.out, layers=args.layers, device=args.device, overwrite=args.overwrite,
                       progress=progress, verify=args.verify, path_prefix=args.path_prefix)
    extra = f", {result['reused']} kept from an earlier run" if result["reused"] else ""
    skipped = f"; skipped {len(result['skipped'])} unreadable (see {result['out']}.skipped.json)" if result["skipped"] else ""
    print(f"Wrote {result['rows']} row(s) ({', '.join(result['features'])}) to {result['out']}{extra}{skipped}")
    print(f"Probe them on your labels: fmct probe {result['out']} [--labels LABELS.csv]")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from fmct.features.probe import format_report, probe, write_report

    methods = tuple(m.strip() for m in args.method.split(",")) if args.method != "both" else ("knn", "logreg")
    report = probe(args.features, labels=args.labels, tasks=args.tasks.split(",") if args.tasks else None, methods=methods,
                   which=args.features_set, folds=args.folds, k=args.k, seed=args.seed)
    print(format_report(report))
    if args.out:
        print(f"Wrote {write_report(report, args.out)}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from fmct.train.finetune import FinetuneConfig, check_out_is_not_the_encoder, finetune

    overrides = {k: getattr(args, k) for k in ("data", "out", "encoder", "mode", "labels_per_class", "epochs",
                                               "batch_size", "lr", "device", "seed", "cache_dir", "name", "augment",
                                               "checkpoints", "verify", "path_prefix")}
    if args.tasks:
        overrides["tasks"] = args.tasks.split(",")
    if args.config:
        cfg = FinetuneConfig.from_file(args.config, **overrides)
    else:
        cfg = FinetuneConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    check_out_is_not_the_encoder(cfg)  # the more specific refusal first: --overwrite must not make it pass
    if cfg.out:
        from fmct.train.run_folder import check_training_out

        check_training_out(cfg.out, "finetune", overwrite=args.overwrite, can_resume=False)  # never replaced silently
    with TqdmProgress("finetune") as progress:
        out = finetune(cfg, progress=progress).bundle
    if out is not None:
        print(f"Wrote the fine-tuned bundle {out}; run it with: fmct analyze CT --model {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fmct.train.evaluate_bundle import evaluate_bundle

    from fmct.conventions.config_file import EvaluateConfig

    o = EvaluateConfig.from_file_and_flags(args.config, model=args.model, data=args.data, ood_data=args.ood, out=args.out,
                                           device=args.device, cache_dir=args.cache_dir, n_boot=args.n_boot)
    if not o.data:
        raise ConfigError("evaluate needs --data (a labelled manifest CSV or folder), on the command line or in --config")
    with TqdmProgress("evaluate") as progress:
        evaluate_bundle(o.model, o.data, o.out, ood_data=o.ood_data, device=o.device, cache_dir=o.cache_dir,
                        n_boot=o.n_boot, progress=progress, path_prefix=args.path_prefix)
    return 0


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it may call git): other commands start without it."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from fmct.conventions.version import code_version

        print(f"fmct {code_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def cmd_fetch(args: argparse.Namespace) -> int:
    from fmct.inference.fetch import fetch_verified

    with TqdmProgress("fetch") as progress:
        out = fetch_verified(args.url, args.sha256, args.out, progress=progress, overwrite=args.overwrite)
    print(f"Wrote {out} (SHA-256 verified); use it with: fmct analyze CT --model {out}")
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    passive_threads()  # before anything imports torch (fmct.conventions.runtime says why)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = args.debug or getattr(args, "debug_after", False)
    _settle_data(parser, args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(message)s"))  # names and paths never drive the terminal
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[handler])
    try:
        return args.func(args)
    except Cancelled as e:
        print(f"fmct: cancelled: {printable(e)}", file=sys.stderr)
        return 130
    except FMCTError as e:
        if args.debug:
            traceback.print_exc()  # --debug adds the traceback; a user error stays exit 2
        print(f"fmct: error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmct: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
