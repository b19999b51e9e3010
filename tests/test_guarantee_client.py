"""emq-green's client with guaranteed jobs: it waits for the router's
confirmation, raises a clear error naming the msgid when none comes or the
router refuses, and the same holds for ``result=True``, ``@job`` and
``emq-green-submit --guarantee``. Real routers on loopback: emq-green's in
this process (a green client), EventMQ's as a subprocess."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import gevent
import pytest
import zmq
from peers import BIN, Peers, RouterAddrs, require_eventmq
from test_router import ANY_PORT, Harness, wait_until

from emq_green.client import (
    Client,
    ConfirmTimeout,
    GuaranteedBatch,
    GuaranteeRefused,
    JobError,
    job,
)
from emq_green.client.submit import main as submit_main
from emq_green.protocol import Command
from emq_green.router import Router
from emq_green.settings import Settings


@pytest.fixture
def harness(tmp_path):
    router = Router(settings=Settings(frontend_addr=ANY_PORT, backend_addr=ANY_PORT,
                                      administrative_addr=ANY_PORT,
                                      journal_file=str(tmp_path / "journal.db")))
    router.start()
    h = Harness(router)
    yield h
    for peer in h.peers:
        peer.close()
    assert router.stop(timeout=5)


def test_defer_job_returns_once_the_router_holds_the_job(harness):
    with Client(harness.router.endpoints["frontend"], green=True) as client:
        msgid = client.defer_job("os.getpid", guarantee=True)
        # confirmed means held: it is in the router's books (nobody runs it yet)
        status = harness.router.status()
        assert status["guaranteed_held"] == 1 and status["journal_rows"] == 1
        assert [r.msgid for r in harness.router.waiting["default"]] == [msgid]
        assert client.acknowledged == 1
        worker = harness.worker(slots=0)
        worker.send(Command.READY)
        got = worker.recv()
        assert got.msgid == msgid and "reply-requested" in got.body[1]


def test_a_refusal_is_raised_with_the_msgid_and_the_reason(harness, monkeypatch):
    journal = harness.router.guarantees.journal
    monkeypatch.setattr(journal, "_commit",
                        lambda rows, deletes: "OperationalError: database or disk is full")
    with Client(harness.router.endpoints["frontend"], green=True) as client:
        with pytest.raises(GuaranteeRefused) as raised:
            client.defer_job("os.getpid", guarantee=True)
        assert raised.value.msgid in str(raised.value)
        assert "disk is full" in raised.value.reason
        # plain jobs do not wait for anything
        assert client.defer_job("os.getpid")


def test_result_and_guarantee_confirm_first_then_the_result(harness):
    worker = harness.worker(slots=0)
    with Client(harness.router.endpoints["frontend"], green=True) as client:
        handle = client.defer_job("os.getpid", guarantee=True, result=True)
        assert not handle.ready() and harness.router.status()["guaranteed_held"] == 1
        worker.send(Command.READY)
        got = worker.recv()
        worker.send(Command.REPLY, json.dumps({"value": 42}), got.msgid)
        assert handle.get(timeout=5) == 42
    wait_until(lambda: harness.router.status()["guaranteed_held"] == 0, what="finished")


def test_result_and_guarantee_refused(harness, monkeypatch):
    journal = harness.router.guarantees.journal
    monkeypatch.setattr(journal, "_commit", lambda rows, deletes: "OperationalError: disk I/O")
    with Client(harness.router.endpoints["frontend"], green=True) as client:
        with pytest.raises(GuaranteeRefused, match="disk I/O"):
            client.defer_job("os.getpid", guarantee=True, result=True)


@job(guarantee=True)
def charge(order: int) -> None:
    """A job sent with ``.delay``; never run here."""


def test_the_job_decorator_passes_guarantee(harness, monkeypatch):
    monkeypatch.setenv("EMQ_BROKER_ADDR", harness.router.endpoints["frontend"])
    # a plain (blocking) client, as in an unpatched program: from a thread
    msgid = gevent.get_hub().threadpool.apply(charge.delay, (7,))
    assert isinstance(msgid, str)
    assert [r.msgid for r in harness.router.waiting["default"]] == [msgid]
    assert "guarantee" in harness.router.waiting["default"][0].body[1]


def test_confirm_needs_guarantee():
    with Client("tcp://127.0.0.1:1", green=False) as client:
        with pytest.raises(ValueError, match="guarantee"):
            client.defer_job("os.getpid", confirm=True)


@pytest.mark.timeout(60)
def test_eventmq_router_never_confirms_a_buffered_job_confirm_timeout_names_it(tmp_path):
    require_eventmq()
    peers = Peers(tmp_path)
    try:
        router = peers.router()  # EventMQ's: no worker, so the job is buffered, unconfirmed
        with Client(router.addrs.frontend, green=False, confirm_timeout=1) as client:
            with pytest.raises(ConfirmTimeout) as raised:
                client.defer_job("os.getpid", guarantee=True)
        assert raised.value.msgid in str(raised.value) and raised.value.timeout == 1
    finally:
        peers.close()


def test_submit_guarantee(harness):
    front = harness.router.endpoints["frontend"]
    out = io.StringIO()
    # the submit command is blocking (plain zmq): run it in a thread, the router here
    rc = gevent.get_hub().threadpool.apply(
        submit_main, (["os.getpid", "--count", "3", "--guarantee", "--addr", front], out))
    assert rc == 0
    assert harness.router.status()["guaranteed_held"] == 3
    assert "confirmed 3" in out.getvalue()


def test_submit_guarantee_refused_exits_1(harness, monkeypatch):
    """A refusal is a runtime failure (exit 1), not a usage error (exit 2)."""
    journal = harness.router.guarantees.journal
    monkeypatch.setattr(journal, "_commit", lambda rows, deletes: "OperationalError: full")
    front = harness.router.endpoints["frontend"]
    out = io.StringIO()
    rc = gevent.get_hub().threadpool.apply(
        submit_main, (["os.getpid", "--guarantee", "--addr", front], out))
    assert rc == 1
    assert "refused by the router" in out.getvalue()


def test_a_job_error_is_not_taken_for_a_refusal(harness):
    worker = harness.worker(slots=1)
    with Client(harness.router.endpoints["frontend"], green=True) as client:
        handle = client.defer_job("os.getpid", guarantee=True, result=True)
        got = worker.recv()
        worker.send(Command.REPLY, json.dumps({"value": "boom", "error": {
            "type": "ValueError", "message": "boom"}}), got.msgid)
        with pytest.raises(JobError, match="ValueError"):
            handle.get(timeout=5)
    assert os.path.exists(BIN / "emq-green-submit")
    assert RouterAddrs  # the peers helpers are shared with the chaos tests


def test_a_batch_sends_back_to_back_and_returns_once_every_job_is_held(harness):
    """GuaranteedBatch: never more than ``window`` unconfirmed; when the
    block ends every request is in the router's books and its journal."""
    front = harness.router.endpoints["frontend"]
    seen_outstanding = []
    with Client(front, green=True) as client:
        with GuaranteedBatch(client, window=50) as batch:
            msgids = []
            for _ in range(600):
                msgids.append(batch.defer_job("os.getpid"))
                seen_outstanding.append(len(batch.outstanding))
        assert batch.outstanding == {} and batch.confirmed == 600
        assert client.acknowledged == 600 and client.sent == 600
    assert max(seen_outstanding) < 50
    status = harness.router.status()
    assert status["guaranteed_held"] == 600 and status["journal_rows"] == 600
    assert [r.msgid for r in harness.router.waiting["default"]] == msgids
    assert all("guarantee" in r.body[1] for r in harness.router.waiting["default"])


def test_a_batch_raises_the_refusal_of_the_request_refused(harness, monkeypatch):
    journal = harness.router.guarantees.journal
    monkeypatch.setattr(journal, "_commit",
                        lambda rows, deletes: "OperationalError: database or disk is full")
    with Client(harness.router.endpoints["frontend"], green=True) as client:
        batch = GuaranteedBatch(client, window=10)
        first = batch.defer_job("os.getpid")
        with pytest.raises(GuaranteeRefused) as raised:
            batch.wait()
        assert raised.value.msgid == first and "disk is full" in raised.value.reason
        assert batch.confirmed == 0 and batch.outstanding == {}
        batch.close()


@pytest.mark.timeout(30)
def test_a_batch_behind_a_silent_router_times_out_naming_the_oldest():
    """A router that reads and never confirms: ConfirmTimeout for the oldest
    request after confirm_timeout, the others still listed as outstanding;
    the block's end does not wait again after the error."""
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client(f"tcp://127.0.0.1:{port}", green=False, confirm_timeout=0.5,
                    linger=0.1) as client:
            started = time.monotonic()
            sent: list[str] = []
            with pytest.raises(ConfirmTimeout) as raised:
                with GuaranteedBatch(client, window=3) as batch:
                    for _ in range(5):
                        sent.append(batch.defer_job("os.getpid"))
            # the third send filled the window and waited: the first timed out
            assert len(sent) == 2 and client.sent == 3
            assert raised.value.msgid == sent[0]
            assert 0.5 <= time.monotonic() - started < 5
            # unconfirmed, the one timed out included (the router may hold it or not)
            assert len(batch.outstanding) == 3 and list(batch.outstanding)[:2] == sent
    finally:
        silent.close()
        context.term()


def test_submit_guarantee_sends_back_to_back(harness):
    """emq-green-submit --guarantee (no --wait) uses a batch: it exits 0 once
    every job is held, and its requests were on the wire before the first
    confirmation came back (a router whose journal commits are held)."""
    front = harness.router.endpoints["frontend"]
    journal = harness.router.guarantees.journal
    commit, release = journal._commit, threading.Event()

    def held(rows, deletes):
        release.wait(20)
        return commit(rows, deletes)

    journal._commit = held
    out = io.StringIO()
    job = gevent.get_hub().threadpool.spawn(
        submit_main, (["os.getpid", "--count", "200", "--guarantee", "--addr", front]), out)
    try:
        # every request reached the router while none could be confirmed
        wait_until(lambda: harness.router.status()["guaranteed_held"] >= 200, timeout=20,
                   what="200 requests sent without waiting for confirmations")
    finally:
        release.set()
    assert job.get(timeout=20) == 0
    assert "confirmed 200" in out.getvalue()
    assert harness.router.status()["journal_rows"] == 200


@pytest.mark.timeout(60)
def test_a_batch_reads_hostile_answers_without_losing_or_confirming_wrongly():
    """A router that sends, before each real confirmation, random bytes, a
    1 MB frame, confirmations and refusals (deeply nested JSON) of msgids
    the batch never sent, and malformed flush answers: the batch confirms
    exactly what it sent, loses nothing and raises nothing. The frame reader
    itself (hypothesis): never raises, and reads a refusal only with a reason."""
    import random
    import threading

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from emq_green.client.results import confirmation_of

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=60), max_size=8))
    def reads_anything(frames):
        got = confirmation_of(frames)
        assert got is None or (isinstance(got[0], str) and isinstance(got[1], str))
        if got is not None and len(frames) == 6:
            assert got[1]  # a refusal always has a reason: never read as confirmed

    reads_anything()

    plain = zmq.Context()
    router = plain.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    done = threading.Event()
    received: list[str] = []
    nested = "[" * 5000 + "]" * 5000
    rng = random.Random(7)

    def serve() -> None:
        while not done.is_set():
            if not router.poll(20):
                continue
            ident, *frames = router.recv_multipart()
            if len(frames) < 4 or frames[2] != b"REQUEST":
                continue
            msgid = frames[3]
            received.append(msgid.decode())
            head = [ident, b"", b"eMQP/1.0"]
            for junk in ([rng.randbytes(rng.randrange(1, 50))],
                         [b"", b"eMQP/1.0", b"REPLY", b"m", b"x" * 1_000_000],
                         [b"", b"eMQP/1.0", b"REPLY", b"m", b"someone-else"],
                         [b"", b"eMQP/1.0", b"REPLY", b"m", nested.encode(), b"someone-else"],
                         [b"", b"eMQP/1.0", b"REPLY", b"m", b"\xff\xfe", msgid + b"x"],
                         [b"", b"eMQP/1.0", b"HEARTBEAT", b"m", b"1", b"flush", b"\xff"],
                         [b"", b"eMQP/1.0", b"REPLY"]):
                router.send_multipart([ident, *junk])
            router.send_multipart([*head, b"REPLY", b"ack", msgid])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with Client(f"tcp://127.0.0.1:{port}", green=False, confirm_timeout=10,
                    linger=0.5) as client:
            with GuaranteedBatch(client, window=20) as batch:
                sent = [batch.defer_job("os.getpid", [i]) for i in range(200)]
            assert batch.confirmed == 200 and batch.outstanding == {}
            assert client.acknowledged == 200
        assert received == sent
    finally:
        done.set()
        thread.join(5)
        router.close()
        plain.term()


STOPPED_ROUTER = """
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
port = sock.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    frames = sock.recv_multipart()
    if len(frames) > 4 and frames[3] == b"REQUEST":
        print(frames[4].decode(), flush=True)
"""


@pytest.mark.timeout(60)
def test_a_confirm_timeout_loses_none_of_the_requests_sent_before_it():
    """A router SIGSTOPped: a plain request, then a guaranteed one whose
    confirmation times out. The socket they went out on was closed for the
    timeout, and the plain request, queued on it, was thrown away with it
    (the client had returned its msgid). Resumed, the router gets both."""
    import signal
    import subprocess
    import sys

    router = subprocess.Popen([sys.executable, "-c", STOPPED_ROUTER], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(router.stdout.readline())
        os.kill(router.pid, signal.SIGSTOP)
        with Client(f"tcp://127.0.0.1:{port}", green=False, confirm_timeout=0.3,
                    linger=0) as client:
            plain = client.defer_job("os.getpid")
            with pytest.raises(ConfirmTimeout):
                client.defer_job("os.getpid", guarantee=True)
            os.kill(router.pid, signal.SIGCONT)
            seen: list[str] = []
            reader = threading.Thread(target=lambda: seen.extend(
                router.stdout.readline().strip() for _ in range(2)), daemon=True)
            reader.start()
            reader.join(timeout=20)
            assert plain in seen, f"the router got {seen}"
    finally:
        router.kill()
        router.wait()
