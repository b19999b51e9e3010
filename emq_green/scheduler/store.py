"""The scheduler's SQLite file (``scheduler_file``): every schedule with its
state, so that a restarted scheduler goes on where it stopped.

One row per schedule, written when a schedule arrives, after each firing
and when it ends; the SCHEDULE body is stored as it came, and read back
through :func:`~emq_green.schedules.parse_schedule`, so a restored schedule
is checked as a new one is. WAL mode with ``synchronous=NORMAL``: a commit
survives ``kill -9`` of the scheduler. The table has a name of its own
(``emq_green_schedules``), so the file may be the router's journal file.

One scheduler per file: :meth:`ScheduleStore.take` holds a lock file
beside it (``<file>.scheduler.lock``) for the scheduler's life, so a second
scheduler given the same file stops at its start with a
:class:`StoreInUse` naming the holder's pid, where it would otherwise take
the router connection from the first one under the same name, over and
over, and fire every schedule twice.

Writes are a few per firing, on the scheduler's loop: SQLite's commit in
WAL mode takes well under a millisecond on a local disk.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from typing import Iterator, Optional

from .. import lockfile
from ..protocol import ProtocolError, printable
from ..schedules import parse_schedule
from .table import Entry

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS emq_green_schedules (
    key TEXT PRIMARY KEY,
    queue TEXT NOT NULL, headers TEXT NOT NULL, interval TEXT NOT NULL,
    payload TEXT NOT NULL, cron TEXT NOT NULL,
    anchor REAL NOT NULL, next_at REAL NOT NULL, runs_left INTEGER NOT NULL,
    runs INTEGER NOT NULL, last_at REAL
)
"""


class StoreInUse(Exception):
    """Another scheduler holds the file."""


class ScheduleStore:
    """The schedules on disk; ``path`` empty: nothing is kept (memory only).
    ``take``: hold the file's lock first (a scheduler's store; a reader of
    the file leaves it False)."""

    def __init__(self, path: str, *, take: bool = False) -> None:
        self.path = path
        self._db: Optional[sqlite3.Connection] = None
        self._lock_fd: Optional[int] = None
        self._file_fd: Optional[int] = None
        if path and take:
            # the real path: through a symbolic link the lock file would be another
            lock_path = os.path.realpath(path) + ".scheduler.lock"
            try:
                self._lock_fd = lockfile.take(lock_path)
            except lockfile.LockHeld as exc:
                raise StoreInUse(f"in use by another scheduler (pid {exc.holder}, lock "
                                 f"file {lock_path})") from None
        if path:
            try:
                db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._db = db
                if take:
                    self._take_the_file(path)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(_SCHEMA)
            except BaseException:
                self.close()
                raise

    def _take_the_file(self, path: str) -> None:
        """The file itself locked too (a hard link is another name, with a
        lock file of its own; a probe ran two schedulers on one database
        that way, each tick fired twice); the router's journal on the same
        file in this process shares it with its own scheduler."""
        try:
            self._file_fd = lockfile.take_inode(path, "scheduler", share_with=("journal",))
        except lockfile.LockHeld:
            raise StoreInUse("in use by another scheduler or router (the same file under "
                             "another name: a hard link)") from None

    def save(self, entry: Entry) -> None:
        if self._db is None:
            return
        queue, headers, interval, payload, cron = entry.schedule.body()
        self._db.execute(
            "INSERT OR REPLACE INTO emq_green_schedules VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (entry.key, queue, headers, interval, payload, cron, entry.anchor,
             entry.next_at, entry.runs_left, entry.runs, entry.last_at))

    def delete(self, key: str) -> None:
        if self._db is not None:
            self._db.execute("DELETE FROM emq_green_schedules WHERE key = ?", (key,))

    def load(self) -> Iterator[Entry]:
        """Every stored schedule, checked again; a row that no longer passes
        is logged and left out."""
        if self._db is None:
            return
        rows = self._db.execute(
            "SELECT key, queue, headers, interval, payload, cron, anchor, next_at, "
            "runs_left, runs, last_at FROM emq_green_schedules").fetchall()
        for key, queue, headers, interval, payload, cron, anchor, next_at, left, runs, \
                last_at in rows:
            try:
                schedule = parse_schedule((queue, headers, interval, payload, cron))
            except ProtocolError as exc:
                logger.error("scheduler: stored schedule %s left out: %s", printable(key),
                             printable(exc, 200))
                continue
            yield Entry(schedule, anchor=anchor, next_at=next_at, runs_left=left, runs=runs,
                        last_at=last_at)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        lockfile.let_go(self._file_fd, self._lock_fd)
        self._file_fd = self._lock_fd = None


__all__ = ["ScheduleStore", "StoreInUse"]
