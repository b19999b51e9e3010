"""The router's journal of guaranteed requests: an SQLite file (WAL mode).

A REQUEST with the ``guarantee`` header is written here before the router
acknowledges it to its client, and deleted when its job finishes (the
worker's REPLY). What the file holds when a router starts is what was
accepted and not seen to finish, including requests that were out at
workers when the last router died: they are queued again (at least once).

Writes never hold the event loop for the disk. :meth:`Journal.add` and
:meth:`Journal.delete` only append to the current batch; one writer greenlet
commits each batch as one transaction in a native thread (gevent's thread
pool) while the loop goes on, and calls each added request's ``then``
callback once its transaction is on disk (group commit: everything that
arrived during a commit goes into the next one). A request deleted before
its insert was committed never reaches the disk.

``sync``: ``normal`` (SQLite ``synchronous=NORMAL`` in WAL mode: a commit
survives the router's process being killed; the OS may lose the last ones
on power loss) or ``full`` (an fsync per commit: survives power loss).

Faults, never silent: a file that is not an SQLite database or fails its
integrity check, one of another application or of a newer schema, one
another router holds (a lock file beside it), or one that cannot be
written, stops the router at start with a :class:`JournalError` naming the
file and the cause. A commit that fails while running (disk full, I/O
error, read-only) fails that batch (its callbacks are told why), and
:meth:`Journal.accepting` is False for :data:`RETRY_AFTER` seconds, during
which the router refuses guaranteed requests instead of losing them.
Deletes that failed are tried again with the next commit.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gevent
import gevent.event
import gevent.threadpool

from .sockets import YIELD

logger = logging.getLogger(__name__)

#: ``PRAGMA application_id`` of an emq-green journal ("EMQG")
APPLICATION_ID = 0x454D5147
#: ``PRAGMA user_version``: the schema this code reads and writes
SCHEMA_VERSION = 1
#: seconds after a failed commit during which guaranteed requests are refused
RETRY_AFTER = 2.0
#: callbacks of one commit run in a row before other greenlets get a turn
CALLBACK_BATCH = 64
#: inserts in one transaction, at most
COMMIT_BATCH = 512
SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}

_SCHEMA = """
CREATE TABLE requests (
    seq INTEGER PRIMARY KEY,   -- acceptance order
    msgid TEXT NOT NULL,
    client TEXT NOT NULL,      -- the sender's identity, hex (its results go there)
    queue TEXT NOT NULL,
    headers TEXT NOT NULL,     -- as forwarded (reply-requested added)
    payload TEXT NOT NULL,
    accepted REAL NOT NULL     -- wall-clock time of acceptance
)
"""
_INSERT = ("INSERT INTO requests SELECT value->>0, value->>1, value->>2, value->>3, "
           "value->>4, value->>5, value->>6 FROM json_each(?)")
_DELETE = "DELETE FROM requests WHERE seq IN (SELECT value FROM json_each(?))"


class JournalError(OSError):
    """The journal cannot be used; the message names the file and the cause."""


@dataclass(frozen=True)
class Entry:
    """One guaranteed request as the journal keeps it."""

    seq: int
    msgid: str
    client: bytes
    queue: str
    headers: str
    payload: str
    accepted: float


#: called once a batch is on disk (``None``) or failed (the reason)
Then = Callable[[Optional[str]], None]


class Journal:
    """An open journal file. Life: :meth:`open` (returns what the file
    holds), :meth:`start` (the writer greenlet), :meth:`add` /
    :meth:`delete`, :meth:`close` (commits what is left)."""

    def __init__(self, path: str, *, sync: str = "normal") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"journal_sync must be one of {sorted(SYNC_MODES)}, not {sync!r}")
        self.path = os.path.abspath(path)
        self.sync = sync
        self._db: Optional[sqlite3.Connection] = None
        self._lock_fd: Optional[int] = None
        self._next_seq = 1
        #: seq -> (row, then), in seq order: inserts waiting for a commit
        self._adds: dict[int, tuple[list[Any], Then]] = {}
        self._deletes: list[int] = []
        self._work = gevent.event.Event()
        self._idle = gevent.event.Event()
        self._idle.set()
        self._writer: Optional[gevent.Greenlet] = None
        self._thread: Optional[gevent.threadpool.ThreadPool] = None
        self._failed_at = 0.0
        #: the last commit's failure, or None
        self.failure: Optional[str] = None
        #: rows in the file (after the last commit) plus rows in the batch
        self.rows = 0
        self.commits = 0
        self.commit_failures = 0
        self.longest_commit = 0.0

    # ------------------------------------------------------------------
    # opening

    def open(self) -> list[Entry]:
        """Lock, check and open the file (made when missing); returns the
        requests it holds, oldest first. Raises :class:`JournalError`."""
        self._lock()
        try:
            self._db = self._connect()
            entries = self._load()
        except BaseException:
            self.close()
            raise
        self.rows = len(entries)
        self._next_seq = (entries[-1].seq + 1) if entries else 1
        return entries

    def _fail(self, what: str, exc: BaseException) -> JournalError:
        return JournalError(f"journal {self.path}: {what}: {exc}")

    def _lock(self) -> None:
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._fail(f"cannot create its lock file {lock_path}", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise JournalError(f"journal {self.path}: in use by another router "
                                   f"(pid {holder}, lock file {lock_path})") from None
            raise self._fail("cannot lock it", exc) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _connect(self) -> sqlite3.Connection:
        try:
            # one connection, used by one thread at a time (the writer's turns)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=0)
        except sqlite3.Error as exc:
            raise self._fail("cannot open it", exc) from exc
        try:
            self._check(db)
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            db.execute(f"PRAGMA synchronous={SYNC_MODES[self.sync]}")
        except BaseException:
            db.close()
            raise
        return db

    def _check(self, db: sqlite3.Connection) -> None:
        """Read-only checks first (nothing is written to a file that is not
        ours); a new, empty file gets the schema."""
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise self._fail("not a readable SQLite database", exc) from exc
        if app_id == 0 and version == 0 and not tables:
            try:
                db.executescript(f"BEGIN; {_SCHEMA};"
                                 f"PRAGMA application_id = {APPLICATION_ID};"
                                 f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            except sqlite3.Error as exc:
                raise self._fail("cannot create the journal", exc) from exc
            return
        if app_id != APPLICATION_ID:
            raise JournalError(f"journal {self.path}: not an emq-green journal "
                               f"(application_id {app_id:#x}, tables {sorted(tables)})")
        if version != SCHEMA_VERSION:
            raise JournalError(f"journal {self.path}: schema version {version}, this router "
                               f"reads version {SCHEMA_VERSION}; refusing to touch it")
        try:
            check = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._fail("integrity check failed", exc) from exc
        if check != "ok":
            raise JournalError(f"journal {self.path}: integrity check failed: {check}")

    def _load(self) -> list[Entry]:
        assert self._db is not None
        try:
            rows = self._db.execute("SELECT seq, msgid, client, queue, headers, payload, "
                                    "accepted FROM requests ORDER BY seq").fetchall()
        except sqlite3.Error as exc:
            raise self._fail("cannot read it", exc) from exc
        return [Entry(seq, msgid, bytes.fromhex(client), queue, headers, payload, accepted)
                for seq, msgid, client, queue, headers, payload, accepted in rows]

    # ------------------------------------------------------------------
    # writing

    def start(self) -> None:
        """Start the writer greenlet and its thread (after :meth:`open`)."""
        # one native thread: the connection is only ever used from it
        self._thread = gevent.threadpool.ThreadPool(1)
        self._writer = gevent.spawn(self._write_loop)

    def accepting(self) -> bool:
        """False while a recent commit failure stands (see :data:`RETRY_AFTER`)."""
        return self.failure is None or time.monotonic() - self._failed_at >= RETRY_AFTER

    def add(self, msgid: str, client: bytes, queue: str, headers: str, payload: str,
            then: Then) -> int:
        """Queue one request for the next commit; ``then(None)`` runs once it
        is on disk, ``then(reason)`` if that commit failed. Returns its seq."""
        seq = self._next_seq
        self._next_seq += 1
        self._adds[seq] = ([seq, msgid, client.hex(), queue, headers, payload, time.time()],
                           then)
        self.rows += 1
        self._wake()
        return seq

    def delete(self, seq: int) -> None:
        """The request ``seq`` finished: forget it (in the next commit, or at
        once when its insert has not been committed yet)."""
        self.rows -= 1
        waiting = self._adds.pop(seq, None)
        if waiting is not None:  # finished before it reached the disk
            waiting[1](None)
            return
        self._deletes.append(seq)
        self._wake()

    @property
    def backlog(self) -> int:
        """Inserts waiting for a commit."""
        return len(self._adds)

    def _wake(self) -> None:
        self._idle.clear()
        self._work.set()

    def _write_loop(self) -> None:
        while True:
            if not self._adds and not self._deletes:
                self._idle.set()
                self._work.wait()
                self._work.clear()
                continue
            # at most COMMIT_BATCH inserts a transaction: short commits keep
            # requests flowing to the workers while the next one is written
            adds = [self._adds.pop(seq) for seq in list(itertools.islice(self._adds,
                                                                          COMMIT_BATCH))]
            deletes, self._deletes = self._deletes, []
            # the rows as one JSON text each way: the thread makes 4 SQLite
            # calls a commit, not one per row (each call lets go of the GIL,
            # and getting it back from a busy loop takes up to 5 ms)
            rows = json.dumps([row for row, _then in adds]) if adds else ""
            gone = json.dumps(deletes) if deletes else ""
            started = time.monotonic()
            assert self._thread is not None
            error = self._thread.apply(self._commit, (rows, gone))
            self._committed(adds, deletes, error, time.monotonic() - started)
            if error is not None:
                gevent.sleep(RETRY_AFTER)  # the failed deletes wait for the retry

    def _commit(self, rows: str, deletes: str) -> Optional[str]:
        """One transaction (in the journal's thread): ``rows`` and
        ``deletes`` as JSON arrays (empty: none); the error text, or None."""
        db = self._db
        if db is None:
            return "the journal is closed"
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    db.execute(_INSERT, (rows,))
                if deletes:
                    db.execute(_DELETE, (deletes,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Exception as exc:  # sqlite3.Error mostly; never kill the writer
            return f"{type(exc).__name__}: {exc}"
        return None

    def _committed(self, adds: list[tuple[list[Any], Then]], deletes: list[int],
                   error: Optional[str], took: float) -> None:
        self.longest_commit = max(self.longest_commit, took)
        if error is None:
            self.commits += 1
            if self.failure is not None:
                logger.warning("router: journal %s writable again", self.path)
            self.failure = None
        else:
            self.commit_failures += 1
            self.failure = error
            self._failed_at = time.monotonic()
            self.rows -= len(adds)
            self._deletes[:0] = deletes  # tried again with the next commit
            logger.error("router: journal %s: a commit of %d request(s) failed: %s; "
                         "guaranteed requests are refused for %g s", self.path, len(adds),
                         error, RETRY_AFTER)
        for i, (_row, then) in enumerate(adds, 1):
            try:
                then(error)
            except Exception:
                logger.exception("router: error after a journal commit")
            if i % CALLBACK_BATCH == 0:
                gevent.sleep(YIELD)  # a big batch's callbacks must not hold the loop

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything queued so far is committed (or failed)."""
        if self._writer is None:
            return not self._adds and not self._deletes
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Commit what is queued (at most a few seconds), then close and unlock."""
        if self._writer is not None and self._db is not None:
            self.flush(5.0)
            self._writer.kill()
            self._writer = None
        if self._thread is not None:
            self._thread.kill()
            self._thread = None
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                logger.error("router: closing journal %s: %s", self.path, exc)
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def status(self) -> dict[str, Any]:
        """STATUS keys of the journal."""
        return {
            "journal_file": self.path,
            "journal_sync": self.sync,
            "journal_rows": self.rows,
            "journal_backlog": len(self._adds),
            "journal_commits": self.commits,
            "journal_commit_failures": self.commit_failures,
            "journal_longest_commit_ms": round(self.longest_commit * 1000, 3),
            "journal_failure": self.failure,
        }


__all__ = ["APPLICATION_ID", "Entry", "Journal", "JournalError", "SCHEMA_VERSION",
           "SYNC_MODES"]
