"""Crash-safe file writes: a reader (or a resumed run) sees the old file or the whole new one.

Every file fmct writes that something later trusts (bundles, checkpoints, caches, results)
goes through here: temp file in the same folder, fsync, rename, fsync the folder. A full disk
(or quota) is the user's to fix, not a bug: it becomes one OutputWriteError naming the folder,
the space the write needed and what is free, and the temp file is removed. The file gets
the mode an ordinary open() would give it (0666 & ~umask), not mkstemp's private 0600, so a
shared bundle or result folder stays readable to the users the umask allows.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path

from fmct.conventions.errors import OutputWriteError

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


DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full_error(folder: str | Path, what: str, needed_bytes: int | None) -> OutputWriteError:
    """The one message for a write that ran out of space: which folder, how much it needed, how much is free."""
    try:
        free = f"{_mb(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"needs about {_mb(needed_bytes)}" if needed_bytes else "needs more space"
    return OutputWriteError(f"the disk holding {folder} is full (No space left on device): writing {what} {need} ({free} there). Free some "
                            "space or write elsewhere; nothing half-written was kept.")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{max(1, round(n / 1024))} KB"


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if os.name == "posix":
            os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(path.parent, path.name, len(data)) from None
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str, errors: str = "strict") -> Path:
    """UTF-8; errors="backslashreplace" writes a file name that is not UTF-8 (a lone surrogate) as \\udcXX."""
    return write_bytes_atomic(path, text.encode("utf-8", errors=errors))


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
