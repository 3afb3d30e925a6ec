"""Shared pieces of the table-driven bad-input suites (test_bad_input*.py): the Case row, the small
test CT, a DICOM series writer with per-slice edits, and how a refusal is run and checked.

A helper module, not a test module, so the suites import it instead of each other (issue 24 item 9).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fmct_testing import ball_ct

from fmct.cli import main
from fmct.reading.dicom import write_dicom_series
from fmct.reading.volume import Volume

if TYPE_CHECKING:
    import pydicom

SHAPE, SPACING = (16, 64, 64), (3.0, 3.0, 6.0)


def _permissions_ignored() -> bool:
    """True where file modes do not stop this process (root with its usual capabilities)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
            return True
        except PermissionError:
            return False
        finally:
            probe.chmod(0o600)


IS_ROOT = _permissions_ignored()


@dataclass
class Case:
    id: str
    build: Callable[[Path], Path]  # writes the bad input under the folder, returns the path to give
    code: int
    words: str  # a fragment of the one-line message (case-insensitive)
    args: list[str] = field(default_factory=list)  # extra CLI arguments
    env: dict[str, str] = field(default_factory=dict)
    needs_non_root: bool = False

    def param(self):
        marks = [pytest.mark.skipif(IS_ROOT, reason="permissions do not apply to root")] if self.needs_non_root else []
        return pytest.param(self, id=self.id, marks=marks)


def small_ct(**kw) -> Volume:
    return ball_ct(shape_zyx=SHAPE, spacing=SPACING, **kw)[0]


def dicom_series(d: Path, edit: "Callable[[int, pydicom.Dataset], None] | None" = None, **kw) -> Path:
    import pydicom

    files = write_dicom_series(small_ct(), d / "dicom", **kw)
    if edit is not None:
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            edit(k, ds)
            ds.save_as(f)
    return d / "dicom"


def run_cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    code = main(argv)
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_refused(code: int, lines: list[str], case_code: int, words: str, out: Path) -> None:
    assert code == case_code, lines
    assert len(lines) == 1, lines  # one line: no warnings, no traceback ahead of it
    assert lines[0].startswith("fmct: error: ") and words.lower() in lines[0].lower(), lines[0]
    assert not (out / "findings.json").exists()
