"""Extension hooks of the job manager, each declared once as a no-op.

An extension subclasses :class:`Extension` and overrides what it needs; the
manager calls every hook of every extension in order, from the event loop.
Hooks must not block. An exception in a hook is logged and does not reach
the job or the manager.

``executor_for`` is the one hook with a result: the first extension that
returns an :class:`Executor` runs the job instead of the in-process greenlet
runner (the subprocess pool uses it for CPU-bound callables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from .jobmanager import JobManager, JobRecord
    from .jobs import JobOutcome
    from .protocol import Headers, RunRequest


class Executor(Protocol):
    def run(self, request: RunRequest, headers: Headers) -> tuple[JobOutcome, int]:
        """Run the job, cooperatively; return (outcome, pid that ran it)."""
        ...


class Extension:
    """Base class: every hook is a documented no-op."""

    def manager_started(self, manager: JobManager) -> None:
        """The manager started serving (before its first connection)."""

    def manager_stopped(self, manager: JobManager) -> None:
        """The manager stopped; release what the extension holds."""

    def connected(self, manager: JobManager, addr: str, identity: str) -> None:
        """A router ACKed our INFORM on a new connection."""

    def disconnected(self, manager: JobManager, reason: str) -> None:
        """A connection ended (router lost, reload, stop)."""

    def executor_for(self, manager: JobManager, record: JobRecord) -> Optional[Executor]:
        """Return an executor to run this job elsewhere, or None."""
        return None

    def job_started(self, manager: JobManager, record: JobRecord) -> None:
        """A job is about to run (in its greenlet)."""

    def job_finished(self, manager: JobManager, record: JobRecord, outcome: JobOutcome,
                     duration: float) -> None:
        """A job finished, failed, timed out or was killed (``duration`` in s)."""

    def status(self, manager: JobManager) -> dict[str, Any]:
        """Extra keys for the status dump and the JSON status."""
        return {}

    def reload(self, manager: JobManager) -> None:
        """SIGHUP: settings were reloaded (``manager.settings`` is the new object)."""
