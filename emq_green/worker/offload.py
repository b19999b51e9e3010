"""Route callables that keep blocking the event loop to the subprocess pool.

Opt-in: ``offload_after_blocks`` (incidents) and ``offload_after_seconds``
(total time blocked), either or both; 0 means never. Once a callable
crosses one, it asks the subprocess extension to route that name
(:meth:`SubprocessExtension.offload`), which runs its next jobs in a
child, where a blocking call holds only that child. Each decision is logged and shown
in the status; SIGHUP forgets them and starts counting again.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from ..extensions import Extension
from .monitor import BlockMonitor, Incident
from .subprocess_pool import SubprocessExtension

if TYPE_CHECKING:  # pragma: no cover
    from ..extensions import WorkerView

logger = logging.getLogger(__name__)


class Offload(Extension):
    """Listens to ``monitor``'s incidents; routes offenders to the subprocess pool.

    ``after_blocks`` / ``after_seconds`` override the settings of the same
    (``offload_after_*``) names.
    """

    def __init__(self, monitor: BlockMonitor, *, after_blocks: Optional[int] = None,
                 after_seconds: Optional[float] = None) -> None:
        self.monitor = monitor
        self._fixed = (after_blocks, after_seconds)
        self.after_blocks = after_blocks or 0
        self.after_seconds = after_seconds or 0.0
        #: callable -> [incidents, seconds blocked] since the last reset
        self.counts: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        #: callables offloaded since the last reset
        self.decided: set[str] = set()
        self._pool: Optional[SubprocessExtension] = None

    @property
    def callables(self) -> dict[str, dict[str, Any]]:
        """Offloaded callable -> {"since": wall time, "reason": str, "jobs": n}."""
        return self._pool.offloaded() if self._pool is not None else {}

    @property
    def enabled(self) -> bool:
        return bool(self.after_blocks or self.after_seconds)

    def _read_settings(self, manager: WorkerView) -> None:
        blocks, seconds = self._fixed
        s = manager.settings
        self.after_blocks = s.offload_after_blocks if blocks is None else blocks
        self.after_seconds = s.offload_after_seconds if seconds is None else seconds

    def manager_started(self, manager: WorkerView) -> None:
        self._read_settings(manager)
        self._pool = manager.extension(SubprocessExtension)
        if self._pool is None:
            logger.warning("no subprocess extension: offload_after_* cannot take effect")
        if self._on_incident not in self.monitor.listeners:
            self.monitor.listeners.append(self._on_incident)

    def manager_stopped(self, manager: WorkerView) -> None:
        if self._on_incident in self.monitor.listeners:
            self.monitor.listeners.remove(self._on_incident)

    def reload(self, manager: WorkerView) -> None:
        names = self._pool.clear_offloaded() if self._pool is not None else []
        if names:
            logger.info("SIGHUP: %d offloaded callable(s) run in the event loop again: %s",
                        len(names), ", ".join(names))
        self.decided.clear()
        self.counts.clear()
        self._read_settings(manager)

    def _on_incident(self, incident: Incident) -> None:
        if not self.enabled or incident.msgid is None or incident.callable in self.decided:
            return
        count = self.counts[incident.callable]
        count[0] += 1
        count[1] += incident.duration
        reasons = []
        if self.after_blocks and count[0] >= self.after_blocks:
            reasons.append(f"{count[0]:.0f} blocks (offload_after_blocks {self.after_blocks})")
        if self.after_seconds and count[1] >= self.after_seconds:
            reasons.append(f"{count[1]:.1f} s blocked (offload_after_seconds "
                           f"{self.after_seconds:g})")
        if reasons:
            reason = " and ".join(reasons)
            self.decided.add(incident.callable)
            if self._pool is not None:
                # the pool's extension routes the name (and counts its jobs)
                self._pool.offload(incident.callable, since=time.time(), reason=reason)
            logger.warning("%s blocked the event loop: %s. Its jobs now run in the "
                           "subprocess pool, until SIGHUP.", incident.callable, reason)

    def status(self, manager: WorkerView) -> dict[str, Any]:
        return {"offload": {
            "after_blocks": self.after_blocks,
            "after_seconds": self.after_seconds,
            "callables": self.callables,
        }}


__all__ = ["Offload"]
