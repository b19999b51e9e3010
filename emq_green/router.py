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

Results, an extension EventMQ lacks: for a REQUEST with the
``result-requested`` header the router remembers the client and sends it the
worker's REPLY body (no acknowledgement then); the map is bounded in size
and age. See :mod:`emq_green.results` and docs/router.md.

Lifecycle: ``stopped -> running -> stopping -> stopped``, changed only by
:meth:`Router._set_state`. :meth:`stop` says KBYE to every worker, logs
every buffered and unread request it drops, then closes the sockets.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import time
from enum import Enum
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import gevent
import gevent.event
import zmq
import zmq.green

from .curve import server_curve_from_settings
from .lifecycle import Lifecycle
from .protocol import (
    Command,
    Message,
    ProtocolError,
    heartbeat,
    parse_queues,
    printable,
    split_identity,
)
from .results import (
    CLIENT_GONE,
    EVICTED,
    EXPIRED,
    STOPPING,
    WORKER_LOST,
    PendingResults,
    lost_body,
    result_requested_in,
)
from .routing import UNLIMITED, Request, Routing, Worker
from .settings import Settings
from .zap import ZapHandler

logger = logging.getLogger(__name__)

# Messages a reader handles in a row before it lets other greenlets run.
_READ_BATCH = 256
_NOBLOCK = int(zmq.NOBLOCK)
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
        context: the ``zmq.green`` context to use; a router with CURVE
            (``curve_secret_key_file``) makes one of its own when none is
            given, as its ZAP handler needs the context to itself.
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
        self._context = context or (zmq.green.Context() if settings.curve_secret_key_file
                                    else zmq.green.Context.instance())
        #: the CURVE key check (see :mod:`emq_green.zap`); None on plain sockets
        self.zap: Optional[ZapHandler] = None
        self._lifecycle: Lifecycle[RouterState] = Lifecycle(RouterState.STOPPED, "router")
        #: Workers, queues, slots and the buffer (the routing policy).
        self.routing = Routing(default_queue=settings.default_queue_name, hwm=settings.hwm,
                               max_buffer_bytes=settings.max_buffer_bytes)
        #: Bound addresses after :meth:`start`: frontend, backend, administrative.
        self.endpoints: dict[str, str] = {}
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
        #: True while the buffer is at a bound and the client socket is not read.
        self.frontend_paused = False
        #: Clients waiting for a job's result (the result-requested header).
        self.results = PendingResults(settings.max_pending_results, settings.result_ttl)
        self._frontend_open = gevent.event.Event()
        self._frontend_open.set()
        size = settings.max_message_size
        self._max_size = size if size >= 0 else UNLIMITED
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

    # the books, as the router's own members (they live in :attr:`routing`)
    @property
    def workers(self) -> dict[bytes, Worker]:
        """Connected workers by identity."""
        return self.routing.workers

    @property
    def queues(self) -> dict[str, list[tuple[int, bytes]]]:
        """Queue name -> ``[(weight, identity), ...]``, in routing order."""
        return self.routing.queues

    @property
    def waiting(self) -> dict[str, collections.deque[Request]]:
        """Queue name -> requests waiting for a free slot, oldest first."""
        return self.routing.waiting

    @property
    def buffered_bytes(self) -> int:
        return self.routing.buffered_bytes

    @property
    def processed_by_queue(self) -> collections.Counter[str]:
        return self.routing.processed_by_queue

    @property
    def processed_by_worker(self) -> collections.Counter[str]:
        return self.routing.processed_by_worker

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
        curve = server_curve_from_settings(s)  # CurveError (an OSError) when misconfigured
        if curve is not None:
            # bound before any CURVE socket: with no handler libzmq lets every key in
            self.zap = ZapHandler(context=self._context, authorized_keys=curve.authorized_keys)
            self.zap.start()
        name, addr = "", ""
        try:
            for name, addrs in binds.items():
                sock = self._context.socket(zmq.ROUTER)
                self._sockets[name] = _Socket(sock)
                if curve is not None and self.zap is not None:
                    curve.apply(sock)  # inproc:// peers are not asked (libzmq)
                    self.zap.watch(name, sock)
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
        logger.info("router listening: clients on %s, workers on %s, admin on %s%s",
                    self.endpoints["frontend"], self.endpoints["backend"],
                    self.endpoints["administrative"],
                    "; CURVE required on all three" if curve is not None else "")
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
        for queue, request in self.routing.clear_buffer():
            logger.error("router stopping: buffered REQUEST %s (queue %s) dropped",
                         printable(request.msgid), printable(queue))
            self.dropped_by_queue[queue] += 1
            self.dropped_by_reason["stopping"] += 1
        for msgid, client in self.results.clear(STOPPING):
            self._tell_result_lost(msgid, client, STOPPING)
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
        if self.zap is not None:
            self.zap.stop()

    def reload_authorized_keys(self) -> int:
        """Re-read ``curve_authorized_keys`` (SIGHUP on ``emq-green-router``):
        a removed key cannot connect any more. Returns the number of keys;
        0 on a router without CURVE."""
        return self.zap.reload() if self.zap is not None else 0

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
        if self.routing.departed(identity):
            if message.command is Command.REPLY:
                self._forward_result(message)  # a job that ran on after KBYE
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
        worker = self.routing.add(identity, queues, time.monotonic())
        logger.info("router: worker %s joined (queues %s)", worker.log_name,
                    printable(json.dumps([list(q) for q in worker.queues]), 400))
        self._send("backend", identity, Message.new(Command.ACK, message.msgid))

    def _on_ready(self, identity: bytes, message: Message) -> None:
        worker = self.workers[identity]
        worker.retire_oldest_unreplied()
        found = self.routing.next_for(worker)
        if found is None:
            worker.slots += 1
            return
        name, request = found
        if not self._hand_over(worker, request, name):
            return
        if self.routing.taken(name):
            logger.info("router: the buffer of queue %s is empty again", printable(name))
        if self.frontend_paused and self.routing.may_resume():
            self._resume_frontend()

    def _on_reply(self, identity: bytes, message: Message) -> None:
        # eMQP quirk kept by EventMQ: [reply_json, orig_msgid]
        orig = message.body[1] if len(message.body) > 1 else ""
        sent = self.workers[identity].in_flight.pop(orig, None)
        if sent is not None and self.observer is not None:
            self.observer.replied(sent.queue, time.monotonic() - sent.sent)
        if sent is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("router: %s job %s done in %.1f ms", printable(sent.queue),
                         printable(orig), (time.monotonic() - sent.sent) * 1000)
        if self.results:
            self._forward_result(message)

    def _forward_result(self, message: Message) -> None:
        """The worker's REPLY body, unchanged, to the client that asked for it."""
        if len(message.body) != 2:
            return
        client = self.results.pop(message.body[1])
        if client is None:
            return
        if self._send("frontend", client, Message.new(Command.REPLY, *message.body)):
            self.results.forwarded += 1
        else:
            self.results.dropped[CLIENT_GONE] += 1
            logger.warning("router: the result of %s was dropped: client %s is gone or "
                           "not reading", printable(message.body[1]), printable(client))

    def _tell_result_lost(self, msgid: str, client: bytes, reason: str) -> None:
        """Best effort: tell a client that its result will not come."""
        logger.warning("router: the result of %s for client %s was dropped (%s)",
                       printable(msgid), printable(client), reason)
        self._send("frontend", client, Message.new(Command.REPLY, lost_body(reason), msgid))

    def _on_kbye(self, identity: bytes, message: Message) -> None:
        self._forget_worker(self.workers[identity], "it said KBYE", dead=False)

    def _forget_worker(self, worker: Worker, reason: str, *, dead: bool) -> None:
        """Remove a worker from every queue. Requests it had in flight are
        logged, as lost when it died, as still running there when it left."""
        self.routing.remove(worker)
        if self.observer is not None:
            self.observer.worker_left(worker, dead)
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
                client = self.results.drop(sent.msgid, WORKER_LOST)
                if client is not None:
                    self._tell_result_lost(sent.msgid, client, WORKER_LOST)

    def _housekeeping(self) -> None:
        """Heartbeats to workers; removal of workers silent for heartbeat_timeout."""
        s = self.settings
        tick = max(0.05, min(1.0, s.heartbeat_interval / 2, s.heartbeat_timeout / 4))
        while True:
            gevent.sleep(tick)
            now = time.monotonic()
            if self.results:
                for msgid, client in self.results.expire(now):
                    self._tell_result_lost(msgid, client, EXPIRED)
            if s.disable_heartbeats:
                continue
            if now - self._last_heartbeat >= s.heartbeat_interval:
                self._last_heartbeat = now
                beat = heartbeat()
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
        if result_requested_in(message.body[1]):
            evicted = self.results.add(request.msgid, client, request.received)
            if evicted is not None:
                self._tell_result_lost(*evicted, EVICTED)
        queue = self.routing.queue_for(request.queue)
        if queue != request.queue:
            logger.warning("router: no worker serves queue %s; REQUEST %s goes to %s",
                           printable(request.queue), printable(request.msgid), queue)
        while True:
            worker = self.routing.pick(queue)
            if worker is None:
                self._buffer(queue, request)
                return
            if self._hand_over(worker, request, queue):
                worker.slots -= 1
                if request.msgid not in self.results:  # the result is its answer
                    self._send("frontend", client, Message.new(Command.REPLY, request.msgid))
                return

    def _hand_over(self, worker: Worker, request: Request, queue: str) -> bool:
        """Send ``request`` to ``worker``; a worker that cannot be reached is
        removed and False returned."""
        message = Message(Command.REQUEST, request.msgid, request.body)
        if not self._send("backend", worker.identity, message):
            self._forget_worker(worker, "it cannot be reached", dead=True)
            return False
        now = time.monotonic()
        self.routing.sent(worker, request, queue, now)
        if self.observer is not None:
            self.observer.handed_over(queue, now - request.received)
        return True

    def _buffer(self, queue: str, request: Request) -> None:
        """Keep ``request`` until a worker has a slot; at a bound (``hwm``
        requests in this queue, ``max_buffer_bytes`` in all), stop reading
        the client socket. Nothing accepted is ever dropped here."""
        if queue not in self.routing.waiting:
            logger.info("router: no free slot for queue %s; buffering requests",
                        printable(queue))
        if self.routing.buffer(queue, request):
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

    def _resume_frontend(self) -> None:
        """Read clients again (every bound is below its low-water mark)."""
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
        return {
            **self.routing.status(time.monotonic()),
            "dropped_messages_by_queue": dict(self.dropped_by_queue),
            "dropped_requests_by_reason": dict(self.dropped_by_reason),
            "buffered_bytes": self.buffered_bytes,
            "max_buffer_bytes": self.settings.max_buffer_bytes,
            "hwm": self.settings.hwm,
            **(self.zap.status() if self.zap is not None else {}),
            "frontend_paused": self.frontend_paused,
            "frontend_pauses": self.counters["frontend_pauses"],
            "oversized_messages": self.counters["oversized_messages"],
            "malformed_messages": self.counters["malformed_messages"],
            "client_disconnects_ignored": self.counters["client_disconnects_ignored"],
            **self.results.status(),
        }

    def show_workers(self) -> dict[str, Any]:
        """ROUTER_SHOW_WORKERS, in EventMQ's shape."""
        return self.routing.show_workers()


__all__ = ["Router", "RouterObserver", "RouterState", "Worker", "Request"]
