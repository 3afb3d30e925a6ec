"""The body of the batch scripts in FMCTTraining/scripts/: parse arguments, run, exit with the code.

Inside Slicer (`Slicer --no-main-window --python-script FMCTTraining/scripts/pretrain.py --config
pretrain.yaml`) sys.argv holds the script and the arguments after it; the application keeps
running after a --python-script unless told to exit, so the exit code is handed to Slicer.
With plain Python (`python FMCTTraining/scripts/pretrain.py --config ...`) it is sys.exit.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from FMCTTrainingLib.logic import TASK_TITLES, FMCTTrainingLogic, TrainingError

EXIT_USAGE = 2  # the engine's CLI uses 2 for user mistakes too


def main(task: str, argv: Sequence[str]) -> int:
    """Run `fmct <task> --config <file> [options]`; every option after --config goes to the engine."""
    parser = argparse.ArgumentParser(
        prog=f"FMCTTraining/scripts/{task}.py",
        description=f"{TASK_TITLES.get(task, task)} with the fmct engine, headless. Options other than "
                    f"--config are passed to `fmct {task}` unchanged.")
    parser.add_argument("--config", required=True, help=f"the YAML config of `fmct {task}`")
    args, engineArgs = parser.parse_known_args(list(argv))
    logic = FMCTTrainingLogic()
    try:
        result = logic.run(task, args.config, engineArgs, log=_print, progress=_ProgressPrinter())
    except TrainingError as error:
        print(f"FMCTTraining: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return result.returncode


def runScript(task: str) -> None:
    """Entry point of scripts/<task>.py: run, then exit Slicer (or Python) with the run's exit code."""
    code = main(task, sys.argv[1:])
    try:
        import slicer

        slicer.app  # noqa: B018 -- only inside the Slicer application
    except (ImportError, AttributeError):
        sys.exit(code)
    slicer.util.exit(code)


def _print(line: str) -> None:
    print(line, flush=True)


class _ProgressPrinter:
    """One log line per 5% step: readable in a batch log file, unlike a redrawn bar."""

    def __init__(self) -> None:
        self.last = -1

    def __call__(self, fraction: float, message: str) -> None:
        step = int(fraction * 20)
        if step != self.last:
            self.last = step
            print(f"[{fraction:6.1%}] {message}", flush=True)
