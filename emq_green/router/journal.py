"""The router's journal of guaranteed requests: an SQLite file (WAL mode).

A REQUEST with the ``guarantee`` header is written here before the router
acknowledges it to its client, and deleted when its job finishes (the
worker's REPLY). What the file holds when a router starts is what was
accepted and not seen to finish, including requests that were out at
workers when the last router died: they are queued again (at least once).

Writes never hold the event loop for the disk. :meth:`Journal.add` and
:meth:`Journal.delete` only append to the current batch; one writer greenlet
commits each batch as one transaction in a native thread (gevent's thread
pool) while the loop goes on, then hands the batch's tokens (what the
caller passed to :meth:`~Journal.add`, e.g. the request) to one
``committed`` callback, in slices (group commit: everything that arrived
during a commit goes into the next one). No callable per request: a batch
costs one call per slice. A request deleted before its insert was
committed never reaches the disk (:meth:`~Journal.delete` says so).

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

import collections
import itertools
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gevent
import gevent.event
import gevent.threadpool

from .. import lockfile
from .sockets import YIELD

logger = logging.getLogger(__name__)

#: the journal's name as a holder of its file (:func:`~emq_green.lockfile.take_inode`)
JOURNAL_OWNER = "journal"

#: ``PRAGMA application_id`` of an emq-green journal ("EMQG")
APPLICATION_ID = 0x454D5147
#: ``PRAGMA user_version``: the schema this code reads and writes
SCHEMA_VERSION = 1
#: seconds after a failed commit during which guaranteed requests are refused
RETRY_AFTER = 2.0
#: seconds the row of a finished job whose result goes back to its client
#: stays on disk: a router killed in that time (the result maybe not yet out
#: of its sockets) runs the job again and sends the result then. A clean stop
#: keeps them too: its sockets close without linger, and drop what a slow
#: client had not read yet
RESULT_LINGER = 1.0
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
    queue TEXT NOT NULL,       -- the queue it was routed to (its own, or the default)
    headers TEXT NOT NULL,     -- as forwarded (reply-requested added)
    payload TEXT NOT NULL,
    accepted REAL NOT NULL     -- wall-clock time of acceptance
)
"""
#: rows a statement takes: a batch is padded (NULL rows, ignored) to the
#: smallest of these, so a commit is one INSERT and one DELETE, each a
#: single SQLite call, from three prepared statements
STATEMENT_ROWS = (16, 128, COMMIT_BATCH)
_COLUMNS = 7


def _insert_sql(rows: int) -> str:
    values = ",".join(["(?,?,?,?,?,?,?)"] * rows)
    return f"INSERT INTO requests SELECT * FROM (VALUES {values}) WHERE column1 IS NOT NULL"


def _delete_sql(rows: int) -> str:
    return f"DELETE FROM requests WHERE seq IN ({','.join(['?'] * rows)})"


_INSERT = {rows: _insert_sql(rows) for rows in STATEMENT_ROWS}
_DELETE = {rows: _delete_sql(rows) for rows in STATEMENT_ROWS}


def _padded(params: list[Any], width: int) -> tuple[int, list[Any]]:
    """The statement size for ``params`` (``width`` per row), and the
    parameters padded with NULLs to it."""
    count = len(params) // width
    size = next(n for n in STATEMENT_ROWS if n >= count)
    if size > count:
        params = params + [None] * ((size - count) * width)
    return size, params


def _ignore(tokens: list[Any], error: Optional[str]) -> None:
    """The default :attr:`Journal.committed`: nobody listens."""


def _refuse_a_lost_main_file(path: str) -> None:
    """The journal is three files: ``path``, ``path-wal`` (the latest
    commits, until a checkpoint copies them into ``path``) and
    ``path-shm``. A write-ahead log with content beside a main file that is
    missing or empty means the main file was emptied or replaced: SQLite
    would discard the log, and the requests in it, without a word (a probe
    lost 50 of 50 confirmed jobs so)."""
    wal = path + "-wal"
    try:
        if os.path.getsize(wal) > 0 and (not os.path.exists(path)
                                          or os.path.getsize(path) == 0):
            raise JournalError(f"journal {path}: the file is missing or empty but its "
                               f"write-ahead log {wal} holds data: the journal was moved or "
                               "emptied without it; put the file back, or move both away "
                               "to start with an empty journal")
    except FileNotFoundError:
        pass


#: the names SQLite gives a database's own files beside it
SIDE_FILES = ("-wal", "-shm", "-journal")


def _refuse_a_side_file(path: str) -> None:
    """``path`` names one of another database's own files (``X-wal`` beside
    ``X``): SQLite would make a journal in it, and a router on ``X`` would
    lose its confirmed requests (a probe: 5 of 5 gone after a restart)."""
    for suffix in SIDE_FILES:
        if path.endswith(suffix) and os.path.isfile(path[: -len(suffix)]):
            raise JournalError(f"journal {path}: this is the {suffix[1:]} file of the "
                               f"database {path[: -len(suffix)]}, not a journal of its own; "
                               "choose another name")


def _checkpoint(db: sqlite3.Connection) -> None:
    """After a failed commit: move the WAL into the database and truncate it,
    so that a disk that filled up gets back the WAL's space (it grew while
    every commit failed, and kept the disk full after room was made)."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass  # the next failure tries again


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


#: called with a slice of a batch's tokens once it is on disk (``None``) or
#: failed (the reason)
Committed = Callable[[list[Any], Optional[str]], None]


class Journal:
    """An open journal file. Life: :meth:`open` (returns what the file
    holds), :meth:`start` (the writer greenlet), :meth:`add` /
    :meth:`delete`, :meth:`close` (commits what is left). ``committed``
    hears of each batch (see :data:`Committed`)."""

    def __init__(self, path: str, *, sync: str = "normal",
                 committed: Optional[Committed] = None) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"journal_sync must be one of {sorted(SYNC_MODES)}, not {sync!r}")
        # the real path: through a symbolic link, the lock file beside it
        # would be another file, and a second router would not see the lock
        self.path = os.path.realpath(path)
        self.sync = sync
        self._db: Optional[sqlite3.Connection] = None
        self._lock_fd: Optional[int] = None
        #: the database file itself, locked too (a hard link is another
        #: path to the same file, with a lock file of its own)
        self._file_fd: Optional[int] = None
        self._next_seq = 1
        #: told of each batch's tokens once it is on disk, or failed
        self.committed: Committed = committed or _ignore
        #: seq -> (msgid, client, queue, headers, payload, token), in seq
        #: order: inserts waiting for a commit (a row is built only for those
        #: still there at the commit)
        self._adds: dict[int, tuple[str, bytes, str, str, str, Any]] = {}
        self._deletes: list[int] = []
        #: (monotonic time due, seq): deletes that wait for RESULT_LINGER
        self._lingering: collections.deque[tuple[float, int]] = collections.deque()
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
        #: rows inserted by commits, and requests that ended before theirs
        #: (never written)
        self.written = 0
        self.skipped = 0
        self.longest_commit = 0.0

    # ------------------------------------------------------------------
    # opening

    def open(self) -> list[Entry]:
        """Lock, check and open the file (made when missing); returns the
        requests it holds, oldest first. Raises :class:`JournalError`."""
        _refuse_a_side_file(self.path)
        self._lock()
        try:
            self._lock_the_file()  # when it exists: before SQLite opens it
            self._db = self._connect()
            self._lock_the_file()  # made by SQLite just now
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
            self._lock_fd = lockfile.take(lock_path)
        except lockfile.LockHeld as exc:
            raise JournalError(f"journal {self.path}: in use by another router "
                               f"(pid {exc.holder}, lock file {lock_path})") from None
        except OSError as exc:
            raise self._fail(f"cannot create or lock its lock file {lock_path}", exc) from exc

    def _lock_the_file(self) -> None:
        """Hold a lock on the database file's own inode (``flock``, which
        SQLite's ``fcntl`` locks do not see): a router that reaches the same
        file under another name is refused (its own scheduler may share it:
        :func:`~emq_green.lockfile.take_inode`)."""
        if self._file_fd is not None:
            return
        try:
            self._file_fd = lockfile.take_inode(self.path, JOURNAL_OWNER)
        except FileNotFoundError:
            return
        except lockfile.LockHeld:
            raise JournalError(f"journal {self.path}: in use by another router, or a "
                               "scheduler (the same file under another name: a hard "
                               "link)") from None
        except OSError as exc:
            raise self._fail("cannot open or lock it", exc) from exc

    def _connect(self) -> sqlite3.Connection:
        _refuse_a_lost_main_file(self.path)
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
        try:  # a file this process cannot write refused every request later
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise self._fail("cannot be written", exc) from exc

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
            token: Any) -> int:
        """Queue one request for the next commit; :attr:`committed` gets
        ``token`` once it is on disk (or the commit failed). Returns its seq."""
        seq = self._next_seq
        self._next_seq = seq + 1
        self._adds[seq] = (msgid, client, queue, headers, payload, token)
        self.rows += 1
        if not self._work.is_set():
            self._wake()
        return seq

    def delete(self, seq: int, linger: bool = False) -> bool:
        """The request ``seq`` finished: forget it, in the next commit (with
        ``linger``, one at least :data:`RESULT_LINGER` from now), or at once
        when its insert has not been committed yet: then True (nothing was
        written, and :attr:`committed` will not hear of its token)."""
        self.rows -= 1
        if self._adds.pop(seq, None) is not None:  # ended before it reached the disk
            self.skipped += 1
            return True
        if linger:
            self._lingering.append((time.monotonic() + RESULT_LINGER, seq))
            if len(self._lingering) == 1:
                self._work.set()  # the writer waits for it to be due
            return False
        self._deletes.append(seq)
        if not self._work.is_set():
            self._wake()
        return False

    @property
    def backlog(self) -> int:
        """Inserts waiting for a commit."""
        return len(self._adds)

    def _wake(self) -> None:
        self._idle.clear()
        self._work.set()

    def _write_loop(self) -> None:
        lingering = self._lingering
        while True:
            now = time.monotonic()
            while lingering and lingering[0][0] <= now:
                self._deletes.append(lingering.popleft()[1])
            if not self._adds and not self._deletes:
                self._idle.set()
                self._work.wait(lingering[0][0] - now if lingering else None)
                self._work.clear()
                continue
            # at most COMMIT_BATCH inserts a transaction: short commits keep
            # requests flowing to the workers while the next one is written
            batch = list(itertools.islice(self._adds, COMMIT_BATCH))
            pop = self._adds.pop
            adds = [(seq, pop(seq)) for seq in batch]
            deletes, self._deletes = self._deletes, []
            # the rows as flat parameters of one statement each way: the
            # thread makes 4 SQLite calls a commit, not one per row (each call
            # lets go of the GIL, and getting it back from a busy loop takes up
            # to 5 ms); no JSON: SQLite binds the values as they are
            now = time.time()
            rows: list[Any] = []
            extend = rows.extend
            for seq, (msgid, client, queue, headers, payload, _token) in adds:
                extend((seq, msgid, client.hex(), queue, headers, payload, now))
            started = time.monotonic()
            assert self._thread is not None
            error = self._thread.apply(self._commit, (rows, deletes))
            self._committed([entry[5] for _seq, entry in adds], deletes, error,
                            time.monotonic() - started)
            if error is not None:
                gevent.sleep(RETRY_AFTER)  # the failed deletes wait for the retry

    def _commit(self, rows: list[Any], deletes: list[int]) -> Optional[str]:
        """One transaction (in the journal's thread): ``rows`` the inserts'
        values, flat (7 a row), ``deletes`` the seqs to delete; the error
        text, or None."""
        db = self._db
        if db is None:
            return "the journal is closed"
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    size, params = _padded(rows, _COLUMNS)
                    db.execute(_INSERT[size], params)
                for start in range(0, len(deletes), COMMIT_BATCH):
                    size, params = _padded(deletes[start:start + COMMIT_BATCH], 1)
                    db.execute(_DELETE[size], params)
                db.execute("COMMIT")
            except BaseException:
                # SQLite ends the transaction itself on some errors (a full
                # disk): a ROLLBACK then fails, and its error hid the cause
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except Exception as exc:  # sqlite3.Error mostly; never kill the writer
            _checkpoint(db)
            return f"{type(exc).__name__}: {exc}"
        return None

    def _committed(self, tokens: list[Any], deletes: list[int], error: Optional[str],
                   took: float) -> None:
        self.longest_commit = max(self.longest_commit, took)
        if error is None:
            self.commits += 1
            self.written += len(tokens)
            if self.failure is not None:
                logger.warning("router: journal %s writable again", self.path)
            self.failure = None
        else:
            self.commit_failures += 1
            self.failure = error
            self._failed_at = time.monotonic()
            self.rows -= len(tokens)
            self._deletes[:0] = deletes  # tried again with the next commit
            logger.error("router: journal %s: a commit of %d request(s) failed: %s; "
                         "guaranteed requests are refused for %g s", self.path, len(tokens),
                         error, RETRY_AFTER)
        for start in range(0, len(tokens), CALLBACK_BATCH):
            if start:
                gevent.sleep(YIELD)  # a big batch's callbacks must not hold the loop
            try:
                self.committed(tokens[start:start + CALLBACK_BATCH], error)
            except Exception:
                logger.exception("router: error after a journal commit")

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything queued so far is committed (or failed)."""
        if self._writer is None:
            return not self._adds and not self._deletes
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Commit what is queued (at most a few seconds), then close and unlock."""
        if self._writer is not None and self._db is not None:
            self.flush(5.0)  # the lingering rows stay (RESULT_LINGER)
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
        lockfile.let_go(self._file_fd, self._lock_fd)
        self._file_fd = self._lock_fd = None

    def status(self) -> dict[str, Any]:
        """STATUS keys of the journal."""
        return {
            "journal_file": self.path,
            "journal_sync": self.sync,
            "journal_rows": self.rows,
            "journal_backlog": len(self._adds),
            "journal_commits": self.commits,
            "journal_commit_failures": self.commit_failures,
            "journal_written": self.written,
            "journal_skipped": self.skipped,
            "journal_longest_commit_ms": round(self.longest_commit * 1000, 3),
            "journal_failure": self.failure,
        }


__all__ = ["APPLICATION_ID", "Committed", "Entry", "Journal", "JournalError", "SCHEMA_VERSION",
           "SYNC_MODES"]
