"""The worker's page at ``/`` of its ``--metrics-addr`` server.

``GET /`` is ``web/worker.html`` (self-contained, like the router's
dashboard); it polls ``GET /dashboard.json``: the worker's ``/status`` plus
the jobs each process ran (``pid_distribution``: this process for greenlet
jobs, each subprocess child for its own). Nothing runs unless a page asks.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

from ..web.pages import answer, page

if TYPE_CHECKING:  # pragma: no cover
    from ..extensions import WorkerView

PATHS = ("/", "/dashboard.json")


def snapshot(manager: WorkerView) -> dict[str, Any]:
    """``manager.status()`` and the jobs run per process."""
    status = manager.status()
    status["pid"] = os.getpid()
    status["pid_distribution"] = {str(pid): n for pid, n in
                                  status.get("pid_distribution", {}).items()}
    return status


def serve(path: str, manager: Optional[WorkerView], start_response: Any) -> list[bytes]:
    """Answer a GET of one of :data:`PATHS`."""
    if path == "/":
        return answer(start_response, "200 OK", page("worker.html"), "text/html; charset=utf-8")
    assert manager is not None
    body = json.dumps(snapshot(manager), sort_keys=True).encode()
    return answer(start_response, "200 OK", body, "application/json")


__all__ = ["PATHS", "serve", "snapshot"]
