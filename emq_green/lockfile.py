"""Locks held for a process's life: one owner of the router's journal, one
scheduler per ``scheduler_file``.

:func:`take`: ``flock`` on a lock file beside the data file (SQLite's own
locks are ``fcntl`` locks and would not see it), with the holder's pid
written in it for the message of whoever is refused. :func:`take_inode`:
``flock`` on the data file itself, so that the same file reached under
another name (a hard link, another mount of it) is refused too; a
holder may let another owner of its own process share it (the router's
journal and its own scheduler on one file). The kernel lets a lock go when its holder
dies, even by ``kill -9``: a stale file never blocks a restart.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from typing import Optional

#: (device, inode) -> (descriptor, owner): the data files this process
#: holds (:func:`take_inode`)
_HELD_HERE: dict[tuple[int, int], tuple[int, str]] = {}


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
        holder = _holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockHeld(path, holder) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """The pid a holder wrote; a holder that has just taken the lock may not
    have written it yet (a probe saw "pid ?" in 1 of 6 starts at once)."""
    for _ in range(10):
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.01)
    return "?"


def take_inode(path: str, owner: str, share_with: tuple[str, ...] = ()) -> Optional[int]:
    """Lock the existing file ``path`` itself, for ``owner`` (a name),
    without waiting; returns the descriptor to give to
    :func:`release_inode`, or None when this process holds it already for
    an owner in ``share_with`` (under any name). Raises :class:`LockHeld`
    (holder "?": the file tells no pid) when another process, or another
    owner here, holds it; ``OSError`` when it cannot be opened."""
    # Looked up before any open: closing a second descriptor of a file this
    # process holds would drop every fcntl lock the process has on it,
    # SQLite's own (a review's find: the journal's WAL read lock).
    stat = os.stat(path)
    held = _HELD_HERE.get((stat.st_dev, stat.st_ino))
    if held is not None and held[1] in share_with:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    stat = os.fstat(fd)
    key = (stat.st_dev, stat.st_ino)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockHeld(path, "?") from None
        raise
    _HELD_HERE[key] = (fd, owner)
    return fd


def let_go(file_fd: Optional[int], lock_fd: Optional[int]) -> None:
    """Release what :func:`take_inode` and :func:`take` returned (either
    may be None: not taken)."""
    if file_fd is not None:
        release_inode(file_fd)
    if lock_fd is not None:
        os.close(lock_fd)


def release_inode(fd: int) -> None:
    """Let go of a lock :func:`take_inode` returned."""
    for key, (held, _owner) in list(_HELD_HERE.items()):
        if held == fd:
            del _HELD_HERE[key]
    os.close(fd)


__all__ = ["LockHeld", "let_go", "release_inode", "take", "take_inode"]
