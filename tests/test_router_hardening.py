"""Hardening of the router and the client (issue 10), on real sockets.

* only the administrative socket stops the router: DISCONNECT on the client
  socket is ignored, in process and in a real ``emq-green --standalone``;
* size limits: a message over ``max_message_size`` never reaches a handler,
  is logged and counted, and other clients are served;
* backpressure instead of loss: a full buffer (``hwm`` requests per queue, or
  ``max_buffer_bytes`` in all) pauses reading the client socket; every
  request of a burst reaches a worker exactly once;
* the client blocks while the router pushes back (plain and green), or
  raises :class:`SendTimeoutError` after ``send_timeout``; it never drops.

In-process routers use the harness of ``test_router.py``; real processes
use the ``stack`` fixture of ``test_client.py``. Every wait has a deadline.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import gevent
import pytest
import zmq
import zmq.green
from peers import recv_from_client
from test_client import BIN, Stack, admin_request, lines, stack
from test_router import Harness, make_router, wait_until

from emq_green.client import Client, SendTimeoutError
from emq_green.protocol import Command, Message
from emq_green.router import Router, RouterState
from emq_green.router.routing import REQUEST_OVERHEAD
from emq_green.settings import Settings

__all__ = ["make_router", "stack"]  # fixtures

PAYLOAD = '["run", {"path": "os", "callable": "getpid"}]'


def _log_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------
# DISCONNECT


def test_disconnect_on_client_socket_is_ignored_admin_disconnect_stops(make_router, caplog):
    h = make_router()
    caplog.set_level(logging.INFO, logger="emq_green.router")
    worker = h.worker(slots=1)
    client = h.peer("frontend")
    disconnect = client.send(Command.DISCONNECT)
    wait_until(lambda: h.router.counters["client_disconnects_ignored"] == 1,
               what="DISCONNECT counted")
    assert any(disconnect.msgid in r.getMessage() and "ignored" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    assert h.router.state is RouterState.RUNNING

    sent = h.request(client)
    assert worker.recv().msgid == sent.msgid
    assert h.admin(Command.STATUS)["client_disconnects_ignored"] == 1

    admin = h.peer("administrative")
    admin.send(Command.DISCONNECT)
    assert admin.recv().command is Command.ACK
    assert h.router.wait_for_state(RouterState.STOPPED, timeout=5)


@pytest.mark.parametrize("overrides, warning", [
    (dict(administrative_addr="tcp://0.0.0.0:*"),
     "administrative socket (tcp://0.0.0.0:*) is not on loopback"),
    # a worker beating every 3 s (the default) behind a 2 s timeout is
    # removed as dead every few seconds while idle
    (dict(heartbeat_timeout=2),
     "heartbeat_timeout (2 s) is not longer than heartbeat_interval (3 s)"),
])
def test_risky_settings_are_warned_about_at_start(caplog, overrides, warning):
    caplog.set_level(logging.INFO, logger="emq_green.router")
    any_port = "tcp://127.0.0.1:*"
    addrs = dict(frontend_addr=any_port, backend_addr=any_port, administrative_addr=any_port)
    quiet = Router(settings=Settings(**addrs))
    quiet.start()
    quiet.stop(timeout=2)
    assert warning not in _log_text(caplog)
    loud = Router(settings=Settings(**{**addrs, **overrides}))
    loud.start()
    try:
        assert any(warning in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)
    finally:
        loud.stop(timeout=2)


# ----------------------------------------------------------------------
# size limits


def test_oversized_message_of_small_frames_dropped_counted_others_served(make_router, caplog):
    h = make_router(max_message_size=2000)
    caplog.set_level(logging.INFO, logger="emq_green.router")
    worker = h.worker(slots=2)
    big_sender = h.peer("frontend")
    # three body frames of 900 bytes: each under the limit, 2,700+ in all
    big = big_sender.send(Command.REQUEST, "default" + " " * 893, "x" * 900, "y" * 900)
    wait_until(lambda: h.router.dropped_by_reason["oversized"] == 1, what="oversized dropped")
    assert any(big.msgid in r.getMessage() and "oversized" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)

    other = h.peer("frontend")
    sent = h.request(other)
    assert worker.recv().msgid == sent.msgid
    assert worker.pending() == []  # the big one never reached the worker
    status = h.admin(Command.STATUS)
    assert status["oversized_messages"] == 1
    assert status["dropped_requests_by_reason"] == {"oversized": 1}
    assert status["processed_messages_by_queue"] == {"default": 1}
    # the sender itself is still served once it keeps to the limit
    small = h.request(big_sender)
    assert worker.recv().msgid == small.msgid


def test_oversized_frame_refused_by_zeromq_others_served(make_router):
    h = make_router(max_message_size=4096)
    worker = h.worker(slots=2)
    big_sender = h.peer("frontend")
    h.request(big_sender, payload="z" * 100_000)  # one frame over MAXMSGSIZE
    other = h.peer("frontend")
    sent = h.request(other)
    assert worker.recv().msgid == sent.msgid
    assert worker.pending() == []
    assert h.router.processed_by_queue["default"] == 1


def test_malformed_request_and_control_characters_logged_escaped(make_router, caplog):
    h = make_router()
    caplog.set_level(logging.INFO, logger="emq_green.router")
    worker = h.worker(slots=1)
    client = h.peer("frontend")
    evil = "evil\n\x1b[31mid"
    client.sock.send_multipart([b"", b"eMQP/1.0", b"REQUEST", evil.encode(), b"default",
                                b""])  # two body frames, not three
    wait_until(lambda: h.router.dropped_by_reason["malformed"] == 1, what="malformed counted")
    client.sock.send_multipart([b"", b"eMQP/1.0", b"REQUEST", b"m2", b"q\x07ueue",
                                b"", PAYLOAD.encode()])  # unknown queue, control char
    assert worker.recv().msgid == "m2"
    text = _log_text(caplog)
    assert "evil\\n\\x1b[31mid" in text and "q\\x07ueue" in text
    assert "\x1b" not in text and "\x07" not in text and "evil\n" not in text
    # a REQUEST whose msgid is not UTF-8 is malformed too, and logged escaped
    client.sock.send_multipart([b"", b"eMQP/1.0", b"REQUEST", b"bad\xff\x1b", b"default",
                                b"", PAYLOAD.encode()])
    wait_until(lambda: h.router.dropped_by_reason["malformed"] == 2, what="second counted")
    assert "bad\\xff\\x1b" in _log_text(caplog)
    # a SCHEDULE with no scheduler connected is held for one, and counted
    client.send(Command.SCHEDULE, "default", "", "60", PAYLOAD, "")
    wait_until(lambda: h.router.scheduler_side.counts["held"]
               + h.router.scheduler_side.counts["refused_malformed"] == 1,
               what="SCHEDULE counted")
    assert h.admin(Command.STATUS)["dropped_requests_by_reason"] == {"malformed": 2}
    assert worker.pending() == []


def test_requests_buffered_or_unread_at_stop_are_logged_and_counted(make_router, caplog):
    h = make_router(hwm=2)
    caplog.set_level(logging.INFO, logger="emq_green.router")
    h.worker(slots=0)
    client = h.peer("frontend")
    sent = [h.request(client) for _ in range(4)]
    wait_until(lambda: h.router.frontend_paused, what="paused")
    # wait until the two unread ones are queued in the router's socket
    wait_until(lambda: h.router.sockets.has_unread("frontend"),
               what="unread requests queued")
    assert h.router.stop(timeout=5)
    assert h.router.dropped_by_reason == {"stopping": 2, "unread": 2}
    assert h.router.dropped_by_queue == {"default": 2}
    text = _log_text(caplog)
    for message in sent:
        assert message.msgid in text


# ----------------------------------------------------------------------
# backpressure


def _burst_through_router(h: Harness, count: int, slots: int, payload: str) -> dict:
    """``count`` requests from one client as fast as ZeroMQ takes them, a
    worker with ``slots`` slots answering each REQUEST with READY; returns
    what was received and the largest buffer seen."""
    worker = h.worker(slots=slots)
    client = h.peer("frontend")
    client.sock.setsockopt(zmq.SNDHWM, 100)
    seen = {"msgids": [], "max_waiting": 0, "max_bytes": 0}
    sent: list[str] = []

    def sample() -> None:
        seen["max_waiting"] = max(seen["max_waiting"],
                                  max(map(len, h.router.waiting.values()), default=0))
        seen["max_bytes"] = max(seen["max_bytes"], h.router.buffered_bytes)

    def send_all() -> None:
        for _ in range(count):
            sent.append(h.request(client, payload=payload).msgid)
            sample()

    def work() -> None:
        while len(seen["msgids"]) < count:
            message = worker.recv(timeout=10)
            if message.command is Command.REQUEST:
                seen["msgids"].append(message.msgid)
                sample()
                worker.send(Command.READY)

    sender, runner = gevent.spawn(send_all), gevent.spawn(work)
    gevent.joinall([sender, runner], timeout=50, raise_error=True)
    assert sender.dead and runner.dead, "burst not done in 50 s"
    seen["sent"] = sent
    return seen


@pytest.mark.timeout(60)
def test_burst_paused_by_hwm_arrives_exactly_once(make_router):
    h = make_router(hwm=50)
    seen = _burst_through_router(h, count=5000, slots=3, payload=PAYLOAD)
    assert len(seen["msgids"]) == 5000
    assert sorted(seen["msgids"]) == sorted(seen["sent"])
    assert seen["msgids"] == seen["sent"]  # one client, one queue: in order
    assert 0 < seen["max_waiting"] <= 50
    status = h.admin(Command.STATUS)
    assert status["frontend_pauses"] >= 1
    assert status["dropped_messages_by_queue"] == {}
    assert status["dropped_requests_by_reason"] == {}
    assert status["processed_messages_by_queue"] == {"default": 5000}
    assert status["waiting_messages_by_queue"] == {} and status["buffered_bytes"] == 0


@pytest.mark.timeout(60)
def test_burst_paused_by_bytes_arrives_exactly_once(make_router):
    payload = json.dumps(["run", {"path": "os", "callable": "getpid", "args": ["p" * 1000]}])
    h = make_router(max_buffer_bytes=20_000)  # about 19 requests; hwm (10,000) not reached
    seen = _burst_through_router(h, count=2000, slots=2, payload=payload)
    assert sorted(seen["msgids"]) == sorted(seen["sent"]) and len(set(seen["msgids"])) == 2000
    request_size = len(seen["sent"][0]) + len("default") + len(payload) + REQUEST_OVERHEAD
    assert 0 < seen["max_bytes"] < 20_000 + request_size
    assert seen["max_waiting"] <= 20_000 // request_size + 1
    status = h.admin(Command.STATUS)
    assert status["frontend_pauses"] >= 1
    assert status["dropped_requests_by_reason"] == {}
    assert status["processed_messages_by_queue"] == {"default": 2000}


@pytest.mark.timeout(60)
def test_a_paused_router_takes_in_a_bounded_number_of_messages_per_client(make_router):
    """While clients are not read, what one connection can still park in the
    router (ZeroMQ's queue for it) is FRONTEND_RCVHWM messages, not ``hwm``:
    a client sent 2,500 x 1 MiB into a paused router (2.5 GB of RSS)."""
    from emq_green.router.sockets import FRONTEND_RCVHWM

    h = make_router(max_buffer_bytes=1)  # paused by the first buffered request
    h.worker(slots=0)
    client = h.peer("frontend")
    client.sock.setsockopt(zmq.SNDHWM, 1)
    client.sock.setsockopt(zmq.SNDBUF, 65536)
    h.request(client)
    wait_until(lambda: h.router.frontend_paused, what="paused")
    frames = Message.new(Command.REQUEST, "default", "", "x" * 32768).frames()
    accepted = 0
    # send until the socket stays unwritable for a second (the router's
    # side full), or far past the bound
    while accepted < 3000:
        try:
            client.sock.send_multipart(frames, zmq.NOBLOCK)
            accepted += 1
        except zmq.Again:
            if not client.sock.poll(1000, zmq.POLLOUT):
                break
    # the bound plus what the kernel's socket buffers and the client's own
    # pipe hold (a few hundred kB on loopback)
    assert FRONTEND_RCVHWM <= 100
    assert accepted < 300, accepted
    assert h.router.frontend_paused


@pytest.mark.timeout(60)
def test_tiny_requests_count_what_holding_them_costs(make_router):
    """A probe buffered tiny requests at ~405 bytes of memory each while
    max_buffer_bytes counted 6.5: the bound was 60 times the memory."""
    h = make_router(max_buffer_bytes=40_000)
    seen = _burst_through_router(h, count=1000, slots=1, payload="[]")
    assert sorted(seen["msgids"]) == sorted(seen["sent"])
    assert seen["max_waiting"] <= 101  # 40,000 / 400 + 1
    assert h.admin(Command.STATUS)["frontend_pauses"] >= 1


def test_admin_and_workers_served_while_paused(make_router):
    h = make_router(hwm=1, heartbeat_interval=0.1, heartbeat_timeout=0.5)
    worker = h.worker(slots=0)
    client = h.peer("frontend")
    first, second = h.request(client), h.request(client)
    wait_until(lambda: h.router.frontend_paused, what="paused")
    assert h.admin(Command.STATUS)["frontend_paused"] is True
    # heartbeats keep going both ways; a new worker can join while paused
    assert worker.recv(skip_heartbeats=False).command is Command.HEARTBEAT
    worker.send(Command.HEARTBEAT, str(time.time()))
    other = h.worker(queues=[(10, "other")], slots=0)
    assert other.identity in h.router.workers
    worker.send(Command.READY)
    assert worker.recv().msgid == first.msgid
    worker.send(Command.READY)
    assert worker.recv().msgid == second.msgid


# ----------------------------------------------------------------------
# the client under backpressure


def _deaf_router(context, hwm: int = 1):
    """A bound ROUTER socket that reads nothing until told to."""
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


BIG = "b" * 65536


@pytest.mark.parametrize("green", [False, True])
def test_client_send_timeout_raises_and_drops_nothing(green: bool):
    context = zmq.green.Context() if green else zmq.Context()
    deaf, addr = _deaf_router(context)
    client = Client(addr, green=green, hwm=1, send_timeout=0.2, linger=0)
    sent: list[str] = []
    try:
        with pytest.raises(SendTimeoutError) as caught:
            for _ in range(2000):
                sent.append(client.send_request(BIG))
        error = caught.value
        assert isinstance(error, TimeoutError) and not error.half_sent
        assert error.msgid in str(error) and error.msgid not in sent
        assert sent and client.sent == len(sent)

        # the router reads again: everything sent arrives, the timed-out one never
        got: list[str] = []
        deadline = time.monotonic() + 20
        while len(got) < len(sent) and time.monotonic() < deadline:
            if deaf.poll(200):
                got.append(Message.parse(recv_from_client(deaf)[1:]).msgid)
        assert got == sent
        assert not deaf.poll(200)
        # the client's socket was given back whole: it sends again
        again = client.send_request(PAYLOAD)
        assert deaf.poll(5000)
        assert Message.parse(recv_from_client(deaf)[1:]).msgid == again
    finally:
        client.close()
        deaf.close()
        context.term()


def _wait_stalled(progress, timeout: float = 20.0, quiet: float = 0.5) -> int:
    """Wait until ``progress()`` stops growing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = progress(), time.monotonic()
    while time.monotonic() < deadline:
        gevent.sleep(0.02)  # poll interval
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError("the sender never blocked")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("green", [False, True])
def test_client_blocks_while_nobody_reads_then_delivers_all(green: bool):
    context = zmq.green.Context() if green else zmq.Context()
    deaf, addr = _deaf_router(context)
    client = Client(addr, green=green, hwm=1, linger=0)
    count = 300  # 19 MB: far more than ZeroMQ's queues and the kernel buffers hold
    sent: list[str] = []

    def send_all() -> None:
        for _ in range(count):
            sent.append(client.send_request(BIG))

    if green:
        sender = gevent.spawn(send_all)
    else:
        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()

    def done() -> bool:
        return bool(sender.dead) if green else not sender.is_alive()
    try:
        blocked_at = _wait_stalled(lambda: len(sent))
        assert not done() and blocked_at < count, "the client did not block"
        got: list[str] = []
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            if deaf.poll(200):
                got.append(Message.parse(recv_from_client(deaf)[1:]).msgid)
        wait_until(done, timeout=10, what="the sender finished")
        assert got == sent and len(got) == count
    finally:
        deaf.close()
        client.close()
        context.term()


# ----------------------------------------------------------------------
# real processes


def _start_standalone(stack: Stack, slots: int, *extra: str):
    proc = stack.spawn("standalone", [
        str(BIN / "emq-green"), "--standalone", "-J", str(slots), "-n", "embedded",
        "--frontend-addr", stack.front, "--backend-addr", stack.back,
        "--administrative-addr", stack.admin, *extra])
    stack.wait_for_worker(slots=slots)
    return proc


@pytest.mark.timeout(90)
def test_standalone_survives_client_disconnect_and_stops_on_admin_disconnect(
        stack: Stack, tmp_path: Path):
    standalone = _start_standalone(stack, 2)
    marks = tmp_path / "marks"
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 1000)
    peer.connect(stack.front)
    try:
        peer.send_multipart(Message.new(Command.DISCONNECT).frames())

        def ignored() -> bool:
            status = admin_request(stack.admin, Command.STATUS) or {}
            return status.get("client_disconnects_ignored") == 1

        wait_until(ignored, 20, "the DISCONNECT counted as ignored")
        assert standalone.poll() is None
        with Client(stack.front, green=False) as client:
            client.defer_job("examples.jobs.mark", [str(marks), "after"])
        wait_until(lambda: lines(marks), 20, "a job run after the DISCONNECT")
        assert lines(marks)[0].split()[0] == "after"
    finally:
        peer.close()
    admin = zmq.Context.instance().socket(zmq.DEALER)
    admin.setsockopt(zmq.LINGER, 0)
    admin.connect(stack.admin)
    try:
        disconnect = Message.new(Command.DISCONNECT)
        admin.send_multipart(disconnect.frames())
        assert admin.poll(5000), "no ACK to the administrative DISCONNECT"
        ack = Message.parse(admin.recv_multipart())
        assert ack.command is Command.ACK and ack.body == (disconnect.msgid,)
    finally:
        admin.close()
    assert standalone.wait(timeout=30) == 0, stack.logs()


@pytest.mark.timeout(240)
def test_standalone_takes_a_30000_burst_without_losing_one(stack: Stack, tmp_path: Path):
    standalone = _start_standalone(stack, 4)
    marks = tmp_path / "marks"
    count = 30_000
    peak_waiting = 0
    with Client(stack.front, green=False) as client:
        for i in range(count):
            client.defer_job("examples.jobs.mark", [str(marks), str(i)])

    def finished() -> bool:
        nonlocal peak_waiting
        status = admin_request(stack.admin, Command.STATUS) or {}
        peak_waiting = max([peak_waiting, *status.get("waiting_messages_by_queue", {}).values()])
        return len(lines(marks)) >= count

    wait_until(finished, 180, f"{count} jobs run")
    tags = [line.split()[0] for line in lines(marks)]
    assert len(tags) == count and set(tags) == {str(i) for i in range(count)}
    status = admin_request(stack.admin, Command.STATUS)
    assert status["processed_messages_by_queue"] == {"default": count}
    assert status["dropped_messages_by_queue"] == {}
    assert status["dropped_requests_by_reason"] == {}
    assert status["frontend_pauses"] >= 1  # 30,000 > hwm 10,000: it did push back
    assert peak_waiting <= 10_000
    assert "dropped" not in (tmp_path / "standalone.log").read_text()
    standalone.send_signal(signal.SIGTERM)
    assert standalone.wait(timeout=30) == 0


@pytest.mark.timeout(30)
def test_a_failing_housekeeping_step_stops_neither_the_others_nor_the_next_ticks(
        make_router, caplog):
    """A probe's find: one exception in a housekeeping step (a hand-over of
    schedules, since fixed) ended the greenlet that beats, removes silent
    workers, expires results and redelivers, for good and nearly silently.
    A step that raises is now logged (a bounded number of times) and counted,
    and the steps after it and the next ticks still run."""
    from emq_green.router import broker

    broker._housekeeping_log.reset()
    h = make_router(heartbeat_interval=0.1, heartbeat_timeout=1.0)
    caplog.set_level(logging.ERROR, logger="emq_green.router")

    def broken(*_args):
        raise RuntimeError("injected fault")

    h.router.relay.expire = broken  # the first step of every tick
    wait_until(lambda: h.router.counters["housekeeping_errors"] >= 3,
               what="the failing step run at three ticks")
    h.worker(slots=1)
    # a later step of the same ticks still runs: the silent worker goes
    wait_until(lambda: not h.router.workers, timeout=10, what="silent worker removed")
    assert h.admin(Command.STATUS)["housekeeping_errors"] >= 3
    failures = [r for r in caplog.records if "housekeeping step failed" in r.getMessage()]
    assert 1 <= len(failures) <= 5 and failures[0].exc_info is not None


@pytest.mark.timeout(30)
def test_an_unknown_worker_is_logged_once_not_per_message(make_router, caplog):
    """An operator probe's find: after a router restart, every HEARTBEAT a
    worker had queued while it was down made its own WARNING (24 lines in
    3 ms for three workers). One line per identity; the rest are counted."""
    h = make_router()
    caplog.set_level(logging.DEBUG, logger="emq_green.router")
    ghost = h.peer("backend", name="ghost")
    for _ in range(5):
        ghost.send(Command.HEARTBEAT, "0")
    wait_until(lambda: h.router.counters["unknown_worker_messages"] == 5,
               what="five messages counted")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING
              and "unknown worker" in r.getMessage()]
    assert len(warned) == 1 and "told to connect anew" in warned[0].getMessage()
    assert ghost.recv().command is Command.KBYE and ghost.pending() == []
