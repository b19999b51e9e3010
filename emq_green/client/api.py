"""The client: send jobs to an eMQP/1.0 router, as EventMQ's client does.

The wire is EventMQ 0.3.13's: ``REQUEST [queue, headers_csv, ["run", {...}]]``
on a DEALER socket connected to the router's frontend; the router may answer
``REPLY [msgid]`` when it hands the job to a worker at once (an
acknowledgement, not the job's result; buffered jobs get none).

Concurrency. A :class:`Client` keeps a small pool of DEALER sockets: a caller
takes one, sends, and gives it back, so concurrent greenlets (or threads)
never share a socket and a burst of calls does not open a socket each. In a
gevent-patched process the sockets are ``zmq.green`` ones, so a full send
queue makes the greenlet wait, not the whole process. Acknowledgements are
read when a socket goes back to the pool and counted in
:attr:`Client.acknowledged`.

Leaving. :meth:`Client.close` (and :meth:`Client.flush`) waits, up to
``linger`` seconds in all, until emq-green's router says it has read every
request sent, on the pooled sockets and on the result channel alike (a
flush probe, :mod:`emq_green.client.flush`): a process that exits right
after a burst lost the requests the router had not read yet. When the
router does not say so in time (it stopped reading, or died), ``flush``
returns False and ``close`` returns at ``linger``. EventMQ's router gives
no such answer; behind it, as with EventMQ's own client, only ``linger``
applies, and a process that exits right after a burst can lose requests
that router had not read (measured: 5,510 of 20,000 ran, and 4,510 of
20,000 reached it from EventMQ's own client).

Backpressure. The client never drops a request. When the router stops
reading (its buffer is full), ZeroMQ's queues fill up to the high-water
marks and a send blocks (the greenlet, with ``zmq.green``; the thread,
otherwise) until the router reads again. With ``send_timeout`` set, a send
that cannot start within that many seconds raises :class:`SendTimeoutError`
instead; the request was then not sent at all (ZeroMQ takes a message's
frames all or none once the first is in, and a socket caught half way is
closed, not reused).

Results. ``defer_job(..., result=True)`` returns a
:class:`~emq_green.client.results.ResultHandle` (``.msgid``, ``.ready()``,
``.get(timeout)``) instead of the msgid; such jobs go out on the client's
result channel, which emq-green's router answers with the job's result (see
:mod:`emq_green.client.results`). EventMQ's router never does: ``get``
then ends in :class:`~emq_green.client.results.ResultTimeout`.

Differences from EventMQ's client, on purpose: functions raise ``ValueError``
for a bad callable instead of logging and returning None; ``defer_job`` takes
``subprocess=True`` (emq-green runs that job in a child process).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
import uuid
from typing import Any, Callable, Literal, Optional, Sequence, TypeVar, Union, overload

import zmq

from ..curve import ClientCurve, client_curve, client_curve_from_env
from ..protocol import (
    RESULT_HEADER,
    Command,
    Headers,
    Message,
    ProtocolError,
    RunRequest,
    check_job_options,
)
from . import threads
from .args import check_number
from .connect import RouterUnreachable, new_dealer
from .flush import PROBE_GRACE, answered, flush_sockets, send_probe
from .results import (
    ConfirmTimeout,
    GreenResultChannel,
    GuaranteeRefused,
    JobError,
    ResultHandle,
    ResultLostError,
    ResultTimeout,
    SendTimeoutError,
    ThreadResultChannel,
    confirmation,
)
from .schedule import defer_later, periodic_body, send_schedule

logger = logging.getLogger(__name__)

ENV_BROKER_ADDR = "EMQ_BROKER_ADDR"
DEFAULT_ADDR = "tcp://127.0.0.1:47291"
DEFAULT_QUEUE = "default"
#: seconds a guaranteed request waits for the router's confirmation when
#: neither ``confirm_timeout`` nor ``send_timeout`` is given
DEFAULT_CONFIRM_TIMEOUT = 30.0

F = TypeVar("F", bound=Callable[..., Any])
JobFunc = Union[str, Callable[..., Any]]


def _gevent_patched() -> bool:
    if "gevent.monkey" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


def callable_path(func: JobFunc) -> tuple[str, str]:
    """``(path, callable)`` for a function, a bound method (``module:Class``)
    or a ``"dotted.path.name"`` string: the names a worker imports.

    Raises:
        ValueError: ``func`` cannot be imported by a worker (a nested
            function, a string without a dot).
    """
    if isinstance(func, str):
        path, _, name = func.rpartition(".")
        if not path or not name:
            raise ValueError(f"callable {func!r} needs an absolute dotted path, "
                             "like 'myapp.jobs.send_mail'")
        return path, name
    if inspect.ismethod(func):
        owner = func.__self__
        cls = owner if inspect.isclass(owner) else type(owner)
        return f"{func.__module__}:{cls.__name__}", func.__name__
    if inspect.isfunction(func) or inspect.isbuiltin(func):
        if ("<locals>" in func.__qualname__ or "." in func.__qualname__
                or func.__name__ == "<lambda>"):
            raise ValueError(f"{func.__qualname__} is not importable by module path")
        if func.__module__ == "__main__":
            logger.warning("%s is defined in __main__; a worker cannot import it",
                           func.__qualname__)
        return func.__module__, func.__name__
    raise ValueError(f"{func!r} is not a function, a bound method or a dotted path")


class Client:
    """Sends REQUESTs to the router frontend at ``addr``.

    Args:
        addr: router frontend; default ``$EMQ_BROKER_ADDR``, else
            ``tcp://127.0.0.1:47291``.
        green: use ``zmq.green`` sockets; default: whether gevent has
            patched ``socket`` in this process.
        max_idle: sockets kept in the pool between calls.
        hwm: ZeroMQ high-water mark of each socket.
        linger: seconds :meth:`close` waits for queued requests to leave and
            for emq-green's router to say it has read them (:meth:`flush`).
        send_timeout: seconds a send may wait while the router pushes back
            before :class:`SendTimeoutError` is raised; None (default) waits
            as long as it takes. Requests are never dropped either way.
        confirm_timeout: seconds a guaranteed request waits for the router's
            confirmation before :class:`ConfirmTimeout` is raised; default
            ``send_timeout``, else 30 s (``DEFAULT_CONFIRM_TIMEOUT``).
        curve_secret_key_file: this client's secret certificate
            (``NAME.key_secret``); with ``curve_server_key_file``, the
            router's public certificate, the link is CURVE-authenticated
            and encrypted. Default: ``$EVENTMQ_CURVE_SECRET_KEY_FILE`` and
            ``$EVENTMQ_CURVE_SERVER_KEY_FILE``; none: plain.
        curve: the keys themselves (a :class:`~emq_green.curve.ClientCurve`),
            instead of the two files.
    """

    def __init__(
        self,
        addr: Optional[str] = None,
        *,
        green: Optional[bool] = None,
        max_idle: int = 8,
        hwm: int = 10000,
        linger: float = 5.0,
        send_timeout: Optional[float] = None,
        confirm_timeout: Optional[float] = None,
        curve_secret_key_file: Optional[str] = None,
        curve_server_key_file: Optional[str] = None,
        curve: Optional[ClientCurve] = None,
    ) -> None:
        #: the CURVE keys of every socket, or None for plain sockets
        self.curve = _checked_curve(send_timeout, confirm_timeout, curve,
                                    curve_secret_key_file, curve_server_key_file,
                                    max_idle=max_idle, hwm=hwm, linger=linger)
        self.addr = addr or os.environ.get(ENV_BROKER_ADDR) or DEFAULT_ADDR
        self.green = _gevent_patched() if green is None else green
        self._zmq = zmq_module = _zmq_module(self.green)
        self._context = zmq_module.Context()
        self._max_idle = max_idle
        self._hwm = hwm
        self._linger = linger
        self.send_timeout = send_timeout
        #: seconds a guaranteed request waits for the router's confirmation
        self.confirm_timeout = (confirm_timeout or send_timeout or DEFAULT_CONFIRM_TIMEOUT)
        self._idle: list[Any] = []
        # (the interpreter's own lock, shared by native threads; no waiting in it)
        self._lock = threads.allocate_lock()
        self._closed = False
        self.max_message_size, self._pid = MAX_REQUEST_BYTES, os.getpid()  # (see _same_process)
        self._results: Optional[Union[GreenResultChannel, ThreadResultChannel]] = None
        #: other native threads' plain sockets and reader (:mod:`~emq_green.client.threads`)
        self._native_context: Optional[zmq.Context] = None
        self._native_idle: list[Any] = []
        self._native_results: Optional[ThreadResultChannel] = None
        #: the gevent hub of ``_idle`` and ``_results`` (None: no hub here)
        self._main_hub: Any = None
        #: REQUESTs sent.
        self.sent = 0
        #: ``REPLY [msgid]`` acknowledgements read so far.
        self.acknowledged = 0
        #: whether the router answered a flush probe (emq-green's does)
        self._router_answers = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------
    # the socket pool

    def _take(self, wait: Optional[float] = None) -> Any:
        """An idle socket, else a new one (:func:`~.connect.new_dealer`)."""
        _same_process(self)
        foreign = threads.foreign_thread(self.green)
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            idle = self._native_idle if foreign else self._idle
            if idle and wait is None:
                return idle.pop()
            context, module = (self._native() if foreign else (self._context, self._zmq))
            if not foreign and self._main_hub is None:
                self._main_hub = threads.current_hub(self.green)
        sock = new_dealer(context, module, self.addr, str(uuid.uuid4()), hwm=self._hwm,
                          linger=self._linger, wait=wait,
                          prepare=self.curve.apply if self.curve is not None else None)
        send_probe(sock, module)  # its answer says the router answers probes (flush)
        return sock

    def _native(self) -> tuple[zmq.Context, Any]:
        """The plain context of the other native threads (the lock is held)."""
        if self._native_context is None:
            self._native_context = zmq.Context()
        return self._native_context, zmq

    def wait_for_router(self, timeout: float) -> None:
        """Return once a router at :attr:`addr` has done the ZeroMQ handshake
        with a new socket of the pool within ``timeout`` seconds (nothing
        else tells: routers acknowledge only what they hand out at once).

        Raises:
            ValueError: ZeroMQ refuses the address.
            RouterUnreachable: nothing answered in time, or the handshake
                failed (a CURVE mismatch, a refused key).
        """
        self._give_back(self._take(wait=timeout))

    def _give_back(self, sock: Any) -> None:
        self._read_acks(sock)
        with self._lock:
            idle = self._native_idle if sock.context is self._native_context else self._idle
            if not self._closed and len(idle) < self._max_idle:
                idle.append(sock)
                return
        sock.close()

    def _read_acks(self, sock: Any) -> None:
        while True:
            try:
                frames = sock.recv_multipart(self._zmq.NOBLOCK)
            except self._zmq.Again:
                return
            if answered(frames) is not None:
                self._router_answers = True
                continue
            try:
                if Message.parse(frames).command is Command.REPLY:
                    self.acknowledged += 1
            except ProtocolError as exc:
                logger.debug("client: ignored a malformed message from the router: %s", exc)

    def poll_acks(self) -> int:
        """Read the acknowledgements waiting on idle sockets; returns the total."""
        with self._lock:
            idle = list(self._idle)
            self._idle.clear()
        for sock in idle:
            self._give_back(sock)
        return self.acknowledged

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` s until the router has read every request
        sent on this thread's idle sockets (:mod:`~emq_green.client.flush`);
        False when it did not say so in time (EventMQ's router never does)."""
        return _flush_pool(self, timeout)

    def close(self) -> None:
        """Wait until the router has read what was sent (:meth:`flush`, up
        to ``linger`` s), then close the sockets (in what is left of it)."""
        deadline = time.monotonic() + self._linger
        if self.sent and not self._closed:
            self.flush(self._linger)
        with self._lock:
            self._closed = True
            idle, native_idle = self._idle, self._native_idle
            self._idle, self._native_idle = [], []
            results, native = self._results, self._native_results
            self._results = self._native_results = None
        _close_all(native_idle, native, self._native_context, deadline)
        if self._main_hub is not None and threads.foreign_thread(self.green):
            # the main thread's sockets and reader are its hub's: closed there
            threads.spawn_on(self._main_hub, _close_all, idle, results, self._context, deadline)
        else:
            _close_all(idle, results, self._context, deadline)

    def _result_channel(self) -> Union[GreenResultChannel, ThreadResultChannel]:
        _same_process(self)
        foreign = threads.foreign_thread(self.green)
        slot = "_native_results" if foreign else "_results"
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            channel = getattr(self, slot)
        if channel is not None:
            return channel
        # made outside the lock, which is the interpreter's own: starting a
        # reader thread under gevent switches greenlets, and another
        # greenlet of this thread taking the lock then would block it
        made = _new_channel(self, foreign)
        if not foreign and self._main_hub is None:
            self._main_hub = threads.current_hub(self.green)
        with self._lock:
            channel = getattr(self, slot)
            if channel is None and not self._closed:
                setattr(self, slot, made)
                return made
        made.close()  # another caller made one first, or the client closed
        if channel is None:
            raise RuntimeError("client is closed")
        return channel

    def _count_ack(self) -> None:
        self.acknowledged += 1

    def _send_message(self, sock: Any, request: Message) -> None:
        if self.send_timeout is None:
            sock.send_multipart(request.frames())  # blocks at SNDHWM; never drops
        else:
            send_within(sock, request, self.send_timeout)

    # ------------------------------------------------------------------
    # sending

    @overload
    def send_request(self, message: Union[str, Sequence[Any]], *, queue: Optional[str] = ...,
                     reply_requested: bool = ..., guarantee: bool = ..., retry_count: int = ...,
                     timeout: float = ..., result: Literal[False] = ...,
                     confirm: Optional[bool] = ...) -> str: ...

    @overload
    def send_request(self, message: Union[str, Sequence[Any]], *, queue: Optional[str] = ...,
                     reply_requested: bool = ..., guarantee: bool = ..., retry_count: int = ...,
                     timeout: float = ..., result: Literal[True],
                     confirm: Optional[bool] = ...) -> ResultHandle: ...

    def send_request(
        self,
        message: Union[str, Sequence[Any]],
        *,
        queue: Optional[str] = None,
        reply_requested: bool = False,
        guarantee: bool = False,
        retry_count: int = 0,
        timeout: float = 0,
        result: bool = False,
        confirm: Optional[bool] = None,
    ) -> Union[str, ResultHandle]:
        """Send a REQUEST whose payload is ``message`` as it is.

        Args:
            message: ``["run", {...}]``, or its JSON text.
            queue: the queue; default ``default``.
            reply_requested: ask the worker for a REPLY (header
                ``reply-requested``).
            guarantee: run the job at least once, even if its worker or the
                router dies (emq-green's router; header ``guarantee``).
            retry_count: re-run the job up to this many times if it raises
                (header ``retry-count:N``).
            timeout: seconds the job may run (header ``timeout:N``); 0 for
                the worker's ``global_timeout``.
            result: ask for the result to come back (through emq-green's
                router): implies ``reply_requested``, and the request goes out
                on the client's result channel.
            confirm: return only once the router confirms that it holds the
                request (journaled, if it has a journal), within
                :attr:`confirm_timeout` seconds; default: ``guarantee``.

        Returns:
            The message id, or with ``result=True`` a :class:`ResultHandle`.

        Raises:
            SendTimeoutError: ``send_timeout`` passed before the router took
                the request (it was not sent).
            ConfirmTimeout: no confirmation came in time (the router may or
                may not hold the request).
            GuaranteeRefused: the router refused the guaranteed request.
        """
        if confirm is None:
            confirm = guarantee
        elif confirm and not guarantee:
            raise ValueError("confirm=True needs guarantee=True (routers confirm only "
                             "guaranteed requests)")
        request = new_request(message, queue=queue, reply_requested=reply_requested,
                              guarantee=guarantee, retry_count=retry_count, timeout=timeout,
                              result=result, limit=self.max_message_size)
        if result:
            handle = self._result_channel().submit(
                request, confirm=self.confirm_timeout if confirm else None)
            self.sent += 1
            return handle
        sock = self._take()
        try:
            if self.send_timeout is None:
                sock.send_multipart(request.frames())  # blocks at SNDHWM; never drops
            else:
                send_within(sock, request, self.send_timeout)
        except SendTimeoutError as exc:
            if exc.half_sent:
                sock.close()  # mid-message: never reuse it
            else:
                self._give_back(sock)  # clean; what it queued before still goes out
            raise
        except BaseException:
            # interrupted somewhere (gevent.Timeout, KeyboardInterrupt): the socket
            # may be mid-message, so it is closed (complete messages still leave
            # within ``linger``)
            sock.close()
            raise
        self.sent += 1
        if confirm:
            try:
                await_confirm(sock, request.msgid, self.confirm_timeout, self._count_ack)
            except (ConfirmTimeout, GuaranteeRefused):
                # the socket is whole, and may still hold requests sent before
                # this one (a router paused): closing it would throw them away.
                # A late answer is matched by msgid: it confirms no other
                self._give_back(sock)
                raise
            except BaseException:
                sock.close()  # interrupted mid-read: never reused
                raise
        self._give_back(sock)
        return request.msgid

    @overload
    def defer_job(self, func: JobFunc, args: Sequence[Any] = ...,
                  kwargs: Optional[dict[str, Any]] = ..., class_args: Sequence[Any] = ...,
                  class_kwargs: Optional[dict[str, Any]] = ..., *, reply_requested: bool = ...,
                  guarantee: bool = ..., retry_count: int = ..., timeout: float = ...,
                  queue: Optional[str] = ..., subprocess: bool = ...,
                  result: Literal[False] = ..., confirm: Optional[bool] = ...) -> str: ...

    @overload
    def defer_job(self, func: JobFunc, args: Sequence[Any] = ...,
                  kwargs: Optional[dict[str, Any]] = ..., class_args: Sequence[Any] = ...,
                  class_kwargs: Optional[dict[str, Any]] = ..., *, reply_requested: bool = ...,
                  guarantee: bool = ..., retry_count: int = ..., timeout: float = ...,
                  queue: Optional[str] = ..., subprocess: bool = ...,
                  result: Literal[True], confirm: Optional[bool] = ...) -> ResultHandle: ...

    def defer_job(
        self,
        func: JobFunc,
        args: Sequence[Any] = (),
        kwargs: Optional[dict[str, Any]] = None,
        class_args: Sequence[Any] = (),
        class_kwargs: Optional[dict[str, Any]] = None,
        *,
        reply_requested: bool = False,
        guarantee: bool = False,
        retry_count: int = 0,
        timeout: float = 0,
        queue: Optional[str] = None,
        subprocess: bool = False,
        result: bool = False,
        confirm: Optional[bool] = None,
        delay: Optional[float] = None,
        eta: Any = None,
    ) -> Union[str, ResultHandle]:
        """Run ``func(*args, **kwargs)`` on a worker.

        Args:
            func: a module-level function, a bound method (its class is built
                with ``class_args`` and ``class_kwargs`` on the worker) or a
                dotted path (``"myapp.jobs.send_mail"``).
            args: positional arguments, JSON-serialisable.
            kwargs: keyword arguments, JSON-serialisable.
            class_args: positional arguments of the method's class.
            class_kwargs: keyword arguments of the method's class.
            reply_requested: ask the worker for a REPLY.
            guarantee: run the job at least once, even if its worker or the
                router dies (emq-green's router).
            retry_count: re-run the job up to this many times if it raises.
            timeout: seconds the job may run; 0 for the worker's
                ``global_timeout``.
            queue: the queue; default ``default``.
            subprocess: run it in one of emq-green's subprocess children (for
                CPU-bound work); other workers ignore it.
            result: get the job's value back: returns a :class:`ResultHandle`
                (through emq-green's router).
            confirm: wait for the router's confirmation; default
                ``guarantee`` (see :meth:`send_request`).
            delay: run it once, this many seconds from now, or ``eta``: at
                that time (a datetime, or epoch seconds); through a scheduler
                (:func:`~emq_green.client.schedule.defer_later`), so no result.
            eta: see ``delay``.

        Returns:
            The message id (with ``delay``/``eta``, the SCHEDULE's), or with
            ``result=True`` a :class:`ResultHandle`.

        Raises:
            ValueError: ``func`` not importable; a bad ``delay``/``eta``, or one with ``result``.
            TypeError: an argument is not JSON-serialisable.
            SendTimeoutError: ``send_timeout`` passed before the router took
                the request (it was not sent).
            ConfirmTimeout: a guaranteed request was not confirmed in time.
            GuaranteeRefused: the router refused the guaranteed request.
        """
        run = run_request(func, args, kwargs, class_args, class_kwargs, subprocess)
        if delay is not None or eta is not None:
            return defer_later(self, run, delay=delay, eta=eta, queue=queue, result=result,
                               guarantee=guarantee, retry_count=retry_count, timeout=timeout)
        return self.send_request(run.payload(), queue=queue,  # type: ignore[call-overload]
                                 reply_requested=reply_requested, guarantee=guarantee,
                                 retry_count=retry_count, timeout=timeout, result=result,
                                 confirm=confirm)


#: bytes of a request's payload a client sends at most by default (its
#: ``max_message_size`` attribute; 0: no limit): the routers' default
#: ``max_message_size`` (a larger message is dropped by ZeroMQ with the
#: connection, the caller told nothing: a probe)
MAX_REQUEST_BYTES = 16 * 1024 * 1024


def new_request(message: Union[str, Sequence[Any]], *, queue: Optional[str] = None,
                reply_requested: bool = False, guarantee: bool = False, retry_count: int = 0,
                timeout: float = 0, result: bool = False,
                limit: int = MAX_REQUEST_BYTES) -> Message:
    """A REQUEST whose payload is ``message`` (a list, or its JSON text), with
    the headers the arguments of :meth:`Client.send_request` ask for; a
    payload over ``limit`` bytes (0: no limit) is a ValueError."""
    import json

    check_job_options(retry_count, timeout, queue)
    payload = message if isinstance(message, str) else json.dumps(list(message))
    if limit and len(payload) > limit // 4 and len(payload.encode()) > limit:
        raise ValueError(f"the request is {len(payload.encode())} bytes, over the "
                         f"{limit} a router takes by default (max_message_size): it would be "
                         "dropped unseen. Send less (a reference to the data), or raise both "
                         "the router's max_message_size and this Client's max_message_size")
    headers = Headers(reply_requested=reply_requested or result, guarantee=guarantee,
                      retry_count=retry_count, timeout=timeout or None,
                      extra=(RESULT_HEADER,) if result else ())
    return Message.new(Command.REQUEST, queue or DEFAULT_QUEUE, headers.text(), payload)


def _checked_curve(send_timeout: Optional[float], confirm_timeout: Optional[float],
                   curve: Optional[ClientCurve], secret_file: Optional[str],
                   server_file: Optional[str], **numbers: Any) -> Optional[ClientCurve]:
    """The Client's arguments checked (``numbers``: the ints max_idle and
    hwm, the seconds linger); its CURVE keys (or None)."""
    for name, value in numbers.items():
        check_number(name, value, integer=name != "linger")
    check_number("send_timeout", send_timeout, optional=True)
    check_number("confirm_timeout", confirm_timeout, optional=True)
    if confirm_timeout is not None and confirm_timeout <= 0:
        raise ValueError("confirm_timeout must be None or more than 0 seconds")
    if curve is None and (secret_file or server_file):
        return client_curve(secret_file or "", server_file or "", who="client")
    return client_curve_from_env() if curve is None else curve


def _flush_pool(client: Client, timeout: float) -> bool:
    """:meth:`Client.flush`: probe each idle socket of this thread's pool,
    and its result channel, all at once."""
    check_number("flush timeout", timeout)
    foreign = threads.foreign_thread(client.green)
    with client._lock:
        idle = client._native_idle if foreign else client._idle
        socks, idle[:] = list(idle), []
        channel = client._native_results if foreign else client._results
    deadline = time.monotonic() + timeout
    probe = channel.send_probe() if channel is not None and channel.used else None

    def count(frames: list[bytes]) -> None:
        if len(frames) > 2 and frames[2] == b"REPLY":
            client._count_ack()

    try:
        done, client._router_answers = flush_sockets(
            socks, zmq if foreign else client._zmq, deadline, client._router_answers, count)
    finally:
        for sock in socks:
            client._give_back(sock)
    if channel is not None and channel.used:
        known = client._router_answers or channel.answers_probes
        left = deadline - time.monotonic()
        done = channel.wait_probe(probe, left if known else min(left, PROBE_GRACE)) and done
    return done


def _close_all(idle: list[Any], channel: Any, context: Optional[zmq.Context],
               deadline: float) -> None:
    """Close ``idle`` sockets and ``channel``, lingering until ``deadline``
    (monotonic) at most, then ``context``."""
    linger = max(0, int((deadline - time.monotonic()) * 1000))
    for sock in idle:
        sock.close(linger=linger)
    try:
        if channel is not None:
            channel.close(linger)
    finally:
        if context is not None:
            context.term()


def await_confirm(sock: Any, msgid: str, timeout: float, count_ack: Callable[[], None]) -> None:
    """Read ``sock`` until the router confirms (or refuses) ``msgid``;
    ``count_ack`` for every acknowledgement read on the way, that one too."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
            raise ConfirmTimeout(msgid, timeout)
        frames = sock.recv_multipart()
        answer = confirmation(frames, msgid)
        if answer is None:
            if len(frames) > 2 and frames[2] == b"REPLY":
                count_ack()
            continue
        count_ack()
        if answer:
            raise GuaranteeRefused(msgid, answer)
        return


def send_within(sock: Any, request: Message, timeout: float) -> None:
    """Send without blocking, waiting for room for at most ``timeout`` s
    (a plain or a ``zmq.green`` socket: the same constants)."""
    frames = request.frames()
    deadline = time.monotonic() + timeout
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        flags = zmq.NOBLOCK | (0 if i == last else zmq.SNDMORE)
        while True:
            try:
                sock.send(frame, flags)
                break
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SendTimeoutError(request.msgid, timeout, half_sent=i > 0) from None
                sock.poll(max(1, int(left * 1000)), zmq.POLLOUT)


def _new_channel(client: Client, foreign: bool) -> Union[GreenResultChannel, ThreadResultChannel]:
    """A result channel for ``client``: green on the main thread of a green
    client, else one on plain sockets (with the interpreter's own threads
    for a ``foreign`` caller, :mod:`~emq_green.client.threads`)."""
    prepare = client.curve.apply if client.curve is not None else None
    if client.green and not foreign:
        return GreenResultChannel(client._context, client.addr, hwm=client._hwm,
                                  linger=client._linger, send=client._send_message,
                                  on_ack=client._count_ack, prepare=prepare)
    if foreign:
        with client._lock:
            context = client._native()[0]
    else:
        context = client._context
    return ThreadResultChannel(context, client.addr, hwm=client._hwm, linger=client._linger,
                               send_timeout=client.send_timeout, on_ack=client._count_ack,
                               prepare=prepare, native=foreign)


# ----------------------------------------------------------------------
# module-level helpers on one shared client per address

def _zmq_module(green: bool) -> Any:
    if green:
        import zmq.green as zmq_green

        return zmq_green
    return zmq


def _same_process(client: Client) -> None:
    """A Client used in a process forked from the one that made it hung for
    ever in its first send (a probe): its ZeroMQ sockets and threads stayed
    in the parent. Refused, plainly (the shared clients are made anew in
    the child: :func:`get_client`)."""
    if client._pid != os.getpid():
        raise RuntimeError(f"this Client was made in process {client._pid}, before a fork; "
                           "ZeroMQ sockets do not survive one: make a new Client in this "
                           "process (or use get_client()/defer_job(), made anew after a fork)")


_clients: dict[str, Client] = {}
_clients_lock = threads.allocate_lock()


def _forget_clients_after_fork() -> None:
    """In a forked child (gunicorn --preload, multiprocessing, prefork
    workers) the parent's sockets are not usable: a send blocked for ever.
    The child makes its own shared clients on first use; the parent's are
    dropped, not closed (closing them there is not safe)."""
    global _clients_lock
    _clients.clear()
    _clients_lock = threads.allocate_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clients_after_fork)


def get_client(addr: Optional[str] = None) -> Client:
    """The shared :class:`Client` for ``addr`` (default ``$EMQ_BROKER_ADDR``,
    else ``tcp://127.0.0.1:47291``), made on first use."""
    addr = addr or os.environ.get(ENV_BROKER_ADDR) or DEFAULT_ADDR
    with _clients_lock:
        client = _clients.get(addr)
        if client is None:
            client = _clients[addr] = Client(addr)
        return client


def send_request(message: Union[str, Sequence[Any]], *, addr: Optional[str] = None,
                 **options: Any) -> Union[str, ResultHandle]:
    """:meth:`Client.send_request` on the shared client for ``addr``
    (:func:`get_client`); ``options`` are that method's."""
    return get_client(addr).send_request(message, **options)


def defer_job(func: JobFunc, args: Sequence[Any] = (), kwargs: Optional[dict[str, Any]] = None,
              class_args: Sequence[Any] = (), class_kwargs: Optional[dict[str, Any]] = None,
              *, addr: Optional[str] = None, **options: Any) -> Union[str, ResultHandle]:
    """:meth:`Client.defer_job` on the shared client for ``addr``
    (:func:`get_client`).

    Args:
        func: the job (see :meth:`Client.defer_job`).
        args: its positional arguments.
        kwargs: its keyword arguments.
        class_args: positional arguments of a method's class.
        class_kwargs: keyword arguments of a method's class.
        addr: the router's frontend; default ``$EMQ_BROKER_ADDR``.
        options: the other keywords of :meth:`Client.defer_job`
            (``queue``, ``timeout``, ``result``...).

    Returns:
        The message id, or with ``result=True`` a :class:`ResultHandle`.
    """
    return get_client(addr).defer_job(func, args, kwargs, class_args, class_kwargs, **options)


def schedule(func: JobFunc, args: Sequence[Any] = (), kwargs: Optional[dict[str, Any]] = None,
             *, every: Optional[float] = None, cron: Optional[str] = None,
             queue: Optional[str] = None, run_count: Optional[int] = None,
             nohaste: bool = False, guarantee: bool = True, retry_count: int = 0,
             timeout: float = 0, class_args: Sequence[Any] = (),
             class_kwargs: Optional[dict[str, Any]] = None, client: Optional[Client] = None,
             addr: Optional[str] = None) -> str:
    """Run ``func(*args, **kwargs)`` every ``every`` seconds (whole seconds,
    as EventMQ's scheduler reads them) or at the times of the ``cron`` text,
    through a scheduler (EventMQ's ``schedule(..., interval_secs=, cron=)``).

    A schedule is keyed by the call (path, callable, arguments), not the
    queue: scheduling the same call again replaces it. Without ``nohaste``
    it also runs at once; ``run_count`` ends it after that many runs;
    ``guarantee`` (EventMQ's client's default) makes each run a guaranteed
    job with emq-green's scheduler. Sent on ``client``, else on the shared
    client of ``addr`` (:func:`get_client`). Returns the SCHEDULE's msgid.

    Raises:
        ValueError: neither or both of ``every`` and ``cron``, ``every`` not
            a whole number of seconds (at least 1), a bad callable, or a
            schedule a scheduler would refuse (a bad cron text...).
    """
    run = run_request(func, args, kwargs, class_args, class_kwargs)
    body = periodic_body(run, every=every, cron=cron, queue=queue, run_count=run_count,
                         nohaste=nohaste, guarantee=guarantee, retry_count=retry_count,
                         timeout=timeout)
    return send_schedule(client or get_client(addr), Command.SCHEDULE, body)


def unschedule(func: JobFunc, args: Sequence[Any] = (), kwargs: Optional[dict[str, Any]] = None,
               *, queue: Optional[str] = None, class_args: Sequence[Any] = (),
               class_kwargs: Optional[dict[str, Any]] = None, client: Optional[Client] = None,
               addr: Optional[str] = None) -> str:
    """Remove the schedule of this call (same function and arguments) from
    every scheduler; returns the UNSCHEDULE's msgid."""
    run = run_request(func, args, kwargs, class_args, class_kwargs)
    body = periodic_body(run, every=1, cron=None, queue=queue, run_count=None, nohaste=False,
                         guarantee=False, retry_count=0, timeout=0)
    return send_schedule(client or get_client(addr), Command.UNSCHEDULE, body)


def run_request(func: JobFunc, args: Sequence[Any], kwargs: Optional[dict[str, Any]],
                class_args: Sequence[Any], class_kwargs: Optional[dict[str, Any]],
                subprocess: bool = False) -> RunRequest:
    """The ``["run", {...}]`` payload of a call (ValueError: ``func`` is not
    importable by a worker)."""
    path, name = callable_path(func)
    for what, value in (("args", args), ("class_args", class_args)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{what} must be a list or tuple, not {type(value).__name__}")
    for what, value in (("kwargs", kwargs), ("class_kwargs", class_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"{what} must be a dict, not {type(value).__name__}")
    return RunRequest(path=path, callable=name, args=tuple(args), kwargs=dict(kwargs or {}),
                      class_args=tuple(class_args), class_kwargs=dict(class_kwargs or {}),
                      subprocess=subprocess)


def job(
    func: Optional[F] = None,
    *,
    queue: Optional[str] = None,
    broker_addr: Optional[str] = None,
    async_: bool = True,
    **options: Any,
) -> Any:
    """Decorator adding ``.delay(*args, **kwargs)``, which defers the call,
    and ``.delay_for(seconds, *args, **kwargs)``, which runs it once later.

    Used bare (``@job``) or with options (``@job(queue="email")``).

    Args:
        func: the function (when used bare).
        queue: the queue of its jobs.
        broker_addr: the router's frontend; default ``$EMQ_BROKER_ADDR``.
        async_: False runs ``.delay`` in the caller, always.
        options: keywords of :meth:`Client.defer_job` (``timeout``,
            ``retry_count``, ``result``...). With ``result=True`` (here, or
            ``.delay(..., _result=True)`` per call) ``.delay`` returns a
            :class:`ResultHandle`.

    Returns:
        The function itself, with ``.delay``.

    As in EventMQ, with no broker address (or with ``async_=False``)
    ``.delay`` runs the function at once, in the caller, and returns its
    value (with ``result``, a handle that already holds it).
    """

    def decorate(f: F) -> F:
        def delay(*args: Any, _result: Optional[bool] = None, **kwargs: Any) -> Any:
            addr = broker_addr or os.environ.get(ENV_BROKER_ADDR)
            call_options = options if _result is None else {**options, "result": _result}
            if async_ and addr:
                return get_client(addr).defer_job(f, args, kwargs, queue=queue, **call_options)
            if async_:
                logger.warning("no EMQ_BROKER_ADDR: running %s synchronously", f.__name__)
            value = f(*args, **kwargs)
            if call_options.get("result"):
                return ResultHandle.completed("", value)
            return value

        def delay_for(seconds: float, *args: Any, **kwargs: Any) -> str:
            """Run it once, ``seconds`` from now (a one-shot schedule; no
            result: the decorator's ``result`` is for ``.delay``)."""
            if seconds is None:  # (defer_job would send it now: a probe)
                raise ValueError("delay_for needs a number of seconds, not None")
            later = {k: v for k, v in options.items() if k != "result"}
            return get_client(broker_addr).defer_job(f, args, kwargs, queue=queue,
                                                     delay=seconds, **later)

        f.delay = delay  # type: ignore[attr-defined]
        f.delay_for = delay_for  # type: ignore[attr-defined]
        return f

    return decorate(func) if func is not None else decorate


__all__ = ["Client", "SendTimeoutError", "ResultHandle", "JobError", "ResultTimeout",
           "ResultLostError", "ConfirmTimeout", "GuaranteeRefused", "defer_job",
           "send_request", "job", "get_client", "callable_path", "ENV_BROKER_ADDR",
           "DEFAULT_ADDR", "schedule", "unschedule", "RouterUnreachable"]
