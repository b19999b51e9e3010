"""Security, round two (issue 20), on real sockets: each hole as a hostile
client, worker or web page would try it, failing safely while legitimate
jobs and results keep flowing.

* REPLY ownership: a REPLY from a worker that does not hold the msgid is
  refused and counted (while the job is buffered, in flight elsewhere, or
  held by a worker that left); the holder's REPLY still goes through, also
  after its KBYE; a dead worker's late REPLY is dropped.
* msgid reuse: a second REQUEST with a msgid that is buffered, in flight or
  waiting for its result is refused (the client's handle raises JobError
  ``DuplicateMsgid``); the first owner keeps its result.
* msgids are unguessable; HTTP JSON pages show none.
* Pending results: bounded by a per-client share and by bytes; the newcomer
  is refused, nobody is evicted.
* Over-long msgids: refused at the router and at the worker, never held.

The allowlist, INFORM limits, HTTP and flood cases are in
``test_security_limits.py``. Every wait has a deadline.
"""

from __future__ import annotations

import json
import uuid

import gevent
import pytest
from conftest import stop_for_good
from test_router import Harness, Peer, make_router, wait_until

from emq_green import protocol
from emq_green.client import Client, JobError
from emq_green.limits import MAX_MSGID_BYTES
from emq_green.protocol import Command, Message, new_msgid

__all__ = ["make_router"]  # the fixture

RESULT = "reply-requested,result-requested"
PAYLOAD = '["run", {"path": "jobs_for_tests", "callable": "add", "args": [1, 2]}]'


def send_request(peer: Peer, msgid: str, headers: str = RESULT, queue: str = "default") -> None:
    peer.sock.send_multipart(Message(Command.REQUEST, msgid, (queue, headers, PAYLOAD)).frames())


def results_of(client: Peer, count: int, timeout: float = 5.0) -> list[tuple[str, dict]]:
    """``count`` REPLYs with two body frames (results and refusals), acks skipped."""
    found = []
    while len(found) < count:
        message = client.recv(timeout=timeout)
        if message.command is Command.REPLY and len(message.body) == 2:
            found.append((message.body[1], json.loads(message.body[0])))
    return found


def no_result(client: Peer, wait: float = 0.3) -> bool:
    """Nothing but acknowledgements arrives within ``wait`` s."""
    try:
        results_of(client, 1, timeout=wait)
    except AssertionError:
        return True
    return False


# ----------------------------------------------------------------------
# REPLY ownership (fails on main: any registered worker's REPLY was forwarded)

@pytest.mark.timeout(30)
def test_a_forged_reply_from_a_second_worker_is_refused_the_real_one_delivered(make_router):
    h: Harness = make_router()
    honest = h.worker(queues=[(10, "default")], slots=0, name="honest")
    forger = h.worker(queues=[(10, "other")], slots=1, name="forger")
    client = h.peer("frontend", "victim")

    # 1. while the job waits in the buffer (no slot anywhere for default)
    buffered = new_msgid()
    send_request(client, buffered)
    wait_until(lambda: h.router.waiting.get("default"), what="the request is buffered")
    forger.send(Command.REPLY, json.dumps({"value": "forged"}), buffered)
    wait_until(lambda: h.router.counters["late_replies"] == 1, what="the forgery refused")
    assert no_result(client)

    # 2. while it runs on the honest worker
    honest.send(Command.READY)
    assert honest.recv().msgid == buffered
    forger.send(Command.REPLY, json.dumps({"value": "forged again"}), buffered)
    wait_until(lambda: h.router.counters["late_replies"] == 2, what="second forgery refused")
    assert no_result(client)
    assert buffered in h.router.results  # the victim still waits for its result

    # the holder's REPLY goes through, once
    honest.send(Command.REPLY, json.dumps({"value": 3}), buffered)
    assert results_of(client, 1) == [(buffered, {"value": 3})]
    honest.send(Command.REPLY, json.dumps({"value": "again"}), buffered)  # not twice
    wait_until(lambda: h.router.counters["late_replies"] == 3, what="replay refused")
    assert no_result(client)
    status = h.admin(Command.STATUS)
    assert status["late_replies"] == 3 and status["results_forwarded"] == 1
    # the forger is still a worker in good standing for its own queue
    assert forger.identity in h.router.workers


@pytest.mark.timeout(30)
def test_replies_after_kbye_still_count_a_dead_workers_do_not(make_router):
    h: Harness = make_router(heartbeat_interval=0.1, heartbeat_timeout=0.5)
    leaving = h.worker(slots=2, name="leaving")
    forger = h.worker(queues=[(10, "other")], slots=0, name="forger2")
    client = h.peer("frontend")
    first, second = new_msgid(), new_msgid()
    send_request(client, first)
    send_request(client, second)
    assert {leaving.recv().msgid, leaving.recv().msgid} == {first, second}
    leaving.send(Command.KBYE)
    wait_until(lambda: leaving.identity not in h.router.workers, what="it left")
    # a job that ran on after KBYE: its holder's REPLY still reaches the client
    forger.send(Command.REPLY, json.dumps({"value": "forged"}), first)
    wait_until(lambda: h.router.counters["late_replies"] == 1, what="forgery refused")
    leaving.send(Command.REPLY, json.dumps({"value": "real"}), first)
    assert results_of(client, 1) == [(first, {"value": "real"})]

    # a worker removed as dead: its jobs are reported lost, a late REPLY is dropped
    dying = h.worker(slots=1, name="dying")
    third = new_msgid()
    send_request(client, third)
    assert dying.recv().msgid == third
    wait_until(lambda: dying.identity not in h.router.workers, timeout=5,
               what="the silent worker removed")  # (the harness peer sends no heartbeats)
    [(msgid, lost)] = results_of(client, 1)
    assert msgid == third and lost["reason"] == "worker_lost"
    refused = h.router.counters["late_replies"]
    dying.send(Command.REPLY, json.dumps({"value": "late"}), third)
    wait_until(lambda: h.router.counters["late_replies"] == refused + 1, what="late refused")
    assert no_result(client)
    leaving.send(Command.REPLY, json.dumps({"value": "real 2"}), second)
    assert results_of(client, 1) == [(second, {"value": "real 2"})]


# ----------------------------------------------------------------------
# msgid reuse (fails on main: the second client took the result over)

@pytest.mark.timeout(30)
def test_a_pending_msgid_reused_by_a_second_client_is_refused(make_router):
    h: Harness = make_router()
    owner = h.peer("frontend", "owner")
    thief = h.peer("frontend", "thief")
    msgid = new_msgid()

    send_request(owner, msgid)  # buffered: no worker yet
    wait_until(lambda: h.router.waiting.get("default"), what="buffered")
    send_request(thief, msgid)
    [(refused_id, refusal)] = results_of(thief, 1)
    assert refused_id == msgid
    assert refusal["error"]["type"] == "DuplicateMsgid" and refusal["refused"] == "msgid_taken"

    worker = h.worker(slots=0)
    worker.send(Command.READY)
    assert worker.recv().msgid == msgid
    send_request(thief, msgid, headers="reply-requested")  # in flight now; no result asked
    [(_, refusal)] = results_of(thief, 1)
    assert refusal["error"]["type"] == "DuplicateMsgid"
    assert len(h.router.waiting.get("default", ())) == 0  # never buffered either

    worker.send(Command.REPLY, json.dumps({"value": "mine"}), msgid)
    assert results_of(owner, 1) == [(msgid, {"value": "mine"})]
    assert no_result(thief)
    status = h.admin(Command.STATUS)
    assert status["requests_refused_by_reason"] == {"msgid_taken": 2}
    assert status["processed_messages_by_queue"] == {"default": 1}  # it ran once

    # once settled, the msgid is free again (EventMQ's clients never reuse one)
    send_request(thief, msgid)
    worker.send(Command.READY)
    assert worker.recv().msgid == msgid


@pytest.mark.timeout(30)
def test_the_clients_handle_raises_job_error_for_a_reused_msgid(make_router, monkeypatch):
    h: Harness = make_router()
    fixed = str(uuid.uuid4())
    monkeypatch.setattr(protocol, "new_msgid", lambda: fixed)
    with Client(h.router.endpoints["frontend"], green=True) as first, \
            Client(h.router.endpoints["frontend"], green=True) as second:
        waiting = first.defer_job("jobs_for_tests.add", [1, 2], result=True)
        wait_until(lambda: h.router.waiting.get("default"), what="buffered")
        stolen = second.defer_job("jobs_for_tests.add", [1, 2], result=True)
        with pytest.raises(JobError) as refused:
            stolen.get(timeout=5)
        assert refused.value.type == "DuplicateMsgid"
        monkeypatch.undo()
        worker = h.worker(slots=0)
        worker.send(Command.READY)
        request = worker.recv()
        worker.send(Command.REPLY, json.dumps({"value": "first's"}), request.msgid)
        assert waiting.get(timeout=5) == "first's"


# ----------------------------------------------------------------------
# unguessable msgids (fails on main: a fixed per-process prefix and a counter)

def test_msgids_are_uuid4_text_with_no_shared_prefix():
    ids = [new_msgid() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)
    # 2,000 ids of 122 random bits: the first 8 hex digits are almost all distinct
    assert len({i[:8] for i in ids}) > 1990
    assert len({i[-12:] for i in ids}) == len(ids)
    # ids made in many greenlets at once are still distinct
    made: list[str] = []
    gevent.joinall([gevent.spawn(lambda: made.extend(new_msgid() for _ in range(300)))
                    for _ in range(10)])
    assert len(set(made)) == 3000


# ----------------------------------------------------------------------
# pending results: per-client share and bytes (fails on main: no such bounds,
# and a full map evicted the oldest, anyone's)

@pytest.mark.timeout(30)
def test_one_client_cannot_fill_the_pending_map_nor_evict_others(make_router):
    h: Harness = make_router(max_pending_results=10, max_pending_results_per_client=3)
    greedy = h.peer("frontend", "greedy")
    modest = h.peer("frontend", "modest")
    greedy_ids = [new_msgid() for _ in range(5)]
    for msgid in greedy_ids:
        send_request(greedy, msgid)
    refused = results_of(greedy, 2)
    assert [m for m, _ in refused] == greedy_ids[3:]
    assert all(r["error"]["type"] == "TooManyPendingResults"
               and r["refused"] == "results_client_share" for _, r in refused)
    modest_id = new_msgid()
    send_request(modest, modest_id)
    worker = h.worker(slots=0)
    for _ in range(4):
        worker.send(Command.READY)
    got = {worker.recv().msgid for _ in range(4)}
    assert got == {*greedy_ids[:3], modest_id}
    worker.send(Command.REPLY, json.dumps({"value": "ok"}), modest_id)
    assert results_of(modest, 1) == [(modest_id, {"value": "ok"})]
    status = h.admin(Command.STATUS)
    assert status["results_refused_by_reason"] == {"client_share": 2}
    assert status["results_dropped_by_reason"] == {}
    assert status["max_pending_results_per_client"] == 3


@pytest.mark.timeout(30)
def test_pending_results_are_bounded_in_bytes(make_router):
    from emq_green.router.results import ENTRY_OVERHEAD

    long_id = "m" * MAX_MSGID_BYTES
    h: Harness = make_router(max_pending_result_bytes=3 * (MAX_MSGID_BYTES + ENTRY_OVERHEAD + 40))
    client = h.peer("frontend", "bytes-client")
    h_client = h.peer("frontend", "short-ids")
    sent = [f"{long_id[:-2]}{i:02d}" for i in range(4)]
    for msgid in sent:
        send_request(client, msgid)
    [(msgid, refusal)] = results_of(client, 1)
    assert msgid == sent[3] and refusal["refused"] == "results_bytes"
    held = h.router.results.bytes
    assert 3 * MAX_MSGID_BYTES < held <= h.router.settings.max_pending_result_bytes
    # a short id still fits in what is left, or is refused: never an eviction
    send_request(h_client, new_msgid())
    assert h.admin(Command.STATUS)["results_dropped_by_reason"] == {}
    assert all(m in h.router.results for m in sent[:3])


# ----------------------------------------------------------------------
# over-long msgids (fails on main: held as long as max_message_size allows)

@pytest.mark.timeout(30)
def test_an_over_long_msgid_is_refused_at_the_router_and_never_held(make_router):
    h: Harness = make_router()
    client = h.peer("frontend")
    longest = "x" * MAX_MSGID_BYTES
    too_long = "y" * (MAX_MSGID_BYTES + 1)
    wide = "é" * (MAX_MSGID_BYTES // 2 + 1)  # 65 characters, 130 bytes
    for msgid in (too_long, wide, "z" * 100_000):
        send_request(client, msgid)
        [(refused_id, refusal)] = results_of(client, 1)
        assert refused_id == msgid and refusal["error"]["type"] == "InvalidRequest"
        assert refusal["refused"] == "msgid_too_long"
    send_request(client, longest)
    wait_until(lambda: longest in h.router.results, what="the longest allowed is held")
    assert len(h.router.results) == 1 and not h.router.routing.taken_msgid(too_long)
    assert h.admin(Command.STATUS)["requests_refused_by_reason"] == {"msgid_too_long": 3}


@pytest.mark.timeout(30)
def test_an_over_long_msgid_is_refused_at_the_worker(router, make_manager):
    manager = make_manager(concurrent_jobs=1)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 1)
    too_long = "w" * (MAX_MSGID_BYTES + 1)
    payload = '["run", {"path": "jobs_for_tests", "callable": "add", "args": [1, 2]}]'
    router.socket.send_multipart([ident, *Message(Command.REQUEST, too_long, (
        "default", "reply-requested", payload)).frames()])
    reply = router.wait_reply(too_long)
    assert reply["error"]["type"] == "InvalidRequest" and "msgid" in reply["value"]
    router.wait_count(Command.READY, 2)  # the slot came back
    assert too_long not in manager.jobs_in_flight
    assert manager.counters["invalid_requests"] == 1
    ok = router.request(ident, "jobs_for_tests", "add", args=[2, 2], headers="reply-requested")
    assert router.wait_reply(ok) == {"value": 4}


# ----------------------------------------------------------------------
# results across a reload: the REPLY leaves on the connection the job came
# on, which the router accepts (passes on main, where any REPLY was taken;
# guards the worker's half of REPLY ownership)

@pytest.mark.timeout(60)
def test_a_result_survives_a_reload_of_the_worker(make_router):
    import jobs_for_tests as J

    from emq_green.jobmanager import JobManager, State
    from emq_green.settings import Settings

    J.reset()
    h: Harness = make_router(heartbeat_interval=0.2, heartbeat_timeout=1.0)
    backend = h.router.endpoints["backend"]
    settings = Settings(name="reloading", worker_addr=backend, worker_addr_default=backend,
                        worker_addr_failover=backend, concurrent_jobs=2,
                        heartbeat_interval=0.2, heartbeat_timeout=1.0, reconnect_timeout=1.0)
    manager = JobManager(settings=settings, skip_signal=True,
                         settings_loader=lambda: settings)
    manager.start()
    try:
        assert manager.wait_for_state(State.RUNNING, timeout=10)
        with Client(h.router.endpoints["frontend"], green=True) as client:
            handle = client.defer_job("jobs_for_tests.wait_gate", ["g"], result=True)
            wait_until(lambda: J.calls["wait_gate"] == 1, what="the job runs")
            connections = manager.counters["connections"]
            manager.reload()
            wait_until(lambda: manager.counters["connections"] > connections, timeout=10,
                       what="the new connection")
            J.gates["g"].set()
            assert handle.get(timeout=10) == "g"
            assert h.router.counters["late_replies"] == 0
            after = client.defer_job("jobs_for_tests.add", [1, 1], result=True)
            assert after.get(timeout=10) == 2
    finally:
        # a graceful stop, and a manager that does not stop is killed: it
        # cannot outlive the test (conftest's stop_for_good)
        assert manager.stop(timeout=10) or stop_for_good(manager)
