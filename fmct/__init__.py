"""fmct: the engine of the FMCT head-CT foundation model (never imports Slicer).

`import fmct` is cheap (no numpy, SimpleITK or torch): the names below are loaded on first use, so
a command pays only for the modules on its own path (the CLI starts in tenths of a second).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fmct.conventions.errors import FMCTError
    from fmct.reading.volume import Volume

__all__ = ["FMCTError", "Volume", "__version__"]
_LAZY = {"FMCTError": "fmct.conventions.errors", "Volume": "fmct.reading.volume"}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # from git (fmct.conventions.version), computed on first use
        from fmct.conventions.version import code_version

        return code_version()
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fmct' has no attribute {name!r}")
