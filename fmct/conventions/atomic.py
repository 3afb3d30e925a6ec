"""Crash-safe file writes: a reader (or a resumed run) sees the old file or the whole new one.

Every file fmct writes that something later trusts (bundles, checkpoints, caches, results)
goes through here: temp file in the same folder, fsync, rename, fsync the folder. The file gets
the mode an ordinary open() would give it (0666 & ~umask), not mkstemp's private 0600, so a
shared bundle or result folder stays readable to the users the umask allows.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it and putting it back, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """What open() (0666) or mkdir() (0777) would give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if os.name == "posix":
            os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename durable; directories cannot be opened for fsync on Windows, where rename suffices."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicWriter:
    """A file written in pieces that appears whole or not at all: `with AtomicWriter(path) as f: f.write(...)`.

    For outputs too large to hold in memory (a cache shard of many studies). Same guarantees as
    write_bytes_atomic: temp file in the same folder, fsync, rename, fsync the folder; on any error
    (a full disk) the temp file is removed and the error propagates.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = None
        self._tmp = ""

    def __enter__(self):
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        if os.name == "posix":
            os.fchmod(fd, default_mode())
        self._file = os.fdopen(fd, "wb")
        return self._file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
                fsync_dir(self.path.parent)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
