"""The router (broker): EventMQ 0.3.13's router, rebuilt on gevent and ``zmq.green``.

Three ROUTER sockets, each read by exactly one greenlet:

* frontend (clients): REQUEST, plus SCHEDULE / UNSCHEDULE / scheduler INFORM,
  which are logged and dropped because emq-green has no scheduler;
* backend (workers): INFORM / ACK, READY, REPLY, HEARTBEAT, KBYE;
* administrative: STATUS, ROUTER_SHOW_WORKERS, ROUTER_SHOW_SCHEDULERS,
  DISCONNECT, answered with the JSON shapes EventMQ's ``emq-cli`` prints.

A fourth greenlet sends heartbeats and removes silent workers. Every send to a
socket goes through one method (:meth:`Router._send`), never waits, and
reports a vanished peer (ROUTER_MANDATORY's EHOSTUNREACH) as ``False``.

Routing, as EventMQ does it. A worker's INFORM lists ``[weight, queue]``
pairs; each READY is one free slot. A REQUEST goes to the worker with a free
slot that has the highest weight for its queue, the least recently used among
equal weights; the client gets ``REPLY [msgid]`` as an acknowledgement. A
REQUEST for a queue no worker serves goes to the default queue. With no free
slot it waits in a per-queue buffer of at most ``hwm`` requests (beyond that
it is dropped, with an error naming it) and leaves on the next READY of a
worker serving that queue, heaviest queue first, without acknowledgement.

Where emq-green differs: requests a worker had in flight when it is removed as
dead are logged one by one (msgid, queue, age); they are not re-dispatched,
because a job may have run already and eMQP has no way to tell. A READY does
not say which job ended, so for requests sent without ``reply-requested`` the
router retires the oldest one on each READY: that list is a best estimate,
exact only for requests that asked for a reply.

Lifecycle: ``stopped -> running -> stopping -> stopped``, changed only by
:meth:`Router._set_state`. :meth:`stop` says KBYE to every worker, logs
every buffered request it drops, then closes the sockets.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, Optional, Sequence

import gevent
import gevent.event
import zmq
import zmq.green

from .lifecycle import Lifecycle
from .protocol import Command, Message, ProtocolError, parse_queues, split_identity
from .settings import Settings

logger = logging.getLogger(__name__)

Queues = tuple[tuple[int, str], ...]
# Identities of workers that left or were removed, remembered so that their
# late messages are logged quietly instead of as "unknown worker".
_DEPARTED_MEMORY = 1000
# Messages a reader handles in a row before it lets other greenlets run.
_READ_BATCH = 256
_NOBLOCK = int(zmq.NOBLOCK)


class _Socket:
    """One ROUTER socket: a ``zmq.green`` socket to wait on, and a plain shadow
    of the same socket for the non-blocking calls.

    zmq.green's per-frame wrappers cost more than the routing itself, so
    sends and the draining of already-queued messages use the plain shadow.
    ZeroMQ's wake-up signal is edge-triggered: after each plain send the green
    socket re-reads its state (``get(EVENTS)``), as zmq.green does after its
    own sends, so the one greenlet waiting to read never misses a message.
    """

    def __init__(self, green: Any) -> None:
        self.green = green
        self.plain = zmq.Socket.shadow(green.underlying)

    def send(self, frames: list[bytes]) -> None:
        try:
            self.plain.send_multipart(frames, _NOBLOCK)
        finally:
            self.green.get(zmq.EVENTS)

    def receive(self) -> Iterator[list[bytes]]:
        """Wait for one message, then yield what is already queued (a batch)."""
        yield self.green.recv_multipart()
        for _ in range(_READ_BATCH):
            try:
                yield self.plain.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return

    def close(self) -> None:
        self.green.close(linger=0)


class RouterState(str, Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Request:
    """A client's REQUEST as the router holds it."""

    msgid: str
    client: bytes
    queue: str
    body: tuple[str, ...]
    received: float

    @property
    def reply_requested(self) -> bool:
        headers = self.body[1] if len(self.body) > 1 else ""
        return any(h.strip() == "reply-requested" for h in headers.split(","))


@dataclass(frozen=True)
class Sent:
    """A REQUEST handed to a worker and not known to be finished."""

    msgid: str
    queue: str
    sent: float
    reply_requested: bool


@dataclass
class Worker:
    """What the router knows of one connected worker."""

    identity: bytes
    queues: Queues
    last_seen: float
    slots: int = 0
    in_flight: collections.OrderedDict[str, Sent] = field(
        default_factory=collections.OrderedDict)

    @property
    def name(self) -> str:
        return self.identity.decode("utf-8", "replace")

    def retire_oldest_unreplied(self) -> None:
        for msgid, sent in self.in_flight.items():
            if not sent.reply_requested:
                del self.in_flight[msgid]
                return


Handler = Callable[[bytes, Message], None]


class Router:
    """An eMQP/1.0 router for emq-green, EventMQ's job managers and clients.

    Keyword arguments:
        settings: the addresses (``frontend_addr``, ``backend_addr``,
            ``administrative_addr``; ``tcp://host:*`` picks a free port, see
            :attr:`endpoints`), ``hwm``, heartbeat settings, the default
            queue and the queues of a worker whose INFORM names none.
        extra_backend_addrs: more addresses for the backend socket, e.g. an
            ``inproc://`` one for a job manager in the same process.
        context: the ``zmq.green`` context to use.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        extra_backend_addrs: Sequence[str] = (),
        context: Optional[zmq.green.Context] = None,
    ) -> None:
        self.settings = settings
        self._extra_backend_addrs = tuple(extra_backend_addrs)
        self._context = context or zmq.green.Context.instance()
        self._lifecycle: Lifecycle[RouterState] = Lifecycle(RouterState.STOPPED, "router")
        #: Connected workers by identity.
        self.workers: dict[bytes, Worker] = {}
        #: Queue name -> ``[(weight, identity), ...]``, heaviest first, least
        #: recently used first among equal weights.
        self.queues: dict[str, list[tuple[int, bytes]]] = {}
        #: Queue name -> requests waiting for a free slot, oldest first.
        self.waiting: dict[str, collections.deque[Request]] = {}
        #: Bound addresses after :meth:`start`: frontend, backend, administrative.
        self.endpoints: dict[str, str] = {}
        self.processed_by_queue: collections.Counter[str] = collections.Counter()
        self.processed_by_worker: collections.Counter[str] = collections.Counter()
        self.dropped_by_queue: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        self._departed: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._sockets: dict[str, _Socket] = {}
        self._greenlets: list[gevent.Greenlet] = []
        self._stopped = gevent.event.Event()
        self._last_heartbeat = 0.0

        self._frontend_table: dict[Command, Handler] = {
            Command.REQUEST: self._on_request,
            Command.SCHEDULE: self._on_schedule,
            Command.UNSCHEDULE: self._on_schedule,
            Command.INFORM: self._on_scheduler_inform,
            Command.HEARTBEAT: self._ignore,
            Command.KBYE: self._ignore,
            Command.DISCONNECT: self._on_disconnect,
        }
        self._backend_table: dict[Command, Handler] = {
            Command.INFORM: self._on_inform,
            Command.READY: self._on_ready,
            Command.REPLY: self._on_reply,
            Command.HEARTBEAT: self._ignore,
            Command.KBYE: self._on_kbye,
        }
        self._admin_table: dict[Command, Handler] = {
            Command.STATUS: lambda who, m: self._answer(who, self.status()),
            Command.ROUTER_SHOW_WORKERS: lambda who, m: self._answer(who, self.show_workers()),
            Command.ROUTER_SHOW_SCHEDULERS: lambda who, m: self._answer(
                who, {"connected_schedulers": {}}),
            Command.DISCONNECT: self._on_admin_disconnect,
        }

    # ------------------------------------------------------------------
    # lifecycle

    @property
    def state(self) -> RouterState:
        return self._lifecycle.state

    def _set_state(self, state: RouterState) -> None:
        self._lifecycle.set(state)

    def start(self) -> None:
        """Bind the three sockets and start serving in the background."""
        if self.state is not RouterState.STOPPED or self._stopped.is_set():
            raise RuntimeError("a Router starts once")
        s = self.settings
        binds = {
            "frontend": (s.frontend_addr,),
            "backend": (s.backend_addr, *self._extra_backend_addrs),
            "administrative": (s.administrative_addr,),
        }
        name, addr = "", ""
        try:
            for name, addrs in binds.items():
                sock = self._context.socket(zmq.ROUTER)
                self._sockets[name] = _Socket(sock)
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                sock.setsockopt(zmq.SNDHWM, s.hwm)
                sock.setsockopt(zmq.RCVHWM, s.hwm)
                sock.setsockopt(zmq.LINGER, 0)
                for addr in addrs:
                    sock.bind(addr)
                    self.endpoints.setdefault(
                        name, sock.getsockopt(zmq.LAST_ENDPOINT).decode())
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(f"router: cannot bind {name} address {addr}: {exc}") from exc
        for name, table in (("frontend", self._frontend_table),
                            ("backend", self._backend_table),
                            ("administrative", self._admin_table)):
            self._greenlets.append(gevent.spawn(self._read_loop, name, table))
        self._greenlets.append(gevent.spawn(self._housekeeping))
        self._set_state(RouterState.RUNNING)
        logger.info("router listening: clients on %s, workers on %s, admin on %s",
                    self.endpoints["frontend"], self.endpoints["backend"],
                    self.endpoints["administrative"])

    def serve_forever(self) -> None:
        """Start (if needed) and block until stopped."""
        if self.state is RouterState.STOPPED and not self._stopped.is_set():
            self.start()
        self._stopped.wait()

    def stop(self, timeout: Optional[float] = 5.0) -> bool:
        """KBYE to every worker, drop (and log) buffered requests, close.

        Must not be called from one of the router's own reader greenlets
        (spawn it instead). Returns True once stopped.
        """
        if self.state is not RouterState.RUNNING:
            return self._stopped.wait(timeout)
        self._set_state(RouterState.STOPPING)
        current = gevent.getcurrent()
        readers = [g for g in self._greenlets if g is not current]
        # Stop reading first: no new work arrives while the books are closed.
        gevent.killall(readers, timeout=timeout)
        for worker in list(self.workers.values()):
            self._send("backend", worker.identity, Message.new(Command.KBYE))
            self._forget_worker(worker, "the router is stopping", dead=False)
        for queue, requests in self.waiting.items():
            for request in requests:
                logger.error("router stopping: buffered REQUEST %s (queue %s) dropped",
                             request.msgid, queue)
        self.waiting.clear()
        self._close_sockets()
        self._set_state(RouterState.STOPPED)
        self._stopped.set()
        return True

    def wait_for_state(self, state: RouterState, timeout: Optional[float] = None) -> bool:
        return self._lifecycle.wait_for(state, timeout)

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    # ------------------------------------------------------------------
    # sockets: one reader greenlet each, one place that sends

    def _send(self, socket_name: str, identity: bytes, message: Message) -> bool:
        """Send without waiting; False when the peer is gone or its pipe is full."""
        sock = self._sockets.get(socket_name)
        if sock is None:
            return False
        if self.settings.super_debug and not (
            self.settings.hide_heartbeat_logs and message.command is Command.HEARTBEAT
        ):
            logger.debug("%s -> %r: %s %s %s", socket_name, identity, message.command.value,
                         message.msgid, message.body)
        return self._send_frames(sock, [identity, *message.frames()])

    @staticmethod
    def _send_frames(sock: _Socket, frames: list[bytes]) -> bool:
        try:
            sock.send(frames)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                return False
            raise

    def _read_loop(self, socket_name: str, table: dict[Command, Handler]) -> None:
        sock = self._sockets[socket_name]
        while True:
            try:
                for frames in sock.receive():
                    self._handle(socket_name, table, frames)
            except zmq.ZMQError as exc:
                if self.state is RouterState.RUNNING:
                    logger.error("router: reading the %s socket failed: %s", socket_name, exc)
                return
            gevent.sleep(0)  # a full batch: let the other greenlets run

    def _handle(self, socket_name: str, table: dict[Command, Handler],
                frames: list[bytes]) -> None:
        try:
            identity, rest = split_identity(frames)
            message = Message.parse(rest)
        except ProtocolError as exc:
            self.counters["malformed_messages"] += 1
            logger.warning("router: dropped a malformed message on the %s socket: %s",
                           socket_name, exc)
            return
        if self.settings.super_debug and not (
            self.settings.hide_heartbeat_logs and message.command is Command.HEARTBEAT
        ):
            logger.debug("%s <- %r: %s %s %s", socket_name, identity,
                         message.command.value, message.msgid, message.body)
        if socket_name == "backend" and not self._known_worker(identity, message):
            return
        handler = table.get(message.command)
        if handler is None:
            self.counters["unexpected_messages"] += 1
            logger.warning("router: ignored %s on the %s socket", message.command.value,
                           socket_name)
            return
        try:
            handler(identity, message)
        except Exception:
            logger.exception("router: error handling %s %s", message.command.value,
                             message.msgid)

    def _known_worker(self, identity: bytes, message: Message) -> bool:
        """Any message from a known worker counts as a heartbeat; others are
        dropped unless they are an INFORM."""
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
            return True
        if message.command is Command.INFORM:
            return True
        if identity in self._departed:
            logger.debug("router: %s from departed worker %r dropped",
                         message.command.value, identity)
        else:
            logger.warning("router: unknown worker %r sent %s; dropped (it must INFORM first)",
                           identity, message.command.value)
        return False

    @staticmethod
    def _ignore(identity: bytes, message: Message) -> None:
        """HEARTBEAT: the read loop already counted it."""

    # ------------------------------------------------------------------
    # workers

    def _on_inform(self, identity: bytes, message: Message) -> None:
        queues_text = message.body[0] if message.body else ""
        kind = message.body[1] if len(message.body) > 1 else "worker"
        if kind != "worker":
            logger.warning("router: INFORM of type %r on the worker socket ignored", kind)
            return
        try:
            queues = parse_queues(queues_text) if queues_text else self.settings.queues
        except ProtocolError as exc:
            logger.error("router: INFORM from %r has bad queues, not accepted: %s",
                         identity, exc)
            return
        old = self.workers.get(identity)
        if old is not None:
            logger.warning("router: worker %s informed again; its old record is replaced",
                           old.name)
            self._forget_worker(old, "it informed again", dead=True)
        worker = Worker(identity, tuple(queues), time.monotonic())
        self.workers[identity] = worker
        self._departed.pop(identity, None)
        for weight, name in worker.queues:
            entries = self.queues.setdefault(name, [])
            at = len(entries)
            while at > 0 and entries[at - 1][0] < weight:
                at -= 1
            entries.insert(at, (weight, identity))
        logger.info("router: worker %s joined (queues %s)", worker.name,
                    json.dumps([list(q) for q in worker.queues]))
        self._send("backend", identity, Message.new(Command.ACK, message.msgid))

    def _on_ready(self, identity: bytes, message: Message) -> None:
        worker = self.workers[identity]
        worker.retire_oldest_unreplied()
        for _weight, name in sorted(worker.queues, key=lambda q: -q[0]):
            waiting = self.waiting.get(name)
            if not waiting:
                continue
            request = waiting[0]
            if not self._hand_over(worker, request, name):
                return
            waiting.popleft()
            if not waiting:
                del self.waiting[name]
                logger.info("router: the buffer of queue %s is empty again", name)
            return
        worker.slots += 1

    def _on_reply(self, identity: bytes, message: Message) -> None:
        # eMQP quirk kept by EventMQ: [reply_json, orig_msgid]
        orig = message.body[1] if len(message.body) > 1 else ""
        sent = self.workers[identity].in_flight.pop(orig, None)
        if sent is not None:
            logger.debug("router: %s job %s done in %.1f ms", sent.queue, orig,
                         (time.monotonic() - sent.sent) * 1000)

    def _on_kbye(self, identity: bytes, message: Message) -> None:
        self._forget_worker(self.workers[identity], "it said KBYE", dead=False)

    def _forget_worker(self, worker: Worker, reason: str, *, dead: bool) -> None:
        """Remove a worker from every queue. Requests it had in flight are
        logged, as lost when it died, as still running there when it left."""
        if self.workers.get(worker.identity) is worker:
            del self.workers[worker.identity]
        for _weight, name in worker.queues:
            entries = [e for e in self.queues.get(name, ()) if e[1] != worker.identity]
            if entries:
                self.queues[name] = entries
            else:
                self.queues.pop(name, None)
        self._departed[worker.identity] = None
        while len(self._departed) > _DEPARTED_MEMORY:
            self._departed.popitem(last=False)
        log = logger.error if dead and worker.in_flight else logger.info
        log("router: worker %s removed (%s); %d request(s) in flight there%s", worker.name,
            reason, len(worker.in_flight),
            ", not re-dispatched:" if dead and worker.in_flight else "")
        if dead:
            now = time.monotonic()
            for sent in worker.in_flight.values():
                logger.error("router: possibly lost REQUEST %s (queue %s, sent %.1f s ago%s)",
                             sent.msgid, sent.queue, now - sent.sent,
                             "" if sent.reply_requested else ", no reply requested")
                self.counters["possibly_lost"] += 1

    def _housekeeping(self) -> None:
        """Heartbeats to workers; removal of workers silent for heartbeat_timeout."""
        s = self.settings
        tick = max(0.05, min(1.0, s.heartbeat_interval / 2, s.heartbeat_timeout / 4))
        while True:
            gevent.sleep(tick)
            if s.disable_heartbeats:
                continue
            now = time.monotonic()
            if now - self._last_heartbeat >= s.heartbeat_interval:
                self._last_heartbeat = now
                beat = Message.new(Command.HEARTBEAT, f"{time.time():.6f}")
                for identity in list(self.workers):
                    self._send("backend", identity, beat)
            backend = self._sockets.get("backend")
            if backend is not None and backend.green.get(zmq.EVENTS) & zmq.POLLIN:
                continue  # messages not read yet may be the heartbeats we wait for
            for worker in list(self.workers.values()):
                silence = now - worker.last_seen
                if silence >= s.heartbeat_timeout:
                    self._forget_worker(worker, f"nothing received for {silence:.1f} s",
                                        dead=True)

    # ------------------------------------------------------------------
    # requests

    def _on_request(self, client: bytes, message: Message) -> None:
        if len(message.body) != 3:
            logger.error("router: REQUEST %s has %d body frames, expected 3; dropped",
                         message.msgid, len(message.body))
            return
        request = Request(message.msgid, client, message.body[0], message.body,
                          time.monotonic())
        queue = request.queue
        if queue not in self.queues:
            if queue != self.settings.default_queue_name:
                logger.warning("router: no worker serves queue %r; REQUEST %s goes to %r",
                               queue, request.msgid, self.settings.default_queue_name)
            queue = self.settings.default_queue_name
        while True:
            worker = self._pick_worker(queue)
            if worker is None:
                self._buffer(queue, request)
                return
            if self._hand_over(worker, request, queue):
                worker.slots -= 1
                self._send("frontend", client, Message.new(Command.REPLY, request.msgid))
                return

    def _pick_worker(self, queue: str) -> Optional[Worker]:
        """The heaviest worker with a free slot, least recently used among
        equals; it moves behind the others of its weight."""
        entries = self.queues.get(queue)
        if not entries:
            return None
        for i, (weight, identity) in enumerate(entries):
            worker = self.workers.get(identity)
            if worker is not None and worker.slots > 0:
                del entries[i]
                at = i
                while at < len(entries) and entries[at][0] == weight:
                    at += 1
                entries.insert(at, (weight, identity))
                return worker
        return None

    def _hand_over(self, worker: Worker, request: Request, queue: str) -> bool:
        """Send ``request`` to ``worker``; a worker that cannot be reached is
        removed and False returned."""
        message = Message(Command.REQUEST, request.msgid, request.body)
        if not self._send("backend", worker.identity, message):
            self._forget_worker(worker, "it cannot be reached", dead=True)
            return False
        worker.in_flight[request.msgid] = Sent(request.msgid, queue, time.monotonic(),
                                               request.reply_requested)
        self.processed_by_queue[queue] += 1
        self.processed_by_worker[worker.name] += 1
        return True

    def _buffer(self, queue: str, request: Request) -> None:
        waiting = self.waiting.get(queue)
        if waiting is None:
            waiting = self.waiting[queue] = collections.deque()
            logger.info("router: no free slot for queue %s; buffering requests", queue)
        if len(waiting) >= self.settings.hwm:
            self.dropped_by_queue[queue] += 1
            logger.error("router: the buffer of queue %s is full (hwm %d requests); "
                         "REQUEST %s dropped", queue, self.settings.hwm, request.msgid)
            return
        waiting.append(request)

    def _on_schedule(self, client: bytes, message: Message) -> None:
        logger.error("router: %s %s dropped: emq-green's router has no scheduler "
                     "(run EventMQ's emq-router and emq-scheduler for scheduled jobs)",
                     message.command.value, message.msgid)

    def _on_scheduler_inform(self, client: bytes, message: Message) -> None:
        logger.error("router: INFORM %s from %r on the client socket ignored: emq-green's "
                     "router does not take schedulers", message.msgid, client)

    def _on_disconnect(self, client: bytes, message: Message) -> None:
        logger.info("router: DISCONNECT from a client: shutting down")
        gevent.spawn(self.stop)

    def _on_admin_disconnect(self, admin: bytes, message: Message) -> None:
        logger.info("router: DISCONNECT from an administrator: shutting down")
        self._send("administrative", admin, Message.new(Command.ACK, message.msgid))
        gevent.spawn(self.stop)

    # ------------------------------------------------------------------
    # administration

    def _answer(self, admin: bytes, value: dict[str, Any]) -> None:
        self._send("administrative", admin, Message.new(Command.REPLY, json.dumps(value)))

    def status(self) -> dict[str, Any]:
        """STATUS, in EventMQ's shape (latencies are ages in ms of the requests
        in flight), plus ``dropped_messages_by_queue``."""
        now = time.monotonic()
        ages: dict[str, list[float]] = collections.defaultdict(list)
        for worker in self.workers.values():
            for sent in worker.in_flight.values():
                ages[sent.queue].append(now - sent.sent)
        return {
            "inflight_messages_by_queue": {q: len(a) for q, a in ages.items()},
            "latency_messages_by_queue": {q: int(sum(a) / len(a) * 1000)
                                          for q, a in ages.items()},
            "max_latency_messages_by_queue": {q: int(max(a) * 1000) for q, a in ages.items()},
            "waiting_messages_by_queue": {q: len(w) for q, w in self.waiting.items()},
            "processed_messages_by_queue": dict(self.processed_by_queue),
            "processed_messages_by_worker": dict(self.processed_by_worker),
            "dropped_messages_by_queue": dict(self.dropped_by_queue),
        }

    def show_workers(self) -> dict[str, Any]:
        """ROUTER_SHOW_WORKERS, in EventMQ's shape."""
        return {
            "connected_workers": {
                w.name: {"queues": [list(q) for q in w.queues], "hb": w.last_seen,
                         "available_slots": w.slots}
                for w in self.workers.values()
            },
            "connected_queues": {
                name: [[weight, identity.decode("utf-8", "replace")]
                       for weight, identity in entries]
                for name, entries in self.queues.items()
            },
        }


__all__ = ["Router", "RouterState", "Worker", "Request"]
