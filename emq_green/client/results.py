"""Results on the client side: the handle a caller waits on, and the socket
that brings results back.

A job sent with ``result=True`` carries the headers ``reply-requested`` and
``result-requested`` (see :mod:`emq_green.router.results`); emq-green's router sends
its result back to the socket that sent it. So each :class:`~emq_green.client.Client`
sends such jobs on one DEALER socket of their own (a result channel), read by
one reader, which hands each result to the :class:`ResultHandle` waiting for
it. Many greenlets or threads may wait at once, each on its own handle.

Two channels, because a ZeroMQ socket belongs to one thread at a time:

* :class:`GreenResultChannel` (``zmq.green``, under gevent): senders take a
  lock around the send; one reader greenlet reads. Waiting on a handle
  blocks only the greenlet.
* :class:`ThreadResultChannel` (plain ``zmq``, threads): the DEALER socket
  sits behind a lock; a sender sends and reads what has arrived, a reader
  thread reads when the socket signals (see the class).

A handle whose caller dropped it is forgotten (weak references), so results
nobody waits for do not pile up in the client.
"""

from __future__ import annotations

import json
import logging
import select
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Optional

import zmq

from ..protocol import Command, Message, ProtocolError, _loads, printable
from . import threads
from .args import check_number
from .connect import new_dealer
from .flush import answered, probe_message, send_probe

logger = logging.getLogger(__name__)

#: ms the reader thread waits for a signal before it reads anyway (edge-triggered FD)
_POLL_MS = 20
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_READ_BATCH = 256
_NOBLOCK_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
# pyzmq's backend (Cython) socket methods, below its Python layer, which
# builds an enum for every flag of every frame (about a third of a send)
_BACKEND = next(c for c in zmq.Socket.__mro__ if c.__module__.startswith("zmq.backend"))
_send, _recv, _get = _BACKEND.send, _BACKEND.recv, _BACKEND.get


def _send_now(sock: Any, frames: list[bytes]) -> bool:
    """Queue a message on a plain socket without waiting; False when there
    is no room (nothing was queued). ZeroMQ takes a multipart message whole
    or not at all: once the first frame is in, the others are."""
    try:
        _send(sock, frames[0], _NOBLOCK_MORE)
    except zmq.Again:
        return False
    last = len(frames) - 1
    for i in range(1, last):
        _send(sock, frames[i], _NOBLOCK_MORE)
    _send(sock, frames[last], _NOBLOCK)
    return True


def _recv_now(sock: Any) -> list[bytes]:
    """One whole message from a plain socket that has one waiting."""
    frame = _recv(sock, _NOBLOCK, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        frames.append(frame.bytes)
    return frames


class SendTimeoutError(TimeoutError):
    """A REQUEST could not be handed to ZeroMQ within ``send_timeout``
    seconds (the router is not reading: its buffer is full, or it is gone).
    The request was not sent; sending it again is safe."""

    def __init__(self, msgid: str, timeout: float, *, half_sent: bool = False) -> None:
        super().__init__(f"REQUEST {msgid} not sent within {timeout:g} s: the router "
                         "is not taking requests (backpressure, or no router)")
        self.msgid = msgid
        self.timeout = timeout
        #: True when some frames were queued; the socket was then closed (ZeroMQ
        #: drops the part)
        self.half_sent = half_sent


class ConfirmTimeout(TimeoutError):
    """A guaranteed REQUEST was sent but the router did not confirm it within
    the time allowed: it may or may not hold it. emq-green's router confirms
    once the request is safe (journaled, or in its memory); EventMQ's router
    only acknowledges a request it hands out at once. Sending it again may
    run the job twice."""

    def __init__(self, msgid: str, timeout: float) -> None:
        super().__init__(f"guaranteed REQUEST {msgid} not confirmed by the router within "
                         f"{timeout:g} s: it may or may not hold it (sending it again may "
                         "run the job twice; EventMQ's router confirms nothing, it only "
                         "acknowledges a request it hands to a worker at once)")
        self.msgid = msgid
        self.timeout = timeout


class GuaranteeRefused(Exception):
    """The router refused a guaranteed REQUEST (``reason``: e.g. its journal
    cannot be written); the job will not run. Sending it again later is safe."""

    def __init__(self, msgid: str, reason: str) -> None:
        super().__init__(f"guaranteed REQUEST {msgid} refused by the router: {reason}")
        self.msgid = msgid
        self.reason = reason


def confirmation(frames: list[bytes], msgid: str) -> Optional[str]:
    """What a message from the router says of the guaranteed REQUEST
    ``msgid``: ``""`` confirmed (``REPLY [msgid]``), the reason it was refused
    (``REPLY [error_json, msgid]``), or None (about something else)."""
    answer = confirmation_of(frames)
    return answer[1] if answer is not None and answer[0] == msgid else None


def confirmation_of(frames: list[bytes]) -> Optional[tuple[str, str]]:
    """``(msgid, "")`` for the router's confirmation ``REPLY [msgid]`` of a
    guaranteed REQUEST, ``(msgid, reason)`` for its refusal ``REPLY
    [error_json, msgid]``, None for anything else. (On a socket that asked
    for no result, a REPLY of two body frames is a refusal.)"""
    if len(frames) < 5 or frames[2] != b"REPLY":
        return None
    try:
        if len(frames) == 5:
            return frames[4].decode(), ""
        if len(frames) != 6:
            return None
        msgid = frames[5].decode()
    except UnicodeDecodeError:
        return None
    try:
        reply = json.loads(frames[4])
        reason = str(reply["error"]["message"])
    except (ValueError, KeyError, TypeError, RecursionError):
        reason = frames[4].decode("utf-8", "replace")[:200]
    return msgid, reason or "refused by the router (no reason given)"


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
            "queued or running, or never reached a router: Client.wait_for_router "
            "tells; EventMQ's router never forwards results, only emq-green's does)")
        self.msgid = msgid
        self.timeout = timeout


class ResultLostError(Exception):
    """The router dropped the result (``reason``: ``expired``,
    ``worker_lost``, ``given_up``, ``stopping``), or the client was closed while it was
    awaited (``client_closed``); the job may or may not have run, except
    when ``unrun`` is True: the router dropped it before any worker took it
    (its result expired first), so sending it again runs it once."""

    def __init__(self, msgid: str, reason: str, text: str, unrun: bool = False) -> None:
        super().__init__(f"result of job {msgid} lost: {text}")
        self.msgid = msgid
        self.reason = reason
        self.unrun = unrun


class ResultHandle:
    """The future result of one job: :meth:`ready`, :meth:`get`.

    No event is made per handle unless a caller waits before the result is
    in (most results are in by the time :meth:`get` is called, and an
    event costs more than the rest of the handle): ``lock`` guards the
    moment the result lands against a waiter making its event.
    """

    __slots__ = ("msgid", "_done", "_event", "_new_event", "_lock", "_value", "_error",
                 "__weakref__")

    def __init__(self, msgid: str, new_event: Callable[[], Any], lock: Any) -> None:
        #: the REQUEST's message id
        self.msgid = msgid
        self._done = False
        self._event: Any = None
        self._new_event = new_event
        self._lock = lock
        self._value: Any = None
        self._error: Optional[BaseException] = None

    @classmethod
    def completed(cls, msgid: str, value: Any) -> ResultHandle:
        """A handle that already holds ``value`` (a job run in the caller)."""
        handle = cls(msgid, threading.Event, threading.Lock())
        handle._value = value
        handle._done = True
        return handle

    def ready(self) -> bool:
        """Whether the result (or the job's error) has arrived."""
        return self._done

    def get(self, timeout: Optional[float] = None) -> Any:
        """The job's return value, once it has come back. May be called again.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Raises:
            JobError: the job failed on the worker.
            ResultLostError: the router dropped the result.
            ResultTimeout: nothing arrived within ``timeout``.
            TypeError, ValueError: ``timeout`` is not None or a number of
                seconds, 0 or more.
        """
        check_number("timeout", timeout, optional=True)
        if not self._done:
            with self._lock:
                event = self._event
                if event is None and not self._done:
                    event = self._event = self._new_event()
            if event is not None and not event.wait(timeout):
                raise ResultTimeout(self.msgid, 0.0 if timeout is None else timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def _resolve(self, reply_json: str) -> None:
        """Called by the channel's reader with the worker's ``reply_json``."""
        try:
            reply = _loads(reply_json)
        except (ValueError, RecursionError) as exc:
            self._error = JobError(self.msgid, "InvalidReply",
                                   f"the reply is not JSON: {printable(exc, 200)}")
        else:
            if type(reply) is not dict:
                self._value = reply
            elif "lost" in reply:
                self._error = ResultLostError(self.msgid, str(reply.get("reason", "")),
                                              str(reply["lost"]), reply.get("unrun") is True)
            elif isinstance(reply.get("error"), dict):
                error = reply["error"]
                self._error = JobError(self.msgid, str(error.get("type", "")),
                                       str(error.get("message", "")), reply.get("value"))
            elif reply.get("error") not in (None, False, ""):
                # another shape of failure (a worker of another kind): still
                # a failure, never taken for the value beside it
                self._error = JobError(self.msgid, "Error", printable(reply["error"], 2000),
                                       reply.get("value"))
            else:
                self._value = reply.get("value")
        with self._lock:
            self._done = True
            event = self._event
        if event is not None:
            event.set()

    def __repr__(self) -> str:
        return f"<ResultHandle {self.msgid} {'ready' if self.ready() else 'pending'}>"


class _Channel:
    """What both channels share: the handles by msgid, and dispatch."""

    def __init__(self, on_ack: Callable[[], None]) -> None:
        self._handles: weakref.WeakValueDictionary[str, ResultHandle] = (
            weakref.WeakValueDictionary())
        self._handles_lock = threading.Lock()
        self._on_ack = on_ack
        #: msgid -> event set when the router confirms (or answers) it
        self._confirms: dict[str, Any] = {}
        self.closed = False
        #: whether a request went out on this channel (then close() flushes it)
        self.used = False
        #: whether the router answered a flush probe here (emq-green's does)
        self.answers_probes = False
        #: probe msgid -> event set when the router answers it
        self._probes: dict[str, Any] = {}

    def _new_event(self) -> Any:
        raise NotImplementedError

    def _send(self, request: Message) -> None:
        raise NotImplementedError

    def _send_probe_now(self, probe: Message) -> bool:
        """Send ``probe`` without waiting (:func:`~.flush.send_probe`)."""
        raise NotImplementedError

    def send_probe(self) -> Optional[str]:
        """Send a flush probe (:mod:`~emq_green.client.flush`) after what was
        sent here; its msgid, None when it could not leave at once."""
        probe = probe_message()
        with self._handles_lock:  # before it leaves: the answer may come at once
            self._probes[probe.msgid] = self._new_event()
        if self._send_probe_now(probe):
            return probe.msgid
        with self._handles_lock:
            self._probes.pop(probe.msgid, None)
        return None

    def wait_probe(self, probe: Optional[str], timeout: float) -> bool:
        """Whether the router answered ``probe`` (read all sent before it)
        within ``timeout`` s."""
        with self._handles_lock:
            event = self._probes.get(probe) if probe is not None else None
        try:
            return event is not None and bool(event.wait(max(timeout, 0.0)))
        finally:
            with self._handles_lock:
                self._probes.pop(probe, None)  # type: ignore[arg-type]

    def submit(self, request: Message, *, confirm: Optional[float] = None) -> ResultHandle:
        """Send ``request`` (which asks for its result); the handle is
        registered first, so even an instant result finds it. With
        ``confirm`` (seconds; a guaranteed request), wait that long for the
        router's confirmation: :class:`ConfirmTimeout` or
        :class:`GuaranteeRefused` when it does not come."""
        if not self.used:
            # the router says early whether it answers probes (close() then
            # knows whether to wait for one)
            self.used = True
            self.send_probe()
        handle = ResultHandle(request.msgid, self._new_event, self._handles_lock)
        confirmed = self._new_event() if confirm is not None else None
        with self._handles_lock:
            self._handles[request.msgid] = handle
            if confirmed is not None:
                self._confirms[request.msgid] = confirmed
        try:
            self._send(request)
            if confirmed is not None:
                self._wait_confirmed(handle, confirmed, confirm or 0.0)
        except BaseException:
            with self._handles_lock:
                self._handles.pop(request.msgid, None)
            raise
        finally:
            if confirmed is not None:
                with self._handles_lock:
                    self._confirms.pop(request.msgid, None)
        return handle

    @staticmethod
    def _wait_confirmed(handle: ResultHandle, confirmed: Any, timeout: float) -> None:
        if not confirmed.wait(timeout) and not handle.ready():
            raise ConfirmTimeout(handle.msgid, timeout)
        error = handle._error
        if isinstance(error, JobError) and error.type == "GuaranteeRefused":
            raise GuaranteeRefused(handle.msgid, error.message)

    def pending(self) -> int:
        """Handles still referenced and waiting."""
        with self._handles_lock:
            return sum(1 for h in self._handles.values() if not h.ready())

    def _dispatch(self, frames: list[bytes]) -> None:
        """Handle one message from the router. Never raises: the reader
        would end with it, and every later result of the client with it."""
        try:
            self._handle(frames)
        except Exception:
            logger.exception("client: a message from the router could not be handled; "
                             "ignored")

    def _handle(self, frames: list[bytes]) -> None:
        # the common case without building a Message: a result,
        # ['', 'eMQP/1.0', 'REPLY', msgid, reply_json, orig_msgid]
        if len(frames) == 6 and frames[2] == b"REPLY" and frames[1] == b"eMQP/1.0":
            msgid = frames[5].decode("utf-8", "replace")
            with self._handles_lock:
                handle = self._handles.pop(msgid, None)
                confirmed = self._confirms.get(msgid) if self._confirms else None
            if handle is not None:
                handle._resolve(frames[4].decode("utf-8", "replace"))
            if confirmed is not None:
                confirmed.set()  # answered (a refusal, or already the result)
            return
        try:
            message = Message.parse(frames)
        except ProtocolError as exc:
            logger.debug("client: ignored a malformed message from the router: %s", exc)
            return
        if message.command is not Command.REPLY:
            probe = answered(frames)
            if probe is not None:
                self.answers_probes = True
                with self._handles_lock:
                    event = self._probes.get(probe)
                if event is not None:
                    event.set()
            return
        if len(message.body) == 1:
            self._on_ack()
            if self._confirms:
                with self._handles_lock:
                    confirmed = self._confirms.get(message.body[0])
                if confirmed is not None:
                    confirmed.set()
            return
        if len(message.body) != 2:
            return
        with self._handles_lock:
            handle = self._handles.pop(message.body[1], None)
        if handle is not None:
            handle._resolve(message.body[0])

    def close(self, linger: Optional[int] = None) -> None:
        """Stop reading, fail the handles still waiting, close the socket
        (``linger``: milliseconds for what is queued, else the socket's)."""
        raise NotImplementedError

    def _abandon(self) -> None:
        """After close: every handle still waiting fails at once with
        ResultLostError (reason ``client_closed``) instead of waiting for
        its timeout, or for ever."""
        with self._handles_lock:
            waiting = [h for h in self._handles.values() if not h.ready()]
            self._handles.clear()
        lost = json.dumps({"lost": "the client was closed before the result came",
                           "reason": "client_closed"})
        for handle in waiting:
            handle._resolve(lost)


class GreenResultChannel(_Channel):
    """Under gevent: one ``zmq.green`` DEALER, sends under a lock, one reader greenlet."""

    def __init__(self, context: Any, addr: str, *, hwm: int, linger: float,
                 send: Callable[[Any, Message], None],
                 on_ack: Callable[[], None],
                 prepare: Optional[Callable[[Any], None]] = None) -> None:
        import gevent
        import gevent.event
        import gevent.lock
        import zmq.green as zmq_green

        super().__init__(on_ack)
        self._event_class = gevent.event.Event
        self._sock = new_dealer(context, zmq_green, addr, f"results:{uuid.uuid4()}", hwm=hwm,
                                linger=linger, prepare=prepare)
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

    def _send_probe_now(self, probe: Message) -> bool:
        import zmq.green as zmq_green

        with self._send_lock:
            return send_probe(self._sock, zmq_green, probe) is not None

    def _read(self) -> None:
        import gevent

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
            gevent.sleep(0)  # a full batch: let the waiters run

    def close(self, linger: Optional[int] = None) -> None:
        self.closed = True
        self._reader.kill()
        self._sock.close(linger=linger)
        self._abandon()


class ThreadResultChannel(_Channel):
    """Without gevent: one plain DEALER socket behind a lock.

    Whoever holds the lock may use the socket: a sender sends, then reads
    what has arrived; a reader thread waits on the socket's file descriptor
    (``ZMQ_FD``, which needs no lock to wait on) and reads when it is
    signalled, or every ``_POLL_MS`` at the latest. That descriptor is
    edge-triggered and any call on the socket may consume the signal, which
    is why a sender reads what arrived after its own send.

    A send never blocks while holding the lock: when the queue is full
    (the router pushes back) the sender lets go, waits a millisecond and
    tries again, so results keep being read meanwhile.
    """

    def __init__(self, context: zmq.Context, addr: str, *, hwm: int, linger: float,
                 send_timeout: Optional[float], on_ack: Callable[[], None],
                 prepare: Optional[Callable[[Any], None]] = None,
                 native: bool = False) -> None:
        super().__init__(on_ack)
        self._send_timeout = send_timeout
        self._sock = new_dealer(context, zmq, addr, f"results:{uuid.uuid4()}", hwm=hwm,
                                linger=linger, prepare=prepare)
        self._fd = self._sock.getsockopt(zmq.FD)
        #: the interpreter's own thread, lock, events and waits even where
        #: gevent patched them (for the native threads of a patched
        #: process: :mod:`~emq_green.client.threads`)
        self._native = native
        if native:
            self._lock = threads.allocate_lock()
            self._handles_lock = threads.allocate_lock()
            self._sleep, self._select = threads.native_sleep, threads.native_select
            self._ended = threads.NativeEvent()
            threads.start_new_thread(self._run_then_end, ())
        else:
            self._lock = threading.Lock()
            self._sleep, self._select = time.sleep, select.select
            self._thread = threading.Thread(target=self._run, name="emq-green-results",
                                            daemon=True)
            self._thread.start()

    def _new_event(self) -> Any:
        return threads.NativeEvent() if self._native else threading.Event()

    def _run_then_end(self) -> None:
        try:
            self._run()
        finally:
            self._ended.set()

    def _send(self, request: Message) -> None:
        frames = request.frames()
        deadline = None if self._send_timeout is None else (
            time.monotonic() + self._send_timeout)
        while True:
            with self._lock:
                if self.closed:
                    raise RuntimeError("client is closed")
                sent = _send_now(self._sock, frames)
                self._read_available()
            if sent:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise SendTimeoutError(request.msgid, self._send_timeout or 0.0)
            self._sleep(0.001)  # backpressure: the router is not reading

    def _send_probe_now(self, probe: Message) -> bool:
        with self._lock:
            if self.closed:
                return False
            sent = send_probe(self._sock, zmq, probe) is not None
            self._read_available()
            return sent

    def _read_available(self) -> None:
        """Read and dispatch what has arrived (the lock is held)."""
        sock, dispatch = self._sock, self._dispatch
        while _get(sock, _EVENTS) & _POLLIN:
            dispatch(_recv_now(sock))

    def _run(self) -> None:
        timeout = _POLL_MS / 1000
        while True:
            with self._lock:
                if self.closed:
                    return
                try:
                    self._read_available()
                except zmq.ZMQError:
                    logger.exception("client: the result socket failed")
                    return
            self._select([self._fd], [], [], timeout)

    def close(self, linger: Optional[int] = None) -> None:
        with self._lock:
            self.closed = True
        if self._native:
            self._ended.wait(1.0)  # (the reader looks every _POLL_MS)
        else:
            self._thread.join()
        self._sock.close(linger=linger)
        self._abandon()


__all__ = ["ResultHandle", "JobError", "ResultTimeout", "ResultLostError", "ConfirmTimeout",
           "GuaranteeRefused", "GreenResultChannel", "ThreadResultChannel", "confirmation"]
