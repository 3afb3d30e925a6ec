"""`fmct fetch URL --sha256 HEX`: download a model bundle published as a release asset, and verify it.

Models larger than ~25 MB are not stored in the repository (README, "Model bundles"): they are
published as a release asset (a bundle .zip) with its SHA-256 next to the link. fmct never
downloads at run time; this command fetches only when a user asks, streams to a temporary file
beside the target while hashing, and keeps the file only when its SHA-256 is the published one.
The result is a bundle .zip that `--model` takes as it is.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from fmct.conventions.errors import ConfigError, FMCTError
from fmct.conventions.runtime import Progress

CHUNK = 1 << 20
SCHEMES = ("https://", "http://", "file://")


class FetchError(FMCTError):
    """The download failed or its SHA-256 is not the published one (nothing is kept)."""


def fetch_verified(url: str, sha256: str, out: str | Path, progress: Progress | None = None,
                   overwrite: bool = False) -> Path:
    """Download url to out, keeping it only if its SHA-256 equals sha256; returns out.

    An existing out with the right SHA-256 is kept as it is (no download); one with another is
    refused unless overwrite.
    """
    want = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ConfigError(f"--sha256 must be the 64 hex digits published with the model, not {sha256!r}")
    if not url.startswith(SCHEMES):
        raise ConfigError(f"{url}: give an https:// (or file://) URL of the published bundle")
    out = Path(out)
    if out.is_dir() or not out.suffix:  # a folder: the asset's own file name in it
        out = out / (Path(urllib.request.url2pathname(url.rsplit("/", 1)[-1])).name or "bundle.zip")
    if out.is_file():
        if _sha256_file(out) == want:
            return out
        if not overwrite:
            raise ConfigError(f"{out} exists and is another file (its SHA-256 differs); choose another --out or add --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        got = _download(url, fd, progress)
        if got != want:
            raise FetchError(f"{url}: SHA-256 {got} is not the published {want}; the file was not kept "
                             "(a changed or corrupted download)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _download(url: str, fd: int, progress: Progress | None) -> str:
    """Stream url into the open file fd, hashing as it goes; returns the hex SHA-256."""
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (schemes checked)
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None and total:
                    progress(min(done / total, 1.0), f"{done / 2**20:.1f} of {total / 2**20:.1f} MB")
            f.flush()
            os.fsync(f.fileno())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FetchError(f"could not download {url} ({e})") from e
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
