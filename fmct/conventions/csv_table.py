"""Reading a CSV a person saved: one reader for the batch manifest and the training manifests.

Spreadsheets save CSVs in ways that differ from what fmct writes: a UTF-8 or UTF-16 byte-order
mark (Excel's "CSV UTF-8" and "Unicode text", the latter tab-separated), a space after each comma,
a ';' between columns (Excel in locales whose decimal mark is a comma), Latin-1 bytes (an older
"CSV"). The first three are read as meant; the last two are refused with a message that says what
the file is and how to save it, instead of a misleading "lacks column path" or a mangled path.
"""
from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path

from fmct.conventions.errors import ConfigError, EmptyInputError

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
SAVE_AS = "save it as 'CSV UTF-8 (comma delimited)'"


def decode_text(data: bytes, path: Path) -> str:
    """The file's text: by its byte-order mark, else UTF-8; anything else refused, naming what it looks like."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path} starts with a {encoding.upper()} byte-order mark but is not valid "
                                  f"{encoding.upper()} ({e.reason} at byte {e.start}); {SAVE_AS}") from None
    if b"\0" in data[:1024]:
        raise ConfigError(f"{path} looks like UTF-16 text without a byte-order mark; fmct cannot tell its byte order. "
                          f"{SAVE_AS[0].upper() + SAVE_AS[1:]}.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} looks like Latin-1 / "
                          f"Windows-1252 (a non-English letter in a path, say). Re-save it as UTF-8 "
                          f"('CSV UTF-8 (comma delimited)' in Excel) so every path is read as written.") from None


def read_csv_table(path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows (column -> text, never None) and the column names of a CSV with a header line.

    Comma- or tab-separated (tab only when the header has no comma), spaces after the separator
    ignored, column names stripped. A ';'-separated file is refused, saying so.
    """
    path = Path(path)
    if not path.is_file():
        raise EmptyInputError(f"{path} does not exist. Check the path of the CSV file.")
    text = decode_text(path.read_bytes(), path)
    header = text.lstrip().split("\n", 1)[0]
    delimiter = "\t" if "\t" in header and "," not in header else ","
    if delimiter == "," and ";" in header and "," not in header:
        raise ConfigError(f"{path} separates its columns with ';' (a CSV from a spreadsheet set to a language that "
                          f"writes decimal commas); fmct reads commas. {SAVE_AS[0].upper() + SAVE_AS[1:]}, or replace "
                          "the ';' between columns with ','.")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    reader.fieldnames = [(c or "").strip() for c in (reader.fieldnames or [])]
    rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
    return rows, [c for c in reader.fieldnames if c]
