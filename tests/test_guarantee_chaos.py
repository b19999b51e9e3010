"""Guaranteed jobs against real faults, with real processes: ``emq-green-router``
with a journal, emq-green workers and EventMQ's own ``emq-jobmanager``,
killed with ``kill -9``, stopped with SIGSTOP, restarted. Jobs record
``start`` and ``done`` lines in a file (``interop_jobs``); every assertion
is about jobs that really ran. Jobs wait on a gate file where a test must
know they are running when it strikes, never on a duration.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
from peers import BIN, GreenRouterProc, Peers, Proc, RouterAddrs, wait_until

from emq_green.client import Client
from emq_green.client.submit import admin_request
from emq_green.protocol import Command

#: the router takes a worker for dead after 2 s of silence (the workers beat every 0.3 s)
ROUTER_BEATS = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "2"]
WORKER_BEATS = ["--heartbeat-interval", "0.3", "--heartbeat-timeout", "1",
                "--heartbeat-liveness", "3"]



class GreenRouter(GreenRouterProc):
    """``emq-green-router`` with this file's heartbeats."""

    def __init__(self, peers: Peers, addrs: RouterAddrs, *extra: str) -> None:
        super().__init__(peers, addrs, *ROUTER_BEATS, *extra)

    def status(self) -> dict:
        status = admin_request(self.addrs.admin, Command.STATUS, timeout=5)
        assert status is not None, f"no STATUS from the router\n{self.tail()}"
        return status

    def workers(self) -> dict:
        shown = admin_request(self.addrs.admin, Command.ROUTER_SHOW_WORKERS, timeout=5)
        return (shown or {}).get("connected_workers", {})


def green_worker(peers: Peers, addrs: RouterAddrs, name: str, jobs: int,
                 *extra: str) -> Proc:
    return peers.green(["-B", addrs.backend, "-J", str(jobs), "-n", name, *WORKER_BEATS,
                        *extra])


def send_guaranteed(addrs: RouterAddrs, tags: list[str], gate: Optional[Path],
                    sleep: Optional[float] = None) -> list[str]:
    """Send one guaranteed job per tag with emq-green's client, each confirmed
    by the router before the next is sent; returns the msgids."""
    sent = []
    with Client(addrs.frontend, green=False, confirm_timeout=20) as client:
        for tag in tags:
            if gate is not None:
                sent.append(client.defer_job("interop_jobs.gated_record",
                                             [tag, str(gate), 120.0], guarantee=True))
            else:
                sent.append(client.defer_job("interop_jobs.sleep_record",
                                             [tag, sleep or 0.0], guarantee=True))
        assert client.acknowledged == len(tags)  # every one confirmed
    return sent


def wait_started_on(peers: Peers, tags: list[str], pid: int, timeout: float = 30) -> None:
    def started() -> bool:
        pids = peers.record.pids("start")
        return all(pids.get(tag) == pid for tag in tags)

    wait_until(started, timeout, f"{len(tags)} jobs started in pid {pid}",
               details=peers.logs)


def gated_jobs_on(peers: Peers, tmp_path: Path, name: str, count: int, slots: int,
                  *router_args: str) -> tuple[GreenRouter, RouterAddrs, Proc, Path, list[str]]:
    """A router (``router_args``), one worker ``name`` of ``slots`` slots,
    and ``count`` guaranteed jobs held at a gate, all started on it."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs, *router_args)
    worker = green_worker(peers, addrs, name, slots)
    gate = tmp_path / "gate"
    tags = [f"job{i}" for i in range(count)]
    send_guaranteed(addrs, tags, gate)
    wait_started_on(peers, tags, worker.pid)
    return router, addrs, worker, gate, tags


@pytest.mark.timeout(120)
def test_kill_9_of_a_green_worker_with_guaranteed_jobs_running(peers, tmp_path):
    router, addrs, victim, gate, tags = gated_jobs_on(
        peers, tmp_path, "victim", 150, 200, "--journal-file", str(tmp_path / "journal.db"))

    survivor = green_worker(peers, addrs, "survivor", 200)
    victim.kill()  # kill -9 of its process group, 150 jobs running
    wait_until(lambda: router.status()["redelivered"] >= 150, 20,
               "the 150 jobs queued again", details=peers.logs)
    gate.touch()
    done = peers.record.wait_for_tags(tags, 60, details=peers.logs)
    assert set(done) == set(tags)
    assert set(peers.record.pids("done").values()) == {survivor.pid}
    status = router.status()
    assert status["guaranteed_held"] == 0 and status["journal_rows"] == 0


@pytest.mark.timeout(150)
def test_kill_9_of_eventmq_jobmanager_with_guaranteed_jobs_running(peers, tmp_path):
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)  # redelivery needs no journal
    config = peers.write_config("jobmanager.conf", {"jobmanager": {
        "worker_addr": addrs.backend, "concurrent_jobs": 4}})
    victim = peers.jobmanager(["-C", str(config)])
    wait_until(lambda: any(w["available_slots"] >= 4 for w in router.workers().values()), 30,
               "emq-jobmanager with 4 free slots", details=peers.logs)
    gate = tmp_path / "gate"
    tags = [f"job{i}" for i in range(4)]
    send_guaranteed(addrs, tags, gate)
    wait_until(lambda: set(peers.record.tags("start")) == set(tags), 30,
               "4 jobs started in emq-jobmanager", details=peers.logs)
    started_in = set(peers.record.pids("start").values())
    assert victim.pid not in started_in  # its worker processes ran them

    survivor = green_worker(peers, addrs, "survivor", 10)
    victim.kill()  # the whole process group: the job manager and its workers
    gate.touch()
    done = peers.record.wait_for_tags(tags, 60, details=peers.logs)
    assert set(done) == set(tags)
    assert set(peers.record.pids("done").values()) == {survivor.pid}
    assert router.status()["redelivered"] == 4


@pytest.mark.timeout(150)
def test_sigstop_past_the_timeout_then_sigcont(peers, tmp_path):
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs, "--journal-file", str(tmp_path / "journal.db"))
    stopped = green_worker(peers, addrs, "stopped", 100)
    gate = tmp_path / "gate"
    first = [f"first{i}" for i in range(40)]
    send_guaranteed(addrs, first, gate)
    wait_started_on(peers, first, stopped.pid)
    other = green_worker(peers, addrs, "other", 100)

    stopped.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: router.status()["redelivered"] >= 40, 20,
                   "its jobs queued again", details=peers.logs)
        gate.touch()
        peers.record.wait_for_tags(first, 60, details=peers.logs)
    finally:
        stopped.signal(signal.SIGCONT)
    # resumed: its own runs end, and their REPLYs are late, dropped and counted
    wait_until(lambda: router.status()["late_replies"] >= 40, 30,
               "the resumed worker's late replies", details=peers.logs)
    stopped.wait_for(r"ACK from ", count=2, timeout=30)  # it connected again

    then = [f"then{i}" for i in range(200)]
    send_guaranteed(addrs, then, None, sleep=0.2)
    done = peers.record.wait_for_tags(then, 60, details=peers.logs)
    assert set(done) >= set(then)
    pids = peers.record.pids("done")
    assert {pids[t] for t in then} == {stopped.pid, other.pid}  # both take jobs again
    status = router.status()
    assert status["guaranteed_held"] == 0
    assert sum(done[t] for t in first) >= 40  # each at least once (some twice)


@pytest.mark.timeout(150)
def test_a_worker_back_from_a_stop_ends_the_copies_its_jobs_left_waiting(peers, tmp_path):
    """A probe's find: a worker SIGSTOPped past the timeout (its four
    guaranteed jobs queued again, waiting: the other worker busy) came back
    and connected anew, then finished the four; their REPLYs left under the
    new identity, which the router had handed no copy to: dropped as late,
    and the copies could run again on another worker. The connection the
    jobs came on now stays open for their REPLYs, which end the waiting
    copies: each job runs once, where it first ran."""
    router, addrs, stopped, gate, tags = gated_jobs_on(peers, tmp_path, "stopped", 4, 4)
    busy = green_worker(peers, addrs, "busy", 1)
    gate2 = tmp_path / "gate2"
    with Client(addrs.frontend, green=False) as client:
        client.defer_job("interop_jobs.gated_record", ["blocker", str(gate2), 120.0])
    wait_started_on(peers, ["blocker"], busy.pid)
    stopped.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: router.status()["redelivered"] >= 4, 20,
                   "its jobs queued again", details=peers.logs)
    finally:
        stopped.signal(signal.SIGCONT)
    stopped.wait_for(r"ACK from ", count=2, timeout=30)  # connected anew, full
    gate.touch()  # its four jobs end there
    wait_until(lambda: router.status()["guaranteed_held"] == 0, 30,
               "the four ended, their copies with them", details=peers.logs)
    # under the identity the jobs came to (a copy handed to the new one as
    # its slots came back is answered from the worker's memory instead)
    assert router.status()["replies_for_buffered_copies"] >= 1
    gate2.touch()  # the other worker is free: nothing of the four is left for it
    peers.record.wait_for_tags(["blocker"], 30, details=peers.logs)
    wait_until(lambda: router.status()["guaranteed_held"] == 0, 10, "nothing held")
    assert peers.record.pids("done") == {**{t: stopped.pid for t in tags},
                                         "blocker": busy.pid}
    counts = peers.record.tags("done")
    assert {t: counts[t] for t in tags} == {t: 1 for t in tags}


@dataclass
class Running:
    """Guaranteed jobs asking for their results, running on one worker
    behind a journaled router (:func:`running_with_results`)."""

    addrs: RouterAddrs
    journal: Path
    router: GreenRouter
    worker: Proc
    gate: Path
    tags: list[str]
    handles: list


@contextlib.contextmanager
def running_with_results(peers: Peers, tmp_path: Path, prefix: str,
                         count: int, slots: int = 10) -> Iterator[Running]:
    """A journaled router, one worker of ``slots`` slots, ``count`` gated
    guaranteed jobs with result=True all started on it; the client stays
    open in the block."""
    addrs = RouterAddrs.fresh()
    journal = tmp_path / "journal.db"
    router = GreenRouter(peers, addrs, "--journal-file", str(journal))
    worker = green_worker(peers, addrs, prefix, slots)
    gate = tmp_path / "gate"
    tags = [f"{prefix}{i}" for i in range(count)]
    with Client(addrs.frontend, green=False, confirm_timeout=20) as client:
        handles = [client.defer_job("interop_jobs.gated_record", [tag, str(gate), 120.0],
                                    guarantee=True, result=True) for tag in tags]
        wait_started_on(peers, tags, worker.pid)
        yield Running(addrs, journal, router, worker, gate, tags, handles)


def results_of(run: Running, peers: Peers) -> list:
    """The values of ``run``'s handles, the peers' logs on any failure."""
    try:
        return [h.get(timeout=30) for h in run.handles]
    except Exception as exc:
        raise AssertionError(f"{exc!r}\n{peers.logs()}") from exc


@pytest.mark.timeout(120)
def test_a_lone_worker_stopped_past_the_timeout_ends_its_jobs_once_with_their_results(
        peers, tmp_path):
    """One worker, stopped with SIGSTOP past the router's timeout while
    guaranteed jobs that asked for their results run, then resumed: the
    router queues the jobs again, and they come back to the same process
    under its new identity, still running them. Not run twice, not answered
    as errors: each client gets its job's own value, and the journal empties."""
    with running_with_results(peers, tmp_path, "lone", 3) as run:
        run.worker.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: run.router.status()["redelivered"] >= 3, 20,
                       "its jobs queued again", details=peers.logs)
        finally:
            run.worker.signal(signal.SIGCONT)
        # the copies reached it (refused as "already in flight" before the fix)
        run.worker.wait_for(r"already (?:running here|in flight)", timeout=30)
        run.gate.touch()
        assert results_of(run, peers) == run.tags
    done = peers.record.wait_for_tags(run.tags, 10, details=peers.logs)
    assert {t: done[t] for t in run.tags} == {t: 1 for t in run.tags}  # once each
    assert peers.record.count("start") == 3
    wait_until(lambda: run.router.status()["journal_rows"] == 0, 10, "the journal emptied")
    assert run.router.status()["guaranteed_held"] == 0


def _journal_rows(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    finally:
        db.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_router_death_with_1000_confirmed_requests_then_restart(peers, tmp_path, how):
    addrs = RouterAddrs.fresh()
    journal = tmp_path / "journal.db"
    router = GreenRouter(peers, addrs, "--journal-file", str(journal))
    worker = green_worker(peers, addrs, "worker", 20)
    gate = tmp_path / "gate"
    tags = [f"job{i}" for i in range(1000)]
    send_guaranteed(addrs, tags, gate)  # 20 out at the worker, 980 buffered
    wait_started_on(peers, tags[:20], worker.pid)
    assert router.status()["guaranteed_held"] == 1000

    if how == "kill-9":
        router.kill()
    else:
        router.signal(signal.SIGTERM)
        assert router.wait_exit(20) == 0
        assert "router: SIGTERM received; stopping" in router.text()
    assert _journal_rows(journal) == 1000  # every confirmed request is on disk

    again = GreenRouter(peers, addrs, "--journal-file", str(journal))
    assert again.status()["guaranteed_restored"] == 1000
    gate.touch()
    done = peers.record.wait_for_tags(tags, 90, details=peers.logs)
    assert set(done) == set(tags)
    wait_until(lambda: again.status()["guaranteed_held"] == 0, 30, "nothing held",
               details=peers.logs)
    again.signal(signal.SIGTERM)
    assert again.wait_exit(20) == 0
    assert _journal_rows(journal) == 0


@pytest.mark.timeout(60)
def test_a_corrupt_journal_stops_emq_green_router_with_the_file_named(tmp_path):
    journal = tmp_path / "journal.db"
    journal.write_bytes(b"\x00garbage" * 512)
    addrs = RouterAddrs.fresh()
    out = subprocess.run([str(BIN / "emq-green-router"), "--frontend-addr", addrs.frontend,
                          "--backend-addr", addrs.backend, "--administrative-addr",
                          addrs.admin, "--journal-file", str(journal)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert str(journal) in out.stderr and "not a readable SQLite database" in out.stderr
    assert journal.read_bytes() == b"\x00garbage" * 512


@pytest.mark.timeout(90)
def test_a_journaled_result_reaches_its_client_across_a_router_kill_9(peers, tmp_path):
    """A guaranteed job asking for its result, sent before the router is
    killed and run by the next router on the same journal: the client, still
    connected with the same identity, gets the value."""
    addrs = RouterAddrs.fresh()
    journal = tmp_path / "journal.db"
    router = GreenRouter(peers, addrs, "--journal-file", str(journal))
    with Client(addrs.frontend, green=False, confirm_timeout=20) as client:
        handle = client.defer_job("interop_jobs.record", ["survivor"], guarantee=True,
                                  result=True)
        assert router.status()["guaranteed_held"] == 1  # no worker yet: it waits
        router.kill()
        GreenRouter(peers, addrs, "--journal-file", str(journal))
        green_worker(peers, addrs, "w", 4)
        assert handle.get(timeout=30) == "survivor"
    assert peers.record.wait_for_tags(["survivor"], 10, details=peers.logs)


@pytest.mark.timeout(120)
def test_jobs_running_across_a_router_kill_9_end_once_with_their_results(peers, tmp_path):
    """Guaranteed jobs asking for their results run on a worker when the
    router is killed; the next router on the same journal sends them again,
    to the same worker under its new identity, which still runs them: each
    runs once, and each client gets its job's own value."""
    with running_with_results(peers, tmp_path, "across", 5) as run:
        run.router.kill()
        GreenRouter(peers, run.addrs, "--journal-file", str(run.journal))
        run.worker.wait_for(r"already (?:running here|in flight)", timeout=30)
        run.gate.touch()
        assert results_of(run, peers) == run.tags
    done = peers.record.wait_for_tags(run.tags, 10, details=peers.logs)
    assert {t: done[t] for t in run.tags} == {t: 1 for t in run.tags}
    assert peers.record.count("start") == 5


@pytest.mark.timeout(120)
def test_a_busy_lone_worker_across_a_router_kill_9_ends_its_jobs_once(peers, tmp_path):
    """Every slot of the lone worker busy when the router is killed: the
    next router's copies wait in its buffer (no READY to send them on). The
    REPLYs of the first runs, from an identity the new router does not know,
    cannot end them (a forger could send the same), so each copy goes to the
    worker, which remembers what it just ended and answers it without
    running it again. (The copies once ran again after the first runs,
    every job twice, while those REPLYs were dropped as late.)"""
    with running_with_results(peers, tmp_path, "busy", 4, slots=4) as run:
        run.router.kill()
        second = GreenRouter(peers, run.addrs, "--journal-file", str(run.journal))
        wait_until(lambda: second.status()["waiting_messages_by_queue"] == {"default": 4}, 30,
                   "the copies waiting in the new router's buffer", details=peers.logs)
        run.gate.touch()
        assert results_of(run, peers) == run.tags
    done = peers.record.wait_for_tags(run.tags, 10, details=peers.logs)
    wait_until(lambda: second.status()["journal_rows"] == 0, 10, "the journal emptied")
    status = second.status()
    assert status["replies_for_buffered_copies"] == 0 and status["guaranteed_held"] == 0
    assert status["waiting_messages_by_queue"] == {}
    assert {t: done[t] for t in run.tags} == {t: 1 for t in run.tags}  # once each
    assert peers.record.count("start") == 4


@pytest.mark.timeout(120)
def test_a_clean_router_stop_does_not_report_journaled_results_lost(peers, tmp_path):
    """SIGTERM to the router while guaranteed jobs that asked for results
    run: they stay in its journal, so their handles are not told "lost"; the
    next router on the journal ends them and the values reach the client."""
    with running_with_results(peers, tmp_path, "kept", 3) as run:
        run.router.signal(signal.SIGTERM)
        assert run.router.wait_exit(30) == 0, run.router.tail()
        run.router.wait_for(r"stay in the journal", timeout=5)
        GreenRouter(peers, run.addrs, "--journal-file", str(run.journal))
        run.worker.wait_for(r"already (?:running here|in flight)", timeout=30)
        run.gate.touch()
        assert results_of(run, peers) == run.tags
    done = peers.record.tags()
    assert {t: done[t] for t in run.tags} == {t: 1 for t in run.tags}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["kill_9", "sigterm"])
def test_a_result_just_sent_keeps_its_journal_row_through_a_router_death(peers, tmp_path,
                                                                          how):
    """The row of a job whose result was just sent lingers (RESULT_LINGER):
    a router that dies, or stops with its sockets' unread results dropped,
    sends the job again from the journal. A probe lost such results for
    good. The worker, still up, answers the copy from its memory of ended
    jobs: it does not run again."""
    with running_with_results(peers, tmp_path, "linger", 3) as run:
        wait_until(lambda: run.router.status()["journal_backlog"] == 0, 10,
                   "the rows on disk")
        run.gate.touch()
        assert results_of(run, peers) == run.tags
        if how == "kill_9":
            run.router.kill()
        else:
            run.router.signal(signal.SIGTERM)
            assert run.router.wait_exit(30) == 0, run.router.tail()
        db = sqlite3.connect(run.journal)
        try:
            rows = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        finally:
            db.close()
        assert rows == 3  # all three finished within the linger
        second = GreenRouter(peers, run.addrs, "--journal-file", str(run.journal))
        wait_until(lambda: second.status()["journal_rows"] == 0, 30,
                   "the copies ended", details=peers.logs)
        run.worker.wait_for(r"ended here a moment ago", timeout=10)
    assert peers.record.count("start") == 3  # none ran again


_FORK_SCRIPT = """
import os, signal, sys
from emq_green.client import defer_job
addr = sys.argv[1]
defer_job("interop_jobs.record", ["parent"], addr=addr)
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a child stuck on the parent's socket dies of SIGALRM
    # guaranteed: it returns once the router holds it (os._exit has no linger)
    defer_job("interop_jobs.record", ["child"], addr=addr, guarantee=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.timeout(60)
def test_the_shared_client_works_in_a_forked_child(peers):
    """gunicorn --preload, multiprocessing: a child's first defer_job on the
    shared client blocked for ever on the parent's socket."""
    addrs = RouterAddrs.fresh()
    GreenRouter(peers, addrs)
    green_worker(peers, addrs, "w", 4)
    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, addrs.frontend],
                         capture_output=True, text=True, timeout=40, env=peers.env())
    assert out.returncode == 0, out.stderr
    assert set(peers.record.wait_for_tags(["parent", "child"], 20, details=peers.logs)) == {
        "parent", "child"}


@pytest.mark.timeout(60)
def test_workers_rejoin_a_restarted_router_at_their_next_heartbeat(peers):
    """The new router tells a worker it does not know to connect anew
    (KBYE): it rejoins at its next heartbeat (3 s), not after its own
    heartbeat timeout x liveness (15 s)."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "4", "-n", "w"])  # default heartbeats
    wait_until(lambda: router.workers(), 20, "the worker joined", details=peers.logs)
    router.kill()
    again = GreenRouter(peers, addrs)
    started = time.monotonic()
    wait_until(lambda: again.workers(), 10, "the worker joined the new router",
               details=peers.logs)
    assert time.monotonic() - started < 10
    assert "told to connect anew (KBYE)" in again.text()


@pytest.mark.timeout(120)
def test_a_batch_confirmed_by_emq_green_submit_survives_a_router_kill_9(peers, tmp_path):
    """``emq-green-submit --guarantee`` (a GuaranteedBatch, real process)
    exits 0 only once the router holds every job: the router is then
    killed with kill -9, every one is in its journal, and the next router
    on that journal runs each (no worker until then)."""
    addrs = RouterAddrs.fresh()
    journal = tmp_path / "journal.db"
    router = GreenRouter(peers, addrs, "--journal-file", str(journal))
    out = subprocess.run([str(BIN / "emq-green-submit"), "interop_jobs.record", "--args", "[]",
                          "--tag-arg", "-n", "800", "--guarantee", "-a", addrs.frontend],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "confirmed 800" in out.stderr
    router.kill()
    assert _journal_rows(journal) == 800
    GreenRouter(peers, addrs, "--journal-file", str(journal))
    green_worker(peers, addrs, "after", 50)
    done = peers.record.wait_for_tags([str(i) for i in range(800)], 60, details=peers.logs)
    assert len(done) == 800


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP"])
def test_plain_jobs_that_end_after_a_worker_s_kbye_are_not_taken_for_lost(peers, tmp_path, how):
    """Plain jobs (no reply requested) that end after the worker's KBYE (a
    SIGTERM's drain, or on the connection a SIGHUP retired): the worker's
    READYs after the router answered that KBYE end them there. Without them
    the router logged each one "possibly lost" once kill_grace_period was
    over, though every one had run (a probe's find). The control, a worker
    that leaves with a job it never reports, is logged lost: the check ran
    past the real worker's deadline."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs, "--kill-grace-period", "1")
    worker = green_worker(peers, addrs, "drained", 4)
    gate = tmp_path / "gate"
    tags = [f"plain{i}" for i in range(4)]
    with Client(addrs.frontend, green=False) as client:
        for tag in tags:
            client.defer_job("interop_jobs.gated_record", [tag, str(gate), 60.0])
        wait_started_on(peers, tags, worker.pid)
        worker.signal(getattr(signal, how))
        router.wait_for(r"removed \(it said KBYE\); 4 request\(s\) in flight", timeout=10)
        gate.touch()
        if how == "SIGTERM":
            assert worker.wait_exit(30) == 0
        assert set(peers.record.wait_for_tags(tags, 10, details=peers.logs)) == set(tags)

        a_control_given_up(addrs, client, router)
    assert router.count("possibly lost REQUEST") == 1, router.tail()


def a_control_given_up(addrs: RouterAddrs, client: Client, router: GreenRouter) -> None:
    """A raw worker takes a plain job, says KBYE ``leaving`` and falls
    silent; returns once the router has given that job up as possibly lost
    (past the deadline of any worker that said KBYE before it)."""
    import zmq

    from emq_green.protocol import KBYE_LEAVING, Message, queues_json

    control = zmq.Context.instance().socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 0)
    control.setsockopt(zmq.RCVTIMEO, 10_000)
    control.connect(addrs.backend)
    try:
        control.send_multipart(Message.new(
            Command.INFORM, queues_json([(10, "control")]), "worker").frames())
        assert Message.parse(control.recv_multipart()).command is Command.ACK
        control.send_multipart(Message.new(Command.READY).frames())
        lost = client.defer_job("interop_jobs.record", ["never-run"], queue="control")
        assert Message.parse(control.recv_multipart()).msgid == lost
        control.send_multipart(Message.new(Command.KBYE, KBYE_LEAVING).frames())
        assert Message.parse(control.recv_multipart()).command is Command.KBYE
        router.wait_for(f"possibly lost REQUEST {lost}", timeout=20)
    finally:
        control.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_the_plain_jobs_reported_lost_are_those_that_did_not_end(peers, tmp_path, how):
    """A READY names the job it follows (an emq-green worker's), so the
    router ends that one: the older jobs still running when a drain's grace
    runs out (SIGTERM) or the worker dies (kill -9) are the ones logged
    "possibly lost", not the younger ones that finished (a probe's find:
    the router took the oldest plain job for the one each READY ended)."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs, "--kill-grace-period", "1")
    worker = green_worker(peers, addrs, "cut", 4, "--kill-grace-period", "1")
    never, soon = tmp_path / "never", tmp_path / "soon"
    with Client(addrs.frontend, green=False) as client:
        long = [client.defer_job("interop_jobs.gated_record", [f"long{i}", str(never), 60.0])
                for i in range(2)]
        wait_started_on(peers, ["long0", "long1"], worker.pid)
        for i in range(2):
            client.defer_job("interop_jobs.gated_record", [f"short{i}", str(soon), 60.0])
        wait_started_on(peers, ["short0", "short1"], worker.pid)
        soon.touch()
        peers.record.wait_for_tags(["short0", "short1"], 10, details=peers.logs)
        if how == "SIGTERM":
            worker.signal(signal.SIGTERM)
            assert worker.wait_exit(30) == 0
        else:
            worker.kill()
        for msgid in long:
            router.wait_for(f"possibly lost REQUEST {msgid}", timeout=20)
    assert router.count("possibly lost REQUEST") == 2, router.tail()


@pytest.mark.timeout(120)
def test_a_long_job_behind_a_reload_keeps_its_result_past_the_router_s_grace(peers, tmp_path):
    """A SIGHUP retires the connection a job came on; the worker lets the
    job run to its end however long it takes. It beats on that connection,
    so the router keeps the job on its books past kill_grace_period +
    heartbeat_timeout: the REPLY counts and the result reaches its client
    (it was dropped as late, the job logged possibly lost)."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs, "--kill-grace-period", "1")
    worker = green_worker(peers, addrs, "reloaded", 2)
    gate = tmp_path / "gate"
    with Client(addrs.frontend, green=False) as client:
        handle = client.defer_job("interop_jobs.gated_record", ["long", str(gate), 60.0],
                                  result=True)
        wait_started_on(peers, ["long"], worker.pid)
        worker.signal(signal.SIGHUP)
        router.wait_for(r"removed \(it said KBYE\); 1 request\(s\) in flight", timeout=10)
        a_control_given_up(addrs, client, router)  # past the retired connection's deadline
        gate.touch()
        assert handle.get(timeout=20) == "long"
    assert router.count("possibly lost REQUEST") == 1, router.tail()
    assert router.status()["late_replies"] == 0


@pytest.mark.timeout(120)
def test_a_guaranteed_job_that_kills_its_workers_is_given_up(peers, tmp_path):
    """A probe's find: such a job was sent again for ever, and a supervisor
    restarting the worker saw it killed again and again. With
    ``--max-redeliveries 1`` it runs on two workers, then it is given up
    (out of the journal), and the next worker lives and works."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs, "--journal-file", str(tmp_path / "journal.db"),
                         "--max-redeliveries", "1")
    with Client(addrs.frontend, green=False, confirm_timeout=20) as client:
        client.defer_job("interop_jobs.record_then_die", ["poison"], guarantee=True)
    for n in range(2):  # a supervisor: the worker again, each time it died
        worker = green_worker(peers, addrs, f"w{n}", 10)
        wait_until(lambda w=worker: w.popen.poll() is not None, 20,
                   f"worker w{n} killed by the job", details=peers.logs)
        assert worker.popen.returncode == 3
    wait_until(lambda: router.status()["guaranteed_given_up"] == 1, 20,
               "the job given up", details=peers.logs)
    status = router.status()
    assert status["redelivered"] == 1 and status["guaranteed_held"] == 0
    assert peers.record.tags("start")["poison"] == 2
    assert router.count("given up") == 1

    survivor = green_worker(peers, addrs, "survivor", 10)
    send_guaranteed(addrs, ["after"], None)
    assert peers.record.wait_for_tags(["after"], 30, details=peers.logs)["after"] == 1
    assert survivor.alive
    assert peers.record.tags("start")["poison"] == 2  # never sent again
    wait_until(lambda: router.status()["journal_rows"] == 0, 10, "journal empty",
               details=peers.logs)
