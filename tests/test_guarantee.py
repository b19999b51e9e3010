# ruff: noqa: F811  (make_router: the fixture of test_router.py, as a parameter)
"""Guaranteed requests in emq-green's router, in this process, with real
sockets on loopback: fake workers and clients are ``zmq.green`` DEALERs
(see ``test_router.py``), so every step is observed on the wire.

What is checked: a guaranteed request is confirmed when it is safe
(buffered or not), goes out with ``reply-requested``, comes back to the head
of its queue when its worker dies, silently or by a ``Killed`` reply, and
runs elsewhere; a late REPLY is dropped and counted, never forwarded twice;
with a journal it survives the router; a plain request keeps EventMQ's
behaviour.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from typing import Iterator, Optional

import gevent
import pytest
from test_metrics import http_get
from test_router import (
    ANY_PORT,
    Harness,
    make_router,  # noqa: F401 (the fixture)
    wait_until,
)

from emq_green.protocol import Command, Message
from emq_green.router import Router
from emq_green.router import journal as journal_module
from emq_green.router.journal import Journal
from emq_green.settings import Settings

FAST = dict(heartbeat_interval=0.1, heartbeat_timeout=0.5)
PAYLOAD = '["run", {"path": "os", "callable": "getpid"}]'
KILLED = json.dumps({"value": "Killed", "error": {"type": "Killed", "message": "stopping"}})


def guaranteed(h: Harness, client, headers: str = "guarantee", queue: str = "default"):
    return h.request(client, queue=queue, headers=headers, payload=PAYLOAD)


def out_with_its_result(make_router, slots: int, name: str):
    """A router, a client and a worker ``name`` running one guaranteed
    request that asked for its result, acknowledged:
    ``(harness, client, worker, request)``."""
    h = make_router(**FAST)
    client = h.peer("frontend")
    worker = h.worker(slots=slots, name=name)
    sent = guaranteed(h, client, headers="guarantee,result-requested")
    assert worker.recv().msgid == sent.msgid
    assert client.recv().body == (sent.msgid,)  # acknowledged
    return h, client, worker, sent


def join(h: Harness, ready: int, name: str = "", beat: bool = False,
         queues=((10, "default"),)):
    """A worker that INFORMs, then sends ``ready`` READYs (which buffered
    requests may use at once); with ``beat``, it sends HEARTBEATs too (a
    fake worker is otherwise silent, and taken for dead)."""
    worker = h.worker(queues=queues, slots=0, name=name)
    for _ in range(ready):
        worker.send(Command.READY)
    if beat:
        def heartbeats() -> None:
            while not worker.sock.closed:
                worker.send(Command.HEARTBEAT, "0")
                gevent.sleep(FAST["heartbeat_interval"])

        gevent.spawn(heartbeats)
    return worker


def test_guaranteed_request_is_confirmed_when_buffered_and_sent_with_reply_requested(
        make_router):
    h = make_router()
    client = h.peer("frontend")
    sent = guaranteed(h, client)
    # no worker: still confirmed, because the router holds it now
    ack = client.recv()
    assert ack.command is Command.REPLY and ack.body == (sent.msgid,)
    assert h.router.status()["guaranteed_held"] == 1

    worker = join(h, 1)
    got = worker.recv()
    assert got.msgid == sent.msgid
    assert set(got.body[1].split(",")) == {"guarantee", "reply-requested"}
    assert got.body[0] == "default" and got.body[2] == PAYLOAD

    worker.send(Command.REPLY, '{"value": 7}', sent.msgid)
    wait_until(lambda: h.router.status()["guaranteed_held"] == 0, what="job finished")
    assert client.pending() == []  # the client did not ask for the result


def test_plain_request_keeps_eventmq_behaviour(make_router):
    h = make_router(**FAST)
    client = h.peer("frontend")
    sent = h.request(client)  # buffered: EventMQ sends no acknowledgement
    # (in the buffer before the worker joins: the two sockets are not ordered)
    wait_until(lambda: "default" in h.router.waiting, timeout=5, what="request buffered")
    worker = join(h, 1)
    got = worker.recv()
    assert got.body[1] == ""  # forwarded untouched
    assert client.pending() == []
    worker.close()  # dies without a reply: the job is not sent again
    wait_until(lambda: worker.identity not in h.router.workers, timeout=5,
               what="dead worker removed")
    other = h.worker(slots=1)
    assert other.pending() == [] and h.router.status()["redelivered"] == 0
    assert h.router.counters["possibly_lost"] == 1
    assert sent.msgid not in {m.msgid for m in other.pending()}


def test_dead_worker_jobs_run_elsewhere_and_its_late_reply_is_dropped(make_router, caplog):
    caplog.set_level(logging.INFO, logger="emq_green")
    h = make_router(**FAST)
    client = h.peer("frontend")
    dying = h.worker(slots=3, name="dying")
    sent = [guaranteed(h, client, headers="guarantee,reply-requested,result-requested")
            for _ in range(3)]
    assert [dying.recv().msgid for _ in range(3)] == [m.msgid for m in sent]
    acks = [client.recv() for _ in range(3)]
    assert {a.body for a in acks} == {(m.msgid,) for m in sent}  # confirmed, one frame

    # it falls silent (a SIGSTOP, a dead host): removed, its jobs go again
    wait_until(lambda: b"dying" not in h.router.workers, timeout=5, what="worker removed")
    assert h.router.status()["redelivered"] == 3
    [removed] = [r.getMessage() for r in caplog.records if "removed (" in r.getMessage()]
    assert "3 request(s) in flight there: 3 guaranteed, sent again; 0 not re-dispatched" \
        in removed, removed
    other = join(h, 3, name="other")
    again = [other.recv() for _ in range(3)]
    assert [m.msgid for m in again] == [m.msgid for m in sent]  # in their old order

    # the first worker comes back and answers: too late, dropped and counted;
    # and it is told to connect anew (KBYE), once
    dying.send(Command.REPLY, '{"value": "stale"}', sent[0].msgid)
    wait_until(lambda: h.router.status()["late_replies"] == 1, what="late reply counted")
    assert dying.recv().command is Command.KBYE
    dying.send(Command.HEARTBEAT, "0")
    dying.send(Command.REPLY, '{"value": "stale"}', sent[1].msgid)
    wait_until(lambda: h.router.status()["late_replies"] == 2, what="second late reply")
    assert dying.pending() == []  # told once
    for m in again:
        other.send(Command.REPLY, json.dumps({"value": m.msgid}), m.msgid)
    results = [client.recv() for _ in range(3)]
    assert sorted(json.loads(r.body[0])["value"] for r in results) == sorted(
        m.msgid for m in sent)
    wait_until(lambda: h.router.status()["guaranteed_held"] == 0, what="all finished")
    assert client.pending() == []  # never a second result


def test_a_reply_from_the_worker_that_ran_it_ends_the_copy_waiting_in_the_buffer(make_router):
    # a lone worker stopped past the timeout: its jobs wait in the buffer to
    # run again; it comes back and answers: the copies were run as well
    h = make_router(**FAST)
    client = h.peer("frontend")
    lone = h.worker(slots=2, name="lone")
    ended, killed = (guaranteed(h, client, headers="guarantee,result-requested")
                     for _ in range(2))
    assert {lone.recv().msgid for _ in range(2)} == {ended.msgid, killed.msgid}
    assert {client.recv().body for _ in range(2)} == {(ended.msgid,), (killed.msgid,)}
    wait_until(lambda: b"lone" not in h.router.workers, timeout=5, what="taken for dead")
    wait_until(lambda: len(h.router.waiting.get("default", ())) == 2, what="copies buffered")

    lone.send(Command.REPLY, '{"value": "done"}', ended.msgid)
    lone.send(Command.REPLY, KILLED, killed.msgid)  # did not end: its copy stays
    result = client.recv()
    assert result.command is Command.REPLY and result.body[1] == ended.msgid
    assert json.loads(result.body[0]) == {"value": "done"}
    wait_until(lambda: [r.msgid for r in h.router.waiting.get("default", ())] == [killed.msgid],
               what="the ended job's copy gone")
    status = h.router.status()
    assert status["replies_for_buffered_copies"] == 1 and status["guaranteed_held"] == 1
    other = join(h, 2, name="other")
    assert other.recv().msgid == killed.msgid
    assert other.pending() == []


def test_a_forged_reply_does_not_end_a_guaranteed_request_never_handed_out(make_router):
    """A guaranteed request waiting for its first worker: a REPLY for its
    msgid from a worker that never had it (a rogue peer that learned the
    msgid) is dropped; the request still runs, and its client gets the real
    result (a probe had the forged value forwarded and the job never run)."""
    h = make_router()
    client = h.peer("frontend")
    request = guaranteed(h, client, headers="guarantee,result-requested")
    wait_until(lambda: len(h.router.waiting.get("default", ())) == 1, what="buffered")
    rogue = h.worker(queues=((10, "elsewhere"),), slots=0, name="rogue")
    rogue.send(Command.REPLY, '{"value": "FORGED"}', request.msgid)
    wait_until(lambda: h.router.status()["late_replies"] == 1, what="the forgery dropped")
    assert [r.msgid for r in h.router.waiting["default"]] == [request.msgid]
    honest = join(h, 1, name="honest")
    assert honest.recv().msgid == request.msgid
    honest.send(Command.REPLY, '{"value": "real"}', request.msgid)
    bodies = []
    while len(bodies) < 2:  # the confirmation, then the result
        bodies.append(client.recv().body)
    assert (json.dumps({"value": "real"}), request.msgid) in bodies
    assert h.router.status()["replies_for_buffered_copies"] == 0


def test_a_forged_reply_does_not_end_a_copy_waiting_after_its_worker_was_lost(make_router):
    """A guaranteed request whose worker was taken for dead waits in the
    buffer: a REPLY for it from a worker that never had it, or from an
    identity that never announced itself, is dropped (a probe got the forged
    value to the client and the job never ran); the copy runs, and the
    client gets the real result."""
    h = make_router(**FAST)
    client = h.peer("frontend")
    lone = h.worker(slots=1, name="lone")
    request = guaranteed(h, client, headers="guarantee,result-requested")
    assert lone.recv().msgid == request.msgid and client.recv().body == (request.msgid,)
    wait_until(lambda: b"lone" not in h.router.workers, timeout=5, what="taken for dead")
    wait_until(lambda: len(h.router.waiting.get("default", ())) == 1, what="copy buffered")
    rogue = h.worker(queues=((10, "elsewhere"),), slots=0, name="rogue")
    rogue.send(Command.REPLY, '{"value": "FORGED"}', request.msgid)
    stranger = h.peer("backend", name="stranger")  # never announced itself
    stranger.send(Command.REPLY, '{"value": "FORGED"}', request.msgid)
    wait_until(lambda: h.router.status()["late_replies"] == 1
               and h.router.status()["unknown_worker_messages"] == 1, what="both dropped")
    assert [r.msgid for r in h.router.waiting["default"]] == [request.msgid]
    honest = join(h, 1, name="honest")
    assert honest.recv().msgid == request.msgid
    honest.send(Command.REPLY, '{"value": "real"}', request.msgid)
    assert client.recv().body == ('{"value": "real"}', request.msgid)
    wait_until(lambda: h.router.status()["guaranteed_held"] == 0, what="finished")
    assert h.router.status()["replies_for_buffered_copies"] == 0
    assert client.pending() == []


def test_a_copy_restored_from_the_journal_is_ended_by_no_unknown_reply(tmp_path):
    """A restarted router cannot tell who ran what its journal holds: a
    REPLY for a restored copy from an identity it does not know (the old
    worker's connection, or a forger's: a probe got FORGED to the client
    with the job never run) is dropped, and the copy runs again (an
    emq-green worker that ran it answers the copy from its memory of ended
    jobs, without running it twice)."""
    path = str(tmp_path / "journal.db")
    with journaled_router(path) as first:
        client = first.peer("frontend", name="client-1")
        worker = first.worker(slots=1, name="busy")
        out = guaranteed(first, client, headers="guarantee,result-requested")
        assert worker.recv().msgid == out.msgid and client.recv().body == (out.msgid,)
    with journaled_router(path) as second:
        assert len(second.router.waiting["default"]) == 1
        client = second.peer("frontend", name="client-1")
        client.send(Command.REQUEST, "x")  # malformed, dropped: the connection is there
        wait_until(lambda: second.router.dropped_by_reason["malformed"] == 1,
                   what="the client connected")
        old = second.peer("backend", name="busy")  # the same identity, unknown here
        old.send(Command.REPLY, '{"value": "FORGED"}', out.msgid)
        assert old.recv().command is Command.KBYE  # it must INFORM again
        assert second.router.status()["unknown_worker_messages"] == 1
        assert [r.msgid for r in second.router.waiting["default"]] == [out.msgid]
        newcomer = join(second, 1)
        assert newcomer.recv().msgid == out.msgid
        newcomer.send(Command.REPLY, '{"value": 42}', out.msgid)
        assert client.recv().body == ('{"value": 42}', out.msgid)
        wait_until(lambda: second.router.status()["guaranteed_held"] == 0, what="finished")
        assert second.router.status()["replies_for_buffered_copies"] == 0
        assert client.pending() == []
        wait_until(lambda: second.router.status()["journal_rows"] == 0, what="row deleted")


def test_a_killed_reply_after_kbye_sends_the_job_again(make_router):
    h = make_router(**FAST)
    client = h.peer("frontend")
    leaving = h.worker(slots=2, name="leaving")
    done, killed = guaranteed(h, client), guaranteed(h, client)
    assert {leaving.recv().msgid for _ in range(2)} == {done.msgid, killed.msgid}
    leaving.send(Command.KBYE)
    wait_until(lambda: b"leaving" not in h.router.workers, what="worker left")
    # its jobs still end there: one finishes, one is killed as the worker stops
    leaving.send(Command.REPLY, '{"value": 1}', done.msgid)
    leaving.send(Command.REPLY, KILLED, killed.msgid)
    wait_until(lambda: h.router.status()["redelivered"] == 1, what="killed job queued again")
    other = join(h, 2, name="other")
    again = other.recv()
    assert again.msgid == killed.msgid
    assert other.pending() == []
    assert h.router.status()["late_replies"] == 0


def test_a_job_raising_its_own_killed_fails_once_and_is_not_sent_again(make_router):
    # a job's own exception class named Killed, on a worker that is not
    # stopping: the job failed, like any other error; taken for the worker's
    # stop, it went back to the queue, ran again on the same worker, whose
    # memory of ended jobs answered Killed again: a loop of ~2,500 a second
    h, client, worker, sent = out_with_its_result(make_router, slots=2, name="busy")
    own = json.dumps({"value": "Killed: mine", "error": {"type": "Killed",
                                                         "message": "Killed: mine"}})
    worker.send(Command.REPLY, own, sent.msgid)
    result = client.recv()
    assert result.command is Command.REPLY and result.body[1] == sent.msgid
    assert json.loads(result.body[0])["error"]["type"] == "Killed"
    status = h.router.status()
    assert status["redelivered"] == 0 and status["guaranteed_held"] == 0
    assert worker.pending() == []


def test_a_leaving_worker_that_never_answers_loses_its_jobs_after_the_grace(make_router):
    h = make_router(kill_grace_period=0.5, **FAST)
    client = h.peer("frontend")
    leaving = h.worker(slots=1, name="leaving")
    sent = guaranteed(h, client)
    assert leaving.recv().msgid == sent.msgid
    other = join(h, 1, name="other", beat=True)
    leaving.send(Command.KBYE)
    # kill_grace_period + heartbeat_timeout later, it goes to the other worker
    assert other.recv(timeout=5).msgid == sent.msgid
    assert not h.router.routing.leaving


def test_journal_holds_what_was_confirmed_until_it_finishes(make_router, tmp_path):
    path = tmp_path / "journal.db"
    h = make_router(journal_file=str(path))
    client = h.peer("frontend")
    sent = [guaranteed(h, client) for _ in range(5)]
    assert [client.recv().body for _ in range(5)] == [(m.msgid,) for m in sent]
    # confirmed means on disk: another connection reads the rows
    rows = sqlite3.connect(path).execute("SELECT msgid, headers FROM requests ORDER BY seq")
    assert [r[0] for r in rows] == [m.msgid for m in sent]
    worker = join(h, 5)
    for _ in range(5):
        m = worker.recv()
        worker.send(Command.REPLY, '{"value": 0}', m.msgid)
    wait_until(lambda: h.router.status()["journal_rows"] == 0, what="rows deleted")
    assert h.router.guarantees.journal.flush(5)
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0


@contextlib.contextmanager
def journaled_router(path: str) -> Iterator[Harness]:
    """A router on the journal at ``path``, in this process, stopped (cleanly:
    what it holds stays in the journal) when the block ends."""
    harness = Harness(Router(settings=Settings(
        frontend_addr=ANY_PORT, backend_addr=ANY_PORT, administrative_addr=ANY_PORT,
        journal_file=path)))
    harness.router.start()
    try:
        yield harness
    finally:
        for peer in harness.peers:
            peer.close()
        assert harness.router.stop(timeout=5)


def test_a_new_router_on_the_journal_runs_what_the_old_one_held(tmp_path):
    path = str(tmp_path / "journal.db")
    with journaled_router(path) as first:
        client = first.peer("frontend")
        worker = first.worker(slots=1)
        out = guaranteed(first, client, headers="guarantee,result-requested")
        assert worker.recv().msgid == out.msgid  # at a worker when the router stops
        queued = [guaranteed(first, client) for _ in range(3)]
        plain = first.request(client)
        assert {client.recv().body for _ in range(4)} == {(m.msgid,) for m in [out, *queued]}
    assert first.router.dropped_by_reason["stopping"] == 1  # only the plain one

    with journaled_router(path) as second:
        status = second.router.status()
        assert status["guaranteed_restored"] == 4 and status["guaranteed_held"] == 4
        worker = join(second, 4)
        got = [worker.recv() for _ in range(4)]
        assert [m.msgid for m in got] == [out.msgid, *(m.msgid for m in queued)]
        assert plain.msgid not in {m.msgid for m in got}
        assert all("reply-requested" in m.body[1] for m in got)


def test_a_new_router_on_the_journal_keeps_each_request_on_its_queue(tmp_path):
    # the new router knows no queue at start: a restored request must not
    # go to a default worker when its own queue's worker connects later
    path = str(tmp_path / "journal.db")
    with journaled_router(path) as first:
        client = first.peer("frontend")
        first.worker(queues=[(10, "mail")], slots=0)
        held = [guaranteed(first, client, queue="mail") for _ in range(2)]
        # a queue no worker announced: routed to default, and after the
        # restart too (the journal keeps where it was routed)
        unknown = guaranteed(first, client, queue="no-such-queue")
        assert {client.recv().body for _ in range(3)} == {
            (m.msgid,) for m in [*held, unknown]}

    with journaled_router(path) as second:
        default = second.worker(queues=[(10, "default")], slots=0)
        default.send(Command.READY)
        assert default.recv().msgid == unknown.msgid
        client = second.peer("frontend")
        later = guaranteed(second, client, queue="mail")
        assert client.recv().body == (later.msgid,)
        wait_until(lambda: len(second.router.waiting.get("mail", ())) == 3, what="buffered")
        default.send(Command.READY)
        wait_until(lambda: second.slots(default) == 1, what="the READY counted")
        assert default.pending() == []
        mail = second.worker(queues=[(10, "mail")], slots=0)
        for _ in range(3):
            mail.send(Command.READY)
        assert [mail.recv().msgid for _ in range(3)] == [m.msgid for m in [*held, later]]
        assert default.pending() == []


def test_a_journal_that_cannot_be_written_refuses_guaranteed_requests(make_router, tmp_path,
                                                                      monkeypatch):
    h = make_router(journal_file=str(tmp_path / "journal.db"))
    journal = h.router.guarantees.journal

    def full_disk(adds, deletes):
        return "OperationalError: database or disk is full"

    monkeypatch.setattr(journal, "_commit", full_disk)
    client = h.peer("frontend")
    first = guaranteed(h, client)
    refused = client.recv()
    assert refused.body[1] == first.msgid
    error = json.loads(refused.body[0])["error"]
    assert error["type"] == "GuaranteeRefused" and "disk is full" in error["message"]
    second = guaranteed(h, client)  # refused at once while the failure stands
    assert client.recv().body[1] == second.msgid
    plain = h.request(client)  # plain requests are not affected
    worker = join(h, 1)
    assert worker.recv().msgid == plain.msgid
    assert h.router.status()["guaranteed_refused"] == 2
    assert worker.pending() == []


def held_commits(journal, monkeypatch, failing: Optional[list[str]] = None
                 ) -> threading.Event:
    """Journal commits wait (in the journal's thread) until the returned
    event is set; then they are written, or fail while ``failing`` holds a
    reason."""
    commit = journal._commit
    release = threading.Event()

    def waiting(rows, deletes):
        release.wait(10)
        return failing[0] if failing else commit(rows, deletes)

    monkeypatch.setattr(journal, "_commit", waiting)
    return release


def held_journal(make_router, tmp_path, monkeypatch, slots: int,
                 failing: Optional[list[str]] = None):
    """A router with a journal whose commits are held (:func:`held_commits`),
    a client and a worker with ``slots``: (harness, journal path, the
    journal, the release event, client, worker)."""
    path = tmp_path / "journal.db"
    h = make_router(journal_file=str(path))
    journal = h.router.guarantees.journal
    release = held_commits(journal, monkeypatch, failing)
    return h, path, journal, release, h.peer("frontend"), h.worker(slots=slots)


def journal_msgids(path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT msgid FROM requests ORDER BY seq")]
    finally:
        db.close()


def test_a_guaranteed_request_leaves_at_once_and_is_confirmed_after_its_commit(
        make_router, tmp_path, monkeypatch):
    h, path, journal, release, client, worker = held_journal(
        make_router, tmp_path, monkeypatch, slots=1)
    sent = guaranteed(h, client)
    assert worker.recv().msgid == sent.msgid  # routed while the journal writes it
    assert client.pending() == []  # not confirmed before its commit
    release.set()
    assert client.recv().body == (sent.msgid,)
    assert journal_msgids(path) == [sent.msgid]  # confirmed means on disk
    worker.send(Command.REPLY, '{"value": 0}', sent.msgid)
    wait_until(lambda: h.router.status()["guaranteed_held"] == 0, what="finished")
    assert journal.flush(5) and journal_msgids(path) == []


def test_a_job_that_ends_before_its_commit_is_confirmed_and_never_written(
        make_router, tmp_path, monkeypatch):
    h, path, journal, release, client, worker = held_journal(
        make_router, tmp_path, monkeypatch, slots=2)
    first = guaranteed(h, client)  # its commit starts, and waits
    assert worker.recv().msgid == first.msgid
    quick = guaranteed(h, client, headers="guarantee,result-requested")  # the next batch
    assert worker.recv().msgid == quick.msgid
    worker.send(Command.REPLY, '{"value": 5}', quick.msgid)
    ack, result = client.recv(), client.recv()  # confirmed first, then its result
    assert ack.body == (quick.msgid,) and json.loads(result.body[0])["value"] == 5
    release.set()
    assert client.recv().body == (first.msgid,)
    status = h.router.status()
    assert status["journal_skipped"] == 1 and status["journal_written"] == 1
    assert status["guaranteed_accepted"] == 2 and status["guaranteed_held"] == 1
    assert journal.flush(5) and journal_msgids(path) == [first.msgid]


def test_a_failed_commit_refuses_what_is_buffered_and_writes_again_what_is_out(
        make_router, tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "RETRY_AFTER", 0.2)
    failing = ["OperationalError: disk I/O error"]
    h, path, journal, release, client, worker = held_journal(
        make_router, tmp_path, monkeypatch, slots=1, failing=failing)
    out = guaranteed(h, client)
    buffered = guaranteed(h, client, headers="guarantee,result-requested")
    assert worker.recv().msgid == out.msgid
    wait_until(lambda: h.router.waiting.get("default"), what="second one buffered")
    release.set()  # commits fail: whatever their batches, the buffered one is refused
    refused = client.recv()
    assert refused.body[1] == buffered.msgid
    assert json.loads(refused.body[0])["error"]["type"] == "GuaranteeRefused"
    assert not h.router.waiting and buffered.msgid not in h.router.relay.pending.ids
    assert client.pending() == []
    failing.clear()  # the disk is back
    # the one out at a worker was not refused: written again, then confirmed
    assert client.recv(timeout=5).body == (out.msgid,)
    assert journal_msgids(path) == [out.msgid]
    status = h.router.status()
    assert status["guaranteed_refused"] == 1 and status["guaranteed_held"] == 1
    worker.send(Command.READY)
    assert worker.pending() == []  # the refused one never runs


@pytest.mark.parametrize("content, cause", [
    (b"this is not a database" * 100, "not a readable SQLite database"),
    (None, "schema version 99"),
    ("other-app", "not an emq-green journal"),
])
def test_a_bad_journal_stops_the_router_at_start(tmp_path, content, cause):
    path = tmp_path / "journal.db"
    if content is None:
        made = Journal(str(path))
        made.open()
        made.close()
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version = 99")
        db.close()
    elif content == "other-app":
        sqlite3.connect(path).execute("CREATE TABLE mine (x)").connection.close()
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    router = Router(settings=Settings(frontend_addr=ANY_PORT, backend_addr=ANY_PORT,
                                      administrative_addr=ANY_PORT, journal_file=str(path)))
    with pytest.raises(OSError) as raised:
        router.start()
    assert str(path) in str(raised.value) and cause in str(raised.value)
    assert path.read_bytes() == before  # never touched, never emptied


def test_a_journal_another_router_holds_is_refused(make_router, tmp_path):
    path = str(tmp_path / "journal.db")
    make_router(journal_file=path)
    second = Router(settings=Settings(frontend_addr=ANY_PORT, backend_addr=ANY_PORT,
                                      administrative_addr=ANY_PORT, journal_file=path))
    with pytest.raises(OSError, match="in use by another router"):
        second.start()


def test_a_late_reply_for_a_finished_job_is_not_forwarded_again(make_router):
    h = make_router()
    client = h.peer("frontend")
    worker = h.worker(slots=1)
    sent = guaranteed(h, client, headers="guarantee,result-requested")
    assert worker.recv().msgid == sent.msgid
    assert client.recv().body == (sent.msgid,)
    worker.send(Command.REPLY, '{"value": 1}', sent.msgid)
    worker.send(Command.REPLY, '{"value": 2}', sent.msgid)  # twice: a confused worker
    result = client.recv()
    assert json.loads(result.body[0]) == {"value": 1}
    wait_until(lambda: h.router.status()["late_replies"] == 1, what="second reply counted")
    assert client.pending() == []
    assert isinstance(Message.new(Command.REPLY), Message)


def test_redeliveries_and_late_replies_on_the_dashboard_and_metrics(make_router):
    from emq_green.router.dashboard import RouterDashboard

    h = make_router(**FAST)
    dashboard = RouterDashboard(h.router, "127.0.0.1:0")
    dashboard.start()
    try:
        client = h.peer("frontend")
        dying = h.worker(slots=2, name="dying")
        sent = [guaranteed(h, client) for _ in range(2)]
        assert {dying.recv().msgid for _ in range(2)} == {m.msgid for m in sent}
        wait_until(lambda: b"dying" not in h.router.workers, timeout=5, what="removed")
        other = join(h, 2, name="other")
        assert {other.recv().msgid for _ in range(2)} == {m.msgid for m in sent}
        dying.send(Command.REPLY, '{"value": 0}', sent[0].msgid)  # late: running elsewhere
        wait_until(lambda: h.router.status()["late_replies"] == 1, what="late reply")

        host, port = dashboard.address
        base = f"http://{host}:{port}"
        data = http_get(base + "/dashboard.json").json()
        assert data["guaranteed"]["redelivered"] == 2
        assert data["guaranteed"]["late_replies"] == 1
        assert data["guaranteed"]["guaranteed_held"] == 2
        metrics = http_get(base + "/metrics")
        assert metrics.status_code == 200
        lines = set(metrics.text.splitlines())
        assert "emq_green_router_redelivered_total 2.0" in lines
        assert "emq_green_router_late_replies_total 1.0" in lines
        assert "emq_green_router_guaranteed_held 2.0" in lines
        assert 'emq_green_router_handed_out_total{queue="default"} 4.0' in lines  # 2 + 2 again
    finally:
        dashboard.stop()


def test_a_job_whose_workers_keep_dying_is_given_up_after_max_redeliveries(make_router,
                                                                           tmp_path, caplog):
    """A probe's find: a guaranteed job that kills its worker (``os._exit``
    in the job) was sent again for ever and killed every worker it reached.
    With max_redeliveries 2 it runs on three workers; the third death gives
    it up: logged, out of the journal, its client told; a job beside it
    that finishes is not touched."""
    caplog.set_level(logging.ERROR, logger="emq_green")
    path = tmp_path / "journal.db"
    h = make_router(journal_file=str(path), max_redeliveries=2, **FAST)
    client = h.peer("frontend")
    poison = guaranteed(h, client, headers="guarantee,result-requested")
    assert client.recv().body == (poison.msgid,)  # confirmed: in the journal
    for attempt in range(3):
        dying = join(h, 1, name=f"dying-{attempt}")
        assert dying.recv().msgid == poison.msgid
        dying.close()  # dies running it
        wait_until(lambda name=dying.identity: name not in h.router.workers, timeout=5,
                   what="dead worker removed")
    status = h.router.status()
    assert status["redelivered"] == 2 and status["guaranteed_given_up"] == 1
    assert status["guaranteed_held"] == 0
    lost = client.recv()
    assert lost.body[1] == poison.msgid and json.loads(lost.body[0])["reason"] == "given_up"
    [line] = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    assert poison.msgid in line and "3 workers died" in line and "dying-2" in line
    # at once, not after RESULT_LINGER: no result of it is to leave, and a
    # router stopped or killed meanwhile would run it again (a probe's find)
    assert h.router.guarantees.journal.flush(5)
    assert journal_msgids(path) == []
    # not sent again: the next worker gets the next job, and only it
    healthy = guaranteed(h, client)
    assert client.recv().body == (healthy.msgid,)
    worker = join(h, 2, name="healthy", beat=True)
    assert worker.recv().msgid == healthy.msgid
    assert worker.pending() == []
    from emq_green.router.metrics import render
    assert "emq_green_router_guaranteed_given_up_total 1.0" in render(
        h.router)[0].decode().splitlines()


def test_with_max_redeliveries_0_a_job_is_sent_again_whatever_happens(make_router):
    h = make_router(max_redeliveries=0, **FAST)
    client = h.peer("frontend")
    sent = guaranteed(h, client)
    client.recv()
    for attempt in range(7):
        dying = join(h, 1, name=f"dying-{attempt}")
        assert dying.recv().msgid == sent.msgid
        dying.close()
        wait_until(lambda name=dying.identity: name not in h.router.workers, timeout=5,
                   what="dead worker removed")
    assert h.router.status()["redelivered"] == 7
    assert h.router.status()["guaranteed_given_up"] == 0
    assert h.router.status()["guaranteed_held"] == 1


def test_jobs_that_shared_workers_with_a_killer_run_alone_and_are_not_given_up(make_router):
    """With max_redeliveries 2, a job that kills its worker and three that
    only ran beside it: all four reach their last chance together (two
    deaths each), then run one at a time; only the killer dies again, so
    only it is given up, and the other three finish."""
    h = make_router(max_redeliveries=2, **FAST)
    client = h.peer("frontend")
    sent = [guaranteed(h, client, headers="guarantee,result-requested") for _ in range(4)]
    assert {client.recv().body for _ in range(4)} == {(m.msgid,) for m in sent}
    poison = sent[2].msgid
    for attempt in range(2):  # two workers take all four and die
        dying = join(h, 4, name=f"shared-{attempt}")
        assert {dying.recv().msgid for _ in range(4)} == {m.msgid for m in sent}
        dying.close()
        wait_until(lambda name=dying.identity: name not in h.router.workers, timeout=5,
                   what="dead worker removed")
    assert h.router.status()["guaranteed_last_chance"] == 4
    finished = []
    worker = join(h, 4, name="alone-0", beat=True)  # room for all: one at a time comes
    for n in range(4):
        got = worker.recv()
        assert worker.pending() == []  # alone: nothing else is sent beside it
        if got.msgid == poison:
            worker.close()  # it kills this one too
            wait_until(lambda: h.router.status()["guaranteed_given_up"] == 1, timeout=5,
                       what="the killer given up")
            worker = join(h, 4, name=f"alone-{n + 1}", beat=True)
        else:
            worker.send(Command.REPLY, json.dumps({"value": got.msgid}), got.msgid)
            finished.append(got.msgid)
    assert sorted(finished) == sorted(m.msgid for m in sent if m.msgid != poison)
    wait_until(lambda: h.router.status()["guaranteed_held"] == 0, timeout=5, what="all ended")
    status = h.router.status()
    assert status["guaranteed_given_up"] == 1
    assert status["guaranteed_last_chance"] == 0
    results = {msgid: reply for msgid, reply in
               ((m.body[1], json.loads(m.body[0])) for m in [client.recv() for _ in range(4)])}
    assert results[poison]["reason"] == "given_up"
    assert all(results[m] == {"value": m} for m in finished)


def test_a_last_chance_request_runs_on_a_worker_that_runs_nothing_else(make_router):
    """A probe's find: "alone" meant one at a time across the router, not
    alone on its worker; a second killer running beside a last-chance
    request took it down and it was given up. Now the router reserves a
    worker for it: no other job goes there until the request ends, and the
    request goes there only once that worker is idle."""
    h = make_router(max_redeliveries=1, **FAST)
    client = h.peer("frontend")
    innocent = guaranteed(h, client)
    killer = guaranteed(h, client)
    assert {client.recv().body for _ in range(2)} == {(innocent.msgid,), (killer.msgid,)}
    first = join(h, 2, name="first")
    assert {first.recv().msgid for _ in range(2)} == {innocent.msgid, killer.msgid}
    first.close()  # both on their last chance now
    wait_until(lambda: h.router.status()["guaranteed_last_chance"] == 2, timeout=5,
               what="both on their last chance")
    worker = join(h, 3, name="second", beat=True)
    got = worker.recv()
    assert got.msgid in (innocent.msgid, killer.msgid)
    plain = [h.request(client) for _ in range(3)]
    wait_until(lambda: len(h.router.waiting.get("default", ())) == 3, timeout=5,
               what="the plain ones wait: the only worker is reserved")
    assert worker.pending() == []
    worker.send(Command.REPLY, json.dumps({"value": 1}), got.msgid)  # it ends well
    # its two withheld slots come back: two plain ones go to it; the other
    # last-chance request reserves it in turn, and waits until it is idle
    out = [worker.recv() for _ in range(2)]
    assert {m.msgid for m in out} < {m.msgid for m in plain}
    worker.send(Command.READY)  # the slot of the job that ended: withheld
    other = ({innocent.msgid, killer.msgid} - {got.msgid}).pop()
    for m in out:  # the plain ones end: idle, the last-chance one comes, alone
        worker.sock.send_multipart([b"", b"eMQP/1.0", b"READY", m.msgid.encode()])
    assert worker.recv().msgid == other
    assert worker.pending() == []
    assert len(h.router.waiting.get("default", ())) == 1  # the third still waits
    worker.close()  # it kills this worker too: given up
    wait_until(lambda: h.router.status()["guaranteed_given_up"] == 1, timeout=5,
               what="the killer given up")
    status = h.router.status()
    assert status["guaranteed_last_chance"] == 0 and status["guaranteed_held"] == 0
    # nothing is withheld any more: a new worker takes the plain one left
    last = join(h, 1, name="last", beat=True)
    assert last.recv().msgid in {m.msgid for m in plain}


def reserved_while_busy(h: Harness, client, slots: int, queues=((10, "default"),)):
    """A guaranteed request on its last chance (its worker "dying" died
    running it) while the only other worker, "busy" (``slots`` slots,
    beating), runs a plain job: "busy" is reserved for it and the request
    waits. Returns the request and "busy"."""
    dying = join(h, 1, name="dying")
    sent = guaranteed(h, client)
    assert client.recv().body == (sent.msgid,)
    assert dying.recv().msgid == sent.msgid
    busy = join(h, 0, name="busy", beat=True, queues=queues)  # alive until it is closed
    for _ in range(slots):
        busy.send(Command.READY)
    # (all read first: a READY read after the job below would end it)
    wait_until(lambda: h.slots(busy) == slots, timeout=5, what=f"{slots} slots")
    long_one = h.request(client)  # runs long on "busy"
    assert busy.recv().msgid == long_one.msgid
    dying.close()  # the guaranteed job's worker dies: its last chance
    wait_until(lambda: h.router.guarantees.reserved is not None, timeout=5,
               what="a worker reserved")
    assert h.router.guarantees.reserved.identity == b"busy"  # the only one
    return sent, busy


def test_a_last_chance_request_moves_to_a_worker_that_is_idle_now(make_router):
    """A probe's find: the reservation fell on a worker running a long job
    (the only worker of the queue at that moment) and stayed there while
    another came back idle: the request waited for the long job, and the
    busy worker's free slots were withheld all along (its other queue
    starved)."""
    h = make_router(max_redeliveries=1, **FAST)
    client = h.peer("frontend")
    sent, busy = reserved_while_busy(h, client, 3, ((10, "default"), (10, "other")))
    starved = h.request(client, queue="other")  # only "busy" serves it: withheld
    wait_until(lambda: len(h.router.waiting.get("other", ())) == 1, timeout=5,
               what="the other queue's job waiting")
    idle = join(h, 2, name="idle", beat=True)  # comes back, idle
    assert idle.recv().msgid == sent.msgid  # moved: it need not wait for the long job
    assert busy.recv().msgid == starved.msgid  # and "busy" has its slots back
    assert idle.pending() == [] and h.router.guarantees.reserved is h.router.workers[b"idle"]


def test_a_reserved_worker_that_dies_before_the_request_reached_it_is_replaced(make_router):
    """The reserved worker is busy, then falls silent (SIGSTOP, kill -9)
    before the last-chance request reached it: another worker of the queue
    is reserved and gets it; the job lost with the first is counted like
    any other."""
    h = make_router(max_redeliveries=1, **FAST)
    client = h.peer("frontend")
    sent, busy = reserved_while_busy(h, client, 1)
    other = join(h, 0, name="other", beat=True)  # no free slot yet: not idle
    busy.close()
    wait_until(lambda: b"busy" not in h.router.workers, timeout=5, what="busy removed")
    wait_until(lambda: h.router.guarantees.reserved is h.router.workers.get(b"other"),
               timeout=5, what="the other worker reserved")
    other.send(Command.READY)
    assert other.recv().msgid == sent.msgid
    assert other.pending() == []
    assert h.router.counters["possibly_lost"] == 1  # the plain job lost with "busy"


def test_a_reply_from_a_worker_back_from_a_stop_ends_last_chance_copies(make_router):
    """A probe's find: a worker SIGSTOPped past the heartbeat timeout was
    taken for dead, so its two guaranteed jobs went on their last chance
    (max_redeliveries 1); resumed, it finished both and sent their REPLYs,
    which were dropped as late (a copy waiting in the buffer is ended by
    such a REPLY, a last-chance one was not): both ran again elsewhere and
    their clients waited a minute. Now the REPLY ends the waiting copy, the
    one placed (its worker reserved) and the one waiting its turn alike."""
    h = make_router(max_redeliveries=1, **FAST)
    client = h.peer("frontend")
    sent = [guaranteed(h, client, headers="guarantee,result-requested") for _ in range(2)]
    assert {client.recv().body for _ in range(2)} == {(m.msgid,) for m in sent}
    stopped = join(h, 2, name="stopped")  # silent: taken for dead
    assert {stopped.recv().msgid for _ in range(2)} == {m.msgid for m in sent}
    wait_until(lambda: h.router.status()["guaranteed_last_chance"] == 2, timeout=5,
               what="both on their last chance")
    assert h.router.guarantees.unplaced is not None  # no worker: it waits
    for m in sent:  # back from the stop: both had finished
        stopped.send(Command.REPLY, json.dumps({"value": m.msgid}), m.msgid)
    wait_until(lambda: h.router.status()["guaranteed_held"] == 0, timeout=5,
               what="both ended by their REPLYs")
    status = h.router.status()
    assert status["guaranteed_last_chance"] == 0 and status["replies_for_buffered_copies"] == 2
    assert h.router.guarantees.unplaced is None and h.router.guarantees.reserved is None
    results = {m.body[1]: json.loads(m.body[0]) for m in [client.recv() for _ in range(2)]}
    assert results == {m.msgid: {"value": m.msgid} for m in sent}
    # neither runs again, and nothing is withheld: a new worker gets a new job
    worker = join(h, 1, name="next", beat=True)
    fresh = h.request(client)
    assert worker.recv().msgid == fresh.msgid
    assert worker.pending() == []


def test_a_last_chance_request_runs_beside_jobs_that_never_end(make_router):
    """A probe's find: behind EventMQ's emq-jobmanager, a job whose process
    was killed is never answered, so its worker is never idle again; the
    worker reserved for a last-chance request had its slots withheld for
    ever and the queue stalled (six jobs waited out their clients). After
    ``reserve_wait`` the request goes on like any other and runs beside the
    jobs that do not end; when it ends, the worker's slots come back."""
    h = make_router(max_redeliveries=1, **FAST)
    h.router.guarantees.reserve_wait = 1.0  # (waiting: not reserve_patience)
    client = h.peer("frontend")
    sent, busy = reserved_while_busy(h, client, 2)  # one slot runs a "stuck" job
    started = time.monotonic()
    waiting = h.request(client)  # held back: the only worker is reserved
    assert busy.recv(timeout=5).msgid == sent.msgid
    assert time.monotonic() - started >= 0.9  # it waited its patience first
    assert busy.pending() == [] and h.router.status()["guaranteed_placed_beside"] == 1
    busy.send(Command.REPLY, json.dumps({"value": 1}), sent.msgid)
    busy.send(Command.READY)
    assert busy.recv().msgid == waiting.msgid  # slots back: the queue moves again
    wait_until(lambda: h.router.guarantees.reserved is None, timeout=5, what="unreserved")


def test_a_last_chance_request_that_never_ends_stalls_neither_its_queue_nor_the_next(
        make_router):
    """A probe's find: a last-chance request out alone whose job never
    ends (behind emq-jobmanager, a job that killed its own process is never
    answered) kept its worker's slots withheld and held every later
    last-chance request back, for ever: plain jobs waited 75-91 s and on.
    A turn lasts ``reserve_wait`` waiting and ``reserve_patience`` running
    alone; then the request goes on like any other and the next one's turn
    begins."""
    h = make_router(max_redeliveries=1, **FAST)
    h.router.guarantees.reserve_patience = h.router.guarantees.reserve_wait = 1.0
    client = h.peer("frontend")
    sent = [guaranteed(h, client) for _ in range(2)]
    assert {client.recv().body for _ in range(2)} == {(m.msgid,) for m in sent}
    dying = join(h, 2, name="dying")
    assert {dying.recv().msgid for _ in range(2)} == {m.msgid for m in sent}
    dying.close()  # both on their last chance
    wait_until(lambda: h.router.status()["guaranteed_last_chance"] == 2, timeout=5,
               what="both on their last chance")
    worker = join(h, 2, name="only", beat=True)
    first = worker.recv()  # alone: its other slot withheld
    assert first.msgid in {m.msgid for m in sent} and worker.pending() == []
    plain = h.request(client)
    # its turn over (it never ends): the slot comes back, the plain job runs
    assert worker.recv(timeout=5).msgid == plain.msgid
    assert h.router.status()["guaranteed_placed_beside"] == 1
    worker.sock.send_multipart([b"", b"eMQP/1.0", b"READY", plain.msgid.encode()])
    # the second one's turn: it waits for the worker (busy with the first)
    # for its patience, then goes on like any other request
    second = worker.recv(timeout=5)
    assert second.msgid in {m.msgid for m in sent} - {first.msgid}
    assert h.router.status()["guaranteed_placed_beside"] == 2
    worker.send(Command.REPLY, json.dumps({"value": 2}), second.msgid)
    worker.send(Command.REPLY, json.dumps({"value": 1}), first.msgid)
    wait_until(lambda: h.router.status()["guaranteed_held"] == 0, timeout=5, what="both end")
    assert h.router.status()["guaranteed_last_chance"] == 0


def test_a_reply_from_the_same_worker_connected_anew_ends_the_copy_in_the_buffer(make_router):
    # the worker taken for dead (the router heard nothing) had connected anew
    # under another identity of its process, and answers there: the job ran,
    # its copy must not run again; another process's REPLY ends nothing
    h, client, _old, sent = out_with_its_result(make_router, slots=1, name="box:77:1-00c0ffee")
    wait_until(lambda: len(h.router.waiting.get("default", ())) == 1, timeout=5,
               what="its copy buffered")
    stranger = join(h, 0, name="box:78:1-00c0ffee")
    stranger.send(Command.REPLY, '{"value": "forged"}', sent.msgid)
    new = join(h, 0, name="box:77:2-0badf00d")
    new.send(Command.REPLY, '{"value": "done"}', sent.msgid)
    result = client.recv()
    assert result.body[1] == sent.msgid and json.loads(result.body[0]) == {"value": "done"}
    wait_until(lambda: not h.router.waiting.get("default"), what="the copy dropped")
    assert h.router.status()["replies_for_buffered_copies"] == 1


def test_back_from_a_gap_the_router_sends_only_to_workers_heard_from_anew(make_router):
    """A probe's find: the router SIGSTOPped 17 s; meanwhile EventMQ's job
    manager gave up on it and connected anew, leaving its old connection
    open. Back, the router sent the requests clients had queued to the old
    identity's free slots: lost with it (4 of 20). Now, back from a gap,
    no worker gets a request before it is heard from again."""
    h = make_router(heartbeat_interval=0.1, heartbeat_timeout=3.0)
    client = h.peer("frontend")
    old = join(h, 2, name="old")  # silent from now on: its connection was left behind
    live = join(h, 2, name="live", beat=True)
    h.router.sockets.alive_at -= 30  # as if the router's loop had not run for 30 s
    wait_until(lambda: h.router.status()["loop_gaps"] == 1, what="the gap seen")
    sent = [h.request(client, payload=PAYLOAD) for _ in range(2)]
    assert {live.recv(timeout=5).msgid for _ in sent} == {m.msgid for m in sent}
    assert old.pending() == []
    wait_until(lambda: b"old" not in h.router.workers, timeout=10, what="old removed")
    assert h.router.status()["loop_gaps"] == 1


def test_a_guaranteed_request_sent_again_under_its_msgid_is_confirmed_not_run_again(make_router):
    """A sender whose confirmation was lost sends the request again under
    its msgid (emq-green's scheduler does, for the runs it fired into a
    router stopped past its patience: both copies ran, 100 of 100): while
    the first is held, and once it ended, the repeat is confirmed and not
    run. A plain repeat is still refused (DuplicateMsgid)."""
    h = make_router(**FAST)
    client, again = h.peer("frontend"), h.peer("frontend")
    worker = join(h, 2, name="w", beat=True)
    first = guaranteed(h, client)
    assert worker.recv().msgid == first.msgid
    assert client.recv().body == (first.msgid,)
    repeat = Message(Command.REQUEST, first.msgid, ("default", "guarantee", PAYLOAD))
    again.sock.send_multipart(repeat.frames())  # while the first runs
    assert again.recv().body == (first.msgid,)  # confirmed
    worker.send(Command.REPLY, '{"value": 1}', first.msgid)
    wait_until(lambda: h.router.status()["guaranteed_held"] == 0, what="the first ended")
    again.sock.send_multipart(repeat.frames())  # once it ended
    assert again.recv().body == (first.msgid,)
    assert worker.pending() == [] and h.router.status()["guaranteed_repeats"] == 2
    plain = Message(Command.REQUEST, first.msgid, ("default", "", PAYLOAD))
    second = guaranteed(h, client)
    assert worker.recv().msgid == second.msgid
    again.sock.send_multipart(plain._replace(msgid=second.msgid).frames())
    refused = again.recv()
    assert json.loads(refused.body[0])["error"]["type"] == "DuplicateMsgid"


def test_a_guaranteed_request_under_a_plain_one_s_msgid_is_refused_not_confirmed(make_router):
    """A probe's find in the repeats: a plain request buffered under msgid X,
    then a guaranteed one under X: confirmed as a repeat, held nowhere, never
    run. Only a guaranteed request holding X makes a repeat."""
    h = make_router(**FAST)
    client = h.peer("frontend")
    plain = h.request(client, queue="nobody")  # no worker: buffered
    wait_until(lambda: plain.msgid in h.router.routing.holders, what="buffered")
    repeat = Message(Command.REQUEST, plain.msgid, ("nobody", "guarantee", PAYLOAD))
    client.sock.send_multipart(repeat.frames())
    refused = client.recv()
    assert json.loads(refused.body[0])["error"]["type"] == "DuplicateMsgid"
    assert h.router.status()["guaranteed_repeats"] == 0
