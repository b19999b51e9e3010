"""The router's behaviour on the wire, with real ZeroMQ sockets on loopback.

The router runs in this process on gevent; the fake workers, clients and
administrators are ``zmq.green`` DEALER sockets, so waiting on them lets the
router's greenlets run. Every wait has a deadline; nothing sleeps to
synchronise.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Callable, Iterator

import gevent
import pytest
import zmq.green as zmq
from conftest import stop_for_good
from peers import free_ports

from emq_green.protocol import CLIENT_FLUSH, KBYE_LEAVING, Command, Message, queues_json
from emq_green.router import Router, RouterState
from emq_green.settings import Settings

ANY_PORT = "tcp://127.0.0.1:*"


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        gevent.sleep(0.005)  # poll interval; lets the router's greenlets run


class Peer:
    """A DEALER socket speaking eMQP/1.0 to one of the router's sockets."""

    def __init__(self, addr: str, name: str = "") -> None:
        self.identity = (name or f"peer-{uuid.uuid4().hex[:8]}").encode()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)

    def send(self, command: Command, *body: str) -> Message:
        message = Message.new(command, *body)
        self.sock.send_multipart(message.frames())
        return message

    def recv(self, timeout: float = 3.0, skip_heartbeats: bool = True) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise AssertionError(f"{self.identity!r}: no message in {timeout} s")
            message = Message.parse(self.sock.recv_multipart())
            if not (skip_heartbeats and message.command is Command.HEARTBEAT):
                return message

    def pending(self) -> list[Message]:
        """Messages already delivered, heartbeats left out."""
        found = []
        while self.sock.poll(0):
            message = Message.parse(self.sock.recv_multipart())
            if message.command is not Command.HEARTBEAT:
                found.append(message)
        return found

    def close(self) -> None:
        self.sock.close(linger=0)


class Harness:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.peers: list[Peer] = []

    def peer(self, socket_name: str, name: str = "") -> Peer:
        peer = Peer(self.router.endpoints[socket_name], name)
        self.peers.append(peer)
        return peer

    def worker(self, queues=((10, "default"),), slots: int = 0, name: str = "") -> Peer:
        peer = self.peer("backend", name)
        inform = peer.send(Command.INFORM, queues_json(queues), "worker")
        ack = peer.recv()
        assert ack.command is Command.ACK and ack.body == (inform.msgid,)
        for _ in range(slots):
            peer.send(Command.READY)
        wait_until(lambda: self.slots(peer) == slots, what=f"{slots} slots")
        return peer

    def slots(self, peer: Peer) -> int:
        worker = self.router.workers.get(peer.identity)
        return -1 if worker is None else worker.slots

    def request(self, client: Peer, queue: str = "default", headers: str = "",
                payload: str = '["run", {"path": "os", "callable": "getpid"}]') -> Message:
        return client.send(Command.REQUEST, queue, headers, payload)

    def admin(self, command: Command) -> dict:
        peer = self.peer("administrative")
        peer.send(command)
        reply = peer.recv()
        assert reply.command is Command.REPLY
        return json.loads(reply.body[0])


@pytest.fixture
def make_router() -> Iterator[Callable[..., Harness]]:
    harnesses: list[Harness] = []

    def make(**overrides) -> Harness:
        values = dict(frontend_addr=ANY_PORT, backend_addr=ANY_PORT,
                      administrative_addr=ANY_PORT)
        values.update(overrides)
        settings = Settings(**values)
        router = Router(settings=settings)
        router.start()
        harness = Harness(router)
        harnesses.append(harness)
        return harness

    yield make
    stuck = []
    for harness in harnesses:
        for peer in harness.peers:
            peer.close()
        if not harness.router.stop(timeout=5):
            stuck.append(harness.router.endpoints)
    if stuck:
        pytest.fail(f"router(s) {stuck} did not stop")


def test_inform_ack_ready_request_and_acknowledgement(make_router):
    h = make_router()
    worker = h.worker(slots=2)
    client = h.peer("frontend")
    sent = h.request(client, headers="reply-requested")

    got = worker.recv()
    assert got.command is Command.REQUEST
    assert got.msgid == sent.msgid and got.body == sent.body
    ack = client.recv()
    assert ack.command is Command.REPLY and ack.body == (sent.msgid,)
    assert h.slots(worker) == 1

    # the worker's REPLY is [reply_json, orig_msgid]; the router is not a relay
    worker.send(Command.REPLY, '{"value": 1}', sent.msgid)
    wait_until(lambda: not h.router.workers[worker.identity].in_flight, what="in flight cleared")
    assert client.pending() == []


def test_heaviest_worker_first_then_least_recently_used(make_router):
    h = make_router()
    heavy = h.worker(queues=[(20, "q")], slots=1, name="heavy")
    b = h.worker(queues=[(10, "q")], slots=2, name="b")
    c = h.worker(queues=[(10, "q")], slots=2, name="c")
    client = h.peer("frontend")

    order = []
    for _ in range(5):
        sent = h.request(client, queue="q")
        assert client.recv().body == (sent.msgid,)
        for peer in (heavy, b, c):
            if any(m.msgid == sent.msgid for m in peer.pending()):
                order.append(peer.identity.decode())
    assert order == ["heavy", "b", "c", "b", "c"]

    # no slot left anywhere: the sixth waits in the router, unacknowledged
    sixth = h.request(client, queue="q")
    wait_until(lambda: len(h.router.waiting.get("q", ())) == 1, what="buffered")
    assert client.pending() == []
    c.send(Command.READY)
    assert c.recv().msgid == sixth.msgid
    assert client.pending() == []  # buffered requests get no acknowledgement


def test_unknown_queue_goes_to_default(make_router):
    h = make_router()
    worker = h.worker(queues=[(10, "default")], slots=1)
    client = h.peer("frontend")
    sent = h.request(client, queue="no-such-queue")
    got = worker.recv()
    assert got.msgid == sent.msgid
    assert got.body[0] == "no-such-queue"  # forwarded untouched
    assert h.router.processed_by_queue["default"] == 1


def test_requests_of_a_queue_whose_workers_left_wait_for_its_next_worker(make_router, caplog):
    # EventMQ 0.3.13 keeps a queue it has seen: its requests wait for a
    # worker of that queue; neither those buffered nor new ones go to default
    h = make_router()
    caplog.set_level(logging.INFO, logger="emq_green.router")
    default = h.worker(queues=[(10, "default")], slots=5, name="default-worker")
    mail = h.worker(queues=[(10, "mail")], slots=0, name="mail-worker")
    client = h.peer("frontend")
    before = [h.request(client, queue="mail") for _ in range(2)]
    wait_until(lambda: len(h.router.waiting.get("mail", ())) == 2, what="buffered")
    mail.send(Command.KBYE)
    wait_until(lambda: not h.slots(mail) + 1, what="mail worker gone")
    after = h.request(client, queue="mail")
    wait_until(lambda: len(h.router.waiting.get("mail", ())) == 3, what="third buffered")
    assert default.pending() == [] and h.slots(default) == 5
    assert h.admin(Command.STATUS)["waiting_messages_by_queue"] == {"mail": 3}
    assert not any("goes to default" in r.getMessage() for r in caplog.records)

    back = h.worker(queues=[(10, "mail")], slots=0, name="mail-worker-2")
    for _ in range(3):
        back.send(Command.READY)
    got = [back.recv().msgid for _ in range(3)]
    assert got == [m.msgid for m in [*before, after]]
    assert "mail" not in h.router.waiting and default.pending() == []


@pytest.mark.timeout(30)
def test_a_router_just_started_keeps_requests_for_queues_its_workers_will_announce(
        make_router, monkeypatch, caplog):
    """A restarted router knows no queue: a scheduler's first firings and
    the clients' first requests for "probe" went to the default queue, which
    the workers did not serve, and waited there for ever (a probe: 15 of 15
    delayed jobs). For its first ``settle_for`` seconds such a request waits
    in its own queue's buffer, for the workers connecting again; then, as
    before, the default queue takes what no worker announced."""
    monkeypatch.setattr(Router, "settle_for", 1.5)
    caplog.set_level(logging.INFO, logger="emq_green.router")
    h = make_router()
    default = h.worker(queues=[(10, "default")], slots=5, name="default-worker")
    client = h.peer("frontend")
    early = h.request(client, queue="probe")
    stray = h.request(client, queue="nobody")
    wait_until(lambda: set(h.router.waiting) == {"probe", "nobody"}, what="both kept")
    assert default.pending() == []
    assert 0 < h.router.status()["settling_seconds_left"] <= 1.5
    probe = h.worker(queues=[(10, "probe")], name="probe-worker")
    probe.send(Command.READY)
    assert probe.recv(timeout=5).msgid == early.msgid  # the worker that came back has it
    # the grace over: what no worker announced goes to the default queue
    assert default.recv(timeout=10).msgid == stray.msgid
    assert not h.router.waiting
    [line] = [r.getMessage() for r in caplog.records if "after the start" in r.getMessage()]
    assert "nobody (1)" in line and "probe" not in line
    assert h.router.status()["settling_seconds_left"] == 0
    # and from now on at once, as EventMQ's router does
    later = h.request(client, queue="nobody-else")
    assert default.recv(timeout=5).msgid == later.msgid


@pytest.mark.timeout(30)
def test_clients_paused_by_a_queue_full_in_the_grace_are_read_again_once_it_moved(
        make_router, monkeypatch):
    """A review's find: an unserved queue filled to hwm in the router's
    first moments paused the clients; at the grace's end its requests went
    to default and ran, and reading never resumed (the next request was
    dropped unread at the stop)."""
    monkeypatch.setattr(Router, "settle_for", 1.0)
    h = make_router(hwm=4)
    client = h.peer("frontend")
    early = [h.request(client, queue="foo") for _ in range(4)]
    wait_until(lambda: h.router.sockets.frontend_paused, what="clients paused")
    default = h.worker(queues=[(10, "default")], slots=16, name="default-worker")
    assert [default.recv(timeout=10).msgid for _ in early] == [m.msgid for m in early]
    later = h.request(client)
    assert default.recv(timeout=10).msgid == later.msgid
    assert not h.router.sockets.frontend_paused


def test_a_queue_name_is_remembered_for_a_bounded_number_of_departures():
    from emq_green.router.routing import SERVED_MEMORY, Routing

    routing = Routing(default_queue="default", hwm=10, max_buffer_bytes=-1)
    for n in range(SERVED_MEMORY + 1):
        worker = routing.add(f"w{n}".encode(), [(10, f"q{n}")], 0.0)
        assert routing.queue_for(f"q{n}") == f"q{n}"
        routing.remove(worker)
    assert routing.queue_for("q0") == "default"  # the oldest name is forgotten
    assert routing.queue_for("q1") == "q1" == routing.queue_for("q1")
    assert routing.queue_for(f"q{SERVED_MEMORY}") == f"q{SERVED_MEMORY}"
    assert routing.queue_for("never-served") == "default"
    again = routing.add(b"again", [(10, "q0")], 0.0)
    routing.remove(again)
    assert routing.queue_for("q0") == "q0" and routing.queue_for("q1") == "default"


def test_full_buffer_pauses_reading_clients_instead_of_dropping(make_router, caplog):
    h = make_router(hwm=3)
    worker = h.worker(slots=0)
    client = h.peer("frontend")
    caplog.set_level(logging.INFO, logger="emq_green.router")
    sent = [h.request(client) for _ in range(5)]
    wait_until(lambda: h.router.frontend_paused, what="reading clients paused")
    assert [r.msgid for r in h.router.waiting["default"]] == [m.msgid for m in sent[:3]]
    assert any("buffer full" in r.getMessage() and "hwm 3" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    status = h.admin(Command.STATUS)  # the admin socket answers while paused
    assert status["frontend_paused"] is True and status["frontend_pauses"] == 1
    assert status["waiting_messages_by_queue"] == {"default": 3}
    assert status["buffered_bytes"] == sum(r.size for r in h.router.waiting["default"])
    assert status["dropped_messages_by_queue"] == {}

    # READYs drain the buffer oldest first, and the two unread requests follow
    for expected in sent:
        worker.send(Command.READY)
        assert worker.recv().msgid == expected.msgid
    assert h.slots(worker) == 0 and "default" not in h.router.waiting
    status = h.admin(Command.STATUS)
    assert status["dropped_messages_by_queue"] == {}
    assert status["dropped_requests_by_reason"] == {}
    assert status["waiting_messages_by_queue"] == {}
    assert status["frontend_paused"] is False and status["buffered_bytes"] == 0


@pytest.mark.parametrize("queues", [[(10, "first"), (30, "second")],
                                    [(30, "first"), (10, "second"), (50, "first")]])
def test_a_worker_s_queues_are_served_from_the_buffer_in_inform_order(make_router, queues):
    # as EventMQ's router: a READY takes from the first queue the INFORM
    # listed that has a request waiting; weights choose between workers
    h = make_router()
    worker = h.worker(queues=queues, slots=0)
    client = h.peer("frontend")
    second = h.request(client, queue="second")
    first = h.request(client, queue="first")
    wait_until(lambda: "first" in h.router.waiting and "second" in h.router.waiting)
    worker.send(Command.READY)
    assert worker.recv().msgid == first.msgid
    worker.send(Command.READY)
    assert worker.recv().msgid == second.msgid


def test_silent_worker_removed_and_its_requests_logged(make_router, caplog):
    # 2 s: a busy machine must not remove the worker before it took its jobs
    h = make_router(heartbeat_interval=0.1, heartbeat_timeout=2.0)
    caplog.set_level(logging.INFO, logger="emq_green.router")
    worker = h.worker(slots=2)
    client = h.peer("frontend")
    plain = h.request(client, queue="default")
    replied = h.request(client, queue="default", headers="reply-requested")
    assert {worker.recv().msgid, worker.recv().msgid} == {plain.msgid, replied.msgid}

    # the router heartbeats the worker while it is known
    beat = worker.recv(skip_heartbeats=False)
    assert beat.command is Command.HEARTBEAT and float(beat.body[0]) > 0

    # then the worker goes silent and is removed
    wait_until(lambda: not h.router.workers, timeout=10, what="silent worker removed")
    lost = [r.getMessage() for r in caplog.records if "possibly lost REQUEST" in r.getMessage()]
    assert any(plain.msgid in m and "queue default" in m for m in lost)
    assert any(replied.msgid in m for m in lost)
    assert h.admin(Command.ROUTER_SHOW_WORKERS) == {"connected_workers": {},
                                                      "connected_queues": {}}

    # late messages from the removed worker are dropped without harm
    worker.send(Command.READY)
    newcomer = h.worker(slots=1)
    third = h.request(client)
    assert newcomer.recv().msgid == third.msgid


def test_heartbeats_keep_a_worker_alive(make_router):
    # a 1 s timeout (ten intervals) leaves room for a busy machine
    h = make_router(heartbeat_interval=0.1, heartbeat_timeout=1.0)
    worker = h.worker(slots=1)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # three heartbeat timeouts, answering each beat
        beat = worker.recv(skip_heartbeats=False)
        assert beat.command is Command.HEARTBEAT
        worker.send(Command.HEARTBEAT, str(time.time()))
    assert worker.identity in h.router.workers


def test_kbye_forgets_the_worker_at_once(make_router):
    h = make_router()
    worker = h.worker(queues=[(10, "default"), (5, "other")], slots=3)
    worker.send(Command.KBYE)
    wait_until(lambda: not h.router.workers, what="worker forgotten")
    assert h.router.queues == {}
    client = h.peer("frontend")
    sent = h.request(client)
    wait_until(lambda: "default" in h.router.waiting)
    assert worker.pending() == [] and h.router.waiting["default"][0].msgid == sent.msgid


def test_an_emq_green_worker_s_kbye_is_answered_and_eventmq_s_is_not(make_router):
    """A stopping emq-green worker waited heartbeat_timeout for REQUESTs that
    might cross its KBYE; the router's answer says none follows. EventMQ's
    job manager sends a KBYE with no body and is sent nothing (one with
    heartbeats off resets its connection on a KBYE)."""
    h = make_router()
    green = h.worker(slots=2, name="green")
    client = h.peer("frontend")
    sent = h.request(client)
    first = green.recv()
    assert (first.command, first.body[-3:]) == (Command.REQUEST, sent.body)
    green.send(Command.KBYE, KBYE_LEAVING)
    answer = green.recv()
    assert answer.command is Command.KBYE and answer.body == ()
    eventmq = h.worker(slots=1, name="eventmq")
    eventmq.send(Command.KBYE)
    wait_until(lambda: not h.router.workers, what="both workers gone")
    h.admin(Command.STATUS)  # a turn of the router's loop after the KBYE
    assert eventmq.pending() == [] and green.pending() == []


def leave_beside_a_silent_control(h: Harness, client: Peer, leaver: Peer) -> None:
    """``leaver`` says KBYE ``leaving``, and so does a second worker, the
    control, with a job it never reports (given up as possibly lost once
    its grace is over); both KBYEs answered."""
    silent = h.worker(slots=1, name="silent")
    lost = h.request(client)
    assert silent.recv().msgid == lost.msgid
    for peer in (leaver, silent):
        peer.send(Command.KBYE, KBYE_LEAVING)
        assert peer.recv().command is Command.KBYE


def test_jobs_a_leaving_worker_ends_with_readies_are_not_taken_for_lost(make_router):
    """A worker that said KBYE ``leaving`` sends no REPLY for the jobs sent
    without reply-requested that end during its drain: a READY after the
    router's answer ends each one. Without it they were logged as possibly
    lost once kill_grace_period was over, though they had run."""
    h = make_router(kill_grace_period=0.2, heartbeat_timeout=0.3, heartbeat_interval=0.1)
    client = h.peer("frontend")
    drained = h.worker(slots=3, name="drained")
    plain = [h.request(client) for _ in range(2)]
    asked = h.request(client, headers="reply-requested")
    got = [drained.recv() for _ in range(3)]
    assert {m.msgid for m in got} == {m.msgid for m in [*plain, asked]}
    leave_beside_a_silent_control(h, client, drained)
    drained.send(Command.REPLY, '{"value": 1}', asked.msgid)
    for _ in range(3):  # one READY more than it owes: ignored
        drained.send(Command.READY)
    wait_until(lambda: h.router.counters["possibly_lost"] >= 1, timeout=10,
               what="the silent worker's job given up")
    status = h.admin(Command.STATUS)  # a turn of the router's loop after that
    assert h.router.counters["possibly_lost"] == 1 == status["possibly_lost"]
    assert drained.identity not in h.router.routing.leaving
    assert drained.identity not in h.router.workers and not h.router.waiting


def test_a_leaving_worker_that_heartbeats_keeps_its_jobs_past_the_grace(make_router):
    """The connection a reload retires keeps running its jobs (the worker
    kills them only when it stops): while it beats, the router keeps those
    jobs on its books past kill_grace_period, so a long job's end still
    counts (its REPLY was dropped as late, its result lost). The control
    stops beating and its job is given up."""
    h = make_router(kill_grace_period=0.5, heartbeat_timeout=1.0, heartbeat_interval=0.1)
    client = h.peer("frontend")
    beating = h.worker(slots=1, name="beating")
    long_job = h.request(client, headers="reply-requested")
    assert beating.recv().msgid == long_job.msgid
    leave_beside_a_silent_control(h, client, beating)

    def beat_until_the_control_is_given_up() -> bool:
        beating.send(Command.HEARTBEAT)
        return h.router.counters["possibly_lost"] >= 1

    wait_until(beat_until_the_control_is_given_up, timeout=10, what="the control given up")
    assert beating.identity in h.router.routing.leaving
    beating.send(Command.REPLY, '{"value": 1}', long_job.msgid)
    wait_until(lambda: beating.identity not in h.router.routing.leaving, what="job ended")
    assert h.router.counters["possibly_lost"] == 1 and h.router.counters["late_replies"] == 0


def test_a_ready_naming_a_plain_job_ends_that_job(make_router):
    """A READY does not say which job ended (EventMQ's job manager sends a
    new msgid): the oldest job sent without reply-requested is taken as
    done. An emq-green worker's READY carries the msgid of the job it
    follows: that job ends, and the READY after a REPLY asked for ends
    nothing. Without this the router named finished jobs "possibly lost"
    and took the one cut off for done (a probe's find)."""
    from emq_green.protocol import ready_frames

    h = make_router()
    worker = h.worker(slots=4, name="names")
    client = h.peer("frontend")
    plain = [h.request(client) for _ in range(3)]
    asked = h.request(client, headers="reply-requested")
    assert {worker.recv().msgid for _ in range(4)} == {m.msgid for m in [*plain, asked]}
    record = h.router.workers[worker.identity]

    def in_flight() -> list[str]:
        h.admin(Command.STATUS)  # a turn of the router's loop after the last send
        return list(record.in_flight)

    worker.sock.send_multipart(ready_frames(plain[1].msgid))  # the middle one ended
    assert in_flight() == [plain[0].msgid, plain[2].msgid, asked.msgid]
    worker.send(Command.REPLY, '{"value": 1}', asked.msgid)
    worker.sock.send_multipart(ready_frames(asked.msgid))  # its READY ends nothing more
    assert in_flight() == [plain[0].msgid, plain[2].msgid]
    worker.send(Command.READY)  # a READY naming nothing: the oldest, as before
    assert in_flight() == [plain[2].msgid]
    assert record.unreplied == 1 and h.slots(worker) == 3


def test_admin_replies_in_eventmq_shapes(make_router):
    h = make_router()
    worker = h.worker(queues=[(10, "default"), (20, "mail")], slots=2, name="w1")
    client = h.peer("frontend")
    h.request(client, queue="mail")
    worker.recv()

    shown = h.admin(Command.ROUTER_SHOW_WORKERS)
    assert set(shown) == {"connected_workers", "connected_queues"}
    w1 = shown["connected_workers"]["w1"]
    assert w1["queues"] == [[10, "default"], [20, "mail"]]
    assert w1["available_slots"] == 1 and isinstance(w1["hb"], float)
    assert shown["connected_queues"] == {"default": [[10, "w1"]], "mail": [[20, "w1"]]}

    status = h.admin(Command.STATUS)
    for key in ("inflight_messages_by_queue", "latency_messages_by_queue",
                "max_latency_messages_by_queue", "waiting_messages_by_queue",
                "processed_messages_by_queue", "processed_messages_by_worker"):
        assert isinstance(status[key], dict), key
    assert status["inflight_messages_by_queue"] == {"mail": 1}
    assert status["processed_messages_by_queue"] == {"mail": 1}
    assert status["processed_messages_by_worker"] == {"w1": 1}
    assert h.admin(Command.ROUTER_SHOW_SCHEDULERS) == {"connected_schedulers": {}}


def test_schedule_without_scheduler_is_held_and_a_bad_one_refused(make_router, caplog):
    h = make_router()
    caplog.set_level(logging.INFO, logger="emq_green.router")
    client = h.peer("frontend")
    sent = client.send(Command.SCHEDULE, "default", "", "60",
                       '["run", {"path": "os", "callable": "getpid", "args": [], "kwargs": {}, '
                       '"class_args": [], "class_kwargs": {}}]', "")
    wait_until(lambda: len(h.router.scheduler_side.held) == 1)
    assert any("no scheduler" in r.getMessage() and sent.msgid in r.getMessage()
               for r in caplog.records)
    client.send(Command.UNSCHEDULE, "default", "", "60", "[]", "")  # no call: refused
    refusal = client.recv()
    assert '"refused": "refused_malformed"' in refusal.body[0]
    assert h.router.state is RouterState.RUNNING
    status = h.admin(Command.STATUS)
    assert status["schedule_messages_held"] == 1
    assert status["schedule_messages"] == {"held": 1, "refused_malformed": 1}


def test_admin_disconnect_says_kbye_and_stops(make_router, caplog):
    h = make_router()
    caplog.set_level(logging.INFO, logger="emq_green.router")
    worker = h.worker(slots=0)
    client = h.peer("frontend")
    waiting = h.request(client)
    wait_until(lambda: "default" in h.router.waiting)
    admin = h.peer("administrative")
    disconnect = admin.send(Command.DISCONNECT)
    ack = admin.recv()
    assert ack.command is Command.ACK and ack.body == (disconnect.msgid,)
    assert worker.recv().command is Command.KBYE
    assert h.router.wait_for_state(RouterState.STOPPED, timeout=5)
    assert any(waiting.msgid in r.getMessage() and "dropped" in r.getMessage()
               for r in caplog.records)


def test_malformed_messages_are_dropped(make_router):
    h = make_router()
    raw = h.peer("frontend")
    raw.sock.send_multipart([b"", b"eMQP/9.9", b"REQUEST", b"x"])
    raw.sock.send_multipart([b"garbage"])
    worker = h.worker(slots=1)
    sent = h.request(raw)
    assert worker.recv().msgid == sent.msgid
    assert h.router.counters["malformed_messages"] == 2


def test_emq_clis_hello_on_the_administrative_socket_is_not_malformed(make_router, caplog):
    # EventMQ's emq-cli sends HELLO before each command, as the docs tell
    # users to run it; EventMQ's router ignores it
    h = make_router()
    caplog.set_level(logging.WARNING, logger="emq_green.router")
    admin = h.peer("administrative")
    admin.sock.send_multipart([b"", b"eMQP/1.0", b"HELLO", b"m1"])
    admin.sock.send_multipart([b"", b"eMQP/1.0", b"SHOUT", b"m2"])  # still malformed
    wait_until(lambda: h.router.counters["malformed_messages"] == 1, what="SHOUT counted")
    assert "connected_workers" in h.admin(Command.ROUTER_SHOW_WORKERS)
    assert h.router.counters["malformed_messages"] == 1
    assert not any("HELLO" in r.getMessage() for r in caplog.records)


def test_a_message_on_the_wrong_socket_is_ignored_and_its_sender_named(make_router, caplog):
    h = make_router()
    caplog.set_level(logging.WARNING, logger="emq_green.router")
    lost = h.peer("frontend", name="lost-worker")
    lost.send(Command.READY)
    wrong = h.peer("backend", name="wrong-kind")
    wrong.send(Command.INFORM, "", "scheduler")
    wait_until(lambda: h.router.counters["unexpected_messages"] == 1
               and h.router.counters["informs_refused"] == 1, what="both ignored")
    lines = [r.getMessage() for r in caplog.records]
    assert any("ignored READY" in m and "lost-worker" in m and "frontend" in m for m in lines)
    assert any("INFORM of type scheduler from wrong-kind" in m for m in lines)
    assert not h.router.workers


def test_replies_short_of_frames_from_a_stranger_leave_the_worker_socket_served(make_router):
    # a REPLY with no body frame ended the worker socket's reader (an
    # IndexError in the check before the handlers): no worker was heard again
    h = make_router()
    stranger = h.peer("backend")
    stranger.send(Command.REPLY)
    stranger.send(Command.REPLY, '{"value": 1}')
    worker = h.worker(slots=1)
    client = h.peer("frontend")
    sent = h.request(client)
    assert worker.recv().msgid == sent.msgid


def test_weights_across_queues_pick_the_heaviest_worker_with_a_slot(make_router):
    h = make_router()
    w1 = h.worker(queues=[(30, "a"), (10, "b")], slots=2, name="w1")
    w2 = h.worker(queues=[(10, "a"), (30, "b")], slots=2, name="w2")
    client = h.peer("frontend")

    def goes_to(queue: str) -> str:
        sent = h.request(client, queue=queue)
        assert client.recv().body == (sent.msgid,)  # handed over at once
        got = [p.identity.decode() for p in (w1, w2)
               for m in p.pending() if m.msgid == sent.msgid]
        if not got:  # delivered, not read yet
            wait_until(lambda: any(p.sock.poll(0) for p in (w1, w2)), what="delivery")
            got = [p.identity.decode() for p in (w1, w2)
                   for m in p.pending() if m.msgid == sent.msgid]
        [name] = got
        return name

    # each queue goes to the worker that weighs it most, while it has slots;
    # then to the lighter one
    assert [goes_to(q) for q in ("a", "b", "a", "a")] == ["w1", "w2", "w1", "w2"]
    assert h.slots(w1) == 0 and h.slots(w2) == 0
    # no slot anywhere: queue b buffers, and the next READY of a worker
    # serving b (w1, its lighter queue) takes it
    buffered = h.request(client, queue="b")
    wait_until(lambda: "b" in h.router.waiting, what="buffered")
    w1.send(Command.READY)
    assert w1.recv().msgid == buffered.msgid


def test_request_to_an_unreachable_worker_is_dispatched_to_the_next(make_router, caplog):
    h = make_router()
    caplog.set_level(logging.INFO, logger="emq_green.router")
    dead = h.worker(queues=[(30, "default")], slots=1, name="dead")
    live = h.worker(queues=[(10, "default")], slots=1, name="live")
    dead.close()  # gone without a KBYE: the router still counts its slot
    # wait until ZeroMQ has dropped the connection: the router's one send
    # path then reports the peer as unreachable (a heartbeat as the probe)
    wait_until(lambda: not h.router.sockets.send("backend", dead.identity,
                                                 Message.new(Command.HEARTBEAT, "probe")),
               timeout=10, what="the dead worker's connection dropped")
    assert dead.identity in h.router.workers and h.slots(dead) == 1
    client = h.peer("frontend")
    sent = h.request(client)
    assert live.recv().msgid == sent.msgid
    assert client.recv().body == (sent.msgid,)  # acknowledged once
    assert dead.identity not in h.router.workers
    assert any("dead removed (it cannot be reached)" in r.getMessage()
               for r in caplog.records)
    assert h.router.processed_by_worker == {"live": 1}
    assert h.router.status()["requests_rerouted"] == 1
    assert client.pending() == []


def connected_client(h: Harness) -> Peer:
    """A client the router has heard from (a ROUTER socket can only answer
    a peer whose connection it has seen): it sends an ignored DISCONNECT."""
    client = h.peer("frontend")
    before = h.router.counters["client_disconnects_ignored"]
    client.send(Command.DISCONNECT)
    wait_until(lambda: h.router.counters["client_disconnects_ignored"] > before,
               what="the client's DISCONNECT read")
    return client


def test_requests_handed_out_in_one_turn_leave_in_one_batch_acknowledged_after(make_router):
    """REQUESTs handed out while the router handles a batch wait for the
    end of its turn and leave together, before their acknowledgements."""
    h = make_router()
    worker = h.worker(slots=3)
    client = connected_client(h)
    batches: list[tuple[str, list[bytes]]] = []
    send_many = h.router.sockets.send_many

    def recording(name, messages):
        batches.append((name, [frames[3] for frames in messages]))
        return send_many(name, messages)

    h.router.sockets.send_many = recording
    sent = [Message.new(Command.REQUEST, "default", "", '["run", {}]') for _ in range(3)]
    for message in sent:  # one turn: nothing here lets the loop run
        h.router.client_side.on_request(client.identity, message)
    assert batches == [] and h.slots(worker) == 0
    got = [worker.recv().msgid for _ in sent]
    assert got == [m.msgid for m in sent]
    assert batches == [("backend", [b"REQUEST"] * 3), ("frontend", [b"REPLY"] * 3)]
    assert [client.recv().body for _ in sent] == [(m.msgid,) for m in sent]


@pytest.mark.parametrize("dead", [True, False], ids=["removed-as-dead", "said-kbye"])
def test_a_worker_removed_in_the_turn_of_its_requests_loses_none(make_router, caplog, dead):
    """A worker removed (dead, or leaving) after a request was handed to it
    but before the end of the turn never gets it: it goes to the next."""
    h = make_router()
    caplog.set_level(logging.INFO, logger="emq_green.router")
    first = h.worker(queues=[(20, "default")], slots=1, name="first")
    second = h.worker(queues=[(10, "default")], slots=1, name="second")
    client = connected_client(h)
    request = Message.new(Command.REQUEST, "default", "", '["run", {}]')
    side = h.router.worker_side
    h.router.client_side.on_request(client.identity, request)
    assert request.msgid in h.router.workers[first.identity].in_flight
    side.forget(h.router.workers[first.identity], "a test removes it", dead=dead)
    assert second.recv().msgid == request.msgid
    assert not first.sock.poll(300), "the removed worker got the request"
    assert h.router.processed_by_worker == {"second": 1}
    assert h.router.status()["requests_rerouted"] == 1
    assert not any("possibly lost" in r.getMessage() for r in caplog.records)
    assert client.recv().body == (request.msgid,)


def test_a_stopping_router_says_kbye_and_the_job_manager_reconnects(make_router, caplog):
    """KBYE sent to a real JobManager: it leaves the stopped router and
    INFORMs the next one on the same address with a new identity; a
    WARNING, not an ERROR (a router stopping is no fault)."""
    from emq_green.jobmanager import JobManager, State

    caplog.set_level(logging.INFO, logger="emq_green.worker")

    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    addrs = dict(frontend_addr=front, backend_addr=back, administrative_addr=admin)
    first = make_router(**addrs)
    manager = JobManager(settings=Settings(
        name="kbye", worker_addr=back, worker_addr_default=back, worker_addr_failover=back,
        concurrent_jobs=2, reconnect_timeout=1.0, heartbeat_interval=0.2), skip_signal=True)
    manager.start()
    try:
        wait_until(lambda: any(w.slots == 2 for w in first.router.workers.values()),
                   timeout=10, what="the manager's READYs")
        [old] = first.router.workers
        assert first.router.stop(timeout=5)
        wait_until(lambda: manager.counters["router_lost"] == 1, timeout=10,
                   what="the manager to take the KBYE")
        [said] = [r for r in caplog.records if "the router said KBYE" in r.getMessage()]
        assert said.levelno == logging.WARNING
        second = None
        deadline = time.monotonic() + 10
        while second is None:  # the port may take a moment to be free again
            try:
                second = make_router(**addrs)
            except OSError:
                assert time.monotonic() < deadline, "cannot bind the router again"
                gevent.sleep(0.05)  # poll interval
        wait_until(lambda: any(w.slots == 2 for w in second.router.workers.values()),
                   timeout=15, what="the manager on the new router")
        [new] = second.router.workers
        assert new != old and new.startswith(b"kbye:")
        assert manager.state is State.RUNNING
    finally:
        assert stop_for_good(manager, timeout=10)




@pytest.mark.timeout(60)
def test_an_idle_job_manager_stops_at_once_behind_an_emq_green_router(make_router):
    """It waited heartbeat_timeout (5 s by default) after its KBYE for
    REQUESTs that might cross it; the router's answer ends the wait. Here
    heartbeat_timeout is 20 s: the old wait would be that long."""
    from emq_green.jobmanager import JobManager, State

    h = make_router()
    back = h.router.endpoints["backend"]
    manager = JobManager(settings=Settings(
        name="quick", worker_addr=back, worker_addr_default=back, worker_addr_failover=back,
        concurrent_jobs=3, heartbeat_interval=1.0, heartbeat_timeout=20.0,
        kill_grace_period=40.0), skip_signal=True)
    manager.start()
    try:
        wait_until(lambda: any(w.slots == 3 for w in h.router.workers.values()),
                   timeout=10, what="the manager's READYs")
        started = time.monotonic()
        assert manager.stop(timeout=45)
        took = time.monotonic() - started
        assert manager.state is State.STOPPED and not h.router.workers
        assert took < 10, f"the stop took {took:.1f} s: it waited out heartbeat_timeout"
    finally:
        stop_for_good(manager)


@pytest.mark.timeout(60)
def test_a_client_closes_only_once_the_router_has_read_what_it_sent(make_router):
    """close() returned once ZeroMQ had handed the requests to the kernel; a
    process exiting then lost those the router had not read yet (the reset
    connection threw them away: a burst from emq-green-submit lost 8,000 of
    20,000). Now it waits for the router's answer to a flush probe."""
    from emq_green.client import Client

    h = make_router()
    client = Client(h.router.endpoints["frontend"], green=True, linger=30)
    for _ in range(3000):  # no worker: every one is buffered
        client.defer_job("os.getpid", queue="default")
    client.close()
    assert len(h.router.waiting.get("default", ())) == 3000
    assert client._router_answers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("green", [True, False])
def test_requests_asking_for_results_are_read_by_the_router_before_close_returns(
        make_router, green):
    """Requests with result=True go out on the result channel's socket,
    which close() did not flush: a process closing right after sending
    them lost up to 8,000 of 20,000 (a probe). Now the channel sends a probe
    too, and close() waits for its answer (within linger)."""
    from emq_green.client import Client

    h = make_router()

    def send_and_close() -> list:
        client = Client(h.router.endpoints["frontend"], green=green, linger=30)
        handles = [client.defer_job("os.getpid", result=True) for _ in range(1500)]
        client.close()  # no worker: every one is buffered, no result comes
        return handles

    # a plain client blocks its thread: it runs in a native one, the router here
    handles = send_and_close() if green else gevent.get_hub().threadpool.apply(send_and_close)
    assert len(h.router.waiting.get("default", ())) == 1500
    assert all(handle.ready() for handle in handles)  # failed at once: client_closed


@pytest.mark.timeout(60)
def test_a_flush_probe_is_answered_after_the_acknowledgements_and_a_scheduler_s_heartbeat_is_not(
        make_router):
    h = make_router()
    worker = h.worker(slots=1)
    client = h.peer("frontend")
    sent = h.request(client)
    probe = client.send(Command.HEARTBEAT, "1.0", CLIENT_FLUSH)
    ack, answer = client.recv(), client.recv(skip_heartbeats=False)
    assert (ack.command, ack.body) == (Command.REPLY, (sent.msgid,))
    assert answer.command is Command.HEARTBEAT and answer.body[1:] == (CLIENT_FLUSH, probe.msgid)
    assert worker.recv().command is Command.REQUEST
    assert h.router.status()["unknown_scheduler_heartbeats"] == 0
    assert not h.router.scheduler_side.schedulers


@pytest.mark.timeout(60)
def test_crafted_flush_probes_are_harmless_and_a_dead_router_does_not_wedge_close(make_router):
    """Malformed or hostile probes (no marker, extra frames, a 60 KB msgid,
    a flood) leave the router serving and taking no scheduler; a client
    whose router answered once and then stopped returns from close()
    within its linger."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from emq_green.client import Client
    from emq_green.client.flush import answered

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=9))
    def never_raises(frames):
        got = answered(frames)
        assert got is None or isinstance(got, str)

    never_raises()
    h = make_router()
    peer = h.peer("frontend")
    peer.sock.send_multipart([b"", b"eMQP/1.0", b"HEARTBEAT", b"m1", b"1.0"])
    peer.sock.send_multipart([b"", b"eMQP/1.0", b"HEARTBEAT", b"m2", b"1.0", b"flush", b"x"])
    peer.sock.send_multipart([b"", b"eMQP/1.0", b"HEARTBEAT", b"x" * 60000, b"1.0", b"flush"])
    for _ in range(500):
        peer.send(Command.HEARTBEAT, "1.0", CLIENT_FLUSH)
    answers = 0
    while answers < 500:
        if peer.recv(timeout=10, skip_heartbeats=False).body[1:2] == (CLIENT_FLUSH,):
            answers += 1
    assert not h.router.scheduler_side.schedulers
    worker = h.worker(slots=1)
    sent = h.request(peer)
    assert worker.recv().body[-3:] == sent.body  # still routing

    client = Client(h.router.endpoints["frontend"], green=True, linger=2)
    client.defer_job("os.getpid")
    for bad in (float("nan"), None, -1, float("inf"), "1"):
        with pytest.raises((TypeError, ValueError), match="flush timeout"):
            client.flush(bad)
    assert client.flush(5) and client._router_answers  # its sockets not lost
    assert h.router.stop(timeout=5)
    client.defer_job("os.getpid")
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_close_returns_within_linger_when_the_router_stops_reading():
    """A router that answered the first probes and then stops reading (its
    buffer full, or SIGSTOPped): close() spent linger waiting for the flush,
    then linger again closing the sockets (4 s with linger=2, a probe). Now
    the whole close() fits in linger; the pool's sockets and the result
    channel's are probed at once (8 idle sockets behind EventMQ's router
    took 8 x 0.25 s)."""
    import contextlib
    import threading

    import zmq as plain_zmq

    from emq_green.client import Client, SendTimeoutError

    context = plain_zmq.Context()
    router = context.socket(plain_zmq.ROUTER)
    router.setsockopt(plain_zmq.LINGER, 0)
    router.setsockopt(plain_zmq.RCVHWM, 10)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    answering, done = threading.Event(), threading.Event()
    answering.set()

    def serve() -> None:  # answers probes while ``answering``; then reads nothing
        while not done.is_set():
            if not answering.is_set() or not router.poll(20):
                done.wait(0.02)
                continue
            ident, *frames = router.recv_multipart()
            if len(frames) == 6 and frames[2] == b"HEARTBEAT" and frames[5] == b"flush":
                router.send_multipart([ident, b"", b"eMQP/1.0", b"HEARTBEAT", b"a", frames[4],
                                       b"flush", frames[3]])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = Client(f"tcp://127.0.0.1:{port}", green=False, linger=2, send_timeout=0.2)
        socks = [client._take() for _ in range(8)]  # 8 pooled sockets, each probed once
        for sock in socks:
            client._give_back(sock)
        client.defer_job("os.getpid", result=True)  # the result channel, probed too
        assert client.flush(5) and client._router_answers
        answering.clear()
        with contextlib.suppress(SendTimeoutError):
            for _ in range(100_000):  # until the queues are full
                client.defer_job("os.getpid")
        started = time.monotonic()
        client.close()
        took = time.monotonic() - started
        assert 1.9 <= took < 3.0, took  # the flush waited, and nothing after it
    finally:
        done.set()
        thread.join(5)
        router.close()
        context.term()
