"""The contract between the job manager and its extensions.

An extension subclasses :class:`Extension` and overrides the hooks it
needs; every hook is declared here once, as a documented no-op. What an
extension may read and call on the worker is :class:`WorkerView`, a typed
view: extensions import this module and the lower layers (protocol, jobs,
records, settings), never the job manager or its parts. Extensions talk to
each other through :meth:`WorkerView.extension` and their own public
methods, not by sharing data structures.

Hooks run in the event loop, in the order the extensions were given; they
must not block. An exception in a hook is logged and reaches neither the
job nor the manager. :class:`HookRegistry` calls them, skipping the
base-class no-ops (three hooks are looked at per job).

``executor_for`` is the one hook with a result: the first extension that
returns an :class:`Executor` runs the job instead of the in-process greenlet
runner (the subprocess pool uses it for CPU-bound callables).
"""

from __future__ import annotations

import logging
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    TypeVar,
)

if TYPE_CHECKING:  # pragma: no cover
    from .jobs import JobOutcome
    from .protocol import Headers, Queues, RunRequest
    from .records import JobRecord, State
    from .settings import Settings

logger = logging.getLogger(__name__)

#: What user code called by the worker (extension hooks, a subclass's
#: overrides) may raise that is logged and goes no further: gevent carries a
#: SystemExit or KeyboardInterrupt from any greenlet up to the main one,
#: which ends the process an application embeds the worker in.
HOOK_FAILURES = (Exception, SystemExit, KeyboardInterrupt, GeneratorExit)

E = TypeVar("E", bound="Extension")


class Executor(Protocol):
    """Runs a job somewhere other than the worker's own greenlet (what
    :meth:`Extension.executor_for` returns)."""

    def run(self, request: RunRequest, headers: Headers) -> tuple[JobOutcome, int]:
        """Run the job, cooperatively; return (outcome, pid that ran it)."""
        ...


class RouterConnection(Protocol):
    """What an extension may use of the worker's current connection to the
    router (:class:`emq_green.worker.connection.Connection`)."""

    addr: str
    identity: str
    #: monotonic time of the last send towards the router
    last_sent: float
    #: the longest silence towards the router so far on this connection (s)
    longest_gap: float

    def send_from_thread(self, frames: list[bytes], loop: object) -> bool:
        """Send one message now from a native thread (the heartbeat thread,
        while the loop is held); False when it cannot leave at once."""
        ...


class WorkerView(Protocol):
    """What an extension may read and call on the worker (the job manager).

    Attributes are read-only for extensions. ``job_of`` is the one member
    that may be called from another thread (the loop-block monitor's).
    """

    @property
    def name(self) -> str:
        """The worker's name."""
        ...

    @property
    def settings(self) -> Settings:
        """The settings in force (a new object after each reload)."""
        ...

    @property
    def queues(self) -> Queues:
        """The ``(weight, name)`` pairs the worker listens on."""
        ...

    @property
    def concurrent_jobs(self) -> int:
        """The number of jobs run at once."""
        ...

    @property
    def state(self) -> State:
        """The worker's lifecycle state."""
        ...

    @property
    def jobs_in_flight(self) -> Mapping[str, JobRecord]:
        """The jobs accepted and not yet finished, by msgid."""
        ...

    @property
    def outgoing(self) -> Optional[RouterConnection]:
        """The current connection to the router (None between connections)."""
        ...

    def timeout_for(self, headers: Headers) -> Optional[float]:
        """A job's timeout: its ``timeout:N`` header, else ``global_timeout``."""
        ...

    def job_of(self, greenlet: Any) -> Optional[JobRecord]:
        """The job ``greenlet`` runs or ran last (safe from any thread)."""
        ...

    def extension(self, kind: type[E]) -> Optional[E]:
        """The first extension of type ``kind``, if the worker has one."""
        ...

    def status(self) -> dict[str, Any]:
        """The worker's status document (what SIGUSR1 logs)."""
        ...


class Extension:
    """Base class: every hook is a documented no-op."""

    def manager_started(self, worker: WorkerView) -> None:
        """The manager started serving (before its first connection)."""

    def manager_stopped(self, worker: WorkerView) -> None:
        """The manager stopped; release what the extension holds."""

    def connected(self, worker: WorkerView, addr: str, identity: str) -> None:
        """A router ACKed our INFORM on a new connection."""

    def disconnected(self, worker: WorkerView, reason: str) -> None:
        """A connection ended (router lost, reload, stop)."""

    def executor_for(self, worker: WorkerView, record: JobRecord) -> Optional[Executor]:
        """Return an executor to run this job elsewhere, or None."""
        return None

    def job_started(self, worker: WorkerView, record: JobRecord) -> None:
        """A job is about to run (in its greenlet)."""

    def job_finished(self, worker: WorkerView, record: JobRecord, outcome: JobOutcome,
                     duration: float) -> None:
        """A job finished, failed, timed out or was killed (``duration`` in s)."""

    def status(self, worker: WorkerView) -> dict[str, Any]:
        """Extra keys for the status dump and the JSON status."""
        return {}

    def reload(self, worker: WorkerView) -> None:
        """SIGHUP: settings were reloaded (``worker.settings`` is the new object)."""


Hook = Callable[..., Any]


class HookRegistry:
    """Calls the extensions' hooks for one worker.

    Only the extensions' own implementations are called (a base-class no-op
    is skipped), looked up once per hook; the three per-job hooks are kept
    as one tuple (:attr:`per_job`) for the job path.
    """

    def __init__(self, worker: WorkerView, extensions: Sequence[Extension]) -> None:
        self.worker = worker
        self.extensions: list[Extension] = list(extensions)
        self._cache: dict[str, list[Hook]] = {}
        #: job_started, executor_for and job_finished implementations
        self.per_job: tuple[list[Hook], list[Hook], list[Hook]] = (
            self.hooks("job_started"), self.hooks("executor_for"), self.hooks("job_finished"))

    def hooks(self, hook: str) -> list[Hook]:
        """The extensions' own implementations of ``hook``, in order."""
        found = self._cache.get(hook)
        if found is None:
            base = getattr(Extension, hook)
            found = [getattr(ext, hook) for ext in self.extensions
                     if getattr(type(ext), hook, base) is not base]
            self._cache[hook] = found
        return found

    def notify(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every extension that has one."""
        self.call(self.hooks(hook), hook, args)

    def call(self, hooks: list[Hook], hook: str, args: tuple[Any, ...]) -> None:
        """Call each of ``hooks`` with the worker and ``args``; an exception
        is logged and goes no further."""
        worker = self.worker
        for fn in hooks:
            try:
                fn(worker, *args)
            except HOOK_FAILURES:
                logger.exception("extension %s failed in %s", type(fn.__self__).__name__, hook)

    def executor_for(self, hooks: list[Hook], record: JobRecord) -> Optional[Executor]:
        """The first executor one of ``hooks`` returns for ``record``, or None."""
        for fn in hooks:
            try:
                executor = fn(self.worker, record)
            except HOOK_FAILURES:
                logger.exception("extension %s failed in executor_for",
                                 type(fn.__self__).__name__)
                continue
            if executor is not None:
                return executor  # type: ignore[no-any-return]
        return None

    def status(self) -> dict[str, Any]:
        """Every extension's status keys, merged in order."""
        extra: dict[str, Any] = {}
        for ext in self.extensions:
            try:
                extra.update(ext.status(self.worker))
            except HOOK_FAILURES:
                logger.exception("extension %s failed in status", type(ext).__name__)
        return extra

    def find(self, kind: type[E]) -> Optional[E]:
        """The first extension of type ``kind``, or None."""
        return next((e for e in self.extensions if isinstance(e, kind)), None)


__all__ = ["Executor", "Extension", "HookRegistry", "RouterConnection", "WorkerView"]
