"""emq-green's client with guaranteed jobs: it waits for the router's
confirmation, raises a clear error naming the msgid when none comes or the
router refuses, and the same holds for ``result=True``, ``@job`` and
``emq-green-submit --guarantee``. Real routers on loopback: emq-green's in
this process (a green client), EventMQ's as a subprocess."""

from __future__ import annotations

import io
import json
import os

import gevent
import pytest
from peers import BIN, Peers, RouterAddrs, require_eventmq
from test_router import ANY_PORT, Harness, wait_until

from emq_green.client import Client, ConfirmTimeout, GuaranteeRefused, JobError, job
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
