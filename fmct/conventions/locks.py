"""One advisory file lock (POSIX flock) for every place two fmct processes may meet.

A batch locks each study while it analyzes it, `fmct analyze` locks its study folder the same
way, and the ranks of a sharded batch serialise their summary merge. Without fcntl (Windows)
there is no lock: acquire() says yes, which is what fmct did there before.
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, Any


class FileLock:
    """An exclusive lock on a file: non-blocking acquire() for "skip what another process does",
    `with FileLock(p):` (blocking) for "wait for it". Closing the file releases the lock, so a
    process that dies never leaves a stale one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.f: IO[str] | None = None

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock; False when another process holds it (never with wait=True)."""
        try:
            import fcntl
        except ImportError:
            return True
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            self.f.close()
            self.f = None
            return False
        return True

    def release(self) -> None:
        if self.f is not None:
            self.f.close()  # closing releases the lock
            self.f = None

    def busy(self) -> bool:
        """Whether another process holds the lock now."""
        if not self.acquire():
            return True
        self.release()
        return False

    def __enter__(self) -> "FileLock":
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
