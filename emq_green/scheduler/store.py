"""The scheduler's SQLite file (``scheduler_file``): every schedule with its
state, so that a restarted scheduler goes on where it stopped.

One row per schedule, written when a schedule arrives, after each firing
and when it ends; the SCHEDULE body is stored as it came, and read back
through :func:`~emq_green.schedules.parse_schedule`, so a restored schedule
is checked as a new one is. WAL mode with ``synchronous=NORMAL``: a commit
survives ``kill -9`` of the scheduler. The table has a name of its own
(``emq_green_schedules``), so the file may be the router's journal file.

Writes are a few per firing, on the scheduler's loop: SQLite's commit in
WAL mode takes well under a millisecond on a local disk.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Iterator, Optional

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


class ScheduleStore:
    """The schedules on disk; ``path`` empty: nothing is kept (memory only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: Optional[sqlite3.Connection] = None
        if path:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            self._db = db

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


__all__ = ["ScheduleStore"]
