"""FMCTLib: the logic of the FMCT Slicer module (MRML nodes <-> the fmct engine).

Kept apart from FMCT.py so that it imports with nothing but MRML (`slicer-core` from PyPI
is enough): scripts and tests use `from FMCTLib.logic import FMCTLogic` with FMCT/ on sys.path.
"""
