"""Conventions every stage shares, each in one home: errors, atomic writes, run-time
(progress, cancel, devices, autocast), config files and the task list.
"""
from __future__ import annotations

from fmct._lazy import lazy_exports

_NAMES = {
    "FMCTError": "fmct.conventions.errors",
    "InputVolumeError": "fmct.conventions.errors",
    "BundleError": "fmct.conventions.errors",
    "ConfigError": "fmct.conventions.errors",
    "OutputFolderError": "fmct.conventions.errors",
    "Cancelled": "fmct.conventions.errors",
    "write_bytes_atomic": "fmct.conventions.atomic",
    "write_text_atomic": "fmct.conventions.atomic",
    "FileLock": "fmct.conventions.locks",
    "check_identifier": "fmct.conventions.names",
    "printable": "fmct.conventions.names",
    "progress_or_silent": "fmct.conventions.runtime",
    "check_cancel": "fmct.conventions.runtime",
    "parse_device": "fmct.conventions.runtime",
    "torch_device": "fmct.conventions.runtime",
    "autocast": "fmct.conventions.runtime",
    "read_config_file": "fmct.conventions.config_file",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
