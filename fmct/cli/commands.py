"""What each `fmct` command does once its arguments are parsed (the parsers are in fmct.cli.parser).

Shared pieces: the tqdm progress bar (or JSON lines under FMCT_PROGRESS=json), the analyzer with every
option checked before the CT is read, one study's analysis into its locked folder, the summary table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from fmct.conventions.errors import ConfigError
from fmct.conventions.names import printable
from fmct.inference.runners import choose_backend
from fmct.conventions.runtime import (DEFAULT_EXPLAIN, EXPLAIN_FINDINGS_CHOICES, EXPLAIN_METHODS,
                                      explain_method_or_none, parse_device)

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
    from fmct.conventions.runtime import torchrun_rank
    from fmct.inference.batch import discover_studies, rank_device, run_batch

    if args.series is not None:
        raise ConfigError("--series applies to one DICOM folder, not to a batch; give each study its own folder")
    if args.keep_descriptions:
        raise ConfigError("--keep-descriptions applies to one study, not to a batch (a batch never copies free text)")
    if args.workers is not None and args.workers < 0:
        raise ConfigError("--workers must be 0 (decode in this process) or more")
    rank = torchrun_rank()
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


def cmd_fetch(args: argparse.Namespace) -> int:
    from fmct.inference.fetch import fetch_verified

    with TqdmProgress("fetch") as progress:
        out = fetch_verified(args.url, args.sha256, args.out, progress=progress, overwrite=args.overwrite)
    print(f"Wrote {out} (SHA-256 verified); use it with: fmct analyze CT --model {out}")
    return 0
