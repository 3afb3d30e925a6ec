"""Self-supervised pretraining of the FMCT encoder (self-distillation + masked image modeling), headless in Slicer.

    Slicer --no-main-window --python-script <module folder>/scripts/pretrain.py --config pretrain.yaml [fmct pretrain options]

Runs `fmct pretrain --config pretrain.yaml ...` (the engine's command line, same config files) in a
subprocess of Slicer's Python, prints its log and progress, and exits with its exit code.
Also runs with plain Python where the fmct engine is installed.
"""
import os
import sys

# The module folder (FMCTTraining/ in a checkout; in an installed extension the folder that holds
# both FMCTTrainingLib and FMCTLib), and FMCT/ beside it in a checkout: the logic uses FMCTLib.
_modules = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _folder in (os.path.join(os.path.dirname(_modules), "FMCT"), _modules):
    if os.path.isdir(_folder) and _folder not in sys.path:
        sys.path.insert(0, _folder)

from FMCTTrainingLib.script import runScript  # noqa: E402

runScript("pretrain")
