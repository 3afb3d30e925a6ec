"""fmct: the engine of the FMCT head-CT foundation model (never imports Slicer)."""
from __future__ import annotations

__version__ = "0.1.0"

from fmct.errors import FMCTError  # noqa: E402
from fmct.volume import Volume  # noqa: E402

__all__ = ["FMCTError", "Volume", "__version__"]
