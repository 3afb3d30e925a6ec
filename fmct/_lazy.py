"""Package-level names loaded on first use, so importing a package costs nothing until a name is used.

`fmct.inference.Analyzer` and `from fmct.reading import read_volume` work, yet `import fmct.reading`
does not pull in numpy, SimpleITK or torch: the CLI's cold start pays only for what it runs.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `names[name]` (a module path) on first access."""

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            setattr(importlib.import_module(package), name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
