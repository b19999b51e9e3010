"""The router's three ROUTER sockets: binding, reading, decoding, sending.

:class:`RouterSockets` owns the frontend (clients), backend (workers) and
administrative sockets. Each is read by exactly one greenlet, which decodes
every message once and passes it to the handler its command has in that
socket's table; nothing here knows what a command means. Every send goes
through :meth:`RouterSockets.send`, which never waits and reports a
vanished peer (ROUTER_MANDATORY's EHOSTUNREACH) or a full pipe as False,
or :meth:`RouterSockets.send_later`: the messages of the hot path (REQUESTs
to workers, acknowledgements and results to clients) wait for the end of
the router's turn and leave in one batch per socket, the workers' first,
so that ZeroMQ's I/O thread wakes once per batch instead of once per
message; whoever queued them learns which did not leave
(:attr:`RouterSockets.flushed`).

What is refused before any handler sees it, logged and counted:

* a message over ``max_message_size`` in all (ZeroMQ's MAXMSGSIZE checks
  single frames, and not at all over ``inproc://``);
* a message that is not eMQP/1.0 (:class:`~emq_green.protocol.ProtocolError`);
* a command the socket's table does not list.

Backpressure is decided by the router; here it is carried out: while
:attr:`RouterSockets.frontend_paused` the client socket is not read, so what
clients send waits in ZeroMQ's queues and their sends block at the
high-water marks (at most :data:`FRONTEND_RCVHWM` messages per client
connection on the router's side).
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import gevent
import gevent.event
import zmq
from gevent import monkey
from gevent.hub import Waiter

from ..curve import ServerCurve
from ..limits import LogLimiter
from ..protocol import PROTOCOL_VERSION, Command, Message, ProtocolError, printable
from ..settings import Settings
from .routing import UNLIMITED
from .zap import ZapHandler

logger = logging.getLogger(__name__)

# Messages a reader handles in a row before it lets other greenlets run, and
# the longest it goes on (s): a run of costly messages (INFORMs of 256
# queues, ~1 ms each) must not hold the timers and the other sockets.
_READ_BATCH = 256
#: Messages ZeroMQ takes in from one client connection that the router has
#: not read (its RCVHWM on the client socket, set at bind: libzmq does not
#: apply a later change to connections already made). While reading is
#: paused this is what a client can still park in the router's memory, per
#: connection: at ``hwm`` (10,000) it was 10,000 messages of up to
#: ``max_message_size`` each, gigabytes past ``max_buffer_bytes``.
FRONTEND_RCVHWM = 100
#: the least room of a worker's pipe: what the router sends a worker in one
#: turn is bounded by its free slots, which may exceed a small ``hwm`` (a
#: probe's ``--hwm 5`` and a ``-J 10`` worker taking a full buffer: the
#: pipe filled, and the worker was removed as unreachable, its jobs
#: reported possibly lost)
BACKEND_MIN_SNDHWM = 10_000
_BATCH_SECONDS = 0.002
_clock = time.perf_counter
#: the interpreter's own sleep, which blocks (gevent's lets greenlets run)
_block = monkey.get_original("time", "sleep")
#: seconds the router's thread stands still when its loop runs again after
#: a gap (SIGSTOP, a paused VM): ZeroMQ's I/O thread meanwhile ends the
#: connections that closed during the gap, so that a send to one fails
#: (its worker removed, the request routed again) instead of vanishing
SETTLE = 0.05
#: How a busy greenlet of the router lets the others run: a timer, not
#: ``sleep(0)``. gevent runs ``sleep(0)`` wake-ups as loop callbacks and looks
#: at the clock only every 50 callbacks, so greenlets that each yield after
#: a batch of work keep I/O and timers (heartbeats, the admin socket) waiting
#: for 50 batches (0.5 s measured); a timer lets the loop poll first.
YIELD = 1e-6
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
# a reader waits at most this long (s) before it looks at its socket again
_WAIT_AT_MOST = 1.0
# pyzmq's backend (Cython) socket methods, below its Python layer (see RouterSocket)
_BACKEND = next(c for c in zmq.Socket.__mro__ if c.__module__.startswith("zmq.backend"))
_send, _recv, _get = _BACKEND.send, _BACKEND.recv, _BACKEND.get
# Unread requests logged one by one when the router stops; beyond, only counted.
_UNREAD_LOG_LIMIT = 10_000

_parse_routed = Message.parse_routed

#: a handler: (sender identity, message)
Handler = Callable[[bytes, Message], None]
#: on the backend, called before the handler; False drops the message
Gate = Callable[[bytes, Message], bool]
#: told after each batch of :meth:`RouterSockets.send_later`: (the messages
#: sent, those of them that could not be delivered)
Flushed = Callable[[list[list[bytes]], list[list[bytes]]], None]
#: the order in which the batches of a turn leave: requests to workers
#: first, then what tells clients they left
_FLUSH_ORDER = ("backend", "frontend", "administrative")


class RouterSocket:
    """One ROUTER socket, read by one greenlet, written by any.

    A plain pyzmq socket with gevent waiting done here, not a ``zmq.green``
    one: zmq.green's per-call machinery (a state check and an enum per call,
    an event set per wake-up), and pyzmq's own ``send_multipart`` (an enum
    flag per frame), cost more than the routing itself. Sends and receives
    call pyzmq's Cython socket methods directly, with integer flags.

    Waiting: ZeroMQ signals its ``FD`` when the socket's state may have
    changed, edge-triggered, and any call on the socket may consume that
    signal. So the reader checks ``EVENTS`` before it waits on the FD (with
    a gevent io watcher); and since a send from another greenlet may eat the
    signal of a message that arrived meanwhile, the first send of a loop
    turn schedules one callback that checks ``EVENTS`` and wakes the reader
    (once a turn, not after every send). A wait also ends after a second,
    as zmq.green's does, in case libzmq's signal was lost anyway.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        hub = gevent.get_hub()
        self._loop = hub.loop
        self._waiter: Optional[Waiter] = None
        self._refresh_due = False
        # started once and kept: starting and stopping an io watcher around
        # each wait made libev report the FD again and again (measured: a
        # hundred wake-ups per message)
        self._watcher = hub.loop.io(sock.getsockopt(zmq.FD), 1)  # 1: readable
        self._watcher.start(self._wake_if_readable)
        #: called each time the reader wakes, before it reads
        self.woke: Optional[Callable[[], None]] = None

    def send(self, frames: list[bytes]) -> None:
        """Send one message now (EAGAIN / EHOSTUNREACH raise ZMQError).
        ZeroMQ takes a multipart message whole or not at all: once the first
        frame is in, the others are."""
        sock = self.sock
        last = len(frames) - 1
        try:
            for i in range(last):
                _send(sock, frames[i], _NOBLOCK_MORE)
            _send(sock, frames[last], _NOBLOCK)
        finally:
            if not self._refresh_due:
                self._refresh_due = True
                self._loop.run_callback(self._refresh)

    def send_many(self, messages: list[list[bytes]]) -> list[list[bytes]]:
        """:meth:`send` of each message in turn (a turn's batch, in one call:
        it runs per job); returns those that could not be delivered (the
        peer gone, or its pipe full)."""
        sock = self.sock
        failed: list[list[bytes]] = []
        try:
            for frames in messages:
                last = len(frames) - 1
                try:
                    for i in range(last):
                        _send(sock, frames[i], _NOBLOCK_MORE)
                    _send(sock, frames[last], _NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                        raise
                    failed.append(frames)
        finally:
            if not self._refresh_due:
                self._refresh_due = True
                self._loop.run_callback(self._refresh)
        return failed

    def send_tracked(self, frames: list[bytes], big: int) -> Any:
        """:meth:`send`, frame ``big`` without a copy and tracked: returns
        its ``zmq.MessageTracker``, done once ZeroMQ has written it out (or
        dropped it with its peer)."""
        frame = zmq.Frame(frames[big], copy=False, track=True)
        self.send([*frames[:big], frame, *frames[big + 1:]])  # type: ignore[list-item]
        return frame.tracker

    def _refresh(self) -> None:
        """After this turn's sends: wake the reader if a message waits."""
        self._refresh_due = False
        self._wake_if_readable()

    def _wake_if_readable(self) -> None:
        waiter = self._waiter
        if waiter is not None and not self.sock.closed and _get(self.sock, _EVENTS) & _POLLIN:
            self._waiter = None
            waiter.switch(None)

    def _wait(self) -> None:
        """Block the reading greenlet until a message waits in ZeroMQ's queue."""
        sock = self.sock
        while not _get(sock, _EVENTS) & _POLLIN:
            waiter = self._waiter = Waiter()
            # a new timer each time: a restarted one fired at once, over and over
            timer = self._loop.timer(_WAIT_AT_MOST)
            timer.start(waiter.switch, None)
            try:
                waiter.get()
            finally:
                timer.close()
                self._waiter = None

    def receive(self) -> Iterator[list[bytes]]:
        """Wait for one message, then yield what is already queued (a batch:
        at most ``_READ_BATCH`` messages, or ``_BATCH_SECONDS`` of them)."""
        self._wait()
        if self.woke is not None:
            self.woke()
        sock = self.sock
        deadline = _clock() + _BATCH_SECONDS
        for i in range(_READ_BATCH + 1):
            if i and not i & 3 and _clock() > deadline:
                return
            try:
                # a ROUTER socket puts the sender's identity first, and some
                # frame always follows it; after that, Frame objects carry
                # RCVMORE (pyzmq's get(RCVMORE) would build an enum per frame)
                frames = [_recv(sock, _NOBLOCK)]
            except zmq.Again:
                return
            frame = _recv(sock, _NOBLOCK, False)
            frames.append(frame.bytes)
            while frame.more:
                frame = _recv(sock, _NOBLOCK, False)
                frames.append(frame.bytes)
            yield frames

    def has_unread(self) -> bool:
        """Whether a message waits in ZeroMQ's queue, not read yet."""
        return bool(_get(self.sock, _EVENTS) & _POLLIN)

    def close(self) -> None:
        self._watcher.stop()
        self._watcher.close()
        self.sock.close(linger=0)


#: A worker's REPLY may be this many times ``max_message_size`` before
#: ZeroMQ itself drops it: one up to that size is read, and its job ends as
#: failed (ReplyTooLarge); dropped by ZeroMQ, the REPLY vanished with no
#: trace (the worker's connection comes back under the same identity) and
#: its job stayed in flight for ever, a guaranteed one in the journal too.
BACKEND_SIZE_FACTOR = 4


def _failed_reply(frames: list[bytes], error_type: str,
                  text: str) -> Optional[tuple[bytes, Message]]:
    """A worker's ``REPLY [reply_json, orig_msgid]`` whose result cannot be
    passed on, as a REPLY saying why (``error_type``, ``text``): the job ends
    as failed and a client waiting for its result is told. None when the
    frames are not such a REPLY."""
    if (len(frames) != 7 or frames[1] or frames[2] != PROTOCOL_VERSION.encode()
            or frames[3] != b"REPLY" or len(frames[4]) > 1024 or len(frames[6]) > 1024):
        return None
    try:
        msgid, orig_msgid = frames[4].decode(), frames[6].decode()
    except UnicodeDecodeError:
        return None
    # the worker's shape of a failed job (EventMQ's clients read "value")
    error = json.dumps({"value": text, "error": {"type": error_type, "message": text}})
    return frames[0], Message(Command.REPLY, msgid, (error, orig_msgid))


def _undecodable_reply(frames: list[bytes]) -> Optional[tuple[bytes, Message]]:
    """A REPLY whose result alone is not UTF-8 (dropped, it stayed in flight,
    and its client waited until result_ttl)."""
    return _failed_reply(frames, "InvalidReply", "the worker's reply is not UTF-8 text")


class RouterSockets:
    """The router's sockets and the greenlets that read them.

    ``counters`` and ``dropped_by_reason`` are the router's (STATUS shows
    them): ``malformed_messages``, ``oversized_messages``,
    ``unexpected_messages`` and ``frontend_pauses`` are counted in the first;
    REQUESTs dropped here (``malformed``, ``oversized``, ``error``,
    ``unread``) in the second.
    """

    def __init__(self, *, context: Any, settings: Settings,
                 counters: collections.Counter[str],
                 dropped_by_reason: collections.Counter[str],
                 limiter: Optional[LogLimiter] = None) -> None:
        self.settings = settings
        self._context = context
        self._counters = counters
        self._dropped = dropped_by_reason
        #: the router's one limiter for lines caused by peers' messages
        self._log = limiter or LogLimiter(logger)
        #: when the router's loop was last seen running (its housekeeping),
        #: and the gap after which it was away (set by the router)
        self.alive_at = time.monotonic()
        self.away_after = 2.0
        self.on_back: Optional[Callable[[float, float], None]] = None
        size = settings.max_message_size
        self._max_size = size if size >= 0 else UNLIMITED
        self._debug = settings.super_debug
        self._sockets: dict[str, RouterSocket] = {}
        #: Bound addresses: frontend, backend, administrative.
        self.endpoints: dict[str, str] = {}
        #: True while the client socket is not read (backpressure).
        self.frontend_paused = False
        self._frontend_open = gevent.event.Event()
        self._frontend_open.set()
        #: False once :meth:`close` ran: a read error then is the close, not a fault.
        self.open = False
        #: messages queued by :meth:`send_later` this turn, by socket name
        self._outboxes: dict[str, list[list[bytes]]] = {}
        self._flush_due = False
        #: socket name -> told after each batch sent (see :data:`Flushed`)
        self.flushed: dict[str, Flushed] = {}

    def bind(self, binds: Mapping[str, tuple[str, ...]], curve: Optional[ServerCurve],
             zap: Optional[ZapHandler]) -> None:
        """Make and bind one socket per name; OSError naming the address that
        could not be bound (every socket made so far is closed again)."""
        s = self.settings
        name, addr = "", ""
        try:
            for name, addrs in binds.items():
                # a plain socket, even from a zmq.green context (see RouterSocket)
                sock = zmq.Socket(self._context, zmq.ROUTER)
                self._sockets[name] = RouterSocket(sock)
                self._sockets[name].woke = self._woke
                if curve is not None and zap is not None:
                    curve.apply(sock)  # inproc:// peers are not asked (libzmq)
                    zap.watch(name, sock)
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                if name == "frontend":
                    # a scheduler reconnects under its name (told KBYE, or
                    # restarted on its file): its new connection takes the
                    # name over. Without it libzmq keeps the new one nameless
                    # while the old one is there and drops what it sends (its
                    # INFORM): the scheduler waits reconnect_timeout
                    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
                sock.setsockopt(zmq.SNDHWM, max(s.hwm, BACKEND_MIN_SNDHWM)
                                if name == "backend" else s.hwm)
                sock.setsockopt(zmq.RCVHWM, min(s.hwm, FRONTEND_RCVHWM)
                                if name == "frontend" else s.hwm)
                sock.setsockopt(zmq.LINGER, 0)
                # per frame; libzmq disconnects a peer that sends a bigger one
                sock.setsockopt(zmq.MAXMSGSIZE, s.max_message_size
                                if name != "backend" or s.max_message_size < 0
                                else s.max_message_size * BACKEND_SIZE_FACTOR + 65536)
                for addr in addrs:
                    sock.bind(addr)
                    self.endpoints.setdefault(
                        name, sock.getsockopt(zmq.LAST_ENDPOINT).decode())
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"router: cannot bind {name} address {addr}: {exc}") from exc
        self.open = True

    def readers(self, tables: Mapping[str, Mapping[Command, Handler]],
                gate: Gate) -> list[gevent.Greenlet]:
        """One reader greenlet per socket; ``gate`` sees every backend message first."""
        return [gevent.spawn(self._read_loop, name, table, gate if name == "backend" else None)
                for name, table in tables.items()]

    def _woke(self) -> None:
        self.alive(time.monotonic())

    def alive(self, now: float) -> None:
        """The loop runs (its housekeeping, or a reader that woke). The first
        to run after a gap of more than :attr:`away_after` stands still
        :data:`SETTLE` s before anything is read or sent, then tells
        :attr:`on_back` ``(gap, now)``."""
        gap, self.alive_at = now - self.alive_at, now
        if gap > self.away_after:
            _block(SETTLE)
            if self.on_back is not None:
                self.on_back(gap, now)

    def has_unread(self, name: str) -> bool:
        sock = self._sockets.get(name)
        return sock is not None and sock.has_unread()

    # ------------------------------------------------------------------
    # backpressure

    def pause_clients(self, why: str) -> None:
        """Stop reading the client socket (once; the next call is a no-op)."""
        if self.frontend_paused:
            return
        self.frontend_paused = True
        self._frontend_open.clear()
        self._counters["frontend_pauses"] += 1
        logger.warning("router: %s: not reading clients until workers take jobs (pause %d)",
                       why, self._counters["frontend_pauses"])

    def resume_clients(self, why: str) -> None:
        """Read the client socket again."""
        self.frontend_paused = False
        self._frontend_open.set()
        logger.info("router: reading clients again (%s)", why)

    # ------------------------------------------------------------------
    # sending

    def send(self, name: str, identity: bytes, message: Message) -> bool:
        """Send without waiting; False when the peer is gone or its pipe is full."""
        sock = self._sockets.get(name)
        if sock is None:
            return False
        if self._debug and not (
            self.settings.hide_heartbeat_logs and message.command is Command.HEARTBEAT
        ):
            logger.debug("%s -> %r: %s %s %s", name, identity, message.command.value,
                         printable(message.msgid), message.body)
        return self.send_frames(name, [identity, *message.frames()])

    def send_or_full(self, name: str, identity: bytes, message: Message) -> Optional[bool]:
        """:meth:`send`, telling a full pipe (None: the peer is slow) from a
        peer gone (False)."""
        sock = self._sockets.get(name)
        try:
            if sock is not None:
                sock.send([identity, *message.frames()])
            return sock is not None
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                return None if exc.errno == errno.EAGAIN else False
            raise

    def send_frames(self, name: str, frames: list[bytes]) -> bool:
        """:meth:`send` of a message already in frames, the peer's identity
        first (the hot paths: REQUESTs to workers, acknowledgements)."""
        sock = self._sockets.get(name)
        if sock is None:
            return False
        if self._debug:
            logger.debug("%s -> %r: %s", name, frames[0], frames[3:])
        try:
            sock.send(frames)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                return False
            raise

    def send_tracked(self, name: str, frames: list[bytes], big: int) -> Any:
        """:meth:`send_frames` of a big message (results): its tracker
        (:meth:`RouterSocket.send_tracked`), None when it could not leave."""
        sock = self._sockets.get(name)
        if sock is None:
            return None
        try:
            return sock.send_tracked(frames, big)
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                return None
            raise

    def send_later(self, name: str, frames: list[bytes]) -> None:
        """Queue a message (frames, the peer's identity first) to leave at the
        end of this turn of the event loop, with the others queued in it
        (:meth:`flush`)."""
        outbox = self._outboxes.get(name)
        if outbox is None:
            outbox = self._outboxes[name] = []
        outbox.append(frames)
        if not self._flush_due:
            self._flush_due = True
            gevent.get_hub().loop.run_callback(self.flush)

    def unqueue(self, name: str, messages: list[list[bytes]]) -> None:
        """Take messages queued by :meth:`send_later` back (the very lists)."""
        outbox = self._outboxes.get(name)
        if outbox:
            gone = {id(frames) for frames in messages}
            outbox[:] = [frames for frames in outbox if id(frames) not in gone]

    def flush(self) -> None:
        """Send what :meth:`send_later` queued, a socket at a time (the
        workers' first); each socket's :attr:`flushed` handler learns what
        did not leave. Run by the event loop once a turn, and before the
        router stops."""
        self._flush_due = False
        outboxes = self._outboxes
        if not self.open:
            outboxes.clear()
            return
        for name in _FLUSH_ORDER:
            batch = outboxes.get(name)
            if not batch:
                continue
            outboxes[name] = []
            try:
                failed = self.send_many(name, batch)
            except Exception:  # run from the event loop: nobody above to log it
                logger.exception("router: sending %d message(s) on the %s socket failed",
                                 len(batch), name)
                failed = batch
            handler = self.flushed.get(name)
            if handler is not None:
                try:
                    handler(batch, failed)
                except Exception:
                    logger.exception("router: after sending on the %s socket", name)

    def send_many(self, name: str, messages: list[list[bytes]]) -> list[list[bytes]]:
        """:meth:`send_frames` of each message in turn (results relayed in a
        batch); returns those that could not be delivered."""
        sock = self._sockets.get(name)
        if sock is None:
            return list(messages)
        if self._debug:
            for frames in messages:
                logger.debug("%s -> %r: %s", name, frames[0], frames[3:])
        return sock.send_many(messages)

    # ------------------------------------------------------------------
    # reading

    def _read_loop(self, name: str, table: Mapping[Command, Handler],
                   gate: Optional[Gate]) -> None:
        sock = self._sockets[name]
        frontend = name == "frontend"
        handle = self._handle
        while True:
            if frontend and self.frontend_paused:
                self._frontend_open.wait()
                continue
            try:
                for frames in sock.receive():
                    handle(name, table, gate, frames)
                    if frontend and self.frontend_paused:
                        break
            except zmq.ZMQError as exc:
                if self.open:
                    logger.error("router: reading the %s socket failed: %s", name, exc)
                return
            gevent.sleep(YIELD)  # a full batch: let the other greenlets run

    def _handle(self, name: str, table: Mapping[Command, Handler], gate: Optional[Gate],
                frames: list[bytes]) -> None:
        size = sum(map(len, frames))
        if size > self._max_size:
            repaired = _failed_reply(frames, "ReplyTooLarge", (
                f"the worker's reply is {size} bytes, over the router's max_message_size "
                f"({self._max_size})")) if name == "backend" else None
            self._drop_oversized(name, frames, ended=repaired is not None)
            if repaired is None:
                return
            identity, message = repaired  # the job ends, failed; its client is told
        else:
            try:
                identity, message = _parse_routed(frames)
            except ProtocolError as exc:
                repaired = _undecodable_reply(frames) if name == "backend" else None
                if repaired is None:
                    self._drop_malformed(name, frames, exc)
                    return
                identity, message = repaired
                self._counters["malformed_messages"] += 1
                self._log.warning("malformed", "router: the REPLY to %s from %s is not "
                                  "UTF-8; the job ends as failed (InvalidReply)",
                                  printable(message.body[1]), printable(identity))
        if self._debug and not (
            self.settings.hide_heartbeat_logs and message.command is Command.HEARTBEAT
        ):
            logger.debug("%s <- %r: %s %s %s", name, identity,
                         message.command.value, printable(message.msgid), message.body)
        if gate is not None:
            try:
                passed = gate(identity, message)
            except Exception:  # a bug must not end this socket's reader
                self._log.log(logging.ERROR, "error", "router: error checking %s %s from %s",
                              message.command.value, printable(message.msgid),
                              printable(identity), exc_info=True)
                return
            if not passed:
                return
        handler = table.get(message.command)
        if handler is None:
            self._counters["unexpected_messages"] += 1
            self._log.warning("unexpected", "router: ignored %s %s from %s on the %s socket",
                              message.command.value, printable(message.msgid, 60),
                              printable(identity), name)
            return
        try:
            handler(identity, message)
        except Exception:
            if message.command is Command.REQUEST and name == "frontend":
                self._dropped["error"] += 1
            # through the limiter: a peer's message can cause it, again and again
            self._log.log(logging.ERROR, "error", "router: error handling %s %s from %s",
                          message.command.value, printable(message.msgid),
                          printable(identity), exc_info=True)

    def _drop_malformed(self, name: str, frames: list[bytes], exc: ProtocolError) -> None:
        if name == "administrative" and len(frames) > 3 and frames[3] == b"HELLO":
            # EventMQ's emq-cli greets every router so; EventMQ's ignores it too
            logger.debug("router: ignored emq-cli's HELLO from %s", printable(frames[0]))
            return
        self._counters["malformed_messages"] += 1
        # [identity, '', version, COMMAND, MSGID, ...]
        if name == "frontend" and len(frames) > 4 and frames[3] == b"REQUEST":
            self._dropped["malformed"] += 1
            self._log.error("malformed", "router: dropped a malformed REQUEST %s from %s: %s",
                            printable(frames[4], 60), printable(frames[0]), printable(exc, 200))
            return
        self._log.warning("malformed", "router: dropped a malformed message on the %s socket "
                          "from %s: %s", name, printable(frames[0]) if frames else "?",
                          printable(exc, 200))

    def _drop_oversized(self, name: str, frames: list[bytes], ended: bool = False) -> None:
        """Count and log an oversized message (``ended``: a worker's REPLY
        whose job ends as failed instead)."""
        self._counters["oversized_messages"] += 1
        command = frames[3] if len(frames) > 3 else b"?"
        if command == b"REQUEST" and name == "frontend":
            self._dropped["oversized"] += 1
        self._log.error("oversized", "router: dropped an oversized message on the %s socket "
                        "from %s: %s %s, %d frames, %d bytes (max_message_size %d)%s", name,
                        printable(frames[0]), printable(command, 40),
                        printable(frames[4], 60) if len(frames) > 4 else "(no msgid)",
                        len(frames), sum(map(len, frames)), self.settings.max_message_size,
                        "; its job ends as failed (ReplyTooLarge)" if ended else "")

    # ------------------------------------------------------------------
    # the end

    def drop_unread_requests(self) -> None:
        """Log the REQUESTs still queued in the client socket (not read yet,
        e.g. while reading was paused): closing the socket drops them."""
        sock = self._sockets.get("frontend")
        if sock is None:
            return
        unread = 0
        while True:
            try:
                frames = sock.sock.recv_multipart(_NOBLOCK)
            except zmq.ZMQError:
                break
            if len(frames) < 5 or frames[3] != b"REQUEST":
                continue
            unread += 1
            self._dropped["unread"] += 1
            if unread <= _UNREAD_LOG_LIMIT:
                logger.error("router stopping: unread REQUEST %s dropped", printable(frames[4]))
        if unread:
            logger.error("router stopping: %d unread REQUEST(s) dropped in all%s", unread,
                         f" ({unread - _UNREAD_LOG_LIMIT} not logged one by one)"
                         if unread > _UNREAD_LOG_LIMIT else "")

    def close(self) -> None:
        """Send what is queued for this turn, then close every socket."""
        if self.open:
            self.flush()
        self.open = False
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


__all__ = ["Flushed", "Gate", "Handler", "RouterSocket", "RouterSockets"]
