"""emq-green's eMQP/1.0 router (``emq-green-router``), wire-compatible with EventMQ 0.3.13's.

Exposes :class:`Router` and the values it shows (:class:`RouterState`,
:class:`Worker`, :class:`Request`, :class:`RouterObserver`); its parts are the
modules of this package (broker, routing, workers, sockets, results, zap,
dashboard).
"""

from .broker import Router, RouterState
from .routing import Request, Worker
from .workers import RouterObserver

__all__ = ["Request", "Router", "RouterObserver", "RouterState", "Worker"]
