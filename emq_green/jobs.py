"""Job execution: resolve a callable, run it under a timeout, say what happened.

Nothing here knows about sockets. :class:`JobRunner` turns a
:class:`~emq_green.protocol.RunRequest` into a :class:`JobOutcome` whose
``reply()`` is the ``{"value": ...}`` document EventMQ 0.3.13 sends back:

- success: the callable's return value;
- an exception: the exception's text (plus an ``error`` key);
- a timeout: the string ``"TimeoutError"``;
- a return value JSON cannot encode: the encoder's error text.

The ``error`` key (``{"type": ..., "message": ...}``) is an emq-green
addition that EventMQ's consumers ignore.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from enum import Enum
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Callable, NamedTuple, Optional, Union

import gevent
import gevent.event

from .callables import NOT_ALLOWED, CallableNotAllowed, CallablePolicy
from .limits import worker_log
from .protocol import Headers, RunRequest, printable

logger = logging.getLogger(__name__)

TIMEOUT_VALUE = "TimeoutError"
#: what a job (or its entry or exit function) may raise that is not an
#: Exception and is still its own error: answered, not retried, and never
#: the worker's or a child's end
JOB_EXITS = (SystemExit, KeyboardInterrupt, GeneratorExit)


class Status(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    KILLED = "killed"


class JobOutcome(NamedTuple):
    """What became of one job (after its retries). A named tuple: one is
    built per job."""

    status: Status
    value: Any
    error_type: str = ""
    error_message: str = ""
    attempts: int = 1

    @classmethod
    def failure(cls, exc: BaseException, attempts: int = 1) -> JobOutcome:
        text = exception_text(exc)
        return cls(Status.FAILED, text, type(exc).__name__, text, attempts)

    @classmethod
    def rejected(cls, error_type: str, message: str) -> JobOutcome:
        """A request that could not even be started (bad payload)."""
        return cls(Status.FAILED, message, error_type, message, 0)

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED

    def sendable(self) -> JobOutcome:
        """This outcome, or, for a job that succeeded with a value JSON cannot
        carry, the failure its reply is: counted and reported as failed."""
        if self.status is Status.SUCCEEDED and (type(self.value) not in _PLAIN or (
                type(self.value) is int and self.value.bit_length() > 14000)):  # str limit
            fault = encoding_fault(self.value)
            if fault is not None:
                return JobOutcome.failure(fault, self.attempts)
        return self

    def reply(self) -> dict[str, Any]:
        if self.status is Status.SUCCEEDED:
            return {"value": self.value}
        return {
            "value": self.value,
            "error": {"type": self.error_type, "message": self.error_message},
        }


def _not_serialisable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps builds an encoder for every call (several microseconds here);
# the C encoder it builds is made once instead, with json.dumps' defaults,
# so the text is the same. It has no circular-reference check: a circular
# value ends in RecursionError, and encode_reply asks json.dumps again.
if c_make_encoder is not None:
    _c_encode = c_make_encoder(None, _not_serialisable, encode_basestring_ascii, None,
                               ": ", ", ", False, False, True)

    def _encode(value: Any) -> str:
        return "".join(_c_encode(value, 0))
else:  # pragma: no cover - Pythons without the C accelerator
    _c_encode = None
    _encode = json.dumps


def encode_reply(reply: Any) -> str:
    """JSON for a REPLY frame; an unencodable value becomes its error text."""
    try:  # (_encoded written out: this runs per job)
        return "".join(_c_encode(reply, 0)) if _c_encode is not None else _encode(reply)
    except RecursionError:
        text = _dumped(reply)  # circular, or just deep
    except (TypeError, ValueError, OverflowError) as exc:
        return _error_reply(exc)
    return text if isinstance(text, str) else _error_reply(text)


def _encoded(value: Any) -> Union[str, BaseException]:
    """``value`` as JSON text, or why JSON cannot carry it."""
    try:
        return _encode(value)
    except RecursionError:
        pass  # circular, or just deep: json.dumps tells which, in its own words
    except (TypeError, ValueError, OverflowError) as exc:
        return exc
    return _dumped(value)


def _dumped(value: Any) -> Union[str, BaseException]:
    """``json.dumps(value)``, or why it cannot (its own words)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        return exc


#: values JSON always carries, not encoded to find out
_PLAIN = frozenset({str, int, float, bool, type(None)})


def encoding_fault(value: Any) -> Optional[BaseException]:
    """Why a REPLY cannot carry ``value`` as JSON; None when it can."""
    fault = _encoded(value)
    return None if isinstance(fault, str) else fault


#: characters of a job's exception message a log line keeps (the reply
#: carries all of it, within max_message_size)
LOGGED_MESSAGE = 2000


def exception_text(exc: BaseException) -> str:
    """``str(exc)``; its type's name when that is empty (``MemoryError()``
    often is); a note when ``str()`` itself raises: a job's exception with a
    broken ``__str__`` must not take the runner, its retries or a pool's
    child down with it."""
    try:
        text = str(exc)
    except BaseException as err:  # SystemExit or GreenletExit from a __str__ too
        return f"{type(exc).__name__} (its message could not be read: {type(err).__name__})"
    return text or type(exc).__name__


def logged(exc: BaseException) -> str:
    """A job's exception message for a log line: at most
    :data:`LOGGED_MESSAGE` characters, control characters escaped."""
    return printable(exception_text(exc), LOGGED_MESSAGE)


def _error_reply(exc: BaseException) -> str:
    message = exception_text(exc)
    return json.dumps({"value": message,
                       "error": {"type": type(exc).__name__, "message": message}})


def import_dotted(path: str) -> Callable[..., Any]:
    """``pkg.mod.func`` or ``pkg.mod:func`` -> the function."""
    if ":" in path:
        module, _, name = path.partition(":")
    else:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ImportError("not a dotted path to a function (module.function)")
    func = getattr(importlib.import_module(module), name, None)
    if not callable(func):
        raise ImportError(f"module {module!r} has no function {name!r}")
    return func


class _JobModules:
    """Imports the modules jobs name, one greenlet per module at a time.

    Python's import lock is per thread, and every greenlet runs in the same
    thread: a second greenlet that asked for a module while the first was
    still importing it (its import paused on IO: a connection opened at
    import time, ``emq_green.client`` imported by a ``@job`` module) got the
    half-initialized module, and its job failed with AttributeError. Here
    it waits for that import to end instead."""

    def __init__(self) -> None:
        #: names imported completely (the fast path: two lookups a job)
        self._done: set[str] = set()
        #: name -> (the greenlet importing it, set when it is done)
        self._importing: dict[str, tuple[Any, gevent.event.Event]] = {}

    def get(self, name: str) -> Any:
        current = None
        while True:
            module = sys.modules.get(name)
            if module is not None and name in self._done:
                return module
            importing = self._importing.get(name)
            if importing is None:
                break  # then import it (again, if another greenlet's import failed)
            current = current or gevent.getcurrent()
            if importing[0] is current:  # asked for again from within its own import
                return importlib.import_module(name)
            importing[1].wait()
        current = current or gevent.getcurrent()
        done = gevent.event.Event()
        self._importing[name] = (current, done)
        try:
            module = importlib.import_module(name)
        finally:
            del self._importing[name]
            done.set()
        if not getattr(getattr(module, "__spec__", None), "_initializing", False):
            self._done.add(name)
        return module


_modules = _JobModules()
_sys_modules = sys.modules


def resolve(request: RunRequest, policy: Optional[CallablePolicy] = None) -> Callable[..., Any]:
    """The callable a request names; ``module:Class`` is instantiated first.

    With ``policy``, what the name resolved to must be defined in a module
    the allowed list covers (:meth:`CallablePolicy.check_resolved`): the
    class before it is instantiated, a function before it is returned.
    Raises :class:`~emq_green.callables.CallableNotAllowed` otherwise."""
    module_name, _, class_name = request.path.partition(":")
    module = _sys_modules.get(module_name)  # (_JobModules.get's fast path, one call less)
    if module is None or module_name not in _modules._done:
        module = _modules.get(module_name)
    if policy is not None and policy.allowed is None:
        policy = None  # (check_resolved allows everything then)
    target: Any = module
    if class_name:
        cls = getattr(module, class_name)
        if policy is not None:
            policy.check_resolved(request, cls)
        target = cls(*request.class_args, **request.class_kwargs)
    func = getattr(target, request.callable)
    if not callable(func):
        raise TypeError(f"{request.name} is not callable")
    if policy is not None and not class_name:
        policy.check_resolved(request, func)
    return func


def refused_once_resolved(request: RunRequest,
                          policy: Optional[CallablePolicy]) -> Optional[CallableNotAllowed]:
    """The refusal :meth:`CallablePolicy.check_resolved` gives what the
    request names (the class for ``module:Class``), found without calling or
    instantiating anything, so a refused job runs no hook; None when it is
    allowed, when no list is set, or when the name cannot be found (the
    runner reports that)."""
    if policy is None or policy.allowed is None:
        return None
    module_name, _, class_name = request.path.partition(":")
    try:
        target = getattr(_modules.get(module_name), class_name or request.callable)
    except Exception:
        return None
    try:
        policy.check_resolved(request, target)
    except CallableNotAllowed as exc:
        return exc
    return None


def run_attempts(
    name: str,
    attempt: Callable[[int], JobOutcome],
    retry_count: int,
    entry_func: Optional[Callable[[], Any]] = None,
    exit_func: Optional[Callable[[], Any]] = None,
) -> JobOutcome:
    """``job_entry_func``, then ``attempt(1)``, ``attempt(2)``... while an
    attempt fails (raises) and retries are left, then ``job_exit_func``
    whatever happened. Shared by the greenlet runner and subprocess children."""
    if entry_func is not None:
        try:
            entry_func()
        except Exception as exc:
            logger.exception("job_entry_func failed; %s not run", name)
            return JobOutcome.failure(exc, attempts=0)
    try:
        n = 0
        while True:
            n += 1
            outcome = attempt(n)
            if outcome.status is not Status.FAILED or n > retry_count or not outcome.attempts:
                return outcome  # (no attempts: the callable was not found)
            logger.info("%s failed (attempt %d of %d), retrying: %s", name, n,
                        retry_count + 1, printable(outcome.error_message, LOGGED_MESSAGE))
    finally:
        if exit_func is not None:
            try:
                exit_func()
            except Exception:
                logger.exception("job_exit_func failed after %s", name)


def not_found(request: RunRequest, exc: Exception) -> JobOutcome:
    """The outcome of a request whose callable could not be imported, found
    or allowed: a failure with no attempt made (not retried, and not counted
    under the callable's own name in the metrics). A name the allowed list
    refuses once resolved is ``CallableNotAllowed``, as one refused by its
    text. Logged through the process's limiter (clients choose the names)."""
    if isinstance(exc, CallableNotAllowed):
        worker_log.warning("refused", "job %s refused: %s", printable(request.name),
                           printable(exc, 300), via=logger)
        return JobOutcome.rejected(NOT_ALLOWED, exception_text(exc))
    worker_log.warning("not_found", "job %s: callable not found: %s: %s",
                       printable(request.name), type(exc).__name__, printable(exc, 300),
                       via=logger)
    return JobOutcome.failure(exc, attempts=0)


class Deadlines:
    """Job timeouts, enforced by one periodic check instead of a timer per job.

    An attempt with a timeout registers its greenlet and deadline; a libev
    timer in the hub looks at the registered attempts every ``period`` and
    throws :class:`JobTimeout` into those past their deadline. Registering
    and leaving cost two dict operations, where a timer per job (gevent's
    ``Timeout``) cost several microseconds of a short job's 50. The period
    is a twentieth of the shortest timeout seen (10 ms to 1 s), so a job
    stops at most 5% late.
    """

    MIN_PERIOD = 0.01
    MAX_PERIOD = 1.0

    def __init__(self) -> None:
        #: greenlet -> (deadline, token)
        self._attempts: dict[Any, tuple[float, object]] = {}
        #: greenlets a JobTimeout was thrown into, until they leave
        self._thrown: set[Any] = set()
        self._timer: Any = None
        self.period = self.MAX_PERIOD

    def enter(self, timeout: float, current: Any = None) -> object:
        """Register ``current`` (default: the current greenlet); returns the
        token its JobTimeout will carry."""
        token = object()
        if current is None:
            current = getcurrent()
        self._attempts[current] = (time.monotonic() + timeout, token)
        if self._timer is None or timeout < self.period * 20:
            self._arm(timeout)
        return token

    def leave(self, current: Any = None) -> bool:
        """Unregister ``current`` (default: the current greenlet); returns
        :meth:`overdue` as it was just before (one call where an attempt
        that ended well made two: this runs per job)."""
        if current is None:
            current = getcurrent()
        entry = self._attempts.pop(current, None)
        if self._thrown and current in self._thrown:
            self._thrown.discard(current)
            return True
        return entry is not None and entry[0] <= time.monotonic()

    def overdue(self, current: Any = None) -> bool:
        """Whether ``current`` (default: the current greenlet) ran past its
        deadline: its JobTimeout was thrown (and caught by the job itself,
        since it is still running), or the job held the event loop past the
        deadline, so that no check could run to throw it."""
        if current is None:
            current = getcurrent()
        if self._thrown and current in self._thrown:
            return True
        entry = self._attempts.get(current)
        return entry is not None and entry[0] <= time.monotonic()

    def __len__(self) -> int:
        return len(self._attempts)

    def _arm(self, timeout: float) -> None:
        period = min(self.MAX_PERIOD, max(self.MIN_PERIOD, timeout / 20))
        if self._timer is not None:
            if period >= self.period:
                return
            self._timer.close()
        self.period = period
        self._timer = gevent.get_hub().loop.timer(period, period)
        self._timer.ref = False  # never keeps the loop alive by itself
        self._timer.start(self._check)

    def _check(self) -> None:
        now = time.monotonic()
        late = [(g, token) for g, (deadline, token) in self._attempts.items()
                if deadline <= now]
        for greenlet, token in late:
            del self._attempts[greenlet]
            if not greenlet.dead:
                self._thrown.add(greenlet)
                greenlet.throw(JobTimeout(token))


class JobRunner:
    """Runs requests in the calling greenlet, with timeout, retries and hooks."""

    def __init__(
        self,
        *,
        global_timeout: float = 300.0,
        entry_func: Optional[Callable[[], Any]] = None,
        exit_func: Optional[Callable[[], Any]] = None,
        deadlines: Optional[Deadlines] = None,
        policy: Optional[CallablePolicy] = None,
    ) -> None:
        self.global_timeout = global_timeout
        self.entry_func = entry_func
        self.exit_func = exit_func
        #: ``allowed_callables``, applied again to what a name resolves to
        self.policy = policy
        #: shared by the runners of one manager (a new runner on SIGHUP)
        self.deadlines = deadlines if deadlines is not None else Deadlines()

    def timeout_for(self, headers: Headers) -> Optional[float]:
        """``timeout:N`` header, else ``global_timeout``; 0 means none."""
        return headers.timeout or self.global_timeout or None

    def run(self, request: RunRequest, headers: Headers) -> JobOutcome:
        """Run once, plus up to ``retry-count`` more times if it raises.

        The timeout applies to each attempt. A timed-out job is not retried:
        it may have done part of its work, and would likely time out again.
        """
        # (timeout_for written out: this runs per job)
        timeout = (self.timeout_for(headers) if type(self).timeout_for is not _timeout_for
                   else headers.timeout or self.global_timeout or None)
        if headers.retry_count == 0 and self.entry_func is None and self.exit_func is None:
            return self._attempt(request, timeout, 1)  # the usual case, one call less
        return run_attempts(request.name, lambda n: self._attempt(request, timeout, n),
                            headers.retry_count, self.entry_func, self.exit_func)

    def _attempt(self, request: RunRequest, timeout: Optional[float],
                 attempt: int) -> JobOutcome:
        # JobTimeout derives from BaseException, like gevent.Timeout, so a
        # job's own ``except Exception`` cannot swallow it; it carries this
        # attempt's token, so a nested one is told apart.
        deadlines = self.deadlines
        if timeout:
            current = getcurrent()
            token: Optional[object] = deadlines.enter(timeout, current)
        else:
            token = current = None
        try:
            try:
                func = resolve(request, self.policy)
            except Exception as exc:
                return not_found(request, exc)
            value = func(*request.args, **request.kwargs)
            if token is not None:
                token = None  # left here, not again in the finally (no switch in between)
                if deadlines.leave(current):
                    # the job caught its JobTimeout (a bare except) and ran
                    # on, or held the loop so long that no check could stop
                    # it: it still exceeded its timeout
                    return _timed_out(request, timeout, attempt)
        except JobTimeout as exc:
            if token is None or exc.args[0] is not token:
                raise
            return _timed_out(request, timeout, attempt)
        except Exception as exc:
            if token is not None and deadlines.overdue(current):
                return _timed_out(request, timeout, attempt)
            logger.warning("job %s raised %s: %s", request.name, type(exc).__name__, logged(exc),
                           exc_info=logger.isEnabledFor(logging.DEBUG))
            return JobOutcome.failure(exc, attempt)
        finally:
            if token is not None:
                deadlines.leave(current)
        # (tuple.__new__ directly: a named tuple's __new__ is a Python frame)
        return _tuple_new(JobOutcome, (Status.SUCCEEDED, value, "", "", attempt))


_timeout_for = JobRunner.timeout_for
_tuple_new = tuple.__new__
getcurrent = gevent.getcurrent


def _timed_out(request: RunRequest, timeout: Optional[float], attempt: int) -> JobOutcome:
    message = f"{request.name} exceeded its timeout of {timeout:g} s"
    return JobOutcome(Status.TIMED_OUT, TIMEOUT_VALUE, "TimeoutError", message, attempt)


class JobTimeout(BaseException):
    """Thrown into a job's greenlet when its attempt runs out of time; its
    one argument is the attempt's token (see :class:`Deadlines`)."""

    def __str__(self) -> str:
        return "the job ran out of time"
