"""Packaging hook: a wheel carries the demo model bundle, so `pip install .` (not only -e) runs `fmct demo`.

The repository keeps the demo bundle once, in Resources/DemoModel (the Slicer extension installs it
from there too). A regular build copies its files into the wheel as fmct/_data/DemoModel, where
fmct.inference.bundle.default_bundle_path finds it through importlib.resources. Everything else is
declared in pyproject.toml.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DEMO_SOURCE = Path(__file__).resolve().parent / "Resources" / "DemoModel"
DEMO_FILES = ("fmct.json", "model.safetensors", "ood.safetensors")  # model.onnx is exported at first use
DEMO_TARGET = ("fmct", "_data", "DemoModel")


class BuildPyWithDemoModel(build_py):
    """build_py, plus the demo bundle copied into the build tree (skipped for editable installs,
    which find Resources/DemoModel in the checkout)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        missing = [n for n in DEMO_FILES if not (DEMO_SOURCE / n).is_file()]
        if missing:
            raise SystemExit(f"Resources/DemoModel lacks {missing}: the wheel would ship without its demo model")
        target = Path(self.build_lib).joinpath(*DEMO_TARGET)
        target.mkdir(parents=True, exist_ok=True)
        for name in DEMO_FILES:
            shutil.copyfile(DEMO_SOURCE / name, target / name)


setup(cmdclass={"build_py": BuildPyWithDemoModel})
