"""The Slicer (and Python) FMCT claims: 5.10 or newer, Python 3.12; anything older gets one message.

The module files are compiled (and the parts that must run there, run) with real interpreters of
the versions in question, where this machine has them: Python 3.12, the oldest Python FMCT claims
for Slicer, must compile every file of both modules and the engine; an older Python (Slicer 5.8
ships 3.9) must still compile FMCT.py, FMCTTraining.py and FMCTLib/slicerversion.py and get the
message from it, instead of a load error. Where no such interpreter is found (CI without them),
the files are parsed here with ast at the claimed feature version instead, which catches newer
syntax but not annotations evaluated at import; the test says which it did.
"""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slicer_testing import REPO  # noqa: F401  (puts FMCT/ on sys.path)

from FMCTLib.slicerversion import MINIMUM_PYTHON, MINIMUM_SLICER, unsupportedMessage  # noqa: E402

MODULE_FILES = sorted(p for folder in ("FMCT", "FMCTTraining", "fmct") for p in (REPO / folder).rglob("*.py"))
OLD_SLICER_FILES = [REPO / "FMCT" / "FMCT.py", REPO / "FMCTTraining" / "FMCTTraining.py",
                    REPO / "FMCT" / "FMCTLib" / "slicerversion.py"]


def interpreter(version: tuple[int, int]) -> str | None:
    """A python<major.minor> on PATH, in pyenv, or named by $FMCT_PYTHON<major><minor>."""
    name = f"python{version[0]}.{version[1]}"
    candidates = [os.environ.get(f"FMCT_PYTHON{version[0]}{version[1]}"), shutil.which(name)]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version[0]}.{version[1]}.*/bin/{name}")))
    for candidate in filter(None, candidates):
        run = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=60)
        if run.returncode == 0 and run.stdout.strip() == str(tuple(version)):
            return candidate
    return None


def compile_with(python: str, files: list[Path]) -> subprocess.CompletedProcess:
    code = ("import sys\nbad = []\nfor path in sys.argv[1:]:\n"
            "    try:\n        compile(open(path, encoding='utf-8').read(), path, 'exec')\n"
            "    except SyntaxError as error:\n        bad.append(f'{path}:{error.lineno}: {error.msg}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)")
    return subprocess.run([python, "-c", code, *map(str, files)], capture_output=True, text=True, timeout=300)


def test_every_module_file_compiles_under_the_oldest_python_claimed():
    python = interpreter(MINIMUM_PYTHON)
    if python is None:
        for path in MODULE_FILES:
            ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=MINIMUM_PYTHON)
        pytest.skip(f"no Python {MINIMUM_PYTHON} interpreter here: parsed with ast(feature_version={MINIMUM_PYTHON}) only")
    run = compile_with(python, MODULE_FILES)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_slicer_version_check_imports_under_the_oldest_python_claimed():
    python = interpreter(MINIMUM_PYTHON)
    if python is None:
        pytest.skip(f"no Python {MINIMUM_PYTHON} interpreter here")
    code = ("import sys; sys.path.insert(0, 'FMCT'); import FMCTLib.slicerversion as v, FMCTLib.worker, "
            "FMCTLib.process; assert v.unsupportedMessage(sys.version_info, (5, 10)) is None")
    run = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("old", [(3, 9), (3, 6)])
def test_an_older_slicer_python_reaches_the_message(old):
    """Slicer 5.8 (Python 3.9) and older: the files it loads first must compile, and the check says what to do."""
    python = interpreter(old)
    if python is None:
        for path in OLD_SLICER_FILES:
            ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=old)
        pytest.skip(f"no Python {old} interpreter here: parsed with ast(feature_version={old}) only")
    run = compile_with(python, OLD_SLICER_FILES)
    assert run.returncode == 0, run.stdout + run.stderr
    code = ("import sys; sys.path.insert(0, 'FMCT'); from FMCTLib.slicerversion import unsupportedMessage; "
            "print(unsupportedMessage(sys.version_info, (5, 8)))")
    run = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "FMCT needs 3D Slicer 5.10 or newer (Python 3.12)" in run.stdout and "Slicer 5.8" in run.stdout


def test_the_module_files_import_nothing_of_fmct_before_the_version_check():
    """Before `UNSUPPORTED = ...`, FMCT.py and FMCTTraining.py import only what every Slicer has."""
    for path in OLD_SLICER_FILES[:2]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported, names = [], []
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "UNSUPPORTED" for t in node.targets):
                break
            if isinstance(node, ast.ImportFrom):
                imported.append(node.module)
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
        assert imported, path
        assert [m for m in imported if m.startswith(("FMCT", "fmct")) and m != "FMCTLib.slicerversion"] == [], path
        # parameterNodeWrapper (Slicer 5.2+), i18n (5.4+) and typing.Annotated (Python 3.9+) come after the check
        assert not {"slicer.parameterNodeWrapper", "slicer.i18n"} & set(imported), path
        assert "Annotated" not in names, path


def test_unsupported_message():
    assert unsupportedMessage((3, 12, 0), (5, 10)) is None
    assert unsupportedMessage((3, 13, 1), (5, 13)) is None
    assert unsupportedMessage((3, 12), None) is None
    message = unsupportedMessage((3, 9, 10), (5, 8))
    assert message.startswith("FMCT needs 3D Slicer 5.10 or newer") and "download.slicer.org" in message
    assert unsupportedMessage((3, 12), (5, 9)) is not None
    assert MINIMUM_SLICER == (5, 10) and MINIMUM_PYTHON == (3, 12)


def test_the_floor_is_the_same_everywhere():
    readme = (REPO / "README.md").read_text()
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "Slicer 5.8 or newer" not in readme
    assert "Slicer 5.10 or newer" in readme and "5.10" in cmake
    assert sys.version_info >= (3, 10)
