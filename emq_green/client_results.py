"""Results on the client side: the handle a caller waits on, and the socket
that brings results back.

A job sent with ``result=True`` carries the headers ``reply-requested`` and
``result-requested`` (see :mod:`emq_green.results`); emq-green's router sends
its result back to the socket that sent it. So each :class:`~emq_green.client.Client`
sends such jobs on one DEALER socket of their own (a result channel), read by
one reader, which hands each result to the :class:`ResultHandle` waiting for
it. Many greenlets or threads may wait at once, each on its own handle.

Two channels, because a ZeroMQ socket belongs to one thread at a time:

* :class:`GreenResultChannel` (``zmq.green``, under gevent): senders take a
  lock around the send; one reader greenlet reads. Waiting on a handle
  blocks only the greenlet.
* :class:`ThreadResultChannel` (plain ``zmq``, threads): one reader thread
  owns the DEALER socket; a sending thread passes its request to that
  thread through a PUSH socket of its own over ``inproc://``.

A handle whose caller dropped it is forgotten (weak references), so results
nobody waits for do not pile up in the client.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
import weakref
from typing import Any, Callable, Optional

import zmq

from .protocol import Command, Message, ProtocolError

logger = logging.getLogger(__name__)

#: seconds the reader thread waits in one poll before it checks for close
_POLL_MS = 100
_READ_BATCH = 256


class JobError(Exception):
    """The job failed on the worker: ``type`` is its error type (an exception
    class name, ``TimeoutError`` for a job timeout, ``CallableNotAllowed``
    for a callable the worker refuses, ``InvalidRequest``...), ``message``
    the worker's text."""

    def __init__(self, msgid: str, type: str, message: str, value: Any = None) -> None:
        super().__init__(f"job {msgid} failed: {type}: {message}")
        self.msgid = msgid
        self.type = type
        self.message = message
        #: the reply's ``value`` (EventMQ's: the error text)
        self.value = value


class ResultTimeout(TimeoutError):
    """No result arrived within the time :meth:`ResultHandle.get` was given.
    The job may still be running (or be waiting for a worker), or the router
    does not forward results: EventMQ's router never does, emq-green's does."""

    def __init__(self, msgid: str, timeout: float) -> None:
        super().__init__(
            f"no result for job {msgid} within {timeout:g} s (the job may still be "
            "queued or running; EventMQ's router never forwards results, only "
            "emq-green's router does)")
        self.msgid = msgid
        self.timeout = timeout


class ResultLostError(Exception):
    """The router dropped the result (``reason``: ``evicted``, ``expired``,
    ``worker_lost``, ``stopping``); the job may or may not have run."""

    def __init__(self, msgid: str, reason: str, text: str) -> None:
        super().__init__(f"result of job {msgid} lost: {text}")
        self.msgid = msgid
        self.reason = reason


class ResultHandle:
    """The future result of one job: :meth:`ready`, :meth:`get`."""

    __slots__ = ("msgid", "_event", "_value", "_error", "__weakref__")

    def __init__(self, msgid: str, event: Any) -> None:
        #: the REQUEST's message id
        self.msgid = msgid
        self._event = event
        self._value: Any = None
        self._error: Optional[BaseException] = None

    @classmethod
    def completed(cls, msgid: str, value: Any) -> ResultHandle:
        """A handle that already holds ``value`` (a job run in the caller)."""
        handle = cls(msgid, threading.Event())
        handle._value = value
        handle._event.set()
        return handle

    def ready(self) -> bool:
        """Whether the result (or the job's error) has arrived."""
        return self._event.is_set()

    def get(self, timeout: Optional[float] = None) -> Any:
        """The job's return value; waits at most ``timeout`` seconds (None:
        for ever). Raises :class:`JobError` when the job failed,
        :class:`ResultLostError` when the router dropped the result and
        :class:`ResultTimeout` when nothing arrived in time."""
        if not self._event.wait(timeout):
            raise ResultTimeout(self.msgid, 0.0 if timeout is None else timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def _resolve(self, reply_json: str) -> None:
        """Called by the channel's reader with the worker's ``reply_json``."""
        try:
            reply = json.loads(reply_json)
        except ValueError as exc:
            self._error = JobError(self.msgid, "InvalidReply",
                                   f"the reply is not JSON: {exc}")
        else:
            if not isinstance(reply, dict):
                self._value = reply
            elif "lost" in reply:
                self._error = ResultLostError(self.msgid, str(reply.get("reason", "")),
                                              str(reply["lost"]))
            elif isinstance(reply.get("error"), dict):
                error = reply["error"]
                self._error = JobError(self.msgid, str(error.get("type", "")),
                                       str(error.get("message", "")), reply.get("value"))
            else:
                self._value = reply.get("value")
        self._event.set()

    def __repr__(self) -> str:
        return f"<ResultHandle {self.msgid} {'ready' if self.ready() else 'pending'}>"


class _Channel:
    """What both channels share: the handles by msgid, and dispatch."""

    def __init__(self, on_ack: Callable[[], None]) -> None:
        self._handles: weakref.WeakValueDictionary[str, ResultHandle] = (
            weakref.WeakValueDictionary())
        self._handles_lock = threading.Lock()
        self._on_ack = on_ack
        self.closed = False

    def _new_event(self) -> Any:
        raise NotImplementedError

    def _send(self, request: Message) -> None:
        raise NotImplementedError

    def submit(self, request: Message) -> ResultHandle:
        """Send ``request`` (which asks for its result); the handle is
        registered first, so even an instant result finds it."""
        handle = ResultHandle(request.msgid, self._new_event())
        with self._handles_lock:
            self._handles[request.msgid] = handle
        try:
            self._send(request)
        except BaseException:
            with self._handles_lock:
                self._handles.pop(request.msgid, None)
            raise
        return handle

    def pending(self) -> int:
        """Handles still referenced and waiting."""
        with self._handles_lock:
            return sum(1 for h in self._handles.values() if not h.ready())

    def _dispatch(self, frames: list[bytes]) -> None:
        # the common case without building a Message: a result,
        # ['', 'eMQP/1.0', 'REPLY', msgid, reply_json, orig_msgid]
        if len(frames) == 6 and frames[2] == b"REPLY" and frames[1] == b"eMQP/1.0":
            with self._handles_lock:
                handle = self._handles.pop(frames[5].decode("utf-8", "replace"), None)
            if handle is not None:
                handle._resolve(frames[4].decode("utf-8", "replace"))
            return
        try:
            message = Message.parse(frames)
        except ProtocolError as exc:
            logger.debug("client: ignored a malformed message from the router: %s", exc)
            return
        if message.command is not Command.REPLY:
            return
        if len(message.body) == 1:
            self._on_ack()
            return
        if len(message.body) != 2:
            return
        with self._handles_lock:
            handle = self._handles.pop(message.body[1], None)
        if handle is not None:
            handle._resolve(message.body[0])

    def close(self) -> None:
        raise NotImplementedError


def _configure(sock: Any, zmq_module: Any, hwm: int, linger: float) -> None:
    sock.setsockopt(zmq_module.IDENTITY, f"results:{uuid.uuid4()}".encode())
    sock.setsockopt(zmq_module.SNDHWM, hwm)
    sock.setsockopt(zmq_module.RCVHWM, hwm)
    sock.setsockopt(zmq_module.LINGER, int(linger * 1000))


class GreenResultChannel(_Channel):
    """Under gevent: one ``zmq.green`` DEALER, sends under a lock, one reader greenlet."""

    def __init__(self, context: Any, addr: str, *, hwm: int, linger: float,
                 send: Callable[[Any, Message], None],
                 on_ack: Callable[[], None]) -> None:
        import gevent
        import gevent.event
        import gevent.lock
        import zmq.green as zmq_green

        super().__init__(on_ack)
        self._event_class = gevent.event.Event
        self._sock = context.socket(zmq_green.DEALER)
        _configure(self._sock, zmq_green, hwm, linger)
        self._sock.connect(addr)
        self._send_lock = gevent.lock.Semaphore()
        self._send_message = send
        self._reader = gevent.spawn(self._read)

    def _new_event(self) -> Any:
        return self._event_class()

    def _send(self, request: Message) -> None:
        # zmq.green sends frame by frame and may wait between frames: one
        # sender at a time, or two messages' frames could interleave
        with self._send_lock:
            self._send_message(self._sock, request)

    def _read(self) -> None:
        sock = self._sock
        while True:
            try:
                self._dispatch(sock.recv_multipart())
                for _ in range(_READ_BATCH):
                    self._dispatch(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if not self.closed:
                    logger.exception("client: the result socket failed")
                return

    def close(self) -> None:
        self.closed = True
        self._reader.kill()
        self._sock.close()


class ThreadResultChannel(_Channel):
    """Without gevent: a reader thread owns the DEALER socket; senders reach
    it through per-thread PUSH sockets over ``inproc://``."""

    def __init__(self, context: zmq.Context, addr: str, *, hwm: int, linger: float,
                 send: Callable[[Any, Message], None],
                 on_ack: Callable[[], None]) -> None:
        super().__init__(on_ack)
        self._context = context
        self._hwm = hwm
        self._linger = linger
        self._send_message = send
        self._inbox_addr = f"inproc://emq-green-results-{uuid.uuid4()}"
        self._dealer = context.socket(zmq.DEALER)
        _configure(self._dealer, zmq, hwm, linger)
        self._dealer.connect(addr)
        self._inbox = context.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.RCVHWM, hwm)
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.bind(self._inbox_addr)
        self._local = threading.local()
        self._pushers: list[Any] = []
        self._pushers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="emq-green-results",
                                        daemon=True)
        self._thread.start()

    def _new_event(self) -> Any:
        return threading.Event()

    def _send(self, request: Message) -> None:
        pusher = getattr(self._local, "pusher", None)
        if pusher is None:
            pusher = self._context.socket(zmq.PUSH)
            pusher.setsockopt(zmq.SNDHWM, self._hwm)
            pusher.setsockopt(zmq.LINGER, int(self._linger * 1000))
            pusher.connect(self._inbox_addr)
            self._local.pusher = pusher
            with self._pushers_lock:
                self._pushers.append(pusher)
        self._send_message(pusher, request)

    def _run(self) -> None:
        dealer, inbox = self._dealer, self._inbox
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(inbox, zmq.POLLIN)
        try:
            while not self.closed:
                events = dict(poller.poll(_POLL_MS))
                if inbox in events:
                    for _ in range(_READ_BATCH):
                        try:
                            frames = inbox.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        dealer.send_multipart(frames)  # blocks at SNDHWM: backpressure
                if dealer in events:
                    for _ in range(_READ_BATCH):
                        try:
                            frames = dealer.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
            # closing: requests still in the inbox go out (within linger)
            while True:
                try:
                    dealer.send_multipart(inbox.recv_multipart(zmq.NOBLOCK), zmq.NOBLOCK)
                except zmq.Again:
                    break
        except zmq.ZMQError:
            if not self.closed:
                logger.exception("client: the result socket failed")
        finally:
            inbox.close()
            dealer.close()

    def close(self) -> None:
        with self._pushers_lock:
            pushers, self._pushers = self._pushers, []
        for pusher in pushers:
            pusher.close()  # their requests reach the inbox first (inproc, linger)
        self.closed = True
        self._thread.join()


__all__ = ["ResultHandle", "JobError", "ResultTimeout", "ResultLostError",
           "GreenResultChannel", "ThreadResultChannel"]
