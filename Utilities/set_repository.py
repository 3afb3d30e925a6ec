"""Name the public repository of FMCT in every place that must spell it out, from one value.

    python Utilities/set_repository.py NEW_OWNER/NEW_NAME [--branch main] [--root .]

FMCT_REPOSITORY in CMakeLists.txt is the one variable that names the repository. The Slicer
Extensions Index reads EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS as literal text (no CMake
variables), and pyproject.toml, CITATION.cff and README.md are read without CMake, so those hold
the URL written out; this script rewrites them all from the old value to the new one (and the
branch of the image URLs), and Testing/test_slicer_extension.py checks that they agree.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

FILES = ("CMakeLists.txt", "pyproject.toml", "CITATION.cff", "README.md")
VARIABLE = re.compile(r'set\(FMCT_REPOSITORY "([^"]+)"')
BRANCH = re.compile(r'set\(FMCT_REPOSITORY_BRANCH "([^"]+)"')
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+$")


def current(root: Path) -> tuple[str, str]:
    """(owner/name, branch) as CMakeLists.txt holds them."""
    text = (root / "CMakeLists.txt").read_text(encoding="utf-8")
    return VARIABLE.search(text).group(1), BRANCH.search(text).group(1)


def rewrite(root: Path, new: str, branch: str | None = None) -> list[Path]:
    """Replace the repository (and the branch of raw URLs) in FILES; returns the files changed."""
    if not NAME.match(new):
        raise SystemExit(f"{new!r}: give the repository as OWNER/NAME, e.g. myorg/SlicerFMCT")
    old, old_branch = current(root)
    branch = branch or old_branch
    changed = []
    for name in FILES:
        path = root / name
        text = path.read_text(encoding="utf-8")
        updated = (text.replace(f"raw.githubusercontent.com/{old}/{old_branch}/", f"raw.githubusercontent.com/{new}/{branch}/")
                   .replace(f"github.com/{old}", f"github.com/{new}")
                   .replace(f'set(FMCT_REPOSITORY "{old}"', f'set(FMCT_REPOSITORY "{new}"')
                   .replace(f'set(FMCT_REPOSITORY_BRANCH "{old_branch}"', f'set(FMCT_REPOSITORY_BRANCH "{branch}"'))
        if updated != text:
            path.write_text(updated, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", help="OWNER/NAME of the public repository (the index wants 'Slicer' in NAME)")
    parser.add_argument("--branch", help="branch the image URLs point at (default: the current one)")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="the checkout")
    args = parser.parse_args(argv)
    for path in rewrite(Path(args.root), args.repository, args.branch):
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
