"""The loop-block monitor: incidents found, attributed and counted."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
import types

import gevent
import pytest

from emq_green.jobmanager import State
from emq_green.protocol import Command
from emq_green.settings import Settings
from emq_green.worker.monitor import BlockMonitor, patch_problems

JOBS = "blocking_jobs"


def monitored(make_manager, threshold=0.3, **settings):
    manager = make_manager(block_threshold=threshold, **settings)
    [monitor] = [e for e in manager.extensions if isinstance(e, BlockMonitor)]
    return manager, monitor


def wait_incidents(router, monitor, n, timeout=10.0):
    return router.wait_until(lambda: len(monitor.recent) >= n and list(monitor.recent),
                             timeout)


@pytest.mark.parametrize("job", ["block_unpatched", "cpu_loop", "block_holding_the_gil"])
def test_blocking_job_is_reported_with_its_callable_and_msgid(router, make_manager, caplog,
                                                              job):
    manager, monitor = monitored(make_manager)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    quiet = router.request(ident, JOBS, "nap", args=[0.01], headers="reply-requested")
    assert router.wait_reply(quiet) == {"value": 0.01}
    # 2 s, well past the threshold: gevent's monitor thread is per process, and
    # may still be sleeping out the period an earlier test's manager set
    sent = time.monotonic()
    msgid = router.request(ident, JOBS, job, args=[2.0], headers="reply-requested")
    router.wait_reply(msgid)
    [incident] = wait_incidents(router, monitor, 1)
    seen = time.monotonic()
    assert incident.callable == f"{JOBS}.{job}", incident
    assert incident.msgid == msgid and incident.queue == "default"
    # the whole 2 s block: from before the job began to after it ended
    assert incident.duration >= 1.9 and incident.started <= incident.job_started
    assert sent <= incident.job_started and incident.ended - incident.job_started >= 1.9
    assert incident.ended <= seen
    assert any(job in line for line in incident.stack)
    # two checks of the monitor's thread after the block: none sees it again
    # (a probe: a Python loop was found once more, as a call holding the GIL)
    from emq_green.worker import monitor as block_monitor

    hub = gevent.get_hub()
    for _ in range(2):
        after = max(incident.ended, block_monitor._LAST_CHECK[id(hub)][0]) + 0.05
        router.wait_until(lambda after=after: block_monitor._LAST_CHECK[id(hub)][0] > after,
                          10)
    stats = monitor.status(manager)["loop_blocks"]
    assert stats["incidents"] == 1 and stats["by_callable"][f"{JOBS}.{job}"]["incidents"] == 1
    assert manager.status()["loop_blocks"]["longest"] >= 1.9
    [line] = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "event loop blocked" in r.getMessage()]
    assert msgid in line and f"{JOBS}.{job}" in line and "queue default" in line
    # it blocked at once: its start is known to the last tick, maybe before the job's
    assert re.search(r"msgid \S+, 0\.\d\d s into the job", line), line
    assert 0 <= incident.in_job < 0.1
    [shown] = stats["recent"]
    assert shown["in_job_seconds"] >= 0
    assert f"{job}(" in line or f"in {job}" in line  # the stack


@pytest.mark.timeout(60)
def test_a_process_stopped_a_while_is_not_a_block(router, make_manager):
    """The monitor thread late by a threshold is a call holding the GIL only
    if the loop's thread computed meanwhile: a process stopped (SIGSTOP, a
    debugger) computes nothing, and its idle loop blocked nobody."""
    import os
    import subprocess

    from emq_green.worker import monitor as monitor_module

    manager, monitor = monitored(make_manager)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    hub = gevent.get_hub()
    started = time.monotonic()  # the monitor thread checks the loop
    router.wait_until(lambda: monitor_module._LAST_CHECK.get(id(hub), (0.0,))[0] > started, 10)
    # a busy loop (a probe's -J 1000 of 1 ms jobs was reported blocked by
    # one of them for the 4 s the process was stopped)
    busy = router.request(ident, JOBS, "spin_yielding", args=[2.0], headers="reply-requested")
    router.wait_until(lambda: manager.jobs_in_flight, 10)
    # the stimulus is a stop of one second, not a wait for an event
    waker = subprocess.Popen(["sh", "-c", f"sleep 1; kill -CONT {os.getpid()}"])
    os.kill(os.getpid(), signal.SIGSTOP)
    waker.wait(timeout=20)
    assert router.wait_reply(busy, timeout=20) == {"value": 2.0}
    back = time.monotonic()
    router.wait_until(lambda: monitor_module._LAST_CHECK.get(id(hub), (0.0,))[0] > back + 0.2,
                      10)
    msgid = router.request(ident, JOBS, "nap", args=[0.01], headers="reply-requested")
    assert router.wait_reply(msgid) == {"value": 0.01}
    assert not monitor.recent and monitor.incidents == 0


def test_block_in_a_greenlet_the_job_spawned_is_the_jobs(router, make_manager):
    manager, monitor = monitored(make_manager)
    ident = router.wait_inform()
    msgid = router.request(ident, JOBS, "block_in_child", args=[0.8], headers="reply-requested")
    router.wait_reply(msgid)
    [incident] = wait_incidents(router, monitor, 1)
    assert (incident.callable, incident.msgid) == (f"{JOBS}.block_in_child", msgid)


def test_one_incident_per_block_and_short_blocks_are_ignored(router, make_manager):
    manager, monitor = monitored(make_manager, threshold=0.4)
    ident = router.wait_inform()
    short = router.request(ident, JOBS, "block_unpatched", args=[0.1],
                           headers="reply-requested")
    router.wait_reply(short)
    sent = time.monotonic()
    ids = [router.request(ident, JOBS, "block_unpatched", args=[1.5],
                          headers="reply-requested") for _ in range(2)]
    for msgid in ids:
        router.wait_reply(msgid)
    incidents = wait_incidents(router, monitor, 2)
    seen = time.monotonic()
    assert [i.msgid for i in incidents] == ids  # one each, none for the short one
    first, second = incidents
    # each its own whole block, one after the other, inside the test's window
    assert first.duration >= 1.4 and second.duration >= 1.4
    assert sent <= first.job_started and first.ended <= second.started < second.ended <= seen
    stats = monitor.by_callable[f"{JOBS}.block_unpatched"]
    assert stats.incidents == 2
    assert stats.blocked_seconds == pytest.approx(first.duration + second.duration)


def test_two_blocks_in_a_row_in_one_reused_job_greenlet_are_two_incidents(router,
                                                                          make_manager):
    """The second REQUEST arrives only once the first block is over, so its
    job runs in the same (parked, reused) job greenlet a few microseconds
    after the first ended: the same frames, two blocks. (Seen as one 3 s
    incident when the end of a block was the greenlet's frames leaving.)"""
    manager, monitor = monitored(make_manager, threshold=0.4)
    ident = router.wait_inform()
    warm = router.request(ident, JOBS, "nap", args=[0.01], headers="reply-requested")
    router.wait_reply(warm)  # one job greenlet, parked
    first = router.request(ident, JOBS, "block_unpatched", args=[1.0],
                           headers="reply-requested")
    later: list[str] = []
    # runs when the loop is free again: after the first block
    gevent.spawn_later(0.01, lambda: later.append(router.request(
        ident, JOBS, "block_unpatched", args=[1.0], headers="reply-requested")))
    router.wait_reply(first)
    router.wait_until(lambda: later)
    router.wait_reply(later[0])
    a, b = wait_incidents(router, monitor, 2)
    assert a.greenlet == b.greenlet  # the case: one greenlet ran both
    assert (a.msgid, b.msgid) == (first, later[0])
    assert a.duration >= 0.9 and b.duration >= 0.9
    assert a.ended <= b.started < b.ended


def test_every_manager_of_the_process_sees_a_block(router, make_manager):
    """gevent's monitor thread is one per hub: one block, watched once, is
    an incident for each manager; the one whose job blocked names it."""
    manager, monitor = monitored(make_manager)
    other, other_monitor = monitored(make_manager, name="other-worker")
    ident = router.wait_inform()
    router.wait_inform(index=1)
    msgid = router.request(ident, JOBS, "block_unpatched", args=[1.0],
                           headers="reply-requested")
    router.wait_reply(msgid)
    [mine] = wait_incidents(router, monitor, 1)
    [theirs] = wait_incidents(router, other_monitor, 1)
    assert mine.msgid == msgid and theirs.msgid is None
    assert theirs.callable == "<not a job>"
    assert mine.ended == theirs.ended  # one block, watched once


@pytest.mark.parametrize("threshold, expected", [(0, 0), (1.0, 1)])
def test_threshold_zero_turns_detection_off(router, make_manager, threshold, expected):
    """A 2.5 s block: longer than the default threshold (1 s, the control
    case), so "0 means the default" would report it."""
    # the fake router shares the blocked loop: a dead-router limit (6 s)
    # beyond the block keeps the worker on its first connection
    manager, monitor = monitored(make_manager, threshold=threshold, heartbeat_timeout=2.0)
    assert Settings().block_threshold == 1.0
    ident = router.wait_inform()
    msgid = router.request(ident, JOBS, "block_unpatched", args=[2.5],
                           headers="reply-requested")
    router.wait_reply(msgid)
    follow = router.request(ident, JOBS, "nap", args=[0.3], headers="reply-requested")
    router.wait_reply(follow)
    if expected:
        wait_incidents(router, monitor, expected)
    assert monitor.incidents == expected


def test_patch_problems_name_the_modules_and_the_fix(monkeypatch):
    problems = patch_problems({})
    assert len(problems) == 1  # the test process is not monkeypatched
    for name in ("socket", "ssl", "time", "select", "threading", "patch_all"):
        assert name in problems[0]
    ext = types.ModuleType("psycopg2.extensions")
    ext.get_wait_callback = lambda: None
    monkeypatch.setitem(sys.modules, "psycopg2.extensions", ext)
    [_, psycopg] = patch_problems({"psycopg2": object()})
    assert "psycopg2" in psycopg and "psycogreen" in psycopg
    ext.get_wait_callback = lambda: print  # psycogreen installed its callback
    assert len(patch_problems({"psycopg2": object()})) == 1


# ---------------------------------------------------------------------------
# heartbeats from a native thread while the loop is held


def lifeline_of(manager):
    from emq_green.worker.lifeline import Lifeline

    [lifeline] = [e for e in manager.extensions if isinstance(e, Lifeline)]
    return lifeline


@pytest.mark.parametrize("on", [True, False])
def test_heartbeats_keep_their_interval_while_a_job_blocks(router, make_manager, on):
    manager = make_manager(thread_heartbeats=on)  # heartbeat_interval 0.2 s
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    msgid = router.request(ident, JOBS, "block_timed", args=[1.5], headers="reply-requested")
    began, ended = router.wait_reply(msgid)["value"]
    # This router shares the worker's (blocked) loop, so it reads late; each
    # HEARTBEAT carries the time it was sent. The loop cannot send while it
    # is held: any heartbeat sent inside the block came from the thread.
    # (the worker may reconnect after the block, as a new identity: the
    # fake router's heartbeats were held too) one heartbeat sent after it
    router.wait_until(lambda: any(float(r.message.body[0]) > ended
                                  for r in router.messages(Command.HEARTBEAT)))
    during = [r for r in router.messages(Command.HEARTBEAT, ident)
              if began < float(r.message.body[0]) < ended]
    if on:
        assert len(during) >= 3, during  # interval 0.2 s, block 1.5 s
        assert lifeline_of(manager).sent >= len(during)
    else:
        assert during == []
        assert lifeline_of(manager).sent == 0


@pytest.mark.timeout(60)
def test_thread_heartbeats_go_early_when_the_loop_is_held_by_a_call(router, make_manager):
    """A probe: a 3 s sleep in C, then a 2.5 s regular expression holding the
    GIL: the thread sent only once the loop was ``interval + period`` late
    (3.5 s), by then the GIL was held: 5.5 s of silence, the worker removed
    as dead. With the loop not running, the thread sends from half an
    interval of silence on, so the silence is the GIL-holding call's and
    about half an interval more."""
    manager = make_manager(thread_heartbeats=True, heartbeat_interval=2.0,
                           heartbeat_timeout=10.0)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    msgid = router.request(ident, JOBS, "sleep_then_hold_the_gil", args=[2.2, 1.0],
                           headers="reply-requested")
    began, ended = router.wait_reply(msgid, timeout=30)["value"]
    router.wait_until(lambda: any(float(r.message.body[0]) > ended
                                  for r in router.messages(Command.HEARTBEAT, ident)), 10)
    sent = sorted(float(r.message.body[0]) for r in router.messages(Command.HEARTBEAT, ident))
    marks = [began, *[t for t in sent if began < t < ended], ended]
    # the thread spoke while the C call slept (before: only once the loop was
    # 2.5 s late, by then the GIL was held), so no silence spans the whole
    assert [t for t in sent if began < t < began + 2.2], (marks, lifeline_of(manager).sent)
    longest = max(b - a for a, b in zip(marks, marks[1:]))
    assert longest < ended - began - 0.5, marks


@pytest.mark.timeout(120)
def test_thread_heartbeats_under_stress_lose_and_corrupt_nothing(router, make_manager):
    """Thousands of jobs, the loop held again and again, and the thread
    sending as fast as it can on the same socket throughout."""
    manager = make_manager(concurrent_jobs=20, block_threshold=0.3)
    lifeline = lifeline_of(manager)
    lifeline.force_every = 0.0002
    ident = router.wait_inform()
    n = 3000
    expected: dict[str, object] = {}
    sent_at: dict[str, float] = {}
    i = 0
    while i < n:
        router.wait_until(lambda i=i: router.count(Command.READY) > i, timeout=15)
        ready = router.count(Command.READY)
        while i < min(ready, n):
            if i % 300 == 150:
                msgid = router.request(ident, JOBS, "block_unpatched", args=[0.05],
                                       headers="reply-requested")
                expected[msgid] = 0.05
            elif i % 300 == 0:
                msgid = router.request(ident, JOBS, "cpu_loop", args=[0.03],
                                       headers="reply-requested")
                expected[msgid] = int
            else:
                msgid = router.request(ident, "jobs_for_tests", "add", args=[i, 1],
                                       headers="reply-requested")
                expected[msgid] = i + 1
            sent_at[msgid] = time.monotonic()
            i += 1
    router.wait_until(lambda: router.count(Command.REPLY) >= n, timeout=60)
    router.wait_count(Command.READY, n + 20)
    lifeline.force_every = None
    replies = router.messages(Command.REPLY)
    assert len(replies) == n  # none lost, none twice
    latencies = []
    for r in replies:
        value = json.loads(r.message.body[0])["value"]
        want = expected[r.message.body[1]]
        assert isinstance(value, int) if want is int else value == want
        latencies.append(r.at - sent_at[r.message.body[1]])
    # a reader left sleeping on pending messages would show as a reply held
    # for zmq.green's 11.6 s fallback poll (the bound is that, not a speed)
    assert max(latencies) < 8.0, max(latencies)
    assert router.count(Command.READY) == n + 20
    for frames in router.raw:  # every message whole: identity + 4 frames + body
        assert frames[1:3] == [b"", b"eMQP/1.0"] and len(frames) >= 5
    assert lifeline.sent > 1000, lifeline.sent
    # every heartbeat the thread sent arrives (the loop's own come on top)
    router.wait_until(lambda: router.count(Command.HEARTBEAT) >= lifeline.sent, timeout=5)
    assert manager.counters["malformed_messages"] == 0
    # and the socket still works both ways at once
    last = router.request(ident, "jobs_for_tests", "add", args=[1, 1],
                          headers="reply-requested")
    assert router.wait_reply(last, timeout=2) == {"value": 2}


# ---------------------------------------------------------------------------
# with EventMQ's own router in front (a subprocess each, default heartbeats)

ROUTER_REMOVED = r"No messages from worker .* Removing from the queue"


def removed(ident: str) -> str:
    """EventMQ's router log line for the removal of this very worker."""
    return rf"No messages from worker {re.escape(ident)} in [0-9.]+\. Removing from the queue"



def _blocked_worker(peers, name, *flags):
    from peers import Client, green_argv

    router = peers.router()
    green = peers.green(green_argv(router.addrs, 10, name, *flags))
    ident, _ = router.wait_for_worker(rf"^{name}:", 10)
    client = Client(router.addrs.frontend)
    return router, green, ident, client


@pytest.mark.timeout(90)
def test_real_router_keeps_a_worker_whose_loop_is_held_12s(peers):
    """12 s > heartbeat_timeout (5 s), and the router looks every 10 s."""
    import blocking_jobs

    router, green, ident, client = _blocked_worker(peers, "held")
    try:
        mark = green.mark()
        client.defer(blocking_jobs.block_unpatched, 12)
        green.wait_for(r"event loop blocked for 1[23]\.\d+ s by job "
                       r"blocking_jobs\.block_unpatched \(queue default, msgid [0-9a-f-]+",
                       timeout=40, since=mark)
        assert router.count(ROUTER_REMOVED) == 0, router.tail()
        assert router.count(r"Unknown worker") == 0, router.tail()
        # the same identity, all 10 slots free again, and it takes new work
        again, _ = router.wait_for_worker(r"^held:", 10)
        assert again == ident
        client.defer(blocking_jobs.block_unpatched, 0.01)
        green.signal(signal.SIGUSR1)
        line = green.wait_for(r'"thread_heartbeats": \{[^}]*"sent": (\d+)', timeout=10,
                              since=mark)
        assert int(line) >= 3  # about one per 3 s while held
    finally:
        client.close()


@pytest.mark.timeout(90)
def test_real_router_drops_the_worker_without_thread_heartbeats(peers):
    """The control: the same worker with the heartbeat thread off is
    removed (16 s held: a router check falls when 5 s have passed)."""
    import blocking_jobs

    router, green, ident, client = _blocked_worker(peers, "dropped",
                                                   "--thread-heartbeats", "false")
    try:
        client.defer(blocking_jobs.block_unpatched, 16)
        router.wait_for(removed(ident), timeout=40)
    finally:
        client.close()


# ---------------------------------------------------------------------------
# offload


def test_offender_goes_to_the_subprocess_pool_after_n_blocks_until_sighup(
        router, make_manager, caplog):
    import os

    from emq_green.worker.offload import Offload

    made = []
    manager, monitor = monitored(make_manager, threshold=0.3, offload_after_blocks=2,
                                 subprocess_pool_size=1,
                                 settings_loader=lambda: made[0].settings)
    made.append(manager)
    [offload] = [e for e in manager.extensions if isinstance(e, Offload)]
    router.wait_inform()
    name = f"{JOBS}.block_and_pid"

    def run():
        msgid = router.request(router.identities[-1], JOBS, "block_and_pid", args=[0.6],
                               headers="reply-requested")
        return router.wait_reply(msgid, timeout=30)["value"]

    assert run() == os.getpid()
    wait_incidents(router, monitor, 1)
    assert not offload.callables
    assert run() == os.getpid()
    router.wait_until(lambda: name in offload.callables)
    assert any("now run in the subprocess pool" in r.getMessage() and name in r.getMessage()
               for r in caplog.records)
    # the third runs in a child: the loop is not held, no new incident
    assert run() != os.getpid()
    assert monitor.incidents == 2
    status = manager.status()["offload"]
    assert status["callables"][name]["jobs"] == 1
    assert "2 blocks" in status["callables"][name]["reason"]
    # SIGHUP (settings reloaded) forgets the decision
    manager.reload()
    router.wait_inform(index=1)
    assert manager.wait_for_state(State.RUNNING, timeout=10)
    assert manager.counters["reloads"] == 1
    assert not offload.callables and manager.status()["offload"]["callables"] == {}
    assert run() == os.getpid()


def test_a_late_found_block_whose_blocker_is_gone_is_timed_by_the_loop_s_ticks():
    """A probe's find: 2 of 15 regex blocks (1.6 s) were not counted at
    all: found late, with the loop already past them, they were timed from
    a guess shorter than the threshold and dropped. The loop's own ticks
    time such a block: the gap between the two around it."""
    from emq_green.worker.monitor import GIL_HOLDER

    monitor = BlockMonitor(threshold=1.0)
    monitor._last_end = 0.0  # (no incident before)
    monitor._gap, monitor._last_tick = (100.0, 101.6), 101.65  # the loop ran on first
    incident, ended = monitor._gap_seen(before=100.1, now=101.7)
    assert (incident.started, ended) == (100.0, 101.6)
    assert incident.callable == GIL_HOLDER and incident.msgid is None
    # the loop did not run again before the monitor thread: its last tick
    # started the block, which ends now
    monitor._gap = (90.0, 90.4)
    monitor._last_tick = 100.05
    incident, ended = monitor._gap_seen(before=100.1, now=101.7)
    assert (incident.started, ended) == (100.05, 101.7)
