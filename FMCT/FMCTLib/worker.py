"""The FMCT analysis worker: one CT file in, one result folder out, progress as JSON lines.

    PythonSlicer worker.py --input CT.nrrd --out RESULT_DIR [--bundle PATH] [--device auto]
                           [--explain integrated_gradients] [--findings auto] [--engine-source DIR]

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
    parser.add_argument("--input", required=True, help="the CT (NRRD, NIfTI or MHA), in LPS as the engine reads it")
    parser.add_argument("--out", required=True, help="result folder (findings.json, saliency_<finding>.nii.gz)")
    parser.add_argument("--bundle", default=None, help="model bundle folder or .zip (default: the engine's demo model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--explain", default="integrated_gradients", help="explanation method, or none")
    parser.add_argument("--findings", default=AUTO,
                        help="which findings get a map: auto, top, positive, all, or a comma-separated list")
    parser.add_argument("--engine-source", default=None, help="folder holding the fmct package to run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parseArguments(argv)
    if args.engine_source:
        sys.path.insert(0, str(Path(args.engine_source).resolve()))
    from fmct.conventions.runtime import JsonLinesProgress, passive_threads

    passive_threads()  # before torch starts: its threads then sleep, not spin, while Slicer's GUI wants a core

    out = JsonLinesProgress(sys.stdout, min_interval_s=0.1)
    try:
        return run(args, out)
    except Exception as error:  # reported as one event; the logic raises it again on its side
        from fmct.conventions.errors import FMCTError

        userError = isinstance(error, FMCTError)
        out.event("error", type=type(error).__name__, message=str(error),
                  traceback=None if userError else traceback.format_exc())
        if not userError:
            traceback.print_exc()
        return EXIT_USER_ERROR if userError else EXIT_BUG


def run(args: argparse.Namespace, out: Any) -> int:
    started = time.perf_counter()
    out(0.0, "starting the analysis process")
    out(0.01, "loading the model")
    from fmct.inference.analyze import Analyzer, attach_checks
    from fmct.reading.files import read_volume
    from fmct.inference.saliency import SaliencyOnCTGrid
    from fmct.inference.study_folder import write_study_outputs
    from fmct.conventions.runtime import explain_method_or_none, parse_device, sub_progress

    method = explain_method_or_none(args.explain)
    analyzer = Analyzer(args.bundle, device=parse_device(args.device))
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
              warning=payload.get("warning"), checks=payload.get("checks"), banner=payload.get("banner"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
