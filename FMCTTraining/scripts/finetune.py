"""Fine-tuning of the FMCT task heads (and encoder) on labelled head CTs, headless in Slicer.

    Slicer --no-main-window --python-script FMCTTraining/scripts/finetune.py --config finetune.yaml [fmct finetune options]

Runs `fmct finetune --config finetune.yaml ...` (the engine's command line, same config files) in a
subprocess of Slicer's Python, prints its log and progress, and exits with its exit code.
Also runs with plain Python where the fmct engine is installed.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # FMCTTraining/

from FMCTTrainingLib.script import runScript  # noqa: E402

runScript("finetune")
