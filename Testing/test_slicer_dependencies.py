"""What the FMCT module installs into Slicer's Python on first use, and how it decides.

The plan depends on what is importable and on where the engine's source is; these tests give the
DependencyLogic those facts directly (the real ones where they exist here) and check each branch.
Installing itself runs Slicer's pip_install and the PyTorch extension, which only exist in Slicer.
"""
from __future__ import annotations

import sys

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
    (step,) = logic.installPlan()
    assert step.package == "torch" and step.method == deps.PYTORCH_EXTENSION
    assert "GPU build" in step.detail


@pytest.mark.parametrize("platform, index", [("linux", True), ("win32", True), ("darwin", False)])
def test_otherwise_torch_is_the_cpu_build_from_pip(platform, index):
    logic = DependencyLogic(importable=lambda name: name == "fmct", platform=platform)
    (step,) = logic.installPlan()
    assert step.method == deps.PIP and step.pipArgs[0] == "torch>=2.2"
    assert (deps.CPU_TORCH_INDEX_URL in step.pipArgs) == index
    assert "CPU build" in step.detail


def test_engine_is_installed_from_the_source_that_came_with_the_module():
    logic = DependencyLogic(importable=importable_except("fmct", "torch"))
    torch_step, engine_step = logic.installPlan()
    assert torch_step.package == "torch"
    assert engine_step.package == "fmct" and engine_step.source == REPO
    assert engine_step.pipArgs == (str(REPO), "--no-deps", "--upgrade")
    message, details = logic.confirmationText(logic.installPlan())
    assert "Install now?" in message and f"fmct {deps.sourceVersion(REPO)}" in details and "PyTorch" in details


def test_engine_without_its_source_says_how_to_install_it():
    logic = DependencyLogic(importable=importable_except("fmct"), engineSource=None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        logic.installPlan()
    with pytest.raises(MissingDependencyError, match="fmct"):
        logic.requireEngine()


def test_engine_requirements_leave_torch_and_slicers_simpleitk_alone():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [f'{r}; extra == "{name}"' for name, rs in project.get("optional-dependencies", {}).items() for r in rs]
    kept = deps.engineRequirements(project["dependencies"] + extras)
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in kept}
    assert "torch" not in names and "simpleitk" not in names
    assert {"numpy", "monai", "captum", "safetensors"} <= names
    assert not any("extra" in r for r in kept)


def test_torch_pip_args_are_a_cpu_build_on_linux():
    assert deps.torchPipArgs("linux") == ("torch>=2.2", "--index-url", "https://download.pytorch.org/whl/cpu")
