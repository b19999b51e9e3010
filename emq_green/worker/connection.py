"""The link to one router: one ``zmq.green`` DEALER socket, one identity.

pyzmq's green sockets allow one waiting greenlet per direction. The job
manager keeps to that: exactly one greenlet calls
:meth:`Connection.recv_batch`, and every send goes through
:meth:`Connection.send_frames` (or :meth:`Connection.send`), which never
waits. When
ZeroMQ's send queue is full (the high-water mark), messages go to a local
overflow queue that one flusher greenlet drains in order.

Fast path. ``zmq.green`` re-checks the socket state on every frame in pure
Python (about 50 us per 5-frame message on the reference machine, against
6 us for the C calls), which was most of a no-op job's cost. When an
operation can complete without waiting, :class:`_FastGreenSocket` calls the
C backend directly and then runs the green socket's own state check once
per message, which is what wakes a reader whose edge-triggered file
descriptor notification was consumed by the operation. Anything that has to
wait falls back to the ordinary green methods.

One native thread may send too. While a job holds the event loop, the
heartbeat thread of :mod:`emq_green.worker.lifeline` sends HEARTBEAT itself with
:meth:`Connection.send_from_thread`. ZeroMQ sockets are not thread-safe, so
every libzmq call on this socket, from the loop or the thread, is made
holding :attr:`Connection.guard` (a real lock, never held across a greenlet
switch), whole messages at a time; and since the thread's send may consume
the descriptor's edge notification, it asks the loop to re-check the
socket state afterwards (docs/monitoring.md has the experiment).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Optional

import gevent
import zmq.green as zmq
from gevent import monkey
from zmq.backend import Socket as _BackendSocket

from ..curve import ClientCurve
from ..protocol import KBYE_LEAVING, Command, Message, ready_frames

logger = logging.getLogger(__name__)

#: The longest a message waits in the worker for its loop turn to end, s.
MAX_BATCH_DELAY = 0.05

_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_send_frame = _BackendSocket.send
_recv_frame = _BackendSocket.recv
_getsockopt = _BackendSocket.get
#: the C lock, even in a monkeypatched process
_RealRLock = monkey.get_original("_thread", "RLock")


class _FastGreenSocket(zmq.Socket):
    """A green socket with non-waiting multipart send/recv in C calls."""

    #: :attr:`Connection.guard`, also taken by zmq.green's own state check
    #: (called from its file descriptor watcher)
    guard: _RealRLock | None = None

    def _Socket__state_changed(self, event: object = None, _evtype: object = None) -> None:
        with self.guard or _RealRLock():
            super()._Socket__state_changed(event, _evtype)

    def send_now(self, frames: list[bytes]) -> None:
        """Send a whole message or raise zmq.Again (nothing sent).

        ZeroMQ accepts the remaining parts once the first is queued, so a
        message is never split by the high-water mark. The caller must call
        :meth:`check_state` after its last send.
        """
        *first, last = frames
        for frame in first:
            _send_frame(self, frame, _MORE_NOBLOCK)
        _send_frame(self, last, _NOBLOCK)

    def check_state(self) -> None:
        """zmq.green's own state check: wakes a waiting reader if needed."""
        self._Socket__state_changed()

    def recv_now(self) -> list[bytes] | None:
        """The next whole message, or None when none is waiting.

        Frames are received as :class:`zmq.Frame` for their ``more`` flag:
        asking the socket for RCVMORE instead goes through pyzmq's option
        enum, about 2.5 us per frame on the reference machine."""
        try:
            frame = _recv_frame(self, _NOBLOCK, False)
        except zmq.Again:
            return None
        frames = [frame.bytes]
        while frame.more:
            frame = _recv_frame(self, _NOBLOCK, False)
            frames.append(frame.bytes)
        return frames


class Connection:
    """A DEALER socket connected to ``addr`` with ``identity``.

    ``last_sent`` and ``last_received`` are monotonic times used for
    heartbeats: any message counts, in both directions. With ``curve`` the
    link is CURVE-authenticated and encrypted (:mod:`emq_green.curve`);
    handshakes the router refuses are logged and counted in
    :attr:`handshake_failures` and in ``counters["curve_handshakes_failed"]``
    (the manager's, which outlive a connection).
    """

    def __init__(
        self,
        context: zmq.Context,
        addr: str,
        identity: str,
        *,
        hwm: int = 10000,
        debug_log: bool = False,
        hide_heartbeats: bool = True,
        curve: ClientCurve | None = None,
        counters: collections.Counter[str] | None = None,
    ) -> None:
        self.addr = addr
        self.identity = identity
        self.socket = context.socket(zmq.DEALER, socket_class=_FastGreenSocket)
        self.socket.setsockopt(zmq.IDENTITY, identity.encode())
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        #: CURVE handshakes the router refused (unlisted key, wrong server key)
        self.handshake_failures = 0
        self._counters = counters
        self._monitor: gevent.Greenlet | None = None
        if curve is not None:
            curve.apply(self.socket)
            self._monitor = gevent.spawn(self._watch_handshakes, self.socket.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED))
        self.socket.connect(addr)
        #: held for every libzmq call on the socket (see the module docstring)
        self.guard = self.socket.guard = _RealRLock()
        self.last_sent = self.last_received = time.monotonic()
        #: longest time between two messages sent (what the router sees)
        self.longest_gap = 0.0
        self.sent_count = 0
        #: READYs sent on this connection that no REQUEST has used yet
        self.ready_outstanding = 0
        #: monotonic time the last REQUEST arrived
        self.last_request = 0.0
        #: REPLYs dropped at close because the socket would not take them
        self.dropped = 0
        self.closed = False
        #: Our KBYE ``leaving`` went out here (a stop, a reload), and whether
        #: the router answered it (emq-green's does, EventMQ's does not).
        self.kbye_sent = self.kbye_answered = False
        #: jobs ended after that KBYE and before the answer (see :meth:`job_ended_after_kbye`)
        self.readies_owed: list[str] = []
        #: the plain job whose end the next READY offers (see :func:`ready_frames`)
        self.ended_job: Optional[str] = None
        self._outbox: list[list[bytes]] = []
        self._outbox_since = 0.0
        self._overflow: collections.deque[list[bytes]] = collections.deque()
        self._flusher: gevent.Greenlet | None = None
        self._debug_log = debug_log
        self._loop = gevent.get_hub().loop
        self._hide_heartbeats = hide_heartbeats

    def __repr__(self) -> str:
        return f"<Connection {self.identity} -> {self.addr}>"

    def _watch_handshakes(self, monitor: zmq.Socket) -> None:
        """Log a refused CURVE handshake: without this, a worker whose key
        the router does not know would only say "connecting" for ever
        (libzmq retries by itself). The first failure and then at most one
        line every 30 s. A handshake cut without a word is logged only when
        the next one fails too: one such failure is what a router restarting
        mid-handshake causes (a probe: an ERROR at every router restart)."""
        from zmq.utils.monitor import recv_monitor_message

        logged, streak = 0.0, 0
        try:
            while True:
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    streak = 0
                    continue
                streak += 1
                if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH and streak < 2:
                    continue
                self.handshake_failures += 1
                if self._counters is not None:
                    self._counters["curve_handshakes_failed"] += 1
                now = time.monotonic()
                if logged and now - logged < 30:
                    continue
                logged = now
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    why = f"this key is not authorized there (ZAP status {event['value']})"
                else:
                    why = "wrong curve_server_key_file, or the router does not speak CURVE"
                logger.error("CURVE handshake with %s failed (%d so far): %s; libzmq keeps "
                             "retrying", self.addr, self.handshake_failures, why)
        except zmq.ZMQError:
            return
        finally:
            monitor.close(linger=0)

    def set_max_message_size(self, size: int) -> None:
        """ZeroMQ's MAXMSGSIZE (bytes, -1 unlimited): libzmq checks it for
        each frame and drops the connection of a peer that sends more; the
        manager checks whole messages itself."""
        with self.guard:
            self.socket.setsockopt(zmq.MAXMSGSIZE, size)

    def send(self, message: Message) -> None:
        """Queue ``message`` for the router without waiting."""
        if self._debug_log and not (
            self._hide_heartbeats and message.command is Command.HEARTBEAT
        ):
            logger.debug("-> %s %s %s", message.command.value, message.msgid, message.body)
        self.send_frames(message.frames(), log=False)

    def say_leaving(self) -> None:
        """KBYE ``leaving``: this worker stops, or a reload retires this connection."""
        self.send(Message.new(Command.KBYE, KBYE_LEAVING))
        self.kbye_sent = True

    def send_ready(self) -> None:
        """One READY, naming :attr:`ended_job` if set (then cleared)."""
        self.send_frames(ready_frames(self.ended_job))
        self.ended_job = None

    def job_ended_after_kbye(self, msgid: str) -> None:
        """Job ``msgid``, sent without reply-requested, ended well after our
        KBYE. No READY offers its slot now, so the router cannot tell it
        from a job lost with a dead worker: emq-green's router, once it has
        answered the KBYE, takes a READY naming it as its end. EventMQ's
        router, which answers nothing and has forgotten the worker, is sent
        none."""
        if not self.kbye_sent or self.closed:
            return
        if self.kbye_answered:
            self.send_frames(ready_frames(msgid))
        else:
            self.readies_owed.append(msgid)

    def kbye_received(self) -> None:
        """The router sent KBYE here: after ours, its answer (the READYs owed leave)."""
        if self.kbye_sent and not self.kbye_answered:
            self.kbye_answered = True
            owed, self.readies_owed = self.readies_owed, []
            for msgid in owed:
                self.send_frames(ready_frames(msgid))

    def send_frames(self, frames: list[bytes], log: bool = True) -> None:
        """Queue a message given as frames (``['', version, COMMAND, MSGID,
        *body]``) without waiting."""
        if self.closed:
            logger.warning("not sent, connection %s is closed: %s", self.identity, frames[2:5])
            return
        if log and self._debug_log:
            logger.debug("-> %s", frames[2:])
        self.sent_count += 1
        if self._overflow:
            self._overflow.append(frames)
            return
        # Messages sent in one turn of the event loop leave together at its
        # end: one state check and fewer wake-ups of ZeroMQ's IO thread. A
        # turn can be long (jobs that compute run back to back without
        # yielding to the hub), so a batch older than MAX_BATCH_DELAY leaves
        # at once.
        outbox = self._outbox
        outbox.append(frames)
        if len(outbox) == 1:
            self._outbox_since = time.monotonic()
            self._loop.run_callback(self._send_outbox)
        elif time.monotonic() - self._outbox_since > MAX_BATCH_DELAY:
            self._send_outbox()

    def _send_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self.closed or not outbox:
            return
        with self.guard:
            self._send_batch(outbox)
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self.last_sent)
        self.last_sent = now

    def _send_batch(self, outbox: list[list[bytes]]) -> None:
        try:
            for i, frames in enumerate(outbox):
                try:
                    self.socket.send_now(frames)
                except zmq.Again:
                    self._overflow.extend(outbox[i:])
                    if self._flusher is None:
                        logger.warning("send queue to %s is full (hwm); buffering in the "
                                       "worker", self.addr)
                        self._flusher = gevent.spawn(self._flush)
                    return
        except zmq.ZMQError as exc:
            logger.error("sending to %s failed: %s", self.addr, exc)
        finally:
            self.socket.check_state()

    def _flush(self) -> None:
        try:
            while self._overflow and not self.closed:
                with self.guard:
                    try:
                        self.socket.send_now(self._overflow[0])
                    except zmq.Again:
                        sent = False
                    else:
                        sent = True
                        self.socket.check_state()
                if sent:
                    self._overflow.popleft()
                    self.last_sent = time.monotonic()
                else:
                    self.socket._wait_write()  # as zmq.green waits, outside the guard
        except zmq.ZMQError as exc:
            if not self.closed:
                logger.error("sending to %s failed: %s", self.addr, exc)
        finally:
            self._flusher = None

    def recv_batch(self, limit: int = 256) -> list[list[bytes]]:
        """Wait for messages; return those waiting (at least one, at most
        ``limit``). Only the reader greenlet calls this."""
        socket = self.socket
        while True:
            with self.guard:
                batch = []
                while len(batch) < limit:
                    frames = socket.recv_now()
                    if frames is None:
                        break
                    batch.append(frames)
            if batch:
                self.last_received = time.monotonic()
                return batch
            socket._wait_read()  # as zmq.green waits, outside the guard

    def send_from_thread(self, frames: list[bytes], loop: object) -> bool:
        """Send one message now from a native thread (not the hub's); False
        when it cannot leave at once or the connection is closed. ``loop``
        is the hub's loop, asked to re-check the socket state afterwards."""
        with self.guard:
            if self.closed:
                return False
            try:
                self.socket.send_now(frames)
            except zmq.ZMQError:
                return False
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self.last_sent)
        self.last_sent = now
        self.sent_count += 1
        loop.run_callback_threadsafe(self._check_state)  # type: ignore[attr-defined]
        return True

    def _check_state(self) -> None:
        with self.guard:
            if not self.closed:
                self.socket.check_state()

    def has_input(self) -> bool:
        """Whether a message is waiting to be read (the reader may be behind
        after the loop was held)."""
        with self.guard:
            if self.closed:
                return False
            return bool(_getsockopt(self.socket, _EVENTS) & _POLLIN)

    @property
    def pending(self) -> int:
        """Messages not yet handed to ZeroMQ."""
        return len(self._outbox) + len(self._overflow)

    def close(self, linger: float = 0.0) -> None:
        """Close the socket, giving queued messages ``linger`` seconds to leave."""
        if self.closed:
            return
        if self._outbox:
            self._send_outbox()
        if self._overflow and linger > 0:
            deadline = time.monotonic() + linger
            while self._overflow and time.monotonic() < deadline:
                gevent.sleep(0.01)
        self.closed = True
        if self._flusher is not None:
            self._flusher.kill(block=False)
        if self._monitor is not None:
            self._monitor.kill(block=False)
        if self._overflow:
            replies = [f[5].decode("utf-8", "replace") for f in self._overflow
                       if len(f) > 5 and f[2] == b"REPLY"]
            logger.error("%d message(s) to %s dropped at close (the router was not taking "
                         "them); REPLY to: %s", len(self._overflow), self.addr,
                         ", ".join(replies) or "none")
            self.dropped += len(replies)
        with self.guard:
            self.socket.close(linger=int(linger * 1000))
