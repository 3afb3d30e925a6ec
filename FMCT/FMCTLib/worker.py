"""The FMCT analysis worker: one CT file in, one result folder out, progress as JSON lines.

    PythonSlicer worker.py --input CT.nrrd --out RESULT_DIR [--bundle PATH] [--device auto]
                           [--explain integrated_gradients] [--findings auto] [--engine-source DIR]
    PythonSlicer worker.py --serve [--engine-source DIR]

With --serve the worker stays warm between clicks: it reads one request per line on stdin (a JSON
object with the options above, without dashes: {"input", "out", "bundle", "device", "explain",
"findings"}), answers each with its progress lines and one "done" or "error" line, and keeps
torch imported and the model loaded for the next request (a different bundle or device loads
that one in place of it). It ends when stdin closes (the logic closed it, or Slicer went away).
Importing torch and loading the model are about a third of a first click on a CPU; a second
click pays neither. Every "done" event carries a "worker" record (pid, model_loads, requests)
so the logic and the tests can see which process served it and whether it loaded the model.

FMCTLogic starts this in a separate process (Slicer's own Python), so the GUI keeps repainting
while torch loads and the model explains, and Cancel can end the work at any moment by killing
the process tree. The worker:

1. reads the CT the logic exported (LPS geometry, the node's own voxel type);
2. runs the engine's Analyzer on it;
3. writes the result with the engine's study writer (fmct.inference.study_folder): findings.json and one uint8
   saliency NIfTI per explained finding on the CT's grid, mapped back one map at a time, so the
   worker never holds more than one full-size map;
4. prints one JSON object per line on stdout (fmct.conventions.runtime.JsonLinesProgress): progress events,
   a "device" event once the model is on its device, then "done" (findings, the finding shown
   first, the explained findings, the out-of-distribution record and its warning) or "error"
   (the engine's exception type and message).

Exit codes follow the engine's CLI: 0 done, 2 a user mistake (FMCTError), 1 a bug.

It imports nothing from Slicer, and only the engine from the engine source it is given (the copy
that came with the module), so the engine that runs is always the one that ships with the module.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

# Which findings get a saliency map (--findings): the engine's choices, and "auto".
AUTO = "auto"    # every positive finding on a GPU; on a CPU only the finding shown first
TOP = "top"      # only the finding shown first (the engine's AnalysisResult.primary_finding)
EXPLAIN_CHOICES = (AUTO, TOP, "positive", "all")

EXIT_OK, EXIT_BUG, EXIT_USER_ERROR = 0, 1, 2


def explainTargets(choice: str | Sequence[str], onGPU: bool) -> str | list[str]:
    """What the engine is asked to explain for a --findings choice on this device.

    Integrated Gradients costs about 30 s per map on an idle laptop CPU (and several times that
    under load) against well under a second on a GPU, so "auto" explains every positive finding
    on a GPU but only the one shown first on a CPU; the others are one click away in the panel.
    """
    if isinstance(choice, str) and choice == AUTO:
        return "positive" if onGPU else TOP
    if isinstance(choice, str) and "," in choice:
        return [name.strip() for name in choice.split(",") if name.strip()]
    return choice


def parseArguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="FMCT analysis worker", description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="stay warm: read one request per line on stdin")
    parser.add_argument("--input", help="the CT (NRRD, NIfTI or MHA), in LPS as the engine reads it")
    parser.add_argument("--out", help="result folder (findings.json, saliency_<finding>.nii.gz)")
    parser.add_argument("--bundle", default=None, help="model bundle folder or .zip (default: the engine's demo model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--explain", default="integrated_gradients", help="explanation method, or none")
    parser.add_argument("--findings", default=AUTO,
                        help="which findings get a map: auto, top, positive, all, or a comma-separated list")
    parser.add_argument("--engine-source", default=None, help="folder holding the fmct package to run")
    args = parser.parse_args(argv)
    if not args.serve and (args.input is None or args.out is None):
        parser.error("--input and --out are required (or --serve)")
    return args


REQUEST_KEYS = ("input", "out", "bundle", "device", "explain", "findings")


def requestArguments(line: str) -> argparse.Namespace:
    """One request line of --serve as the arguments of a one-shot run (checked by the same parser)."""
    request = json.loads(line)
    if not isinstance(request, dict) or set(request) - set(REQUEST_KEYS):
        raise ValueError(f"a worker request is a JSON object with keys among {REQUEST_KEYS}; got {line.strip()[:200]}")
    argv = []
    for key in REQUEST_KEYS:
        if request.get(key) is not None:
            argv += [f"--{key}", str(request[key])]
    return parseArguments(argv)


class ModelCache:
    """The analyzer of the last (bundle, device) asked for, kept between requests of a warm worker.

    A different bundle or device, or a bundle whose files changed on disk, loads that model in
    place of the one held (freed first: two models need not fit at once)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.analyzer = None
        self.loads = 0
        self.requests = 0

    @staticmethod
    def _key(bundle: str | None, device: str) -> tuple:
        if bundle is None:
            return (None, device)
        path = Path(bundle)
        files = [path, *path.iterdir()] if path.is_dir() else [path]
        stamps = tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists()))
        return (str(path.resolve()), device, stamps)

    def get(self, bundle: str | None, device: str):
        """(analyzer, loaded): the model for this bundle and device, and whether it was loaded now."""
        from fmct.inference.analyze import Analyzer
        from fmct.conventions.runtime import parse_device

        key = self._key(bundle, device)
        if key == self.key and self.analyzer is not None:
            return self.analyzer, False
        self.key, self.analyzer = None, None
        self.analyzer = Analyzer(bundle, device=parse_device(device))
        self.key = key
        self.loads += 1
        return self.analyzer, True

    def record(self) -> dict:
        return {"pid": os.getpid(), "model_loads": self.loads, "requests": self.requests}


def main(argv: Sequence[str] | None = None) -> int:
    args = parseArguments(argv)
    if args.engine_source:
        sys.path.insert(0, str(Path(args.engine_source).resolve()))
    from fmct.conventions.runtime import passive_threads

    passive_threads()  # before torch starts: its threads then sleep, not spin, while Slicer's GUI wants a core

    cache = ModelCache()
    if args.serve:
        return serve(cache)
    return runReporting(lambda: args, cache)


def serve(cache: ModelCache) -> int:
    """Answer requests from stdin, one at a time, until it closes; the model stays loaded between them."""
    for line in sys.stdin:
        if line.strip():
            runReporting(lambda: requestArguments(line), cache)
    return EXIT_OK


def runReporting(arguments, cache: ModelCache) -> int:
    """Run one analysis; any exception becomes one "error" event (the logic raises it again on its side)."""
    from fmct.conventions.runtime import JsonLinesProgress

    out = JsonLinesProgress(sys.stdout, min_interval_s=0.1)
    try:
        return run(arguments(), out, cache)
    except (Exception, SystemExit) as error:  # SystemExit: a request the parser refused
        from fmct.conventions.errors import FMCTError

        userError = isinstance(error, FMCTError)
        out.event("error", type=type(error).__name__, message=str(error),
                  traceback=None if userError else traceback.format_exc())
        if not userError:
            traceback.print_exc()
        return EXIT_USER_ERROR if userError else EXIT_BUG


def run(args: argparse.Namespace, out: Any, cache: ModelCache | None = None) -> int:
    started = time.perf_counter()
    cache = cache or ModelCache()
    cache.requests += 1
    out(0.0, "starting the analysis process" if cache.requests == 1 else "starting the analysis (warm process)")
    out(0.01, "loading the model" if cache.loads == 0 else "checking the loaded model")
    from fmct.inference.analyze import attach_checks
    from fmct.reading.files import read_volume
    from fmct.inference.saliency import SaliencyOnCTGrid
    from fmct.inference.study_folder import write_study_outputs
    from fmct.conventions.runtime import explain_method_or_none, sub_progress

    method = explain_method_or_none(args.explain)
    analyzer, loaded = cache.get(args.bundle, args.device)
    device = str(analyzer.device)
    onGPU = device.startswith("cuda")
    out.event("device", device=device, gpu=onGPU, model=analyzer.bundle.meta.name)
    load_s = time.perf_counter() - started

    out(0.08, "reading the CT")
    volume = read_volume(args.input)
    volume.meta.setdefault("source", "The input volume")
    out(0.1, "checking the CT and preprocessing")
    checks, modelInput = analyzer.prepare(volume)  # refuses (exit 2) before any model runs

    targets = explainTargets(args.findings, onGPU) if method else []
    engineProgress = sub_progress(out, 0.12, 0.95)
    if targets == TOP:  # the finding shown first is known only once the findings are
        findingsOnly = analyzer.analyze_prepared(modelInput, None)
        primary = findingsOnly.primary_finding()
        targets = [primary.name] if primary is not None else []
    result = analyzer.analyze_prepared(modelInput, method if targets else None, targets or "positive",
                                       progress=engineProgress, map_back=False)
    attach_checks(result, checks)
    out(0.95, "writing the results")
    primary = result.primary_finding()
    timings = {"load_s": load_s, **result.timings}
    result.saliency = SaliencyOnCTGrid(analyzer, result)  # mapped back, written and freed one at a time
    payload, _ = write_study_outputs(args.out, volume, result, analyzer.bundle.meta.name, device, report=False,
                                     timings={**timings, "total_s": time.perf_counter() - started})
    out(1.0, "done")
    out.event("done", folder=str(args.out), findings=payload["findings"],
              primary=primary.name if primary is not None else None, explained=list(result.model_saliency),
              saliency_files=payload["saliency_files"], saliency_scale=payload.get("saliency_scale"),
              explanation=payload.get("explanation"), device=device, gpu=onGPU, model=analyzer.bundle.meta.name,
              timings=payload["timings"], out_of_distribution=payload.get("out_of_distribution"),
              warning=payload.get("warning"), checks=payload.get("checks"), banner=payload.get("banner"),
              worker={**cache.record(), "model_loaded": loaded})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
