"""The job manager against a fake router on real loopback sockets."""

from __future__ import annotations

import json
import logging
import os
import time

import gevent
import jobs_for_tests as J
import pytest
import zmq
from fakerouter import FakeRouter

from emq_green.jobmanager import State
from emq_green.protocol import Command, Message, RunRequest

JOBS = "jobs_for_tests"


def test_no_queues_of_its_own_announces_none_and_the_router_chooses(router, make_manager):
    """``queues = []``: EventMQ's job manager sends an empty queues text
    (never "[]"), and its router gives the worker the router's queues."""
    make_manager(queues=())
    router.wait_inform()
    assert router.messages(Command.INFORM)[0].message.body == ("", "worker")


def test_handshake_sends_inform_then_one_ready_per_slot(router, make_manager):
    manager = make_manager(concurrent_jobs=7, queues=((30, "fast"), (10, "default")))
    ident = router.wait_inform()
    inform = router.messages(Command.INFORM)[0]
    assert inform.message.body == ('[[30, "fast"], [10, "default"]]', "worker")
    assert ident.decode().startswith("test-worker:")
    router.wait_count(Command.READY, 7)
    # A job round trip proves the worker is past its start-up READYs: had it
    # sent more than 7, they would be in before this REPLY's READY.
    msgid = router.request(ident, JOBS, "add", args=[1, 2], headers="reply-requested")
    assert router.wait_reply(msgid) == {"value": 3}
    router.wait_count(Command.READY, 8)
    assert router.count(Command.READY) == 8
    assert manager.total_ready_sent == 8
    # frames exactly as EventMQ sends them: REPLY [reply_json, orig_msgid]
    raw = [f for f in router.raw if f[3] == b"REPLY"][0]
    assert raw[1:3] == [b"", b"eMQP/1.0"]
    assert json.loads(raw[5]) == {"value": 3} and raw[6] == msgid.encode()


def test_reply_only_when_requested_and_ready_after_each_job(router, make_manager):
    make_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    quiet = router.request(ident, JOBS, "add", args=[1, 1])
    loud = router.request(ident, JOBS, "add", args=[2, 2], headers="reply-requested")
    assert router.wait_reply(loud) == {"value": 4}
    router.wait_count(Command.READY, 4)
    assert quiet not in router.replies()


def test_slots_are_never_overcommitted(router, make_manager):
    manager = make_manager(concurrent_jobs=3)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 3)
    for i in range(3):
        router.request(ident, JOBS, "wait_gate", args=[f"g{i}"])
    router.wait_until(lambda: J.calls["wait_gate"] == 3)
    assert manager.free_slots == 0
    # a fourth REQUEST the router had no READY for still runs, in the backlog
    extra = router.request(ident, JOBS, "add", args=[5, 5], headers="reply-requested")
    router.wait_until(lambda: manager.counters["backlogged"] == 1)
    assert router.count(Command.READY) == 3
    J.gates["g0"].set()
    assert router.wait_reply(extra) == {"value": 10}
    # g0 and the extra job are done: the router is owed exactly... one READY
    # (3 slots, 2 jobs still running, 0 READYs outstanding -> 1)
    router.wait_count(Command.READY, 4)
    J.gates["g1"].set()
    J.gates["g2"].set()
    router.wait_count(Command.READY, 6)
    router.wait_until(lambda: not manager.jobs_in_flight)
    assert manager.free_slots == 3
    assert router.count(Command.READY) == 6  # 3 + one per slot that came back


def test_a_job_sent_again_while_it_runs_here_runs_once_and_answers_once(router,
                                                                         make_manager):
    """The router sends again a job this worker runs (it took the worker for
    dead, or restarted from its journal, and the worker came back): the copy
    is not run, not answered with an error (a router would take that as the
    job's end), and takes no slot: its READY is given back. The one REPLY is
    the job's own. The same msgid with another job is still refused."""
    manager = make_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    body = ["default", "reply-requested,guarantee",
            RunRequest(path=JOBS, callable="wait_gate", args=("again",)).payload()]
    frames = Message(Command.REQUEST, "job-sent-twice", tuple(body)).frames()
    router.send_raw(ident, frames)
    router.wait_until(lambda: J.calls["wait_gate"] == 1)
    router.send_raw(ident, frames)  # the copy
    router.wait_until(lambda: manager.counters["handed_again"] == 1)
    router.wait_count(Command.READY, 3)  # the copy's READY back: it took no slot
    assert manager.free_slots == 1 and len(manager.jobs_in_flight) == 1
    other = Message(Command.REQUEST, "job-sent-twice", (
        "default", "reply-requested", RunRequest(path=JOBS, callable="add",
                                                 args=(1, 2)).payload())).frames()
    router.send_raw(ident, other)
    router.wait_until(lambda: manager.counters["invalid_requests"] == 1)
    J.gates["again"].set()
    router.wait_until(lambda: not manager.jobs_in_flight)
    replies = [json.loads(r.message.body[0]) for r in router.messages(Command.REPLY)]
    assert {"value": "again"} in replies and J.calls["wait_gate"] == 1
    assert sum(r == {"value": "again"} for r in replies) == 1
    [refused] = [r for r in replies if r != {"value": "again"}]
    assert refused["error"]["type"] == "InvalidRequest"
    assert "with another job" in refused["error"]["message"]


def test_a_guaranteed_job_sent_again_as_its_reply_crossed_is_answered_not_run(router,
                                                                             make_manager):
    """The router sent the copy before the REPLY reached it (a worker taken
    for dead that came back, a restarted router): the job has just ended
    here, so the copy gets the same REPLY and takes no slot; it ran once. A
    plain job is not remembered."""
    manager = make_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    body = ["default", "reply-requested,guarantee",
            RunRequest(path=JOBS, callable="counted_nap", args=("ended", 0)).payload()]
    frames = Message(Command.REQUEST, "ended-then-sent-again", tuple(body)).frames()
    router.send_raw(ident, frames)
    router.wait_until(lambda: len(router.messages(Command.REPLY)) == 1)
    router.wait_count(Command.READY, 3)
    router.send_raw(ident, frames)  # the copy, after the job's end
    router.wait_until(lambda: len(router.messages(Command.REPLY)) == 2)
    router.wait_count(Command.READY, 4)  # the READY the copy used, offered again
    first, second = (r.message.body for r in router.messages(Command.REPLY))
    assert first == second and J.calls["ended"] == 1
    assert manager.counters["handed_again"] == 1 and manager.free_slots == 2

    plain = Message(Command.REQUEST, "plain-sent-again", (
        "default", "reply-requested",
        RunRequest(path=JOBS, callable="counted_nap", args=("plain", 0)).payload())).frames()
    router.send_raw(ident, plain)
    router.wait_until(lambda: J.calls["plain"] == 1)
    router.send_raw(ident, plain)
    router.wait_until(lambda: J.calls["plain"] == 2)  # not remembered: it runs


def test_the_memory_of_ended_guaranteed_jobs_is_bounded_in_bytes(router, make_manager,
                                                                 monkeypatch):
    """Ended guaranteed jobs are remembered with their encoded replies, the
    oldest forgotten once the replies pass ENDED_MEMORY_BYTES; a copy of a
    forgotten one runs again (at least once), a remembered one is answered."""
    from emq_green.worker import slots

    monkeypatch.setattr(slots, "ENDED_MEMORY_BYTES", 1500)
    manager = make_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)

    def frames(n):
        body = ("default", "reply-requested,guarantee",
                RunRequest(path=JOBS, callable="repeat", args=(str(n), 600)).payload())
        return Message(Command.REQUEST, f"big-{n}", body).frames()

    for n in range(3):
        router.send_raw(ident, frames(n))
        router.wait_until(lambda n=n: len(router.messages(Command.REPLY)) == n + 1)
    ended = manager._slots.ended_guaranteed
    assert list(ended) == ["big-1", "big-2"]
    assert manager._slots.ended_bytes == sum(len(e[3]) for e in ended.values()) <= 1500
    assert json.loads(ended["big-2"][3]) == {"value": "2" * 600}

    router.send_raw(ident, frames(2))  # remembered: answered, not run
    router.wait_until(lambda: len(router.messages(Command.REPLY)) == 4)
    assert manager.counters["handed_again"] == 1
    router.send_raw(ident, frames(0))  # forgotten: it runs again
    router.wait_until(lambda: len(router.messages(Command.REPLY)) == 5)
    assert manager.counters["handed_again"] == 1
    assert list(manager._slots.ended_guaranteed) == ["big-2", "big-0"]
    replies = [r.message.body for r in router.messages(Command.REPLY)]
    assert replies[3] == replies[2] and json.loads(replies[4][0]) == {"value": "0" * 600}


def test_class_path_with_class_args(router, make_manager):
    make_manager()
    ident = router.wait_inform()
    msgid = router.request(ident, f"{JOBS}:Greeter", "greet", args=["Ada"],
                           class_args=["Hello"], class_kwargs={"punctuation": "?"},
                           headers="reply-requested")
    assert router.wait_reply(msgid) == {"value": "Hello, Ada?"}


@pytest.mark.parametrize(
    "path, name, args, value_part, error_type",
    [
        ("no_such_module_xyz", "f", [], "No module named 'no_such_module_xyz'",
         "ModuleNotFoundError"),
        (JOBS, "missing_function", [], "missing_function", "AttributeError"),
        (JOBS, "not_callable", [], "not callable", "TypeError"),
        (JOBS, "boom", ["kaput"], "kaput", "ValueError"),
        (JOBS, "unserialisable", [], "not JSON serializable", "TypeError"),
        (JOBS, "add", [1], "missing 1 required positional argument", "TypeError"),
    ],
)
def test_failing_jobs_reply_with_error_and_return_the_slot(
        router, make_manager, path, name, args, value_part, error_type):
    manager = make_manager(concurrent_jobs=1)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 1)
    msgid = router.request(ident, path, name, args=args, headers="reply-requested")
    reply = router.wait_reply(msgid)
    assert value_part in reply["value"]
    assert reply["error"]["type"] == error_type
    # counted as what its reply says, not as a success
    assert (manager.counters["failed"], manager.counters["succeeded"]) == (1, 0)
    router.wait_count(Command.READY, 2)
    # the worker keeps working
    ok = router.request(ident, JOBS, "add", args=[1, 2], headers="reply-requested")
    assert router.wait_reply(ok) == {"value": 3}
    assert manager.state is State.RUNNING


def test_a_timeout_and_an_unsendable_value_are_logged_without_reply_requested(
        router, make_manager, caplog):
    """A probe's find: a job that timed out or returned what JSON cannot
    carry left no line in the worker's log (a job that raised did), so
    without reply-requested nobody could see it failed."""
    caplog.set_level(logging.WARNING, logger="emq_green")
    manager = make_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    late = router.request(ident, JOBS, "nap", args=[30], headers="timeout:0.3")
    odd = router.request(ident, JOBS, "unserialisable")
    counts = manager.counters
    router.wait_until(lambda: counts["timed_out"] == 1 and counts["failed"] == 1)
    text = caplog.text
    assert f"job {JOBS}.nap ({late}): {JOBS}.nap exceeded its timeout of 0.3 s" in text, text
    assert f"job {JOBS}.unserialisable ({odd}) returned a value JSON cannot carry: " in text
    assert "not JSON serializable" in text


def test_malformed_input_is_logged_answered_and_never_fatal(router, make_manager, caplog):
    manager = make_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    router.send_raw(ident, [b"", b"eMQP/9.9", b"REQUEST", b"x"])          # bad version
    router.send_raw(ident, [b"", b"eMQP/1.0", b"FROBNICATE", b"x"])       # unknown command
    router.send_raw(ident, [b"only-one-frame"])                           # too short
    router.send_raw(ident, [b"", b"eMQP/1.0", b"REQUEST", b"m1", b"\xff\xfe", b"", b"{}"])
    bad_json = router.send(ident, Command.REQUEST, "default", "reply-requested", "{not json")
    bad_shape = router.send(ident, Command.REQUEST, "default", "reply-requested",
                            '["run", {"path": "os"}]')
    short = router.send(ident, Command.REQUEST, "default", "reply-requested")
    bad_header = router.send(ident, Command.REQUEST, "default", "reply-requested,timeout:x",
                             '["run", {"path": "os", "callable": "getpid"}]')
    for msgid in (bad_json, bad_shape, short, bad_header):
        reply = router.wait_reply(msgid)
        assert reply["error"]["type"] == "InvalidRequest", reply
    # every REQUEST took a slot at the router, the one with a bad version and
    # the one that is not UTF-8 too: each one gives it back
    router.wait_count(Command.READY, 2 + 6)
    assert manager.counters["malformed_messages"] == 2
    assert manager.counters["invalid_requests"] == 6
    assert "unknown command" in caplog.text and "unsupported protocol version" in caplog.text
    ok = router.request(ident, JOBS, "add", args=[2, 3], headers="reply-requested")
    assert router.wait_reply(ok) == {"value": 5}


def test_timeout_header_stops_the_job_and_returns_the_slot(router, make_manager):
    manager = make_manager(concurrent_jobs=1, global_timeout=60)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 1)
    started = time.monotonic()
    msgid = router.request(ident, JOBS, "swallow_everything", args=[30],
                           headers="reply-requested,timeout:1")
    reply = router.wait_reply(msgid, timeout=10)
    assert reply["value"] == "TimeoutError"
    assert reply["error"]["type"] == "TimeoutError"
    # never early; cut short (the job would take 30 s: the wait above is 10)
    assert time.monotonic() - started >= 0.9
    router.wait_count(Command.READY, 2)
    assert manager.counters["timed_out"] == 1 and not manager.jobs_in_flight


def test_a_job_that_catches_its_timeout_still_timed_out(router, make_manager):
    # its bare except swallowed the JobTimeout and it replied with success
    manager = make_manager(concurrent_jobs=1)
    ident = router.wait_inform()
    msgid = router.request(ident, JOBS, "catch_the_timeout", args=[0.6],
                           headers="reply-requested,timeout:0.2")
    reply = router.wait_reply(msgid, timeout=10)
    assert reply["error"]["type"] == "TimeoutError", reply
    ok = router.request(ident, JOBS, "catch_the_timeout", args=[0.1],
                        headers="reply-requested,timeout:5")
    assert router.wait_reply(ok, timeout=10) == {"value": "done after catching 0"}
    assert manager.counters["timed_out"] == 1


def test_global_timeout_applies_without_header(router, make_manager):
    make_manager(global_timeout=0.5)
    ident = router.wait_inform()
    msgid = router.request(ident, JOBS, "nap", args=[30], headers="reply-requested")
    assert router.wait_reply(msgid, timeout=10)["value"] == "TimeoutError"


def test_retry_count_reruns_a_failing_job(router, make_manager):
    manager = make_manager()
    ident = router.wait_inform()
    enough = router.request(ident, JOBS, "flaky", args=["a", 2],
                            headers="reply-requested,retry-count:2")
    assert router.wait_reply(enough) == {"value": 3}
    too_few = router.request(ident, JOBS, "flaky", args=["b", 2],
                             headers="reply-requested,retry-count:1")
    reply = router.wait_reply(too_few)
    assert reply["value"] == "failure 2" and J.calls["b"] == 2
    assert manager.counters["succeeded"] == 1 and manager.counters["failed"] == 1


def test_entry_and_exit_functions_wrap_every_job(router, make_manager):
    make_manager(concurrent_jobs=1, job_entry_func=f"{JOBS}.entry",
                 job_exit_func=f"{JOBS}.exit_")
    ident = router.wait_inform()
    ok = router.request(ident, JOBS, "add", args=[1, 1], headers="reply-requested")
    router.wait_reply(ok)
    bad = router.request(ident, JOBS, "boom", headers="reply-requested")
    router.wait_reply(bad)
    assert J.events == ["entry", "exit", "entry", "exit"]


@pytest.mark.timeout(60)
def test_heartbeats_keep_flowing_while_500_jobs_wait_on_io(router, make_manager):
    """500 jobs hold every slot, waiting on IO until the test lets them go;
    meanwhile the worker's heartbeats keep coming (events, not a clock: the
    jobs end when the heartbeats have been seen, however slow the box)."""
    manager = make_manager(concurrent_jobs=500)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 500)
    for _ in range(500):
        router.request(ident, JOBS, "wait_gate", args=["hold"])
    router.wait_until(lambda: len(manager.jobs_in_flight) == 500, timeout=10)
    beats = router.count(Command.HEARTBEAT, ident)
    router.wait_until(lambda: router.count(Command.HEARTBEAT, ident) >= beats + 10, timeout=20)
    assert len(manager.jobs_in_flight) == 500 and J.calls["wait_gate"] == 500
    J.gates["hold"].set()
    router.wait_count(Command.READY, 1000, timeout=20)
    assert manager.counters["succeeded"] == 500


def test_router_death_reconnects_to_failover_and_keeps_running_jobs(make_manager):
    primary = FakeRouter(heartbeat_interval=0.2)
    failover = FakeRouter(heartbeat_interval=0.2)
    try:
        manager = make_manager(concurrent_jobs=4, worker_addr=primary.addr,
                               worker_addr_default=primary.addr,
                               worker_addr_failover=failover.addr)
        first = primary.wait_inform()
        primary.wait_count(Command.READY, 4)
        running = [primary.request(first, JOBS, "wait_gate", args=["r"],
                                   headers="reply-requested") for _ in range(2)]
        primary.wait_until(lambda: J.calls["wait_gate"] == 2)
        primary.close()  # the router dies: no more heartbeats, nothing answers
        second = failover.wait_inform(timeout=15)
        assert second != first and second.decode().startswith("test-worker:")
        # only the free slots are offered on the new connection
        failover.wait_count(Command.READY, 2)
        J.gates["r"].set()
        for msgid in running:  # replies of jobs from the old connection
            assert failover.wait_reply(msgid) == {"value": "r"}
        failover.wait_count(Command.READY, 4)
        assert len(failover.messages(Command.READY)) == 4
        assert manager.counters["router_lost"] == 1
        ok = failover.request(second, JOBS, "add", args=[2, 2], headers="reply-requested")
        assert failover.wait_reply(ok) == {"value": 4}
    finally:
        primary.close()
        failover.close()


@pytest.mark.timeout(60)
def test_a_worker_whose_fallback_addresses_are_dead_comes_back_to_its_own_router(make_manager):
    """worker_addr, then worker_addr_default and worker_addr_failover, then
    worker_addr again: it alternated between the two fallbacks for ever, so
    a router restarted at the worker's own address never saw it again."""
    from peers import free_ports

    dead = [f"tcp://127.0.0.1:{port}" for port in free_ports(2)]
    primary = FakeRouter(heartbeat_interval=0.2)
    addr = primary.addr
    again = None
    try:
        manager = make_manager(concurrent_jobs=2, worker_addr=addr, worker_addr_default=dead[0],
                               worker_addr_failover=dead[1])
        first = primary.wait_inform()
        primary.close()  # the router dies; nothing listens at the fallbacks
        deadline = time.monotonic() + 10
        while again is None:  # back at the same address (once the port is free)
            try:
                again = FakeRouter(addr=addr, heartbeat_interval=0.2)
            except zmq.ZMQError:
                assert time.monotonic() < deadline, "the old port stayed taken"
                gevent.sleep(0.05)
        second = again.wait_inform(timeout=30)
        assert second != first and manager.counters["router_lost"] >= 1
        again.wait_count(Command.READY, 2)
        ok = again.request(second, JOBS, "add", args=[1, 1], headers="reply-requested")
        assert again.wait_reply(ok) == {"value": 2}
    finally:
        primary.close()
        if again is not None:
            again.close()


def test_no_ack_means_retry_with_a_fresh_identity(make_manager):
    silent = FakeRouter(auto_ack=False)
    try:
        manager = make_manager(wait_running=False, name="w", worker_addr=silent.addr,
                               worker_addr_default=silent.addr,
                               worker_addr_failover=silent.addr, reconnect_timeout=0.3)
        silent.wait_until(lambda: len(silent.identities) >= 2, timeout=10)
        assert silent.identities[0] != silent.identities[1]
        assert manager.state is State.CONNECTING
        silent.send(silent.identities[-1], Command.ACK, "x")
        assert manager.wait_for_state(State.RUNNING, timeout=10)
        # a state's value works as well (it waited out its timeout, False)
        assert manager.wait_for_state("running", timeout=1)
        with pytest.raises(ValueError):
            manager.wait_for_state("runing", timeout=1)
        assert manager.stop(timeout=10, graceful=False)
    finally:
        silent.close()


def test_graceful_stop_finishes_running_jobs_and_runs_requests_on_the_wire(
        router, make_manager):
    # The drain reads until the router has been quiet for heartbeat_timeout:
    # 3 s, so that a busy machine's pause between the KBYE and the late
    # REQUEST below cannot end it first (the conftest's 0.5 s could).
    manager = make_manager(concurrent_jobs=4, heartbeat_timeout=3.0)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    running = [router.request(ident, JOBS, "nap", args=[0.5], headers="reply-requested")
               for _ in range(3)]
    router.wait_until(lambda: len(manager.jobs_in_flight) == 3)
    stopper = gevent.spawn(manager.stop, 10)
    router.wait_count(Command.KBYE, 1)
    kbye_at = router.messages(Command.KBYE)[0].at
    # the router had one more READY counted: its REQUEST crosses the KBYE
    late = router.request(ident, JOBS, "add", args=[1, 1], headers="reply-requested")
    assert stopper.get(timeout=10) is True
    assert manager.state is State.STOPPED
    replies = router.replies()
    assert all(replies[m] == {"value": 0.5} for m in running)
    assert replies[late] == {"value": 2}
    after = [r for r in router.received if r.at > kbye_at and r.identity == ident]
    assert {r.command for r in after} <= {Command.REPLY}


def test_grace_period_expiry_kills_jobs_and_says_so(router, make_manager):
    grace = 2.0
    manager = make_manager(concurrent_jobs=2, kill_grace_period=grace)
    ident = router.wait_inform()
    stuck = router.request(ident, JOBS, "nap", args=[60], headers="reply-requested")
    short = router.request(ident, JOBS, "wait_gate", args=["short"],
                           headers="reply-requested")
    router.wait_until(lambda: len(manager.jobs_in_flight) == 2 and J.calls["wait_gate"])
    started = time.monotonic()
    stopper = gevent.spawn(manager.stop, 30)
    router.wait_count(Command.KBYE, 1)
    # the short job ends inside the grace period: it is not killed
    J.gates["short"].set()
    assert router.wait_reply(short) == {"value": "short"}
    assert stopper.get(timeout=30) is True
    reply = router.wait_reply(stuck)
    assert reply["value"] == "Killed" and reply["error"]["type"] == "Killed"
    killed_at = next(r.at for r in router.messages(Command.REPLY)
                     if r.message.body[1] == stuck)
    # not before the grace period is over, and not long after it
    assert grace <= killed_at - started < grace + 5, killed_at - started


def test_a_job_that_will_not_die_does_not_crash_the_stop(router, make_manager, monkeypatch,
                                                         caplog):
    """A probe's find: a job that swallows GreenletExit made the kill at the
    end of a stop time out; the manager logged a crash, tried again, and the
    process exited 1 after ~12 s. Now the job is answered as Killed and the
    stop ends normally."""
    from emq_green.worker import slots

    monkeypatch.setattr(slots, "KILL_WAIT", 0.5)
    manager = make_manager(concurrent_jobs=2, kill_grace_period=0.5)
    ident = router.wait_inform()
    stubborn = router.request(ident, JOBS, "refuse_to_die", args=[30], headers="reply-requested")
    router.wait_until(lambda: len(manager.jobs_in_flight) == 1)
    started = time.monotonic()
    assert manager.stop(timeout=15) is True
    assert time.monotonic() - started < 5
    assert manager.crashed is None and manager.state is State.STOPPED
    reply = router.wait_reply(stubborn)
    assert reply["value"] == "Killed" and "did not end" in reply["error"]["message"]
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
    [line] = [r.getMessage() for r in caplog.records if "did not end within" in r.getMessage()]
    assert "refuse_to_die" in line
    assert manager.counters["killed"] == 1


def test_a_job_raising_greenlet_exit_fails_and_is_not_killed(router, make_manager):
    """GreenletExit raised by a job while the worker runs is the job's error,
    not a stop: answered as a failure of that type (a ``Killed`` answer
    makes the router send a guaranteed job again, for ever), and the slot
    and its greenlet go on serving."""
    manager = make_manager(concurrent_jobs=1)
    ident = router.wait_inform()
    msgid = router.request(ident, JOBS, "exit_greenlet", headers="reply-requested")
    reply = router.wait_reply(msgid)
    assert reply["error"]["type"] == "GreenletExit", reply
    assert manager.state is State.RUNNING
    assert manager.counters["failed"] == 1 and not manager.counters["killed"]
    ok = router.request(ident, JOBS, "add", args=[2, 3], headers="reply-requested")
    assert router.wait_reply(ok) == {"value": 5}


def test_second_stop_request_stops_at_once(router, make_manager):
    manager = make_manager(concurrent_jobs=2, kill_grace_period=60)
    ident = router.wait_inform()
    router.request(ident, JOBS, "nap", args=[60])
    router.wait_until(lambda: manager.jobs_in_flight)
    first = gevent.spawn(manager.stop, 30)
    router.wait_count(Command.KBYE, 1)
    assert manager.state is State.DRAINING
    started = time.monotonic()
    assert manager.stop(timeout=10)  # the second request
    assert time.monotonic() - started < 5
    assert first.get(timeout=5)


def test_router_disconnect_means_graceful_stop(router, make_manager):
    manager = make_manager()
    ident = router.wait_inform()
    router.send(ident, Command.DISCONNECT)
    assert manager.wait_for_state(State.STOPPED, timeout=10)
    router.wait_count(Command.KBYE, 1)


def test_check_worker_health_repairs_a_lost_job(router, make_manager):
    """A job whose greenlet died without reporting (here: killed before it
    ever ran, so none of its own cleanup ran) is completed as Killed, its
    reply sent and its slot offered again."""
    manager = make_manager(concurrent_jobs=1)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 1)
    # on_request (seed API) from this greenlet: the job greenlet is spawned,
    # and killed here before the hub ever runs it
    payload = RunRequest(path=JOBS, callable="add", args=(1, 2)).payload()
    manager.on_request("lost-1", ["default", "reply-requested", payload])
    record = manager.jobs_in_flight["lost-1"]
    assert record.greenlet is not None and not record.greenlet.dead
    record.greenlet.kill(block=True, timeout=5)
    assert record.greenlet.dead and not record.done
    assert "lost-1" in manager.jobs_in_flight and manager.free_slots == 0
    assert manager.check_worker_health() == 1
    assert record.done and not manager.jobs_in_flight
    reply = router.wait_reply("lost-1")
    assert reply["value"] == "Killed" and reply["error"]["type"] == "Killed"
    router.wait_count(Command.READY, 2)
    assert manager.check_worker_health() == 0  # repaired once, not twice
    # the slot really came back: a job runs in it
    ok = router.request(ident, JOBS, "add", args=[2, 2], headers="reply-requested")
    assert router.wait_reply(ok) == {"value": 4}
    router.wait_count(Command.READY, 3)
    assert router.count(Command.READY) == 3 and manager.free_slots == 1


def test_seed_api_members_exist(router, make_manager):
    manager = make_manager(concurrent_jobs=3, name="seed")
    assert manager.name == "seed" and manager.concurrent_jobs == 3
    assert manager.queues == ((10, "default"),)
    assert manager.outgoing is not None
    ident = router.wait_inform()
    router.wait_count(Command.READY, 3)
    manager.send_reply({"value": "hand-made"}, "abc")
    assert router.wait_reply("abc") == {"value": "hand-made"}
    # on_heartbeat (seed API) runs the health check: a job whose greenlet
    # died unreported is repaired, its reply sent, its slot offered again
    payload = RunRequest(path=JOBS, callable="add", args=(1, 2)).payload()
    manager.on_request("lost-hb", ["default", "reply-requested", payload])
    manager.jobs_in_flight["lost-hb"].greenlet.kill(block=True, timeout=5)
    manager.on_heartbeat("m", ["1"])
    assert "lost-hb" not in manager.jobs_in_flight
    assert router.wait_reply("lost-hb")["error"]["type"] == "Killed"
    router.wait_count(Command.READY, 4)
    assert manager.total_requests == 1 and manager.pid_distribution == {}
    router.request(ident, JOBS, "add", args=[1, 2])
    router.wait_count(Command.READY, 5)
    import os
    assert manager.pid_distribution == {os.getpid(): 1}
    assert manager.total_requests == 2
    with pytest.raises(ValueError):
        manager.handle_response({"callback": "no_such_callback", "msgid": None})
    # premature_death is kept as a no-op: it returns nothing and changes
    # nothing (no slot, no counter, nothing sent)
    def sent() -> list[Command]:
        return [r.command for r in router.messages() if r.command is not Command.HEARTBEAT]

    before = (dict(manager.counters), manager.free_slots, dict(manager.jobs_in_flight),
              len(sent()))
    assert manager.premature_death(None, None) is None
    assert manager.premature_death({"value": 1}, "abc") is None
    ping = router.request(ident, JOBS, "add", args=[0, 0], headers="reply-requested")
    assert router.wait_reply(ping) == {"value": 0}  # all it sent came before this
    # the READY follows the REPLY: wait for it, then nothing else may be there
    router.wait_until(lambda: len(sent()) >= before[3] + 2)
    assert sent()[before[3]:] == [Command.REPLY, Command.READY]  # that job's, nothing else
    assert (manager.free_slots, manager.jobs_in_flight) == (before[1], before[2])
    assert manager.counters["succeeded"] == before[0]["succeeded"] + 1


def test_unpatched_embedding_warns(router, make_manager, caplog):
    make_manager()
    assert "gevent has not patched" in caplog.text


def test_message_frames_round_trip():
    msg = Message.new(Command.REPLY, '{"value": 1}', "orig")
    assert Message.parse(msg.frames()) == msg


@pytest.mark.timeout(90)
def test_thousands_of_jobs_on_credit_all_complete_once(router, make_manager):
    """Like a real router: one REQUEST per READY counted, 3,000 short jobs.
    The fake router shares this loop with the worker and the test's sender:
    a busy machine's pause must not make the worker take it for dead (the
    conftest's heartbeats give it 1.5 s), as router loss is not tested here."""
    manager = make_manager(concurrent_jobs=50, heartbeat_timeout=5.0)
    ident = router.wait_inform()
    total, sent = 3000, []
    credit_used = 0
    deadline = time.monotonic() + 60
    while len(sent) < total:
        assert time.monotonic() < deadline, f"stuck at {len(sent)} sent"
        readies = router.count(Command.READY, ident)
        while credit_used < readies and len(sent) < total:
            sent.append(router.request(ident, JOBS, "nap", args=[0.001 * (len(sent) % 7)],
                                       headers="reply-requested"))
            credit_used += 1
        used = credit_used
        router.wait_until(lambda: router.count(Command.READY, ident) > used  # noqa: B023
                          or len(sent) == total, timeout=10)
    router.wait_until(lambda: len(router.replies()) == total, timeout=30)
    replies = [r for r in router.messages(Command.REPLY)]
    assert len(replies) == total  # none twice
    assert set(router.replies()) == set(sent)
    # every slot came back: 50 at start + one per job
    router.wait_count(Command.READY, total + 50)
    assert router.count(Command.READY) == total + 50
    assert manager.free_slots == 50 and manager.counters["backlogged"] == 0


def test_jobs_leave_no_reference_cycles(router, make_manager):
    """Everything a job allocates is freed by reference counting as it ends,
    which is what lets the console script collect garbage rarely
    (cli.tune_gc). A cycle per job would show here as hundreds of objects."""
    import gc

    make_manager(concurrent_jobs=20)
    ident = router.wait_inform()

    def run_jobs(n: int) -> None:
        msgids = [router.request(ident, JOBS, "add", args=[i, 1], headers="reply-requested")
                  for i in range(n)]
        router.wait_until(lambda: set(msgids) <= set(router.replies()), timeout=30)

    run_jobs(50)  # warm up: imports, caches, parked greenlets
    # Greenlets of managers stopped by earlier tests may still be ending
    # (their exceptions' tracebacks are cycles): a first window takes those.
    gc.collect()
    gc.disable()
    try:
        run_jobs(200)
        gc.collect()
        run_jobs(400)
        found = gc.collect()
    finally:
        gc.enable()
    assert found < 100, f"{found} objects in reference cycles after 400 jobs"


EMBEDDED_APP = """
from gevent import monkey
monkey.patch_all()
import json, os, signal, sys
from emq_green.jobmanager import JobManager, State
from emq_green.settings import Settings

got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append("usr1"))
signal.signal(signal.SIGTERM, lambda *_: got.append("term"))
addr = sys.argv[1]
manager = JobManager(settings=Settings(worker_addr=addr, worker_addr_default=addr,
                                       worker_addr_failover=addr))
manager.start()  # the manager's handlers are installed when start() returns
os.kill(os.getpid(), signal.SIGUSR1)  # the manager's: a status line
assert manager.wait_for_state(State.CONNECTING, timeout=10)
assert manager.stop(timeout=10, graceful=False)
os.kill(os.getpid(), signal.SIGUSR1)  # the application's again
os.kill(os.getpid(), signal.SIGTERM)
print(json.dumps(got))
"""


@pytest.mark.timeout(60)
def test_an_embedded_manager_gives_the_signals_back_to_the_application_when_it_stops(
        tmp_path):
    """Its gevent handlers, cancelled, left SIGUSR1 and SIGTERM at the
    default action: the application died on the next one."""
    import subprocess
    import sys

    from peers import clean_env, free_port

    script = tmp_path / "app.py"
    script.write_text(EMBEDDED_APP)
    done = subprocess.run([sys.executable, str(script), f"tcp://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=50, env=clean_env(),
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["usr1", "term"]


@pytest.mark.parametrize("raises", ["RuntimeError", "SystemExit", "GreenletExit"])
@pytest.mark.parametrize("subprocess", [False, True], ids=["in the worker", "in a pool child"])
def test_an_exception_whose_message_cannot_be_read_is_retried_and_reported(
        router, make_manager, subprocess, raises, caplog):
    """A probe's find: a job's exception whose ``__str__`` raises took the
    runner down (no retries, the reply a RuntimeError from ``__str__``) and,
    in the subprocess pool, the child itself."""
    manager = make_manager(**(dict(subprocess_pool_size=1) if subprocess else {}))
    ident = router.wait_inform()
    child = None
    if subprocess:
        before = router.request(ident, JOBS, "pid", subprocess=True, headers="reply-requested")
        child = router.wait_reply(before)["value"]
    msgid = router.request(ident, JOBS, "raise_unprintable", args=["u", raises],
                           subprocess=subprocess, headers="reply-requested,retry-count:2")
    reply = router.wait_reply(msgid)
    assert reply["error"]["type"] == "Unprintable"
    assert "could not be read" in reply["error"]["message"]
    assert not [r for r in caplog.records if "crashed the runner" in r.getMessage()]
    assert reply["value"] == reply["error"]["message"]
    if subprocess:  # the same child runs the next job: it did not die
        after = router.request(ident, JOBS, "pid", subprocess=True, headers="reply-requested")
        assert router.wait_reply(after)["value"] == child != os.getpid()
    else:
        assert J.calls["u"] == 3  # run, and retried twice
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == (0 if subprocess else 2)  # (a child logs to its own stderr)
    assert manager.counters["failed"] == 1


def test_a_huge_exception_message_is_cut_in_the_log_not_in_the_reply(router, make_manager,
                                                                    caplog):
    make_manager()
    ident = router.wait_inform()
    msgid = router.request(ident, JOBS, "raise_huge", args=[1_000_000],
                           headers="reply-requested")
    reply = router.wait_reply(msgid)
    assert reply["error"]["type"] == "ValueError" and len(reply["value"]) == 1_000_000
    [line] = [r.getMessage() for r in caplog.records if "raise_huge raised" in r.getMessage()]
    assert len(line) < 2_200
