"""A lock file beside a data file, held for a process's life: one owner of
the router's journal, one scheduler per ``scheduler_file``.

``flock`` on a file of its own (SQLite's own locks are ``fcntl`` locks and
would not see it), with the holder's pid written in it for the message of
whoever is refused. The kernel lets the lock go when its holder dies, even
by ``kill -9``: a stale file never blocks a restart.
"""

from __future__ import annotations

import errno
import fcntl
import os


class LockHeld(Exception):
    """Another open file holds the lock: ``holder`` is the pid it wrote."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"lock file {path} held by pid {holder}")
        self.path = path
        self.holder = holder


def take(path: str) -> int:
    """Create ``path`` if needed and lock it without waiting; returns the
    open file descriptor (close it to let the lock go). Raises
    :class:`LockHeld`, or ``OSError`` when the file cannot be made or locked."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockHeld(path, holder) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


__all__ = ["LockHeld", "take"]
