"""The router's journal alone (``emq_green/router/journal.py``): a real SQLite
file in a temporary directory, its writer greenlet and thread. Disk faults
that cannot be produced as root in a test (a full or read-only disk) are
injected into SQLite with ``mock``."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator, Optional
from unittest.mock import patch

import gevent
import pytest

from emq_green.router import journal as journal_module
from emq_green.router.journal import APPLICATION_ID, SCHEMA_VERSION, Journal, JournalError


def rows(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT msgid FROM requests ORDER BY seq")]
    finally:
        db.close()


@pytest.fixture
def journal(tmp_path):
    j = Journal(str(tmp_path / "journal.db"))
    assert j.open() == []
    j.start()
    yield j
    j.close()


def record(tokens: list, error: Optional[str]) -> None:
    """The journal's ``committed`` listener of these tests: a token is
    ``(msgid, results)``; ``(msgid, error)`` goes to its results."""
    for msgid, results in tokens:
        results.append((msgid, error))


def add(journal: Journal, msgid: str, results: list) -> int:
    journal.committed = record
    return journal.add(msgid, b"client", "default", "guarantee,reply-requested",
                       '["run", {}]', (msgid, results))


def test_a_new_file_is_an_emq_green_journal_in_wal_mode(journal, tmp_path):
    db = sqlite3.connect(tmp_path / "journal.db")
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_callbacks_run_once_the_batch_is_on_disk_one_commit_for_a_burst(journal, tmp_path):
    done: list = []
    for i in range(50):
        add(journal, f"m{i}", done)
    assert done == []  # nothing is on disk before the writer's turn
    assert journal.flush(5)
    assert done == [(f"m{i}", None) for i in range(50)]
    assert rows(tmp_path / "journal.db") == [f"m{i}" for i in range(50)]
    assert journal.commits == 1  # group commit: the burst in one transaction


def test_a_request_that_ends_before_its_commit_never_reaches_the_disk(journal, tmp_path):
    done: list = []
    seq = add(journal, "quick", done)
    add(journal, "slow", done)
    assert journal.delete(seq)  # never written: its owner may confirm it at once
    assert journal.flush(5)
    assert done == [("slow", None)]
    assert rows(tmp_path / "journal.db") == ["slow"]
    assert journal.rows == 1


def test_what_is_left_comes_back_in_order_and_seqs_go_on(tmp_path):
    path = str(tmp_path / "journal.db")
    first = Journal(path)
    first.open()
    first.start()
    done: list = []
    seqs = [add(first, f"m{i}", done) for i in range(5)]
    assert first.flush(5)
    first.delete(seqs[1])
    first.close()  # commits the delete

    second = Journal(path)
    entries = second.open()
    try:
        assert [e.msgid for e in entries] == ["m0", "m2", "m3", "m4"]
        assert [e.seq for e in entries] == [seqs[0], *seqs[2:]]
        assert entries[0].client == b"client" and entries[0].headers.endswith("reply-requested")
        second.start()
        assert add(second, "next", done) == seqs[-1] + 1
    finally:
        second.close()


def test_the_loop_runs_while_a_slow_commit_is_on_disk(journal):
    commit = journal._commit
    in_commit = threading.Event()

    def slow_commit(adds, deletes):  # runs in the journal's native thread
        in_commit.set()
        time.sleep(0.5)  # an fsync on a slow disk
        return commit(adds, deletes)

    ticks = []

    def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    with patch.object(journal, "_commit", slow_commit):
        done: list = []
        add(journal, "m", done)
        tick = gevent.spawn(ticker)
        assert journal.flush(5)
        tick.kill()
    assert in_commit.is_set() and done == [("m", None)]
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 20 and max(gaps) < 0.25  # the loop was never held for the commit


@contextlib.contextmanager
def faulty(journal: Journal, wrapper: type) -> Iterator[sqlite3.Connection]:
    """The journal's connection wrapped by ``wrapper`` (retries after 0.2 s);
    yields the real one, put back at the end."""
    real = journal._db
    journal._db = wrapper(real)
    try:
        with patch.object(journal_module, "RETRY_AFTER", 0.2):
            yield real
    finally:
        journal._db = real


class Wrapped:
    """A real sqlite3 connection, wrapped to inject a disk fault in ``execute``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction


def test_a_failed_commit_fails_its_batch_refuses_for_a_while_and_retries_deletes(journal,
                                                                                  tmp_path):
    done: list = []
    kept = add(journal, "kept", done)
    assert journal.flush(5)
    refused_statements: list[str] = []

    class FullDisk(Wrapped):
        """sqlite3's connection, except that writing fails as on a full disk."""

        def execute(self, sql: str, *args):
            if sql.startswith(("INSERT", "DELETE")):
                refused_statements.append(sql.split()[0])
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

    with faulty(journal, FullDisk) as real:
        lost: list = []
        add(journal, "lost", lost)
        journal.delete(kept)
        wait_for(lambda: lost, 5)
        assert lost[0][0] == "lost" and "disk is full" in lost[0][1]
        assert not journal.accepting() and "disk is full" in journal.failure
        assert journal.commit_failures == 1 and refused_statements == ["INSERT"]
        journal._db = real  # the disk has room again
        wait_for(lambda: journal.accepting(), 5)
        wait_for(lambda: journal.commits >= 2, 5)  # the delete, tried again
    assert rows(tmp_path / "journal.db") == []
    assert journal.failure is None


def test_a_commit_that_fails_as_on_a_full_disk_names_the_full_disk(journal, tmp_path):
    """On a full disk SQLite's COMMIT fails and ends the transaction itself:
    the ROLLBACK that followed failed too, and its error ("no transaction is
    active") was all the log and STATUS said (a probe on a small tmpfs)."""

    class FullOnCommit(Wrapped):
        def execute(self, sql: str, *args):
            if sql == "COMMIT":
                self.db.execute("ROLLBACK")  # what SQLite does on SQLITE_FULL
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

    with faulty(journal, FullOnCommit) as real:
        lost: list = []
        add(journal, "lost", lost)
        wait_for(lambda: lost, 5)
        assert lost == [("lost", "OperationalError: database or disk is full")]
        assert journal.failure == "OperationalError: database or disk is full"
        journal._db = real
        after: list = []
        wait_for(lambda: journal.accepting(), 5)
        add(journal, "after", after)
        wait_for(lambda: after, 5)
        assert after == [("after", None)]
    assert rows(tmp_path / "journal.db") == ["after"]


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.01)


def test_a_second_journal_on_the_same_file_is_refused_while_the_first_holds_it(journal,
                                                                                 tmp_path):
    with pytest.raises(JournalError, match="in use by another router"):
        Journal(str(tmp_path / "journal.db")).open()
    journal.close()
    again = Journal(str(tmp_path / "journal.db"))
    again.open()  # free once the first let go
    again.close()


def test_a_damaged_page_fails_the_integrity_check(tmp_path):
    path = tmp_path / "journal.db"
    j = Journal(str(path))
    j.open()
    j.start()
    for i in range(300):
        add(j, f"m{i}" + "x" * 200, [])
    j.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page + 100: 2 * page + 400] = b"\xff" * 300  # scribble over a table page
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError) as raised:
        Journal(str(path)).open()
    assert str(path) in str(raised.value)


def test_a_read_only_place_is_named_at_start(tmp_path):
    target = tmp_path / "journal.db"
    error: Optional[BaseException] = None
    with patch.object(journal_module.os, "open",
                      side_effect=OSError(30, "Read-only file system")):
        try:
            Journal(str(target)).open()
        except JournalError as exc:
            error = exc
    assert error is not None and str(target) in str(error) and "Read-only" in str(error)


def test_journal_sync_full_is_applied(tmp_path):
    j = Journal(str(tmp_path / "journal.db"), sync="full")
    j.open()
    try:
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        j.close()
    with pytest.raises(ValueError):
        Journal(str(tmp_path / "other.db"), sync="sometimes")


def test_the_row_of_a_job_whose_result_goes_back_lingers_then_goes(journal, tmp_path):
    """A router killed while the result may still be in its sockets runs the
    job again from the row (a probe lost two results of confirmed jobs so)."""
    with patch.object(journal_module, "RESULT_LINGER", 0.3):
        seqs = [add(journal, msgid, []) for msgid in ("plain", "result")]
        assert journal.flush(5)
        journal.delete(seqs[0])
        journal.delete(seqs[1], linger=True)
        assert journal.flush(5)
        assert rows(tmp_path / "journal.db") == ["result"]
        wait_for(lambda: rows(tmp_path / "journal.db") == [], 5)
        assert journal.rows == 0


def test_a_clean_close_keeps_the_lingering_rows(tmp_path):
    """The router's sockets close without linger: a result a slow client had
    not read yet is dropped with them (a probe lost 19 of 20 so), and the
    job runs again from its row on the next start."""
    j = Journal(str(tmp_path / "journal.db"))
    assert j.open() == []
    j.start()
    seqs = [add(j, msgid, []) for msgid in ("plain", "result")]
    assert j.flush(5)
    j.delete(seqs[0])
    j.delete(seqs[1], linger=True)
    j.close()
    assert rows(tmp_path / "journal.db") == ["result"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", ["emptied", "removed"])
def test_a_main_file_lost_beside_its_write_ahead_log_is_refused(tmp_path, damage):
    """After a kill -9 the latest commits are in ``journal.db-wal``; a main
    file emptied (``: > journal.db``) or removed made SQLite discard the log
    and the router start with nothing (a probe: 50 of 50 confirmed jobs)."""
    import shutil

    live = tmp_path / "live"
    live.mkdir()
    j = Journal(str(live / "journal.db"))
    j.open()
    j.start()
    for i in range(5):
        add(j, f"m{i}", [])
    assert j.flush(5)
    # the files as a kill -9 leaves them: copied while the journal is open
    control, damaged = tmp_path / "control", tmp_path / "damaged"
    for where in (control, damaged):
        where.mkdir()
        for name in ("journal.db", "journal.db-wal"):
            shutil.copy(live / name, where / name)
    j.close()
    assert (damaged / "journal.db-wal").stat().st_size > 0
    restored = Journal(str(control / "journal.db"))
    assert [e.msgid for e in restored.open()] == [f"m{i}" for i in range(5)]
    restored.close()
    if damage == "emptied":
        (damaged / "journal.db").write_bytes(b"")
    else:
        (damaged / "journal.db").unlink()
    with pytest.raises(JournalError) as raised:
        Journal(str(damaged / "journal.db")).open()
    assert "write-ahead log" in str(raised.value)
    assert (damaged / "journal.db-wal").stat().st_size > 0  # kept, untouched


@pytest.mark.parametrize("alias", ["symlink", "hardlink", "symlinked directory"])
def test_a_second_journal_reaching_the_file_under_another_name_is_refused(
        journal, tmp_path, alias):
    """A probe's find: through a symbolic or hard link a second router took
    the journal a running one held, and both ran its jobs."""
    other = tmp_path / "other"
    other.mkdir()
    if alias == "symlink":
        path = other / "link.db"
        path.symlink_to(tmp_path / "journal.db")
    elif alias == "hardlink":
        path = other / "link.db"
        os.link(tmp_path / "journal.db", path)
    else:
        (other / "dir").symlink_to(tmp_path, target_is_directory=True)
        path = other / "dir" / "journal.db"
    with pytest.raises(JournalError, match="in use by another router"):
        Journal(str(path)).open()
    journal.close()
    again = Journal(str(path))
    again.open()  # free once the first let go
    again.close()


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_journal_named_after_another_database_s_own_file_is_refused(journal, tmp_path,
                                                                      suffix):
    """A probe's find: a second router on ``journal.db-wal`` (empty while the
    first checkpoints) made its journal there, and the first router's
    confirmed requests were gone after a restart."""
    with pytest.raises(JournalError, match=f"the {suffix[1:]} file of the database"):
        Journal(str(tmp_path / f"journal.db{suffix}")).open()
    alone = tmp_path / "alone"
    alone.mkdir()
    own = Journal(str(alone / f"mine{suffix}"))  # no database beside it: a name like any
    own.open()
    own.close()
