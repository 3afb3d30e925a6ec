"""Names that become file names, and text that reaches a terminal, a log or a table.

A bundle's name and its task names end up in file names (saliency_<task>.nii.gz), CSV columns
and Slicer node names, so they are identifiers: a task called "x/../../pwned" would otherwise
write outside the output folder. Free text (descriptions, paths, messages) is not restricted,
but control characters are stripped wherever it is shown: an ESC sequence would drive the
terminal, a newline would forge a table row or a log line.
"""
from __future__ import annotations

import logging
import os
import re
import unicodedata

from fmct.conventions.errors import FMCTError

IDENTIFIER = re.compile(r"[A-Za-z0-9_-]{1,100}")
IDENTIFIER_RULE = "1 to 100 letters, digits, '_' or '-'"
# Unicode format characters that reorder what a terminal shows (bidirectional overrides, "Trojan Source")
_BIDI = {"\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"}


def is_identifier(value: object) -> bool:
    return isinstance(value, str) and IDENTIFIER.fullmatch(value) is not None


def check_identifier(value: object, what: str, error: type[FMCTError] = FMCTError) -> str:
    """value when it is an identifier, else `error` naming `what` and the rule."""
    if not is_identifier(value):
        shown = printable(repr(value))[:120]
        raise error(f"{what} is {shown}; it must be {IDENTIFIER_RULE} (it becomes part of file names)")
    return value  # type: ignore[return-value]


def printable(text: object, keep_newlines: bool = False) -> str:
    """str(text) with control characters removed: tabs and line breaks become spaces (kept with
    keep_newlines), every other C0/C1 control and bidirectional override is dropped, and a byte of a
    file name that is not UTF-8 is shown as \\xNN (a terminal's UTF-8 encoder would fail on it)."""
    out = []
    for ch in str(text):
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch in "\t\n\r\v\f":
            out.append(" ")
        elif ch in _BIDI or unicodedata.category(ch) == "Cc":
            continue
        elif unicodedata.category(ch) == "Cs":  # a file name's non-UTF-8 byte (surrogateescape): shown, printable
            out.append(f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else "?")
        else:
            out.append(ch)
    return "".join(out)


class PrintableFormatter(logging.Formatter):
    """A log formatter that strips control characters: from the values a message interpolates (line
    breaks too, so a name cannot forge a log line) and from the message itself (its own line breaks,
    such as a --debug traceback's, kept)."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.args, tuple):
            record.args = tuple(printable(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: printable(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return printable(super().format(record), keep_newlines=True)


def check_utf8_path(path: str | os.PathLike) -> None:
    """Refuse an image file whose path is not UTF-8 (a Latin-1 'ä' copied from an old system): SimpleITK
    cannot open such a name, and aborts the whole process instead of raising. Say which byte, and what to do."""
    from fmct.conventions.errors import UnreadableInputError

    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableInputError(
            f"{printable(os.fsdecode(raw))}: its path holds the byte 0x{raw[e.start]:02x}, which is not UTF-8 (Latin-1 "
            "or Windows-1252, e.g. an 'ä' from an older system); the image reader cannot open such a name. Rename it "
            "(for example with: convmv -f latin1 -t utf8 --notest NAME) or copy the file to a plain name.") from None
