"""Exceptions for user mistakes: one type per kind, each message says what is wrong and what to do.

The CLI turns any `FMCTError` into exit code 2 and a one-line message; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations


class FMCTError(Exception):
    """Base of every error caused by input the user gave us (never by a bug in fmct)."""


class InputVolumeError(FMCTError):
    """The input is not a usable head CT volume."""


class EmptyInputError(InputVolumeError):
    """The path holds nothing we can read (no file, empty folder, no DICOM series)."""


class UnreadableInputError(InputVolumeError):
    """A file is corrupt, truncated or in a format we cannot read."""


class NotCTError(InputVolumeError):
    """The image is not a CT: wrong DICOM modality or values that are not Hounsfield units."""


class HeadCheckError(InputVolumeError):
    """The CT fails a model-independent plausibility check (fmct.checks): no head found, orientation against
    the header, not calibrated in HU, implausible size or direction matrix. `checks` holds every check's record."""

    checks: list = []


class NotVolumeError(InputVolumeError):
    """The image is 2D (a single slice) or too thin to be a 3D head CT."""


class MissingSlicesError(InputVolumeError):
    """The DICOM series has a gap in its slice positions (or duplicated positions)."""


class NonUniformSpacingError(InputVolumeError):
    """Slices are not evenly spaced, so no single voxel grid describes the series."""


class GantryTiltError(InputVolumeError):
    """The series is acquired with a gantry tilt that cannot be corrected."""


class AbsurdSpacingError(InputVolumeError):
    """Voxel spacing is zero, negative or implausibly large for a head CT."""


class VolumeTooLargeError(InputVolumeError):
    """The volume would need more memory than this machine has (its header says how big it is)."""


class OutputFolderError(FMCTError):
    """The output folder cannot be created or written, or holds the results of another study."""


class OutputWriteError(OutputFolderError, OSError):
    """A result could not be written completely (a full disk, a quota); nothing half-written is left.

    Also an OSError, which is what it replaces: code that caught the disk error still catches it."""


class BundleError(FMCTError):
    """A model bundle is missing, malformed, or does not match this version of the code."""


class ConfigError(FMCTError):
    """A configuration value is invalid."""


class ResumeMismatchError(ConfigError):
    """--resume was asked with a config (seed, data, model, losses, crops) other than the run's own."""


class TrainingDivergedError(FMCTError, FloatingPointError):
    """Training produced a non-finite loss; the message says which setting to change."""


class Cancelled(FMCTError):
    """The user cancelled a long-running operation."""
