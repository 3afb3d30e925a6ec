"""Evaluation of a model bundle: AUROC with bootstrap CIs, calibration, ID/OOD reports, headless in Slicer.

    Slicer --no-main-window --python-script FMCTTraining/scripts/evaluate.py --config evaluate.yaml [fmct evaluate options]

Runs `fmct evaluate --config evaluate.yaml ...` (the engine's command line, same config files) in a
subprocess of Slicer's Python, prints its log and progress, and exits with its exit code.
Also runs with plain Python where the fmct engine is installed.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # FMCTTraining/

from FMCTTrainingLib.script import runScript  # noqa: E402

runScript("evaluate")
