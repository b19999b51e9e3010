"""Promises the README and the guides make that no other test held to:
SIGQUIT as a graceful stop, ``offload_after_seconds``, the slots of a
reloaded worker's old connection, the end of a graceful drain, and the
``guarantee`` header on the worker."""

from __future__ import annotations

import os
import signal
import time

import gevent
import jobs_for_tests as J
import pytest
from test_cli import fast, worker_factory

from emq_green.jobmanager import JobManager, State
from emq_green.protocol import Command
from emq_green.worker.monitor import BlockMonitor
from emq_green.worker.offload import Offload

__all__ = ["worker_factory"]

JOBS = "jobs_for_tests"
REPLY = "reply-requested"


# ---------------------------------------------------------------------------
# SIGQUIT (docs/guide/signals.md: SIGTERM, SIGINT, SIGQUIT: graceful stop)


def test_sigquit_is_a_graceful_stop(router, worker_factory):
    """The console script as a process: jobs running when SIGQUIT comes
    finish (they are released only once the KBYE has left) and the process
    exits 0; no new READY after the KBYE."""
    w = worker_factory(*fast(router), "-J", "3")
    ident = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 3)
    jobs = [router.request(ident, "clijobs", "gated", args=[f"q{i}"], headers=REPLY)
            for i in range(3)]
    w.wait_file("started", "xxx")
    w.proc.send_signal(signal.SIGQUIT)
    w.wait_log("running -> draining")
    router.wait_count(Command.KBYE, 1)
    readies = router.count(Command.READY)
    assert w.proc.poll() is None and not set(jobs) & set(router.replies())
    (w.cwd / "release").touch()
    assert w.proc.wait(15) == 0
    replies = router.replies()
    assert [replies.get(m) for m in jobs] == [{"value": f"q{i}"} for i in range(3)], replies
    assert router.count(Command.READY) == readies  # none after the KBYE
    assert "draining -> stopped" in w.text() and "Killed" not in w.text()
    assert "SIGQUIT received: stopping gracefully" in w.text()  # (it said nothing: a probe)


# ---------------------------------------------------------------------------
# offload_after_seconds (docs/monitoring.md)


def test_offload_after_seconds_blocked_in_total(router, make_manager, caplog):
    """0.6 s blocks, threshold 0.3 s, ``offload_after_seconds`` 1.0 and no
    block count: one block is not enough, the second (1.2 s in total) sends
    the callable to the subprocess pool; the blocks count is not what did it."""
    manager = make_manager(block_threshold=0.3, offload_after_seconds=1.0,
                           subprocess_pool_size=1)
    [monitor] = [e for e in manager.extensions if isinstance(e, BlockMonitor)]
    [offload] = [e for e in manager.extensions if isinstance(e, Offload)]
    assert (offload.after_blocks, offload.after_seconds) == (0, 1.0)
    router.wait_inform()
    name = "blocking_jobs.block_and_pid"

    def run() -> int:
        msgid = router.request(router.identities[-1], "blocking_jobs", "block_and_pid",
                               args=[0.6], headers=REPLY)
        return router.wait_reply(msgid, timeout=30)["value"]

    assert run() == os.getpid()
    router.wait_until(lambda: monitor.incidents == 1)
    assert not offload.callables  # 0.6 s blocked: under the 1 s
    assert run() == os.getpid()
    router.wait_until(lambda: name in offload.callables)
    assert monitor.by_callable[name].blocked_seconds >= 1.0
    reason = manager.status()["offload"]["callables"][name]["reason"]
    assert "s blocked (offload_after_seconds 1)" in reason and "blocks" not in reason, reason
    assert any("now run in the subprocess pool" in r.getMessage() and name in r.getMessage()
               for r in caplog.records)
    # the next one runs in a child: the loop is not held, no new incident
    assert run() != os.getpid()
    assert monitor.incidents == 2
    assert manager.status()["offload"]["callables"][name]["jobs"] == 1


# ---------------------------------------------------------------------------
# reload: REQUESTs on the old connection, and the slots they hold


def test_reload_offers_every_free_slot_at_once_and_old_connection_requests_still_run(
        router, make_manager):
    """docs/guide/signals.md, SIGHUP: the new connection offers every free
    slot as soon as it is ACKed (a router drops a worker's unused READYs
    when it reads its KBYE), so an idle worker is not out of work for
    ``heartbeat_timeout``; the old socket is still read, and a REQUEST the
    router sent there before it read the KBYE runs, its REPLY on that
    connection. Over-committed meanwhile, the extra jobs wait in the
    backlog and run as slots free: nothing is lost, nothing runs twice."""
    made: list[JobManager] = []
    # heartbeat_timeout far longer than the waits below: a worker that waited
    # for the old connection to be quiet would offer nothing in time
    manager = make_manager(concurrent_jobs=4, heartbeat_timeout=60.0,
                           settings_loader=lambda: made[0].settings)
    made.append(manager)
    first = router.wait_inform()
    router.wait_count(Command.READY, 4, identity=first)
    manager.reload()
    router.wait_count(Command.KBYE, 1, identity=first)
    second = router.wait_inform(index=1)
    assert manager.wait_for_state(State.RUNNING, timeout=10)
    router.wait_count(Command.READY, 4, identity=second, timeout=10)
    assert manager.status()["retiring_connections"] == 1
    # two REQUESTs the router sent before it saw the KBYE arrive there, and run
    old = [router.request(first, JOBS, "wait_gate", args=["g"], headers=REPLY)
           for _ in range(2)]
    router.wait_until(lambda: J.calls["wait_gate"] == 2)
    # the router uses the 4 READYs of the new connection: 2 jobs run, 2 wait
    new = [router.request(second, JOBS, "wait_gate", args=["g"], headers=REPLY)
           for _ in range(4)]
    router.wait_until(lambda: manager.counters["backlogged"] == 2)
    assert J.calls["wait_gate"] == 4 and manager.free_slots == 0
    assert manager.status()["backlog"] == 2
    J.gates["g"].set()
    for msgid in old + new:
        assert router.wait_reply(msgid) == {"value": "g"}
    assert J.calls["wait_gate"] == 6
    replied_on = {r.message.body[1]: r.identity for r in router.messages(Command.REPLY)}
    assert replied_on == {**{m: first for m in old}, **{m: second for m in new}}
    # every slot offered again, on the new connection only
    router.wait_until(lambda: not manager.jobs_in_flight)
    router.wait_count(Command.READY, 8, identity=second)
    assert router.count(Command.READY, first) == 4
    assert manager.free_slots == 4


# ---------------------------------------------------------------------------
# the end of a graceful drain


def test_graceful_drain_ends_after_quiet_for_heartbeat_timeout(router, make_manager):
    """After the KBYE, REQUESTs that crossed it keep coming (three, one after
    another, each once the one before has run); each runs, and the drain
    ends only once the router has been quiet for ``heartbeat_timeout`` after
    the last. No READY after the KBYE."""
    quiet = 1.5
    manager = make_manager(concurrent_jobs=4, heartbeat_timeout=quiet, kill_grace_period=30)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    stopping = gevent.spawn(manager.stop, timeout=40)
    router.wait_count(Command.KBYE, 1)
    assert manager.state is State.DRAINING
    crossed = []
    for i in range(3):
        crossed.append(router.request(ident, JOBS, "add", args=[i, 1], headers=REPLY))
        last = time.monotonic()
        assert router.wait_reply(crossed[-1]) == {"value": i + 1}
        # still reading: within heartbeat_timeout of this REQUEST
        assert not stopping.ready() and manager.state is State.DRAINING
    assert stopping.get(timeout=30) is True
    stopped = time.monotonic()
    assert manager.state is State.STOPPED
    assert stopped - last >= quiet  # quiet for heartbeat_timeout after the last one
    assert router.count(Command.READY) == 4  # no READY after the KBYE
    assert manager.counters["succeeded"] == 3 and manager.counters["backlogged"] == 0


# ---------------------------------------------------------------------------
# the guarantee header (on the worker: accepted, and the job runs once)


@pytest.mark.parametrize("headers", ["guarantee", "reply-requested,guarantee",
                                     "guarantee,retry-count:2,reply-requested"])
def test_guarantee_header_is_accepted_and_the_job_runs_once(router, make_manager, headers):
    manager = make_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    msgid = router.request(ident, JOBS, "tag", args=["guaranteed"], headers=headers)
    if "reply-requested" in headers:
        assert router.wait_reply(msgid) == {"value": None}
    # its slot comes back once it has run: then nothing of it is left to run
    router.wait_count(Command.READY, 3)
    router.wait_until(lambda: not manager.jobs_in_flight)
    assert J.tags["guaranteed"] == 1
    assert manager.counters["succeeded"] == 1
    assert manager.counters["invalid_requests"] == 0 and manager.counters["refused"] == 0
    # a later job runs after it, and the guaranteed one has not run again
    after = router.request(ident, JOBS, "add", args=[1, 1], headers=REPLY)
    assert router.wait_reply(after) == {"value": 2}
    router.wait_count(Command.READY, 4)  # its READY follows its REPLY
    assert J.tags["guaranteed"] == 1 and router.count(Command.READY) == 4
