"""The link to one router: one ``zmq.green`` DEALER socket, one identity.

pyzmq's green sockets allow one waiting greenlet per direction. The job
manager keeps to that: exactly one greenlet calls :meth:`Connection.recv`,
and every send goes through :meth:`Connection.send`, which never waits. When
ZeroMQ's send queue is full (the high-water mark), messages go to a local
overflow queue that one flusher greenlet drains in order.
"""

from __future__ import annotations

import collections
import logging
import time

import gevent
import zmq.green as zmq

from .protocol import Command, Message

logger = logging.getLogger(__name__)


class Connection:
    """A DEALER socket connected to ``addr`` with ``identity``.

    ``last_sent`` and ``last_received`` are monotonic times used for
    heartbeats: any message counts, in both directions.
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
    ) -> None:
        self.addr = addr
        self.identity = identity
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity.encode())
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(addr)
        self.last_sent = self.last_received = time.monotonic()
        self.sent_count = 0
        self.closed = False
        self._overflow: collections.deque[list[bytes]] = collections.deque()
        self._flusher: gevent.Greenlet | None = None
        self._debug_log = debug_log
        self._hide_heartbeats = hide_heartbeats

    def __repr__(self) -> str:
        return f"<Connection {self.identity} -> {self.addr}>"

    def send(self, message: Message) -> None:
        """Queue ``message`` for the router without waiting."""
        if self.closed:
            logger.warning("not sent, connection %s is closed: %s %s", self.identity,
                           message.command.value, message.body[:1])
            return
        if self._debug_log and not (
            self._hide_heartbeats and message.command is Command.HEARTBEAT
        ):
            logger.debug("-> %s %s %s", message.command.value, message.msgid, message.body)
        frames = message.frames()
        self.last_sent = time.monotonic()
        self.sent_count += 1
        if not self._overflow:
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
        self._overflow.append(frames)
        if self._flusher is None:
            logger.warning("send queue to %s is full (hwm); buffering in the worker", self.addr)
            self._flusher = gevent.spawn(self._flush)

    def _flush(self) -> None:
        try:
            while self._overflow and not self.closed:
                self.socket.send_multipart(self._overflow[0])  # waits for room
                self._overflow.popleft()
        except zmq.ZMQError as exc:
            if not self.closed:
                logger.error("sending to %s failed: %s", self.addr, exc)
        finally:
            self._flusher = None

    def recv(self) -> list[bytes]:
        """Wait for the next message; only the reader greenlet calls this."""
        frames = self.socket.recv_multipart()
        self.last_received = time.monotonic()
        return frames

    @property
    def pending(self) -> int:
        """Messages waiting in the worker because ZeroMQ's queue was full."""
        return len(self._overflow)

    def close(self, linger: float = 0.0) -> None:
        """Close the socket, giving queued messages ``linger`` seconds to leave."""
        if self.closed:
            return
        if self._overflow and linger > 0:
            deadline = time.monotonic() + linger
            while self._overflow and time.monotonic() < deadline:
                gevent.sleep(0.01)
        self.closed = True
        if self._flusher is not None:
            self._flusher.kill(block=False)
        if self._overflow:
            logger.warning("%d message(s) to %s dropped at close", len(self._overflow), self.addr)
        self.socket.close(linger=int(linger * 1000))
