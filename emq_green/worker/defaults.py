"""The one list of extensions a job manager gets by default.

The manager does not choose its extensions: whoever builds it passes a
list, and :func:`default_extensions` is that list unless told otherwise
(the console script and ``JobManager()`` use it). Each default is idle
until its settings ask for something.
"""

from __future__ import annotations

from typing import Sequence

from ..extensions import Extension
from .lifeline import Lifeline
from .metrics import MetricsExtension, ProcessTitle
from .monitor import BlockMonitor
from .offload import Offload
from .subprocess_pool import SubprocessExtension


def default_extensions(given: Sequence[Extension] = ()) -> list[Extension]:
    """``given``, then one of each default kind ``given`` lacks, in this order:

    - :class:`SubprocessExtension`: CPU-bound jobs (``"subprocess": true``,
      ``subprocess_callables``) in a pool of children started on first use;
    - :class:`BlockMonitor`: reports jobs that block the event loop;
    - :class:`Lifeline`: heartbeats from a native thread while it is blocked;
    - :class:`Offload`: routes repeat offenders to the pool (``offload_after_*``);
    - :class:`MetricsExtension`: ``/metrics`` and ``/status`` (``metrics_addr``);
    - :class:`ProcessTitle`: ``emq-green: NAME busy/total STATE``.

    (docs/monitoring.md and docs/subprocess.md have the details.)
    """
    chosen = list(given)
    kinds: tuple[type[Extension], ...] = (SubprocessExtension, BlockMonitor, Lifeline, Offload,
                                          MetricsExtension, ProcessTitle)
    for kind in kinds:
        if not any(isinstance(e, kind) for e in chosen):
            chosen.append(_make(kind, chosen))
    return chosen


def _make(kind: type[Extension], chosen: list[Extension]) -> Extension:
    if kind is Offload:
        monitor = next(e for e in chosen if isinstance(e, BlockMonitor))
        return Offload(monitor)
    return kind()


__all__ = ["default_extensions"]
