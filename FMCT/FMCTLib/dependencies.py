"""The Python packages FMCT needs inside Slicer, and how they get there on first use.

Slicer's Python does not ship PyTorch or the fmct engine. Installing them when the module is
imported would stall Slicer's startup (torch is gigabytes) and would happen without consent,
so nothing is installed at import time: when an analysis is first asked for, the widget shows
the plan made here in a confirmation dialog, and only then runs it. This is how widely used
Slicer AI extensions (TotalSegmentator, MONAIAuto3DSeg) do it:

- torch through the PyTorch extension's installer when that extension is present (it picks the
  CUDA build that matches the GPU driver); otherwise `slicer.util.pip_install` of the CPU build
  (on Linux and Windows from PyTorch's CPU index, as PyPI's default Linux wheel bundles CUDA).
- the fmct engine from this repository: from the engine source that travels with the
  extension (or the checkout the module is loaded from), installed with --no-deps, followed by
  its requirements except torch (done above) and SimpleITK (Slicer's own build, which has
  Slicer's ITK IO factories: replacing it would break Slicer).

Decisions live here, in plain functions of what is importable, so they are testable without
Slicer's GUI; only `install` needs Slicer's pip_install.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

TORCH_REQUIREMENT = ">=2.2"
CPU_TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"
ENGINE_PACKAGE = "fmct"
ENGINE_FOLDER_IN_EXTENSION = "FMCTEngine"  # see the top-level CMakeLists.txt
# Packages never installed or replaced by FMCT: torch has its own step, SimpleITK is Slicer's.
NOT_INSTALLED_BY_PIP = ("torch", "simpleitk")

PYTORCH_EXTENSION = "PyTorch extension"
PIP = "pip"


class MissingDependencyError(RuntimeError):
    """torch or the fmct engine is not importable, or its installation was declined or failed."""


@dataclass(frozen=True)
class InstallStep:
    """One package to install, and how; `detail` is what the confirmation dialog shows."""

    package: str
    method: str
    detail: str
    pipArgs: tuple[str, ...] = field(default=())
    source: Path | None = None


def isImportable(name: str) -> bool:
    """Whether a top-level module can be imported, without importing it (torch takes seconds)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def moduleDir() -> Path:
    """The folder holding FMCT.py (FMCTLib's parent), in a checkout or an installed extension."""
    return Path(__file__).resolve().parent.parent


def engineSourceDir(fromModuleDir: Path | None = None) -> Path | None:
    """Where the engine's source (pyproject.toml + fmct/) is: next to the installed modules
    (extension) or one level up (a checkout of this repository); None if neither."""
    base = fromModuleDir or moduleDir()
    for candidate in (base.parent / ENGINE_FOLDER_IN_EXTENSION, base / ENGINE_FOLDER_IN_EXTENSION, base.parent):
        if (candidate / "pyproject.toml").is_file() and (candidate / ENGINE_PACKAGE / "__init__.py").is_file():
            return candidate
    return None


def sourceVersion(source: Path) -> str | None:
    """The engine version declared in the source's pyproject.toml."""
    match = re.search(r'^version\s*=\s*"([^"]+)"', (source / "pyproject.toml").read_text(), re.MULTILINE)
    return match.group(1) if match else None


def installedEngineVersion() -> str | None:
    """The version pip installed, or None when fmct is not pip-installed (e.g. on sys.path from a checkout)."""
    try:
        return importlib.metadata.version(ENGINE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def torchPipArgs(platform: str = sys.platform) -> tuple[str, ...]:
    """pip arguments for the CPU build of torch on this platform."""
    requirement = f"torch{TORCH_REQUIREMENT}"
    if platform == "darwin":  # macOS wheels on PyPI are the CPU/MPS build already
        return (requirement,)
    return (requirement, "--index-url", CPU_TORCH_INDEX_URL)


def engineRequirements(requires: list[str] | None) -> list[str]:
    """The engine's install requirements minus extras and the packages FMCT never installs."""
    from packaging.requirements import Requirement

    kept = []
    for text in requires or []:
        requirement = Requirement(text)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        if requirement.name.lower() in NOT_INSTALLED_BY_PIP:
            continue
        kept.append(str(requirement))
    return kept


class DependencyLogic:
    """Works out what is missing and installs it (the latter only inside Slicer)."""

    def __init__(self, importable: Callable[[str], bool] = isImportable, platform: str = sys.platform,
                 engineSource: Path | None | bool = True) -> None:
        """importable and engineSource are parameters so that every branch of the plan can be
        exercised in tests; engineSource=True means "look for it next to this module"."""
        self.importable = importable
        self.platform = platform
        self.engineSource = engineSourceDir() if engineSource is True else engineSource

    # -- what is missing ---------------------------------------------------------------------

    def missingPackages(self) -> list[str]:
        return [name for name in ("torch", ENGINE_PACKAGE) if not self.importable(name)]

    def engineOutdated(self) -> bool:
        """A pip-installed engine older or newer than the source this module came with."""
        if self.engineSource is None or not self.importable(ENGINE_PACKAGE):
            return False
        installed = installedEngineVersion()
        return installed is not None and installed != sourceVersion(self.engineSource)

    def installPlan(self) -> list[InstallStep]:
        """The steps to run, in order; empty when everything is in place."""
        plan = []
        if not self.importable("torch"):
            plan.append(self._torchStep())
        if not self.importable(ENGINE_PACKAGE) or self.engineOutdated():
            plan.append(self._engineStep())
        return plan

    def _torchStep(self) -> InstallStep:
        if self.importable("PyTorchUtils"):
            return InstallStep("torch", PYTORCH_EXTENSION,
                               f"PyTorch (torch{TORCH_REQUIREMENT}) with the PyTorch extension's installer, "
                               "which picks the GPU build that matches your NVIDIA driver, or the CPU build")
        args = torchPipArgs(self.platform)
        return InstallStep("torch", PIP, f"PyTorch, CPU build: pip install {' '.join(args)}", pipArgs=args)

    def _engineStep(self) -> InstallStep:
        if self.engineSource is None:
            raise MissingDependencyError(
                "The fmct engine is not installed and its source was not found next to the FMCT module. "
                "Install it into Slicer's Python with: PythonSlicer -m pip install <path to the FMCT repository>")
        return InstallStep(ENGINE_PACKAGE, PIP,
                           f"the FMCT engine (fmct {sourceVersion(self.engineSource)}) from {self.engineSource}, "
                           "with MONAI, Captum, safetensors and its other requirements",
                           pipArgs=(str(self.engineSource), "--no-deps", "--upgrade"), source=self.engineSource)

    def confirmationText(self, plan: list[InstallStep]) -> tuple[str, str]:
        """(message, details) for the dialog that asks before anything is installed."""
        message = ("FMCT needs Python packages that are not installed in Slicer yet. Installing them needs a "
                   "network connection and may take several minutes (PyTorch is large). Install now?")
        details = "\n".join(f"- {step.detail}" for step in plan)
        return message, details

    def requireEngine(self) -> None:
        """Fail with what to do when an analysis is asked for without the packages."""
        missing = self.missingPackages()
        if missing:
            raise MissingDependencyError(
                f"FMCT needs the Python package(s) {', '.join(missing)}. Open the FMCT module and click Analyze to "
                "install them (you will be asked first), or call FMCTLogic().dependencies.install().")

    # -- installing (inside Slicer) ------------------------------------------------------------

    def install(self, plan: list[InstallStep] | None = None, log: Callable[[str], None] = print) -> None:
        """Run the plan with Slicer's installers. Callers ask the user first (see confirmationText)."""
        import slicer.util

        for step in self.installPlan() if plan is None else plan:
            log(f"Installing {step.detail} ...")
            if step.method == PYTORCH_EXTENSION:
                import PyTorchUtils

                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
                if torch is None:
                    raise MissingDependencyError("PyTorch was not installed; FMCT cannot run without it.")
            elif step.package == ENGINE_PACKAGE:
                slicer.util.pip_install(list(step.pipArgs))
                importlib.invalidate_caches()
                requirements = engineRequirements(importlib.metadata.requires(ENGINE_PACKAGE))
                if requirements:
                    slicer.util.pip_install(requirements)
            else:
                slicer.util.pip_install(list(step.pipArgs))
            importlib.invalidate_caches()
        self.requireEngine()
        log("FMCT's Python packages are installed.")
