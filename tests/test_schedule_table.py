"""The scheduler's table and store, and the SCHEDULE checks, with a clock
the test chooses (no waiting): the grid does not drift, a missed tick fires
once, run_count, cron, eta, restore from the file."""

from __future__ import annotations

import json
import time

import pytest

from emq_green.protocol import ProtocolError
from emq_green.scheduler import ScheduleStore, ScheduleTable
from emq_green.scheduler.store import StoreInUse
from emq_green.schedules import (
    FOREVER,
    parse_schedule,
    schedule_body,
    schedule_key,
    unschedule_key,
)

CALL = {"path": "interop_jobs", "callable": "record", "args": ["x"], "kwargs": {},
        "class_args": [], "class_kwargs": {}}
T0 = 1_800_000_000.0  # a whole minute (UTC)


def body(interval="60", headers="", cron="", call=CALL, queue="default"):
    return (queue, headers, interval, json.dumps(["run", call]), cron)


def run_until(table: ScheduleTable, start: float, end: float, step: float = 0.25,
              late: float = 0.0) -> list[float]:
    """Drive the table from ``start`` to ``end``; the due times fired."""
    fired = []
    for i in range(int(round((end - start) / step)) + 2):
        now = start + i * step
        for entry in table.due(now):
            fired.append(entry.next_at)
            table.fired(entry, now + late, entry.next_at)
    return fired


def test_key_is_eventmqs_sha1_of_the_sorted_call():
    import hashlib

    expected = hashlib.sha1(json.dumps(
        {"args": ["x"], "kwargs": {}, "class_args": [], "class_kwargs": {},
         "path": "interop_jobs", "callable": "record"}, sort_keys=True).encode()).hexdigest()
    assert schedule_key(json.dumps(["run", CALL])) == expected
    assert parse_schedule(body()).key == expected
    assert parse_schedule(body(queue="other")).key == expected  # not the queue
    assert unschedule_key(body(interval="-1")) == expected


def test_interval_fires_on_its_grid_without_drift():
    table = ScheduleTable()
    table.add(parse_schedule(body("1", "nohaste")), T0)
    # every firing is 30 ms late: the next one is still due on the grid
    fired = run_until(table, T0, T0 + 3600.005, step=0.01, late=0.03)
    assert len(fired) == 3600
    assert fired[-1] == pytest.approx(T0 + 3600)
    assert all(t == pytest.approx(T0 + i + 1) for i, t in enumerate(fired))


def test_missed_ticks_fire_once_then_the_grid_goes_on():
    table = ScheduleTable()
    entry, haste = table.add(parse_schedule(body("10", "nohaste")), T0)
    assert not haste and entry.next_at == T0 + 10
    # the scheduler was stopped for 95 s: one firing, then the next grid tick
    assert [e.key for e in table.due(T0 + 105)] == [entry.key]
    table.fired(entry, T0 + 105, entry.next_at)
    assert entry.next_at == T0 + 110
    assert table.due(T0 + 109.9) == []


def test_a_catch_up_run_just_before_a_tick_stands_for_that_tick_too():
    # missed ticks fired once at T0 + 108: the tick at T0 + 110 would be a
    # second run 2 s later (a router restart showed two runs 50 ms apart)
    table = ScheduleTable()
    entry, _ = table.add(parse_schedule(body("10", "nohaste")), T0)
    assert [e.key for e in table.due(T0 + 108)] == [entry.key]
    table.fired(entry, T0 + 108, entry.next_at)
    assert entry.next_at == T0 + 120
    # on time, or a little late: the grid as it is
    table.fired(entry, T0 + 120.03, entry.next_at)
    assert entry.next_at == T0 + 130


def test_a_missed_cron_time_sent_just_before_the_next_stands_for_it_too():
    # every 4 s (croniter's seconds field); the scheduler was down from
    # T0 + 2 to T0 + 7.4: the missed T0 + 4 is fired at T0 + 7.4, and the
    # time T0 + 8 a moment later would be a second run (a probe saw them
    # 0.6 s apart)
    table = ScheduleTable()
    entry, _ = table.add(parse_schedule(body("-1", "nohaste", "* * * * * */4")), T0)
    assert entry.next_at == T0 + 4
    assert [e.key for e in table.due(T0 + 7.4)] == [entry.key]
    table.fired(entry, T0 + 7.4, entry.next_at)
    assert entry.next_at == T0 + 12
    # on time, or a little late: every time as it comes
    table.fired(entry, T0 + 12.05, entry.next_at)
    assert entry.next_at == T0 + 16
    # late by less than half a period: the next time stays
    table.fired(entry, T0 + 17.5, entry.next_at)
    assert entry.next_at == T0 + 20


def test_run_count_haste_and_the_end():
    table = ScheduleTable()
    entry, haste = table.add(parse_schedule(body("5", "run_count:3")), T0)
    assert haste  # no nohaste: fires at once, and that counts
    assert table.fired(entry, T0, None)
    fired = run_until(table, T0, T0 + 60)
    assert fired == [T0 + 5, T0 + 10]
    assert entry.key not in table.entries and table.next_due() is None


def test_cron_keeps_its_queue_and_fires_once_after_a_gap():
    table = ScheduleTable()
    entry, _ = table.add(parse_schedule(body("-1", "nohaste", "*/5 * * * *", queue="q")), T0)
    assert entry.schedule.queue == "q" and entry.next_at == T0 + 300
    assert len(table.due(T0 + 3600)) == 1  # an hour missed: once
    table.fired(entry, T0 + 3600, entry.next_at)
    assert entry.next_at == T0 + 3900
    assert table.remove(entry.key) is entry and table.next_due() is None


def test_eta_one_shot():
    table = ScheduleTable()
    entry, haste = table.add(parse_schedule(body("3", f"run_count:1,nohaste,eta:{T0 + 2.5}")),
                             T0)
    assert not haste and entry.next_at == T0 + 2.5
    assert run_until(table, T0, T0 + 10, step=0.1) == [T0 + 2.5]
    assert len(table) == 0


@pytest.mark.parametrize("bad, reason", [
    (body("-1", cron="61 * * * *"), "cron text"),
    (body("-1", cron="0 0 31 2 *"), "names no time"),  # valid to croniter: 31 February
    (body("-1"), "needs a cron"),
    (body("-3"), "must be"),
    (body("nan"), "must be"),
    (body("abc"), "not a number"),
    (body("5", cron="* * * * *"), "both"),
    (body("5", "run_count:0"), "run_count"),
    (body("5", "run_count:x"), "run_count"),
    # a probe: 10**30 overflowed the scheduler's SQLite INTEGER, never saved
    (body("5", f"run_count:{10**30}"), "run_count 1000000000000000000000000000000 must be"),
    (body("5", "eta:soon"), "eta"),
    # a probe's finds: never run, then refused by the scheduler it was handed to
    (body("60", "eta:1e308"), "ten years"),
    (body("60", f"eta:{time.time() + 20 * 365 * 86400}"), "ten years"),
    (body("-1", f"eta:{time.time() + 60}", cron="* * * * *"), "both an eta"),
    (body("5", call={"path": "m"}), "path"),
    (body("5", call={"path": "m", "callable": "f"}), "kwargs"),
    (body("5", call={**CALL, "args": ["x" * 70_000]}), "bytes"),
    (body("5")[:4], "body frames"),
])
def test_malformed_schedules_name_the_fault(bad, reason):
    with pytest.raises(ProtocolError, match=reason):
        parse_schedule(bad)


def test_request_headers_keep_the_jobs_and_drop_the_schedulers():
    s = parse_schedule(body("5", "guarantee,run_count:2,nohaste,timeout:30,result-requested"))
    assert s.request_headers() == "guarantee,timeout:30,reply-requested"
    assert s.guaranteed and s.run_count == 2 and s.nohaste
    assert parse_schedule(body("5")).run_count == FOREVER


def test_client_body_is_whole_seconds_as_eventmq_reads_them():
    sent = schedule_body(queue="q", headers=["nohaste"], payload=CALL, interval=2.2)
    assert sent[2] == "3" and sent[4] == ""
    assert parse_schedule(sent).interval == 3


def test_a_store_taken_by_one_scheduler_is_refused_to_another_until_closed(tmp_path):
    """One scheduler per file: the lock is held from the store's opening to
    its close, a reader of the file (``take`` left False) is not refused,
    and the file reached through a symbolic link is the same file."""
    path = tmp_path / "s.db"
    first = ScheduleStore(str(path), take=True)
    (tmp_path / "link.db").symlink_to(path)
    for other in (str(path), str(tmp_path / "link.db")):
        with pytest.raises(StoreInUse, match=r"another scheduler \(pid \d+"):
            ScheduleStore(other, take=True)
    ScheduleStore(str(path)).close()  # a reader
    first.close()
    ScheduleStore(str(tmp_path / "link.db"), take=True).close()


def test_a_store_reached_through_a_hard_link_is_refused_but_the_routers_journal_shares_it(
        tmp_path):
    """A probe's find: two schedulers on one database under two names (a
    hard link) each had a lock file of their own, and every tick fired
    twice. The file itself is locked too; the router's journal on the same
    file (its own scheduler beside it, one process) shares it."""
    from emq_green.router.journal import Journal

    first = tmp_path / "x.db"
    store = ScheduleStore(str(first), take=True)
    (tmp_path / "y.db").hardlink_to(first)
    with pytest.raises(StoreInUse, match="the same file under another name"):
        ScheduleStore(str(tmp_path / "y.db"), take=True)
    store.close()
    ScheduleStore(str(tmp_path / "y.db"), take=True).close()  # let go: free again

    shared = str(tmp_path / "journal.db")
    journal = Journal(shared)
    journal.open()
    try:
        beside = ScheduleStore(shared, take=True)  # the router's own scheduler
        beside.close()
    finally:
        journal.close()


def test_sharing_the_journals_file_keeps_the_processs_fcntl_locks(tmp_path):
    """A review's find: the scheduler's lock opened and closed a second
    descriptor of the journal's database, and a close drops every fcntl
    lock the process holds on the file (SQLite's WAL read lock). In the
    shared case nothing is opened now."""
    import fcntl
    import os

    from emq_green import lockfile

    path = tmp_path / "journal.db"
    path.write_bytes(b"")
    held = lockfile.take_inode(str(path), "journal")
    keep = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(keep, fcntl.LOCK_SH, 1, 100)  # stands for SQLite's lock

        def posix_locks() -> int:
            inode = os.stat(path).st_ino
            with open("/proc/locks") as f:
                return sum(1 for line in f if " POSIX " in line
                           and f" {os.getpid()} " in line and f":{inode} " in line)

        assert posix_locks() == 1
        assert lockfile.take_inode(str(path), "scheduler", share_with=("journal",)) is None
        assert posix_locks() == 1
    finally:
        os.close(keep)
        lockfile.release_inode(held)


def test_store_keeps_state_across_a_restart(tmp_path):
    path = str(tmp_path / "s.db")
    table = ScheduleTable()
    store = ScheduleStore(path)
    entry, _ = table.add(parse_schedule(body("10", "nohaste,run_count:5", queue="q")), T0)
    table.fired(entry, T0 + 10.01, entry.next_at)
    store.save(entry)
    gone, _ = table.add(parse_schedule(body("10", call={**CALL, "args": ["y"]})), T0)
    store.save(gone)
    store.delete(gone.key)
    store.close()
    restored = list(ScheduleStore(path).load())
    assert len(restored) == 1
    (back,) = restored
    assert (back.key, back.anchor, back.next_at, back.runs_left, back.runs, back.last_at) == \
        (entry.key, T0, T0 + 20, 4, 1, T0 + 10.01)
    assert back.schedule.queue == "q"


def test_a_wall_clock_stepped_back_does_not_stall_the_schedules():
    """A probe's find (an offset clock, the system's untouched): the clock
    stepped back 300 s and nothing fired for 300 s, without a word.
    Intervals keep their pace in elapsed time, cron takes its next time from
    the clock as it is now, a one-shot keeps its absolute eta."""
    table = ScheduleTable()
    calls = [dict(CALL, args=[name]) for name in ("every", "cron", "once")]
    every, _ = table.add(parse_schedule(body("10", "nohaste", call=calls[0])), T0)
    cron, _ = table.add(parse_schedule(body("-1", "nohaste", "* * * * *", call=calls[1])), T0)
    once, _ = table.add(parse_schedule(body("400", f"run_count:1,nohaste,eta:{T0 + 400}",
                                            call=calls[2])), T0)
    assert run_until(table, T0, T0 + 25) == [T0 + 10, T0 + 20]
    now = T0 + 25 - 300  # 5 s later by the monotonic clock, the wall clock 300 s back
    table.clock_stepped_back(-300.0 - 5, now)
    assert every.next_at == T0 + 30 - 305  # 5 s from now, as before the step
    assert cron.next_at == T0 - 240  # the next whole minute of the clock as it is
    assert once.next_at == T0 + 400  # an absolute time
    assert table.due(now + 5) == [every]


def test_the_clock_watch_sees_a_step_back_and_nothing_else():
    from emq_green.scheduler.service import ClockWatch

    wall = [T0]
    watch = ClockWatch(lambda: wall[0])
    assert watch.stepped_back(T0) == 0.0
    assert watch.stepped_back(T0 + 60) == 0.0  # forward (or a test's fake clock)
    step = watch.stepped_back(T0 + 60 - 300)
    assert -301 < step < -299
    assert watch.stepped_back(T0 + 60 - 300) == 0.0  # once
