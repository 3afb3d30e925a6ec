"""The `fmct` command line: demo, analyze, phantom.

User mistakes (bad input, bad bundle, bad option) exit with code 2 and one line saying what
to do; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from fmct import __version__
from fmct.errors import Cancelled, FMCTError

log = logging.getLogger("fmct")
EXPLAIN_CHOICES = ("integrated_gradients", "occlusion", "attention", "attention_rollout", "none")


class TqdmProgress:
    """Adapts the engine's progress(fraction, message) callback to a tqdm bar."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=desc, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}", file=sys.stderr)

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _run_analysis(volume, args, out: Path, save_ct: bool) -> int:
    from fmct.analyze import Analyzer
    from fmct.io import write_volume
    from fmct.report import write_report

    t_start = time.perf_counter()
    analyzer = Analyzer(args.model, device=args.device)
    method = None if args.explain == "none" else args.explain
    progress = TqdmProgress("analyze")
    try:
        result = analyzer.analyze(volume, explain_method=method, explain_findings=args.findings, progress=progress)
    finally:
        progress.close()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if save_ct:
        written.append(write_volume(volume, out / "ct.nii.gz"))
    for name, sal in result.saliency.items():
        written.append(write_volume(sal, out / f"saliency_{name}.nii.gz"))
    written.append(write_report(volume, result, out / "report.png", analyzer.bundle.meta.name))
    timings = {**{k: round(v, 3) for k, v in result.timings.items()}, "total_s": round(time.perf_counter() - t_start, 3)}
    payload = {
        "model": analyzer.bundle.meta.name,
        "fmct_version": __version__,
        "device": str(analyzer.device),
        "explain_method": method,
        "input": {
            "size_xyz": list(volume.size),
            "spacing_mm_xyz": [round(s, 4) for s in volume.spacing],
            "series_description": volume.meta.get("series_description"),
            "gantry_tilt_deg": volume.meta.get("gantry_tilt_deg"),
        },
        "findings": [f.to_dict() for f in result.findings],
        "saliency_files": {n: f"saliency_{n}.nii.gz" for n in result.saliency},
        "timings": timings,
    }
    (out / "findings.json").write_text(json.dumps(payload, indent=2))
    written.insert(0, out / "findings.json")
    _print_summary(result, analyzer.bundle.meta.name, written, timings)
    return 0


def _print_summary(result, model_name: str, written: Sequence[Path], timings: dict) -> None:
    print(f"\nFMCT findings ({model_name}; research use only, not for diagnosis)")
    print(f"  {'finding':<20}{'probability':>12}{'threshold':>11}  result")
    for f in result.findings:
        print(f"  {f.name:<20}{f.probability:>12.3f}{f.threshold:>11.3f}  {'POSITIVE' if f.positive else '-'}")
    print("\nWrote:")
    for p in written:
        print(f"  {p}")
    print(f"\nTime: {timings['total_s']:.1f} s (preprocess {timings.get('preprocess_s', 0):.1f} s, "
          f"predict {timings.get('predict_s', 0):.1f} s, explain {timings.get('explain_s', 0):.1f} s)")


def cmd_demo(args: argparse.Namespace) -> int:
    from fmct.phantom import make_phantom

    print("Making a sample head CT (synthetic, 512 x 512, 5 mm slices) ...", file=sys.stderr)
    phantom = make_phantom(args.seed, findings=["subdural", "mass_effect"], slices="thick")
    args.findings = "positive"
    code = _run_analysis(phantom.volume, args, Path(args.out), save_ct=True)
    truth = [t for t, v in phantom.labels.items() if v]
    print(f"Ground truth of the sample CT: {', '.join(truth) or 'normal'}")
    return code


def cmd_analyze(args: argparse.Namespace) -> int:
    from fmct.io import read_volume

    volume = read_volume(args.input, series_uid=args.series)
    findings = args.findings if args.findings in ("positive", "all") else args.findings.split(",")
    args.findings = findings
    return _run_analysis(volume, args, Path(args.out), save_ct=args.save_ct)


def cmd_phantom(args: argparse.Namespace) -> int:
    from fmct.phantom import write_phantom_set

    progress = TqdmProgress("phantom")
    try:
        out = write_phantom_set(args.out, args.n, args.seed, fmt=args.format, slices=args.slices,
                                in_plane_size=args.size, anatomy=args.anatomy, progress=progress)
    finally:
        progress.close()
    print(f"Wrote {args.n} phantom(s) and labels.csv to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmct", description="FMCT head-CT foundation model: analyze head CTs, make synthetic CTs.")
    p.add_argument("--version", action="version", version=f"fmct {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def model_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default=None, help="model bundle folder or .zip (default: the bundled demo model)")
        sp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto picks CUDA when present")
        sp.add_argument("--explain", default="integrated_gradients", choices=EXPLAIN_CHOICES,
                        help="saliency method for positive findings (default: integrated_gradients)")

    d = sub.add_parser("demo", help="make a sample head CT and analyze it with the bundled model")
    d.add_argument("--out", default="fmct_demo", help="output folder (default: ./fmct_demo)")
    d.add_argument("--seed", type=int, default=7, help="seed of the sample CT")
    model_options(d)
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("analyze", help="analyze a head CT: DICOM folder, NIfTI, NRRD or MHA")
    a.add_argument("input", help="DICOM series folder or a .nii/.nii.gz/.nrrd/.mha file")
    a.add_argument("--out", default="fmct_out", help="output folder (default: ./fmct_out)")
    a.add_argument("--series", default=None, help="SeriesInstanceUID to use when the folder holds several series")
    a.add_argument("--findings", default="positive", help="which findings get a saliency map: positive (default), all, or a comma-separated list")
    a.add_argument("--save-ct", action="store_true", help="also write the CT as ct.nii.gz (to overlay the saliency in any viewer)")
    model_options(a)
    a.set_defaults(func=cmd_analyze)

    ph = sub.add_parser("phantom", help="write synthetic head CTs with findings, lesion masks and a labels CSV")
    ph.add_argument("out", help="output folder")
    ph.add_argument("--n", type=int, default=10, help="number of CTs (default 10)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--format", default="nifti", choices=("nifti", "dicom"))
    ph.add_argument("--slices", default="random", choices=("random", "thick", "thin"))
    ph.add_argument("--size", type=int, default=512, help="in-plane matrix size (default 512)")
    ph.add_argument("--anatomy", default="default", help="anatomy preset: default or ood")
    ph.set_defaults(func=cmd_phantom)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except Cancelled as e:
        print(f"fmct: cancelled: {e}", file=sys.stderr)
        return 130
    except FMCTError as e:
        if args.debug:
            raise
        print(f"fmct: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmct: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
