"""The router (broker): EventMQ 0.3.13's router, rebuilt on gevent and ``zmq.green``.

Three ROUTER sockets, bound to loopback by default, each read by exactly one
greenlet:

* frontend (clients): REQUEST, plus SCHEDULE / UNSCHEDULE / scheduler INFORM,
  which are logged and dropped because emq-green has no scheduler, and
  DISCONNECT, which is ignored with a warning (EventMQ stops on it; here any
  client could then stop the service);
* backend (workers): INFORM / ACK, READY, REPLY, HEARTBEAT, KBYE;
* administrative: STATUS, ROUTER_SHOW_WORKERS, ROUTER_SHOW_SCHEDULERS,
  answered with the JSON shapes EventMQ's ``emq-cli`` prints, and DISCONNECT,
  the only message that stops the router.

A fourth greenlet sends heartbeats and removes silent workers. Every send to a
socket goes through one method (:meth:`Router._send`), never waits, and
reports a vanished peer (ROUTER_MANDATORY's EHOSTUNREACH) as ``False``.

Routing, as EventMQ does it. A worker's INFORM lists ``[weight, queue]``
pairs; each READY is one free slot. A REQUEST goes to the worker with a free
slot that has the highest weight for its queue, the least recently used among
equal weights; the client gets ``REPLY [msgid]`` as an acknowledgement. A
REQUEST for a queue no worker serves goes to the default queue. With no free
slot it waits in a per-queue buffer and leaves on the next READY of a worker
serving that queue, heaviest queue first, without acknowledgement.

Limits, where emq-green differs from EventMQ:

* Backpressure, never loss. When a queue's buffer holds ``hwm`` requests or
  all buffers hold ``max_buffer_bytes``, the frontend reader stops reading;
  ZeroMQ's high-water marks then block the senders. Reading resumes once
  READYs have brought every bound down to three quarters. Workers, admin
  and heartbeats are served meanwhile.
* Size. ``max_message_size`` is ZeroMQ's MAXMSGSIZE on every socket (per
  frame; libzmq disconnects the sender), and the whole message's size is
  checked before any handler (many small frames; ``inproc://``, where
  libzmq does not check). An oversized message is logged and counted.
* Every request the router drops (malformed, oversized, buffered or unread
  at stop) is logged with its msgid and counted by reason in STATUS. Text a
  peer supplied (msgids, queue names, identities) goes through
  :func:`~emq_green.protocol.printable` before it reaches a log.
* Requests a worker had in flight when it is removed as dead are logged one
  by one (msgid, queue, age); they are not re-dispatched, because a job may
  have run already and eMQP has no way to tell. A READY does not say which
  job ended, so for requests sent without ``reply-requested`` the router
  retires the oldest one on each READY: that list is a best estimate, exact
  only for requests that asked for a reply.

Lifecycle: ``stopped -> running -> stopping -> stopped``, changed only by
:meth:`Router._set_state`. :meth:`stop` says KBYE to every worker, logs
every buffered and unread request it drops, then closes the sockets.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import gevent
import gevent.event
import zmq
import zmq.green

from .lifecycle import Lifecycle
from .protocol import Command, Message, ProtocolError, parse_queues, printable, split_identity
from .settings import Settings

logger = logging.getLogger(__name__)

Queues = tuple[tuple[int, str], ...]
# Identities of workers that left or were removed, remembered so that their
# late messages are logged quietly instead of as "unknown worker".
_DEPARTED_MEMORY = 1000
# Messages a reader handles in a row before it lets other greenlets run.
_READ_BATCH = 256
_NOBLOCK = int(zmq.NOBLOCK)
#: a size limit of -1 (unlimited), as a number every size is below
_UNLIMITED = sys.maxsize
# Unread requests logged one by one when the router stops; beyond, only counted.
_UNREAD_LOG_LIMIT = 10_000
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


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

    @property
    def size(self) -> int:
        """What the request counts against ``max_buffer_bytes``: the length of
        its msgid and body (characters; bytes for ASCII, as JSON mostly is)."""
        return len(self.msgid) + sum(map(len, self.body))


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

    @property
    def log_name(self) -> str:
        """The identity, escaped for a log line."""
        return printable(self.identity)

    def retire_oldest_unreplied(self) -> None:
        for msgid, sent in self.in_flight.items():
            if not sent.reply_requested:
                del self.in_flight[msgid]
                return


Handler = Callable[[bytes, Message], None]


class RouterObserver(Protocol):
    """What :attr:`Router.observer` is told; each call is on the hot path and
    must be O(1) (the dashboard appends to bounded deques)."""

    def handed_over(self, queue: str, waited: float) -> None:
        """A REQUEST went to a worker after ``waited`` s in the router."""

    def replied(self, queue: str, latency: float) -> None:
        """A REPLY came back ``latency`` s after its REQUEST was handed out."""

    def worker_left(self, worker: Worker, dead: bool) -> None:
        """A worker was removed: it said KBYE (draining) or went silent (dead)."""


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
        #: Requests dropped when the router stopped with them buffered, by queue.
        self.dropped_by_queue: collections.Counter[str] = collections.Counter()
        #: Every request dropped, by reason: ``malformed`` (not eMQP/1.0, or
        #: not 3 body frames), ``oversized``, ``stopping`` (buffered at stop),
        #: ``unread`` (still in the client socket's queue at stop),
        #: ``no_scheduler`` (SCHEDULE / UNSCHEDULE), ``error`` (a bug: the
        #: handler raised; logged with a traceback).
        self.dropped_by_reason: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        #: Told of each job (see :class:`RouterObserver`); None: nobody listens.
        self.observer: Optional[RouterObserver] = None
        #: Bytes of the requests in :attr:`waiting` (see :attr:`Request.size`).
        self.buffered_bytes = 0
        #: True while the buffer is at a bound and the client socket is not read.
        self.frontend_paused = False
        self._frontend_open = gevent.event.Event()
        self._frontend_open.set()
        self._full_queues: set[str] = set()
        s = settings
        self._max_size = s.max_message_size if s.max_message_size >= 0 else _UNLIMITED
        self._max_bytes = s.max_buffer_bytes if s.max_buffer_bytes >= 0 else _UNLIMITED
        # Low-water marks: once paused, reading resumes below these, so that a
        # burst does not pause and resume the client socket on every READY.
        self._resume_length = s.hwm - max(1, s.hwm // 4)
        self._resume_bytes = self._max_bytes - self._max_bytes // 4
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
            Command.DISCONNECT: self._on_client_disconnect,
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
                # per frame; libzmq disconnects a peer that sends a bigger one
                sock.setsockopt(zmq.MAXMSGSIZE, s.max_message_size)
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
        admin_host = s.administrative_addr.partition("://")[2].rpartition(":")[0]
        if s.administrative_addr.startswith("tcp://") and admin_host not in _LOOPBACK_HOSTS:
            logger.warning("router: the administrative socket (%s) is not on loopback: "
                           "whoever can connect to it can stop the router",
                           s.administrative_addr)

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
                             printable(request.msgid), printable(queue))
                self.dropped_by_queue[queue] += 1
                self.dropped_by_reason["stopping"] += 1
        self.waiting.clear()
        self.buffered_bytes = 0
        self._full_queues.clear()
        self._drop_unread_requests()
        self._close_sockets()
        self._set_state(RouterState.STOPPED)
        self._stopped.set()
        return True

    def _drop_unread_requests(self) -> None:
        """Log the REQUESTs still queued in the client socket (not read yet,
        e.g. while reading was paused): closing the socket drops them."""
        sock = self._sockets.get("frontend")
        if sock is None:
            return
        unread = 0
        while True:
            try:
                frames = sock.plain.recv_multipart(_NOBLOCK)
            except zmq.ZMQError:
                break
            if len(frames) < 5 or frames[3] != b"REQUEST":
                continue
            unread += 1
            self.dropped_by_reason["unread"] += 1
            if unread <= _UNREAD_LOG_LIMIT:
                logger.error("router stopping: unread REQUEST %s dropped", printable(frames[4]))
        if unread:
            logger.error("router stopping: %d unread REQUEST(s) dropped in all%s", unread,
                         f" ({unread - _UNREAD_LOG_LIMIT} not logged one by one)"
                         if unread > _UNREAD_LOG_LIMIT else "")

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
                         printable(message.msgid), message.body)
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
        frontend = socket_name == "frontend"
        while True:
            if frontend and self.frontend_paused:
                # backpressure: what clients send waits in ZeroMQ's queues,
                # and their sends block once those reach the high-water marks
                self._frontend_open.wait()
                continue
            try:
                for frames in sock.receive():
                    self._handle(socket_name, table, frames)
                    if frontend and self.frontend_paused:
                        break
            except zmq.ZMQError as exc:
                if self.state is RouterState.RUNNING:
                    logger.error("router: reading the %s socket failed: %s", socket_name, exc)
                return
            gevent.sleep(0)  # a full batch: let the other greenlets run

    def _handle(self, socket_name: str, table: dict[Command, Handler],
                frames: list[bytes]) -> None:
        if sum(map(len, frames)) > self._max_size:
            self._drop_oversized(socket_name, frames)
            return
        try:
            identity, rest = split_identity(frames)
            message = Message.parse(rest)
        except ProtocolError as exc:
            self.counters["malformed_messages"] += 1
            # [identity, '', version, COMMAND, MSGID, ...]
            if socket_name == "frontend" and len(frames) > 4 and frames[3] == b"REQUEST":
                self.dropped_by_reason["malformed"] += 1
                logger.error("router: dropped a malformed REQUEST %s from %s: %s",
                             printable(frames[4]), printable(frames[0]), printable(exc, 200))
                return
            logger.warning("router: dropped a malformed message on the %s socket: %s",
                           socket_name, printable(exc, 200))
            return
        if self.settings.super_debug and not (
            self.settings.hide_heartbeat_logs and message.command is Command.HEARTBEAT
        ):
            logger.debug("%s <- %r: %s %s %s", socket_name, identity,
                         message.command.value, printable(message.msgid), message.body)
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
            if message.command is Command.REQUEST and socket_name == "frontend":
                self.dropped_by_reason["error"] += 1
            logger.exception("router: error handling %s %s", message.command.value,
                             printable(message.msgid))

    def _drop_oversized(self, socket_name: str, frames: list[bytes]) -> None:
        """A message over ``max_message_size`` in all (ZeroMQ's MAXMSGSIZE
        checks single frames, and not at all over inproc): never handled."""
        self.counters["oversized_messages"] += 1
        # [identity, '', version, COMMAND, MSGID, ...]
        command = frames[3] if len(frames) > 3 else b"?"
        if command == b"REQUEST" and socket_name == "frontend":
            self.dropped_by_reason["oversized"] += 1
        logger.error("router: dropped an oversized message on the %s socket from %s: "
                     "%s %s, %d bytes (max_message_size %d)", socket_name,
                     printable(frames[0]), printable(command, 40),
                     printable(frames[4]) if len(frames) > 4 else "(no msgid)",
                     sum(map(len, frames)), self.settings.max_message_size)

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
            logger.debug("router: %s from departed worker %s dropped",
                         message.command.value, printable(identity))
        else:
            logger.warning("router: unknown worker %s sent %s; dropped (it must INFORM first)",
                           printable(identity), message.command.value)
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
            logger.warning("router: INFORM of type %s on the worker socket ignored",
                           printable(kind))
            return
        try:
            queues = parse_queues(queues_text) if queues_text else self.settings.queues
        except ProtocolError as exc:
            logger.error("router: INFORM from %s has bad queues, not accepted: %s",
                         printable(identity), printable(exc, 200))
            return
        old = self.workers.get(identity)
        if old is not None:
            logger.warning("router: worker %s informed again; its old record is replaced",
                           old.log_name)
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
        logger.info("router: worker %s joined (queues %s)", worker.log_name,
                    printable(json.dumps([list(q) for q in worker.queues]), 400))
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
            self.buffered_bytes -= request.size
            if not waiting:
                del self.waiting[name]
                logger.info("router: the buffer of queue %s is empty again", printable(name))
            if self.frontend_paused:
                self._maybe_resume(name, len(waiting))
            return
        worker.slots += 1

    def _on_reply(self, identity: bytes, message: Message) -> None:
        # eMQP quirk kept by EventMQ: [reply_json, orig_msgid]
        orig = message.body[1] if len(message.body) > 1 else ""
        sent = self.workers[identity].in_flight.pop(orig, None)
        if sent is not None and self.observer is not None:
            self.observer.replied(sent.queue, time.monotonic() - sent.sent)
        if sent is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("router: %s job %s done in %.1f ms", printable(sent.queue),
                         printable(orig), (time.monotonic() - sent.sent) * 1000)

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
        if self.observer is not None:
            self.observer.worker_left(worker, dead)
        while len(self._departed) > _DEPARTED_MEMORY:
            self._departed.popitem(last=False)
        log = logger.error if dead and worker.in_flight else logger.info
        log("router: worker %s removed (%s); %d request(s) in flight there%s", worker.log_name,
            reason, len(worker.in_flight),
            ", not re-dispatched:" if dead and worker.in_flight else "")
        if dead:
            now = time.monotonic()
            for sent in worker.in_flight.values():
                logger.error("router: possibly lost REQUEST %s (queue %s, sent %.1f s ago%s)",
                             printable(sent.msgid), printable(sent.queue), now - sent.sent,
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
            self.dropped_by_reason["malformed"] += 1
            logger.error("router: REQUEST %s from %s has %d body frames, expected 3; dropped",
                         printable(message.msgid), printable(client), len(message.body))
            return
        request = Request(message.msgid, client, message.body[0], message.body,
                          time.monotonic())
        queue = request.queue
        if queue not in self.queues:
            if queue != self.settings.default_queue_name:
                logger.warning("router: no worker serves queue %s; REQUEST %s goes to %s",
                               printable(queue), printable(request.msgid),
                               self.settings.default_queue_name)
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
        now = time.monotonic()
        worker.in_flight[request.msgid] = Sent(request.msgid, queue, now,
                                               request.reply_requested)
        if self.observer is not None:
            self.observer.handed_over(queue, now - request.received)
        self.processed_by_queue[queue] += 1
        self.processed_by_worker[worker.name] += 1
        return True

    def _buffer(self, queue: str, request: Request) -> None:
        """Keep ``request`` until a worker has a slot; at a bound (``hwm``
        requests in this queue, ``max_buffer_bytes`` in all), stop reading
        the client socket. Nothing accepted is ever dropped here."""
        waiting = self.waiting.get(queue)
        if waiting is None:
            waiting = self.waiting[queue] = collections.deque()
            logger.info("router: no free slot for queue %s; buffering requests",
                        printable(queue))
        waiting.append(request)
        self.buffered_bytes += request.size
        if len(waiting) >= self.settings.hwm:
            self._full_queues.add(queue)
        if self._full_queues or self.buffered_bytes >= self._max_bytes:
            self._pause_frontend(queue)

    def _pause_frontend(self, queue: str) -> None:
        if self.frontend_paused:
            return
        self.frontend_paused = True
        self._frontend_open.clear()
        self.counters["frontend_pauses"] += 1
        logger.warning("router: buffer full (queue %s: %d of hwm %d requests; %d of %d bytes "
                       "in all): not reading clients until workers take jobs (pause %d)",
                       printable(queue), len(self.waiting.get(queue, ())), self.settings.hwm,
                       self.buffered_bytes, self.settings.max_buffer_bytes,
                       self.counters["frontend_pauses"])

    def _maybe_resume(self, queue: str, left: int) -> None:
        """Read clients again once every queue and the bytes are below the
        low-water marks (three quarters of each bound)."""
        if left <= self._resume_length:
            self._full_queues.discard(queue)
        if self._full_queues or self.buffered_bytes > self._resume_bytes:
            return
        self.frontend_paused = False
        self._frontend_open.set()
        logger.info("router: reading clients again (%d requests, %d bytes buffered)",
                    sum(map(len, self.waiting.values())), self.buffered_bytes)

    def _on_schedule(self, client: bytes, message: Message) -> None:
        self.dropped_by_reason["no_scheduler"] += 1
        logger.error("router: %s %s dropped: emq-green's router has no scheduler "
                     "(run EventMQ's emq-router and emq-scheduler for scheduled jobs)",
                     message.command.value, printable(message.msgid))

    def _on_scheduler_inform(self, client: bytes, message: Message) -> None:
        logger.error("router: INFORM %s from %s on the client socket ignored: emq-green's "
                     "router does not take schedulers", printable(message.msgid),
                     printable(client))

    def _on_client_disconnect(self, client: bytes, message: Message) -> None:
        # EventMQ's router stops here; any client could then stop the service
        self.counters["client_disconnects_ignored"] += 1
        logger.warning("router: DISCONNECT %s from client %s ignored: only the "
                       "administrative socket stops the router", printable(message.msgid),
                       printable(client))

    def _on_admin_disconnect(self, admin: bytes, message: Message) -> None:
        logger.info("router: DISCONNECT from administrator %s: shutting down",
                    printable(admin))
        self._send("administrative", admin, Message.new(Command.ACK, message.msgid))
        gevent.spawn(self.stop)

    # ------------------------------------------------------------------
    # administration

    def _answer(self, admin: bytes, value: dict[str, Any]) -> None:
        self._send("administrative", admin, Message.new(Command.REPLY, json.dumps(value)))

    def status(self) -> dict[str, Any]:
        """STATUS, in EventMQ's shape (latencies are ages in ms of the requests
        in flight), plus emq-green's own keys: drops (by queue, by reason),
        the buffer's bytes and whether reading clients is paused, and counts
        of oversized and malformed messages and ignored client DISCONNECTs."""
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
            "dropped_requests_by_reason": dict(self.dropped_by_reason),
            "buffered_bytes": self.buffered_bytes,
            "max_buffer_bytes": self.settings.max_buffer_bytes,
            "hwm": self.settings.hwm,
            "frontend_paused": self.frontend_paused,
            "frontend_pauses": self.counters["frontend_pauses"],
            "oversized_messages": self.counters["oversized_messages"],
            "malformed_messages": self.counters["malformed_messages"],
            "client_disconnects_ignored": self.counters["client_disconnects_ignored"],
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


__all__ = ["Router", "RouterObserver", "RouterState", "Worker", "Request"]
