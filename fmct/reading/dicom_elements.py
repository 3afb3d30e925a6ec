"""A DICOM file's own data elements, nested sequences included, read without decoding any pixel.

GDCM (through SimpleITK) shows only the top-level elements and hides what the checks need: the
per-frame positions of enhanced multi-frame images (PerFrameFunctionalGroupsSequence), whether an
object has pixel data at all, and where the uncompressed pixel bytes start. This walker reads the
elements of the common encodings (implicit and explicit VR, little and big endian, deflated) up to
the pixel data, which it locates but does not read.
"""
from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmct.conventions.errors import UnreadableInputError

PIXEL_DATA = 0x7FE00010
PIXEL_DATA_TAGS = (PIXEL_DATA, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
# Sequences whose VR an implicit-VR file does not say (the ones the checks look into).
KNOWN_SEQUENCES = {0x52009229, 0x52009230, 0x00289110, 0x00209113, 0x00209116, 0x00289145, 0x00209111, 0x00209071}
IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")
NATIVE_SYNTAXES = {IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED}
# What GDCM decodes: the native syntaxes, RLE, JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000.
DECODABLE_SYNTAXES = NATIVE_SYNTAXES | {
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
}
SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL lossless", "1.2.840.10008.1.2.4.111": "JPEG XL JPEG recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL", "1.2.840.10008.1.2.4.201": "HTJ2K lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K lossless RPCL", "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.4.94": "JPIP referenced", "1.2.840.10008.1.2.4.95": "JPIP referenced deflate",
    "1.2.840.10008.1.2.4.100": "MPEG2 video", "1.2.840.10008.1.2.4.102": "MPEG-4 AVC/H.264 video",
    "1.2.840.10008.1.2.4.107": "HEVC/H.265 video", "1.2.840.10008.1.2.6.1": "RFC 2557 MIME encapsulation",
}


class NotDicomError(ValueError):
    """The bytes are not a DICOM data set this walker can follow."""


@dataclass
class Elements:
    """The elements of one file: raw values by tag (sequences as lists of item dicts)."""

    values: dict[int, object]
    transfer_syntax: str
    little_endian: bool
    pixel_offset: int | None = None  # where the (native) pixel bytes start in the file
    pixel_length: int | None = None  # None: encapsulated (compressed) or absent
    has_pixels: bool = False
    meta: dict[int, object] = field(default_factory=dict)

    def text(self, tag: int, within: dict | None = None) -> str:
        value = (self.values if within is None else within).get(tag)
        return value.decode("latin-1").strip("\x00 ") if isinstance(value, bytes) else ""

    def floats(self, tag: int, within: dict | None = None) -> list[float] | None:
        try:
            values = [float(v) for v in self.text(tag, within).split("\\")]
        except ValueError:
            return None
        return values if all(np.isfinite(values)) else None

    def uint(self, tag: int, within: dict | None = None) -> int | None:
        value = (self.values if within is None else within).get(tag)
        if not isinstance(value, bytes) or len(value) not in (2, 4):
            return None
        fmt = ("<" if self.little_endian else ">") + ("H" if len(value) == 2 else "I")
        return struct.unpack(fmt, value)[0]

    def items(self, tag: int, within: dict | None = None) -> list[dict]:
        value = (self.values if within is None else within).get(tag)
        return value if isinstance(value, list) else []


def frame_count(e: Elements) -> int:
    """NumberOfFrames (0028,0008), 1 when absent or unreadable."""
    try:
        return max(1, int(float(e.text(0x00280008) or 1)))
    except (ValueError, OverflowError):
        return 1


def read_elements(path: Path) -> Elements:
    """The file's elements up to its pixel data; raises NotDicomError for what it cannot follow."""
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            raise NotDicomError("empty file") from None
    with data:
        return _walk_file(data)


def transfer_syntax_of(path: Path) -> str:
    """The TransferSyntaxUID of the file meta header ('' without one): GDCM does not show group 0002."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 12)  # the file meta header is a few hundred bytes
        if head[128:132] != b"DICM":
            return ""
        meta, _ = _group2(head, 132)
    except (NotDicomError, OSError, struct.error):
        return ""
    value = meta.get(0x00020010, b"")
    return value.decode("latin-1").strip("\x00 ") if isinstance(value, bytes) else ""


def _walk_file(data) -> Elements:
    if len(data) >= 132 and data[128:132] == b"DICM":
        meta, pos = _group2(data, 132)
        syntax = meta.get(0x00020010, b"").decode("latin-1").strip("\x00 ")
    else:
        meta, pos, syntax = {}, 0, IMPLICIT_LE
    if syntax == DEFLATED:
        body = zlib.decompressobj(-15).decompress(bytes(data[pos:]))
        walker = _Walker(body, explicit=True, little=True)
        values = walker.dataset(0, len(body))
        return Elements(values, syntax, True, None, None, walker.has_pixels, meta)
    explicit, little = syntax != IMPLICIT_LE, syntax != EXPLICIT_BE
    if syntax == IMPLICIT_LE and len(data) > pos + 6 and data[pos + 4 : pos + 6].isalpha() and data[pos + 4 : pos + 6].isupper():
        explicit = True  # no meta header, but explicit VR all the same
    walker = _Walker(data, explicit, little)
    values = walker.dataset(pos, len(data))
    return Elements(values, syntax, little, walker.pixel_offset, walker.pixel_length, walker.has_pixels, meta)


def _group2(data, pos: int) -> tuple[dict[int, object], int]:
    """The file meta information (always explicit VR little endian)."""
    walker = _Walker(data, explicit=True, little=True)
    values: dict[int, object] = {}
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        tag, value, pos = walker.element(pos, len(data))
        values[tag] = value
    return values, pos


class _Walker:
    def __init__(self, data, explicit: bool, little: bool) -> None:
        self.data, self.explicit, self.e = data, explicit, "<" if little else ">"
        self.pixel_offset: int | None = None
        self.pixel_length: int | None = None
        self.has_pixels = False
        self.stopped_at = 0

    def dataset(self, pos: int, end: int, top: bool = True) -> dict[int, object]:
        values: dict[int, object] = {}
        while pos + 8 <= end:
            tag = self._tag(pos)
            if tag == ITEM_END:
                pos += 8
                break
            if top and tag in PIXEL_DATA_TAGS:
                self._pixels(pos)
                break
            tag, value, pos = self.element(pos, end)
            values[tag] = value
        self.stopped_at = pos
        return values

    def _tag(self, pos: int) -> int:
        group, elem = struct.unpack_from(self.e + "HH", self.data, pos)
        return group << 16 | elem

    def _header(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, position of the value)."""
        tag = self._tag(pos)
        if tag >> 16 == 0xFFFE or not self.explicit:
            return tag, None, struct.unpack_from(self.e + "I", self.data, pos + 4)[0], pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if not (vr.isalpha() and vr.isupper()):
            raise NotDicomError(f"no value representation at byte {pos}")
        if vr in LONG_VRS:
            return tag, vr, struct.unpack_from(self.e + "I", self.data, pos + 8)[0], pos + 12
        return tag, vr, struct.unpack_from(self.e + "H", self.data, pos + 6)[0], pos + 8

    def element(self, pos: int, end: int) -> tuple[int, object, int]:
        tag, vr, length, start = self._header(pos)
        is_sequence = vr == b"SQ" or (vr is None and (tag in KNOWN_SEQUENCES or length == UNDEFINED)) \
            or (vr == b"UN" and length == UNDEFINED)
        if is_sequence:
            return tag, *self._sequence(start, length, end)
        if length == UNDEFINED or start + length > end:
            raise NotDicomError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the file")
        return tag, bytes(self.data[start : start + length]), start + length

    def _sequence(self, start: int, length: int, end: int) -> tuple[list[dict], int]:
        stop = end if length == UNDEFINED else start + length
        if stop > end:
            raise NotDicomError("a sequence runs past the end of the file")
        items, pos = [], start
        while pos + 8 <= stop:
            tag, _, item_length, body = self._header(pos)
            if tag == SEQUENCE_END:
                return items, body
            if tag != ITEM:
                raise NotDicomError(f"expected an item at byte {pos}")
            item_stop = stop if item_length == UNDEFINED else body + item_length
            items.append(self.dataset(body, item_stop, top=False))
            pos = self.stopped_at if item_length == UNDEFINED else item_stop
        if length == UNDEFINED:
            raise NotDicomError("a sequence has no end")
        return items, stop

    def _pixels(self, pos: int) -> None:
        _, _, length, start = self._header(pos)
        self.has_pixels = True
        self.pixel_offset = start
        self.pixel_length = None if length == UNDEFINED else length


# ----------------------------------------------------------------------------- what an object is, its text
NON_PIXEL_SOP_NAMES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report", "1.2.840.10008.5.1.4.1.1.481.": "RT object",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state", "1.2.840.10008.5.1.4.1.1.9.": "waveform (ECG)",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document", "1.2.840.10008.5.1.4.1.1.66": "raw data / registration",
    "1.3.12.2.1107.5.9.1": "Siemens CSA non-image", "1.3.46.670589.11.0.0.12.": "Philips private object",
    "1.2.840.10008.1.3.10": "DICOMDIR",
}


# SpecificCharacterSet (0008,0005) defined terms -> Python codecs; "ISO 2022 IR n" uses the same tables.
CHARSETS = {
    "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 101": "iso8859_2", "ISO_IR 109": "iso8859_3",
    "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5", "ISO_IR 127": "iso8859_6", "ISO_IR 126": "iso8859_7",
    "ISO_IR 138": "iso8859_8", "ISO_IR 148": "iso8859_9", "ISO_IR 203": "iso8859_15", "ISO_IR 13": "shift_jis",
    "ISO_IR 166": "tis-620", "ISO_IR 192": "utf-8", "GB18030": "gb18030", "GBK": "gbk",
    "ISO 2022 IR 87": "iso2022_jp", "ISO 2022 IR 159": "iso2022_jp_2", "ISO 2022 IR 149": "iso2022_kr",
    "ISO 2022 IR 58": "gb2312",
}


def decode_text(text: str, charset: str) -> str:
    """A DICOM text value decoded by the file's SpecificCharacterSet.

    GDCM hands over the raw bytes, which SWIG decodes as UTF-8 with lone surrogates for anything
    else (a Latin-1 "Schädel" arrives as "Sch\\udce4del"); the bytes are recovered and decoded properly.
    """
    raw = text.encode("utf-8", "surrogateescape")
    terms = [t.strip().upper().replace("ISO 2022 IR ", "ISO_IR ") for t in charset.split("\\") if t.strip()]
    terms += [t.replace("ISO_IR ", "ISO 2022 IR ") for t in terms]
    for codec in [CHARSETS[t] for t in terms if t in CHARSETS] + ["utf-8", "latin-1"]:
        try:
            return raw.decode(codec).strip()
        except (UnicodeDecodeError, LookupError):
            continue
    return raw.decode("latin-1").strip()  # every byte string decodes as Latin-1


def check_transfer_syntax(path: Path, syntax: str) -> None:
    """Refuse, by name, pixels in a transfer syntax GDCM cannot decode (rather than 'corrupt')."""
    syntax = syntax.strip("\x00 ")
    if not syntax or syntax in DECODABLE_SYNTAXES:
        return
    name = SYNTAX_NAMES.get(syntax) or ("a vendor's private transfer syntax" if not syntax.startswith("1.2.840.10008.")
                                        else "a transfer syntax fmct cannot decode")
    raise UnreadableInputError(
        f"{path.name} is stored in {name} ({syntax}), which fmct's DICOM decoder (GDCM) does not support. Export the "
        "series again uncompressed (Explicit VR Little Endian) or as JPEG 2000 / JPEG-LS / JPEG lossless, or convert "
        "it first (e.g. dcmconv +te, or gdcmconv --raw with a decoder for it).")


def sop_name(sop_class: str) -> str:
    for prefix, name in NON_PIXEL_SOP_NAMES.items():
        if sop_class.startswith(prefix):
            return name
    return f"no pixel data, SOP class {sop_class or 'unknown'}"


# --------------------------------------------------------------------------------------------- pixels
def native_frames(path: Path, elements: Elements) -> np.ndarray | None:
    """The stored values of an uncompressed image as [frames, rows, columns] (BitsStored applied, sign
    extended), or None when the pixels are compressed or laid out otherwise (GDCM decodes those)."""
    e = elements
    rows, cols, bits, stored = e.uint(0x00280010), e.uint(0x00280011), e.uint(0x00280100), e.uint(0x00280101)
    signed = e.uint(0x00280103) == 1
    frames = frame_count(e)
    if (e.transfer_syntax not in (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE) or e.pixel_offset is None
            or e.pixel_length is None or bits not in (8, 16, 32) or not rows or not cols
            or (e.uint(0x00280002) or 1) != 1):
        return None
    stored = stored or bits
    dtype = np.dtype(f"{'<' if e.little_endian else '>'}{'i' if signed else 'u'}{bits // 8}")
    count = frames * rows * cols
    if count * dtype.itemsize > e.pixel_length:
        return None
    raw = np.fromfile(path, dtype, count, offset=e.pixel_offset).astype(np.int64 if bits == 32 else np.int32)
    raw &= (1 << stored) - 1
    if signed:
        raw[raw >= 1 << (stored - 1)] -= 1 << stored
    return raw.reshape(frames, rows, cols)


def undo_monochrome1(hu: np.ndarray, e: Elements, slope: float, intercept: float) -> np.ndarray | None:
    """The HU of a compressed MONOCHROME1 image from what GDCM gives: GDCM inverts the stored values
    before the rescale (signed: -s - 1, unsigned: 65535 - s) and decodes only 16 bits stored; None
    for other bit depths."""
    if (e.uint(0x00280101) or 16) != 16:
        return None
    inverted = (np.asarray(hu, np.float64) - intercept) / slope
    stored = -inverted - 1 if e.uint(0x00280103) == 1 else 65535 - inverted
    return (stored * slope + intercept).astype(np.float32)
