"""The version of this code, derived from git: what findings.json, bundle provenance and `fmct --version` record.

A fixed "0.1.0" named 142 different revisions alike. The version now comes from git through
setuptools-scm (e.g. 0.1.dev143+g1a2b3c4, ".d<date>" added for uncommitted changes), computed:
1. in a git checkout of the source (a developer's or an editable install): from git itself, so a
   commit changes it at once (setuptools-scm when importable, else `git rev-list`/`rev-parse`);
2. in an installed wheel or sdist: fmct/_scm_version.py, written by setuptools-scm at build time;
3. else, outside a source tree, the installed distribution's metadata; else "0+unknown" (never
   a made-up number, nor the version of another installed copy).
It is computed on first use and cached, so importing fmct costs no git call.
"""
from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path

UNKNOWN = "0+unknown"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding fmct/, when run from source


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """This code's version string (see the module docstring for where it comes from)."""
    source_tree = (SOURCE_ROOT / "pyproject.toml").is_file()
    if source_tree and (SOURCE_ROOT / ".git").exists():
        found = _from_git(SOURCE_ROOT)
        if found:
            return found
    try:
        from fmct._scm_version import version  # type: ignore[import-not-found]

        return str(version)
    except ImportError:
        pass
    if source_tree:  # a source tree without git: an installed fmct's metadata would describe other code
        return UNKNOWN
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("fmct")
    except (ImportError, PackageNotFoundError):
        return UNKNOWN


def _from_git(root: Path) -> str | None:
    try:
        from setuptools_scm import get_version  # the same rule as the build

        return str(get_version(root=str(root)))
    except Exception:  # not installed, or no usable git metadata: ask git directly
        pass
    try:
        count = _git(root, "rev-list", "--count", "HEAD")
        sha = _git(root, "rev-parse", "--short=9", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    # setuptools-scm's form for a repository without tags; uncommitted changes add the date
    return f"0.1.dev{count}+g{sha}" + (time.strftime(".d%Y%m%d", time.gmtime()) if dirty else "")


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()
