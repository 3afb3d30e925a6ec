"""Ready for the Slicer Extensions Index, to cite and to install (issue 29 items 2 and 4)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "Utilities"))
sys.path.insert(0, str(REPO / "FMCT"))

import set_repository  # noqa: E402
from FMCTLib.dependencies import DependencyLogic, MissingDependencyError, documentationUrl  # noqa: E402

CMAKE = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
URL_FILES = ("CMakeLists.txt", "pyproject.toml", "CITATION.cff", "README.md")


def _repositories(text: str) -> set[str]:
    """owner/name of every github.com or raw.githubusercontent.com URL in a text."""
    return set(re.findall(r"https://(?:raw\.githubusercontent\.com|github\.com)/([\w.-]+/[\w.-]+?)(?:\.git)?(?=[/#\"'\s)]|$)",
                          text)) - {"Slicer/Slicer"}


def test_one_variable_names_the_repository_and_every_url_agrees():
    repository, _ = set_repository.current(REPO)
    assert re.search(r'set\(FMCT_REPOSITORY_URL "https://github.com/\$\{FMCT_REPOSITORY\}"\)', CMAKE)
    for name in URL_FILES:
        assert _repositories((REPO / name).read_text(encoding="utf-8")) == {repository}, name


def test_set_repository_rewrites_every_place(tmp_path):
    for name in URL_FILES:
        shutil.copy(REPO / name, tmp_path / name)
    old, branch = set_repository.current(tmp_path)
    changed = set_repository.rewrite(tmp_path, "myorg/SlicerFMCT", branch="release")
    assert {p.name for p in changed} == set(URL_FILES)
    assert set_repository.current(tmp_path) == ("myorg/SlicerFMCT", "release")
    for name in URL_FILES:
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert _repositories(text) == {"myorg/SlicerFMCT"}, name  # every URL
        if name != "README.md":  # (the README's prose still tells what the placeholder was)
            assert old not in text, name
    cmake = (tmp_path / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "raw.githubusercontent.com/myorg/SlicerFMCT/release/Resources/Icons/FMCT.png" in cmake


def test_contributors_are_the_same_in_cmake_the_modules_and_the_package():
    cmake = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', CMAKE).group(1)
    for module in ("FMCT/FMCT.py", "FMCTTraining/FMCTTraining.py"):
        listed = re.search(r"parent\.contributors = \[([^\]]+)\]", (REPO / module).read_text(encoding="utf-8")).group(1)
        assert [c.strip().strip('"') for c in listed.split(",")] == [c.strip() for c in cmake.split(",")], module
    authors = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["authors"]
    assert [a["name"] for a in authors] == [c.split(" (")[0].strip() for c in cmake.split(",")]


def test_description_is_two_sentences_and_the_readme_has_what_the_index_asks():
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', CMAKE).group(1)
    assert 1 <= len(re.findall(r"[.!?](?:\s|$)", description)) <= 2, description
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Publishing the extension"):readme.index("### How to cite")]
    assert "Apache License 2.0" in section and "`LICENSE`" in section
    entry = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', CMAKE).group(1)
    assert entry["build_dependencies"] == re.search(r'set\(EXTENSION_DEPENDS "([^"]+)"\)', CMAKE).group(1).split()
    assert entry["scm_url"] == f"https://github.com/{set_repository.current(REPO)[0]}.git"
    assert "python Testing/run_selftests.py" in section and (REPO / "Testing" / "run_selftests.py").is_file()


def test_citation_cff_cites_the_paper_and_fmct():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "Apache-2.0"
    paper = cff["preferred-citation"]
    assert paper["title"] == "3D Foundation Model for Generalizable Disease Detection in Head Computed Tomography"
    assert paper["journal"] == "Nature Biomedical Engineering" and paper["year"] == 2026
    assert "2502.02779" in paper["url"] and paper["authors"][0]["family-names"] == "Zhu"
    assert "2502.02779" in (REPO / "README.md").read_text(encoding="utf-8")
    assert (REPO / "CHANGELOG.md").read_text(encoding="utf-8").startswith("# Changelog")


def test_module_help_links_to_the_documentation():
    home = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Homepage"]
    assert documentationUrl("#fmct-in-3d-slicer", source=REPO) == f"{home}#fmct-in-3d-slicer"
    assert documentationUrl(source=None) is None
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "## FMCT in 3D Slicer" in readme and "### Training headless: FMCT Training" in readme  # the anchors
    for module, anchor in (("FMCT/FMCT.py", "#fmct-in-3d-slicer"), ("FMCTTraining/FMCTTraining.py",
                                                                     "#training-headless-fmct-training")):
        assert f'documentationUrl("{anchor}")' in (REPO / module).read_text(encoding="utf-8")


def test_sample_data_needs_numpy_and_simpleitk_only():
    """Sample Data's button: the synthetic head CT loads with PyTorch absent, and asks for no install."""
    without_torch = DependencyLogic(importable=lambda name: name not in ("torch",))
    without_torch.requireSampleEngine()  # no MissingDependencyError: numpy, SimpleITK and the engine are there
    try:
        without_torch.requireEngine()
    except MissingDependencyError as error:
        assert "torch" in str(error)  # Analyze still needs it
    else:
        raise AssertionError("the analysis path does not need torch?")
    code = (
        "import sys\n"
        "for blocked in ('torch', 'captum', 'safetensors', 'matplotlib'):\n"
        "    sys.modules[blocked] = None\n"  # as in a Slicer where nothing was installed yet
        f"sys.path[:0] = [{str(REPO / 'Testing')!r}, {str(REPO / 'FMCT')!r}]\n"
        "from slicer_testing import headless_slicer\n"
        "from FMCTLib.logic import FMCTLogic, SAMPLE_NAME\n"
        "import tempfile\n"
        "with headless_slicer() as app:\n"
        "    node = FMCTLogic().loadSyntheticHeadCT(app.scene, tempfile.mkdtemp(), inPlaneSize=64)\n"
        "    assert node.GetName() == SAMPLE_NAME and node.GetImageData().GetDimensions()[0] == 64\n"
        "print('SAMPLE-OK')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180, cwd=REPO)
    assert "SAMPLE-OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_one_command_runs_both_modules_self_tests_headless():
    """The README's command (about 3 minutes on 2 CPU cores): both modules' checks on a real scene."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "Testing/run_selftests.py"], capture_output=True, text=True, env=env,
                          timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FMCT self-test passed" in proc.stdout and "FMCTTraining self-test passed" in proc.stdout


def test_the_code_passes_its_ruff_configuration():
    """pyproject.toml [tool.ruff]: CI runs it with the tests (ruff is in the test extra)."""
    pytest.importorskip("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
