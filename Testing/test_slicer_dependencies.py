"""What the FMCT module installs into Slicer's Python on first use, and how it decides.

The plan depends on what is importable, what is installed and where the engine's source is; these
tests give the DependencyLogic those facts directly (the real ones where they exist here) and check
each branch. The rule that matters most, that the torch already there never changes, is checked
with pip itself: in a stand-in environment with an older torch, pip resolves the plan's install
against a local index that also offers a newer torch and a captum that would want it.
Installing itself runs Slicer's pip_install and the PyTorch extension, which only exist in Slicer.
"""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from slicer_testing import REPO  # noqa: F401  (puts FMCT/ on sys.path)

from FMCTLib import dependencies as deps  # noqa: E402
from FMCTLib.dependencies import DependencyLogic, MissingDependencyError  # noqa: E402


def importable_except(*missing: str):
    return lambda name: name not in missing and deps.isImportable(name)


def test_nothing_to_install_where_torch_and_the_engine_are_importable():
    logic = DependencyLogic()
    assert deps.isImportable("torch") and deps.isImportable("fmct")
    assert logic.installPlan() == []
    logic.requireEngine()


def test_engine_source_is_found_in_a_checkout_and_in_an_extension(tmp_path):
    assert deps.engineSourceDir() == REPO
    modules = tmp_path / "lib" / "Slicer-5.8" / "qt-scripted-modules"  # an installed extension
    engine = modules / deps.ENGINE_FOLDER_IN_EXTENSION
    (engine / "fmct").mkdir(parents=True)
    (engine / "fmct" / "__init__.py").write_text("")
    (engine / "pyproject.toml").write_text('[project]\nname = "fmct"\nversion = "9.9.9"\n')
    assert deps.engineSourceDir(modules) == engine
    assert deps.sourceVersion(engine) == "9.9.9"
    assert deps.engineSourceDir(tmp_path / "elsewhere") is None


def test_torch_comes_from_the_pytorch_extension_when_it_is_there():
    logic = DependencyLogic(importable=lambda name: name in ("fmct", "PyTorchUtils"))
    step = logic.installPlan()[0]
    assert step.package == "torch" and step.method == deps.PYTORCH_EXTENSION
    assert "GPU build" in step.detail and step.pipArgs == ("torch>=2.2",)


@pytest.mark.parametrize("platform, index", [("linux", True), ("win32", True), ("darwin", False)])
def test_otherwise_torch_is_the_cpu_build_from_pip(platform, index):
    logic = DependencyLogic(importable=lambda name: name == "fmct", platform=platform)
    step = logic.installPlan()[0]
    assert step.method == deps.PIP and step.pipArgs[0] == "torch>=2.2"
    assert (deps.CPU_TORCH_INDEX_URL in step.pipArgs) == index
    assert "CPU build" in step.detail


def test_the_engine_runs_from_the_source_that_came_with_the_module(tmp_path):
    """No pip install of the engine (a stale copy in site-packages, a read-only extension folder):
    its source goes first on sys.path, so an edit in a checkout takes effect at once."""
    logic = DependencyLogic()
    assert logic.engineSource == REPO
    assert not any(step.package == "fmct" for step in DependencyLogic(importable=lambda n: False).installPlan())
    stale = tmp_path / "site-packages"
    (stale / "fmct").mkdir(parents=True)
    (stale / "fmct" / "__init__.py").write_text("STALE = True\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]); "
            "from FMCTLib.dependencies import DependencyLogic, useEngineSource; "
            "useEngineSource(DependencyLogic().engineSource); import fmct; "
            "assert not hasattr(fmct, 'STALE'), fmct.__file__; print(fmct.__file__)")
    run = subprocess.run([sys.executable, "-c", code, str(stale), str(REPO / "FMCT")], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).resolve() == (REPO / "fmct" / "__init__.py").resolve()


def test_engine_without_its_source_says_where_to_get_it():
    logic = DependencyLogic(importable=importable_except("fmct"), engineSource=None)
    with pytest.raises(MissingDependencyError, match="Additional module paths"):
        logic.installPlan()
    with pytest.raises(MissingDependencyError, match="fmct"):
        logic.requireEngine()


def test_engine_requirements_leave_torch_and_slicers_simpleitk_alone():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [f'{r}; extra == "{name}"' for name, rs in project.get("optional-dependencies", {}).items() for r in rs]
    kept = deps.engineRequirements(project["dependencies"] + extras)
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in kept}
    assert "torch" not in names and "simpleitk" not in names
    assert {"numpy", "captum", "safetensors"} <= names
    assert "monai" not in names, "fmct/ does not import monai: the Analyze path must not install it"
    assert any(r.startswith("monai") for r in project["optional-dependencies"]["bench"])
    assert not any("extra" in r for r in kept)


def test_fmct_imports_monai_only_on_first_use_in_the_monai_extra():
    """MONAI is the `fmct[monai]` extra (FM-HCT's preprocessing, `--monai` export, the MONAI transform): imported
    inside the functions that need it, in those modules only, so the Slicer module and every other command run
    without it. The one exception is fmct.preprocessing.monai_transform, the transform a user's MONAI pipeline
    imports: it needs MONAI at module level, and no module of fmct imports it."""
    import ast

    allowed = {"fmct/preprocessing/foreground.py", "fmct/export/monai_vit.py"}
    pipeline_only = "fmct/preprocessing/monai_transform.py"
    offenders = []
    for p in (REPO / "fmct").rglob("*.py"):
        where = str(p.relative_to(REPO))
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "monai" or n.startswith("monai.") for n in names):
                if where != pipeline_only and (where not in allowed or node in tree.body):
                    offenders.append(f"{where}:{node.lineno}")
            if where != pipeline_only and any(n.endswith("monai_transform") for n in names):
                offenders.append(f"{where}:{node.lineno} imports {pipeline_only}")
    assert offenders == []


def test_torch_pip_args_are_a_cpu_build_on_linux():
    assert deps.torchPipArgs("torch>=2.2", "linux") == ("torch>=2.2", "--index-url", "https://download.pytorch.org/whl/cpu")


STAND_IN = {"torch": "2.4.0+cu121", "torchvision": "0.19.0+cu121", "nvidia-cublas-cu12": "12.1.3.1",
            "numpy": "1.26.4", "captum": "0.6.0", "safetensors": "0.4.5", "tqdm": "4.66.0", "matplotlib": "3.9.0",
            "PyYAML": "6.0.2", "SimpleITK": "2.3.1"}


def test_plan_for_an_older_torch_pins_everything_torch_related():
    """A Slicer where the PyTorch extension installed torch 2.4 (CUDA 12.1) and an old captum."""
    logic = DependencyLogic(importable=lambda name: name in ("torch", "fmct"), installed=STAND_IN)
    (step,) = logic.installPlan()
    assert step.package == "requirements" and step.pipArgs == ("captum>=0.7",)
    assert not any("torch" in a or "nvidia" in a or "numpy" in a for a in step.pipArgs)
    pins = logic.constraints()
    assert {"torch==2.4.0+cu121", "torchvision==0.19.0+cu121", "nvidia-cublas-cu12==12.1.3.1", "numpy==1.26.4"} <= set(pins)
    assert "captum<0.10" in pins
    args = logic.pipArguments(step, Path("/tmp/c.txt"))
    assert args[-2:] == ["--constraint", "/tmp/c.txt"]
    message, details = logic.confirmationText([step])
    assert "stay exactly as they are" in details and "Install now?" in message


def test_nothing_to_install_where_everything_is_there():
    logic = DependencyLogic()
    assert deps.isImportable("torch")
    assert logic.installPlan() == [] and logic.missingPackages() == []
    logic.requireEngine()


# -- pip itself, in a stand-in environment with an older torch -----------------------------------------

def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal valid wheel (metadata only) of a package, so pip can resolve and install it offline."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {
        f"{name.replace('-', '_')}_stub/__init__.py": "",
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: fmct-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as archive:
        for arcname, text in files.items():
            data = text.encode()
            archive.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arcname},sha256={digest},{len(data)}")
        record.append(f"{dist}.dist-info/RECORD,,")
        archive.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A Python environment with torch 2.4 and numpy 1.26 installed, and a local index that offers
    torch 2.14, numpy 2.4, captum 0.9 (needing torch>=2.8, as monai 1.6 does) and captum 0.8."""
    root = tmp_path_factory.mktemp("stand-in")
    wheels = root / "wheels"
    wheels.mkdir()
    for name, version, requires in [("torch", "2.4.0", ()), ("torch", "2.14.0", ()), ("numpy", "1.26.4", ()),
                                    ("numpy", "2.4.0", ()), ("captum", "0.9.0", ("torch>=2.8", "numpy>=2")),
                                    ("captum", "0.8.0", ("torch>=1.10", "numpy")), ("safetensors", "0.4.5", ())]:
        _wheel(wheels, name, version, requires)
    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    python = env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    installed = _pip(python, "install", "--no-index", "--find-links", str(wheels), "torch==2.4.0", "numpy==1.26.4")
    assert installed.returncode == 0, installed.stderr
    return python, wheels, root


def _resolve(python: Path, wheels: Path, root: Path, args: list[str]) -> dict[str, str]:
    report = root / "report.json"
    run = _pip(python, "install", "--dry-run", "--no-index", "--find-links", str(wheels), "--report", str(report), *args)
    assert run.returncode == 0, run.stderr
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_pip_keeps_the_older_torch_with_the_plans_constraints(stand_in):
    python, wheels, root = stand_in
    listing = subprocess.run([str(python), "-c", "import importlib.metadata as m, json; "
                              "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"],
                             capture_output=True, text=True, check=True, timeout=120)
    installed = json.loads(listing.stdout)
    assert installed["torch"] == "2.4.0"
    logic = DependencyLogic(importable=lambda name: name in ("torch", "fmct"), installed=installed)
    (step,) = [s for s in logic.installPlan() if s.package == "requirements"]
    constraintsFile = root / "constraints.txt"
    constraintsFile.write_text("\n".join(logic.constraints()) + "\n")
    args = [a for a in logic.pipArguments(step, constraintsFile) if a.split(">")[0].split("<")[0] in
            ("captum", "safetensors", "--constraint", str(constraintsFile))]  # what the stand-in index offers
    unconstrained = _resolve(python, wheels, root, [a for a in args if a not in ("--constraint", str(constraintsFile))])
    assert unconstrained.get("torch") == "2.14.0", "without the constraints pip would replace torch (the bug)"
    planned = _resolve(python, wheels, root, args)
    assert "torch" not in planned and "numpy" not in planned, f"the plan changes torch/numpy: {planned}"
    assert planned["captum"] == "0.8.0", "pip picks the captum that works with the torch that is there"


# -- asking, failing, and the self-test gate ------------------------------------------------------------

class _PipFails(DependencyLogic):
    """The plan of a Slicer without torch, whose pip then fails (no network)."""

    def install(self, plan=None, log=print):
        raise OSError("pip: network is unreachable")


def test_a_failed_install_is_shown_once_and_reported_as_false():
    logic = _PipFails(importable=lambda name: name == "fmct", installed=STAND_IN)
    shown, asked = [], []
    ok = logic.ensure(lambda message, details: asked.append(message) or True,
                      lambda message, details: shown.append((message, details)))
    assert ok is False and len(asked) == 1
    assert len(shown) == 1 and "network is unreachable" in shown[0][0] and "Traceback" in shown[0][1]


def test_declining_installs_nothing_and_everything_in_place_asks_nothing():
    logic = _PipFails(importable=lambda name: name == "fmct", installed=STAND_IN)
    shown = []
    assert logic.ensure(lambda m, d: False, lambda m, d: shown.append(m)) is False and shown == []
    asked = []
    assert DependencyLogic().ensure(lambda m, d: asked.append(m) or True, lambda m, d: shown.append(m)) is True
    assert asked == [] and shown == []
    missing_source = DependencyLogic(importable=importable_except("fmct"), engineSource=None)
    assert missing_source.ensure(lambda m, d: True, lambda m, d: shown.append(m)) is False
    assert len(shown) == 1 and "Additional module paths" in shown[0]


def test_the_self_test_runs_only_with_testing_enabled_and_the_packages_present():
    assert DependencyLogic().selfTestSkipReason(testingEnabled=True) == ""
    assert "testing is not enabled" in DependencyLogic().selfTestSkipReason(testingEnabled=False)
    without_torch = DependencyLogic(importable=lambda name: name == "fmct", installed=STAND_IN)
    reason = without_torch.selfTestSkipReason(testingEnabled=True)
    assert "torch" in reason and "never installs" in reason
