"""The Python packages FMCT needs inside Slicer, and how they get there on first use.

Slicer's Python does not ship PyTorch or the engine's requirements (Captum, safetensors, ...).
Installing them when the module is imported would stall Slicer's startup (torch is gigabytes)
and would happen without consent, so nothing is installed at import time: when an analysis is
first asked for, the widget shows the plan made here in a confirmation dialog, and only then
runs it. Three rules, each from a way this goes wrong for Slicer users:

- **Never change the torch that is there.** Other extensions (PyTorch, TotalSegmentator,
  MONAIAuto3DSeg) install the torch build that matches the GPU driver, and it may already be
  imported in this Slicer. An unconstrained `pip install captum` would replace torch 2.4 with the
  newest torch and its CUDA wheels (captum 0.9 needs torch>=2.3, monai 1.6 torch>=2.8). So every
  pip install here runs with a constraints file that pins the installed torch, its companions
  (torchvision, torchaudio, triton, nvidia-*) and Slicer's numpy; pip then picks the newest
  version of each requirement that works with them (captum 0.8 for a torch 2.2), or stops
  with a conflict instead of replacing them. torch itself, when missing, comes from the PyTorch
  extension's installer (the build for the GPU driver), else pip's CPU build.
- **Only what the Analyze path imports.** The engine's requirements from its pyproject.toml,
  minus torch (its own step) and SimpleITK (Slicer's own build, with Slicer's ITK IO factories),
  with upper bounds at the newest versions tested (TESTED_BELOW). MONAI is not among them: the
  engine does not import it (it is in the engine's `bench` extra, for benchmarks).
- **The engine that runs is the one that came with the module.** The engine is pure Python, so
  it is not pip-installed at all: its source folder (the copy inside the extension, or the
  checkout the module is loaded from) is put first on sys.path (useEngineSource), in Slicer and
  in the analysis worker. Editing `fmct/` in a checkout, or updating the extension, takes effect
  at once, and a read-only install location is no obstacle.

Decisions live here, in plain functions of what is installed, so they are testable without
Slicer's GUI; only `install` needs Slicer's pip_install.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

CPU_TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"
ENGINE_PACKAGE = "fmct"
ENGINE_FOLDER_IN_EXTENSION = "FMCTEngine"  # see the top-level CMakeLists.txt
# Packages never installed or replaced by the requirements step: torch has its own step,
# SimpleITK is Slicer's.
NOT_INSTALLED_BY_PIP = ("torch", "simpleitk")
# Installed packages pinned while pip installs anything: torch and what is built against it, and
# Slicer's numpy (replacing it under a running Slicer breaks Slicer's own modules).
PINNED_NAMES = ("torch", "torchvision", "torchaudio", "torchtext", "torchdata", "triton", "numpy")
PINNED_PREFIXES = ("nvidia-",)
# The newest versions FMCT is tested with: the installer stays below the next minor release.
TESTED_BELOW = {"captum": "0.10", "safetensors": "1", "matplotlib": "4", "pyyaml": "7", "tqdm": "5"}
TESTED_VERSIONS = "torch 2.13 (CPU), captum 0.9.0, safetensors 0.7, numpy 2.4, Slicer 5.10 / slicer-core 5.13"

PYTORCH_EXTENSION = "PyTorch extension"
PIP = "pip"


class MissingDependencyError(RuntimeError):
    """torch or the fmct engine is not importable, or its installation was declined or failed."""


@dataclass(frozen=True)
class InstallStep:
    """One thing to install, and how; `detail` is what the confirmation dialog shows."""

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


def installedDistributions() -> dict[str, str]:
    """Normalised distribution name -> version, for everything installed in this Python."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalizeName(name), dist.version)
    return found


def normalizeName(name: str) -> str:
    """PEP 503 name normalisation (Pillow == pillow, typing_extensions == typing-extensions)."""
    return re.sub(r"[-_.]+", "-", name).lower()


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


def useEngineSource(source: Path | None) -> None:
    """Put the engine source first on sys.path, so `import fmct` is this copy, not an old one in site-packages."""
    if source is None:
        return
    text = str(source)
    if text in sys.path:
        if sys.path[0] == text:
            return
        sys.path.remove(text)
    sys.path.insert(0, text)
    importlib.invalidate_caches()


def sourceVersion(source: Path) -> str | None:
    """The engine version declared in the source's pyproject.toml."""
    match = re.search(r'^version\s*=\s*"([^"]+)"', (source / "pyproject.toml").read_text(), re.MULTILINE)
    return match.group(1) if match else None


def documentationUrl(anchor: str = "", source: Path | None | bool = True) -> str | None:
    """The documentation (the README on the repository's page) for the modules' help, from the
    engine's pyproject.toml [project.urls] Homepage: no URL of its own in the modules, so the one
    repository variable (CMakeLists.txt FMCT_REPOSITORY, Utilities/set_repository.py) covers it."""
    source = engineSourceDir() if source is True else source
    if source is None:
        return None
    try:
        import tomllib

        urls = tomllib.loads((source / "pyproject.toml").read_text())["project"].get("urls", {})
    except (ImportError, OSError, KeyError, ValueError):
        return None
    home = urls.get("Homepage")
    return f"{home}{anchor}" if home else None


def sourceRequirements(source: Path) -> list[str]:
    """The engine's core requirements as its pyproject.toml declares them (extras excluded)."""
    import tomllib

    return list(tomllib.loads((source / "pyproject.toml").read_text())["project"].get("dependencies", []))


def torchRequirement(requires: list[str]) -> str:
    """The engine's torch requirement (e.g. 'torch>=2.2'), used when torch must be installed."""
    from packaging.requirements import Requirement

    for text in requires:
        requirement = Requirement(text)
        if normalizeName(requirement.name) == "torch":
            return str(requirement)
    return "torch"


def torchPipArgs(requirement: str = "torch>=2.2", platform: str = sys.platform) -> tuple[str, ...]:
    """pip arguments for the CPU build of torch on this platform."""
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
        if normalizeName(requirement.name) in NOT_INSTALLED_BY_PIP:
            continue
        kept.append(str(requirement))
    return kept


def unsatisfied(requirements: list[str], installed: Mapping[str, str]) -> list[str]:
    """The requirements the installed versions do not meet (missing, or outside the specifier)."""
    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        version = installed.get(normalizeName(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def constraints(installed: Mapping[str, str]) -> list[str]:
    """Lines of the pip constraints file: the installed torch family and numpy pinned exactly,
    the tested upper bounds of the engine's requirements."""
    pins = [f"{name}=={version}" for name, version in sorted(installed.items())
            if name in PINNED_NAMES or name.startswith(PINNED_PREFIXES)]
    caps = [f"{name}<{below}" for name, below in sorted(TESTED_BELOW.items())]
    return pins + caps


SAMPLE_PACKAGES = ("numpy", "SimpleITK")  # all the synthetic sample CT needs besides the engine source


class DependencyLogic:
    """Works out what is missing and installs it (the latter only inside Slicer)."""

    def __init__(self, importable: Callable[[str], bool] = isImportable, platform: str = sys.platform,
                 engineSource: Path | None | bool = True,
                 installed: Callable[[], Mapping[str, str]] | Mapping[str, str] = installedDistributions) -> None:
        """importable, engineSource and installed are parameters so that every branch of the plan
        can be exercised in tests (a stand-in environment with an older torch, no engine source);
        engineSource=True means "look for it next to this module"."""
        self.importable = importable
        self.platform = platform
        self.engineSource = engineSourceDir() if engineSource is True else engineSource
        self._installed = installed

    # -- what is there ---------------------------------------------------------------------------

    def installed(self) -> dict[str, str]:
        """Normalised name -> version of what is installed (asked again each time: installs change it)."""
        found = self._installed() if callable(self._installed) else self._installed
        return {normalizeName(name): version for name, version in found.items()}

    def engineAvailable(self) -> bool:
        return self.engineSource is not None or self.importable(ENGINE_PACKAGE)

    def requirements(self) -> list[str]:
        """What the Analyze path needs besides torch: the engine source's requirements."""
        if self.engineSource is not None:
            requires = sourceRequirements(self.engineSource)
        else:
            try:
                requires = importlib.metadata.requires(ENGINE_PACKAGE) or []
            except importlib.metadata.PackageNotFoundError:
                requires = []
        return requires

    def missingPackages(self) -> list[str]:
        missing = [] if self.importable("torch") else ["torch"]
        if not self.engineAvailable():
            missing.append(ENGINE_PACKAGE)
        return missing + unsatisfied(engineRequirements(self.requirements()), self.installed())

    def constraints(self) -> list[str]:
        return constraints(self.installed())

    # -- the plan -----------------------------------------------------------------------------

    def installPlan(self) -> list[InstallStep]:
        """The steps to run, in order; empty when everything is in place."""
        if not self.engineAvailable():
            raise MissingDependencyError(
                "The fmct engine was not found next to the FMCT module, and it is not installed. Use the FMCT "
                "extension from the Extensions Manager, or add the FMCT and FMCTTraining folders of a checkout of "
                "the FMCT repository to Slicer's Additional module paths.")
        requires = self.requirements()
        plan = []
        if not self.importable("torch"):
            plan.append(self._torchStep(torchRequirement(requires)))
        needed = unsatisfied(engineRequirements(requires), self.installed())
        if needed:
            plan.append(InstallStep(
                "requirements", PIP,
                f"{', '.join(needed)} with pip; the installed PyTorch (and numpy) stay exactly as they are",
                pipArgs=tuple(needed)))
        return plan

    def _torchStep(self, requirement: str) -> InstallStep:
        if self.importable("PyTorchUtils"):
            return InstallStep("torch", PYTORCH_EXTENSION,
                               f"PyTorch ({requirement}) with the PyTorch extension's installer, "
                               "which picks the GPU build that matches your NVIDIA driver, or the CPU build",
                               pipArgs=(requirement,))
        args = torchPipArgs(requirement, self.platform)
        return InstallStep("torch", PIP, f"PyTorch, CPU build: pip install {' '.join(args)}", pipArgs=args)

    def confirmationText(self, plan: list[InstallStep]) -> tuple[str, str]:
        """(message, details) for the dialog that asks before anything is installed."""
        message = ("FMCT needs Python packages that are not installed in Slicer yet. Installing them needs a "
                   "network connection and may take several minutes (PyTorch is large). Install now?")
        details = "\n".join(f"- {step.detail}" for step in plan)
        details += f"\n\nTested with {TESTED_VERSIONS}."
        return message, details

    def requireSampleEngine(self) -> None:
        """What Sample Data's synthetic head CT needs: the engine source, numpy and SimpleITK, which
        Slicer ships. fmct.phantom and the NRRD writer import nothing else, so the button loads the
        CT without PyTorch and without the install dialog (Analyze asks for PyTorch later)."""
        if not self.engineAvailable():
            self.installPlan()  # raises the one message about a missing engine
        missing = [name for name in SAMPLE_PACKAGES if not self.importable(name)]
        if missing:
            raise MissingDependencyError(f"The synthetic head CT needs {', '.join(missing)}, which this Slicer lacks.")
        useEngineSource(self.engineSource)

    def requireEngine(self) -> None:
        """Fail with what to do when an analysis is asked for without the packages."""
        missing = self.missingPackages()
        if missing:
            raise MissingDependencyError(
                f"FMCT needs the Python package(s) {', '.join(missing)}. Open the FMCT module and click Analyze to "
                "install them (you will be asked first), or call FMCTLogic().dependencies.install().")
        useEngineSource(self.engineSource)

    def ensure(self, confirm: Callable[[str, str], bool], showError: Callable[[str, str], None],
               log: Callable[[str], None] = print) -> bool:
        """Ask, install, and say whether everything is in place; never raises.

        confirm(message, details) -> bool asks the user; showError(message, details) shows a
        failure once (Slicer's tryWithErrorDisplay would show it and then raise it again, which
        a button handler turns into a second, raw traceback). False when the user declined or
        installing failed.
        """
        import traceback

        try:
            plan = self.installPlan()
        except MissingDependencyError as error:
            showError(str(error), "")
            return False
        if not plan:
            return True
        message, details = self.confirmationText(plan)
        if not confirm(message, details):
            return False
        try:
            self.install(plan, log=log)
        except Exception as error:  # any failure of pip or of the PyTorch installer goes to the dialog
            showError(f"Installing FMCT's Python packages failed: {error}", traceback.format_exc())
            return False
        return True

    def selfTestSkipReason(self, testingEnabled: bool) -> str:
        """Why the module's self-test must not run here ('' when it may): it never installs packages,
        so "Reload and Test" and the extension build machines never download PyTorch."""
        if not testingEnabled:
            return "testing is not enabled (start Slicer with --testing, or use the Developer Tools' Reload and Test)"
        try:
            missing = self.missingPackages()
        except MissingDependencyError as error:
            return str(error)
        if missing or not self.engineAvailable():
            return (f"{', '.join(missing) or 'the fmct engine'} not installed; click Analyze once to install them, "
                    "then run the test again (the test never installs packages)")
        return ""

    # -- installing (inside Slicer) ------------------------------------------------------------

    def pipArguments(self, step: InstallStep, constraintsFile: Path) -> list[str]:
        """pip's arguments for a step: the packages, and the constraints that hold torch in place."""
        return [*step.pipArgs, "--constraint", str(constraintsFile)]

    def install(self, plan: list[InstallStep] | None = None, log: Callable[[str], None] = print) -> None:
        """Run the plan with Slicer's installers. Callers ask the user first (see confirmationText)."""
        import slicer.util

        for step in self.installPlan() if plan is None else plan:
            log(f"Installing {step.detail} ...")
            if step.method == PYTORCH_EXTENSION:
                import PyTorchUtils

                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=step.pipArgs[0].removeprefix("torch"))
                if torch is None:
                    raise MissingDependencyError("PyTorch was not installed; FMCT cannot run without it.")
            elif step.package == "torch":
                slicer.util.pip_install(list(step.pipArgs))
            else:
                with tempfile.TemporaryDirectory(prefix="fmct-pip-") as folder:
                    constraintsFile = Path(folder) / "constraints.txt"
                    constraintsFile.write_text("\n".join(self.constraints()) + "\n")  # after torch's own step
                    slicer.util.pip_install(self.pipArguments(step, constraintsFile))
            importlib.invalidate_caches()
        self.requireEngine()
        log("FMCT's Python packages are installed.")
