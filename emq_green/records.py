"""Small types shared by the job manager's parts and its extensions: the
lifecycle states and one job's record. Nothing here knows sockets."""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Optional

from .jobs import Status
from .protocol import Headers, RunRequest


class State(str, Enum):
    """The job manager's lifecycle (see :mod:`emq_green.jobmanager`)."""

    CONNECTING = "connecting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class StopMode(str, Enum):
    """How the manager stops: draining first (graceful), or at once."""

    GRACEFUL = "graceful"
    NOW = "now"


#: the callable name of a request that could not be read
INVALID_REQUEST = "<invalid request>"

#: a job's outcome -> its counter name
STATUS_KEYS = {status: status.value for status in Status}


class JobRecord:
    """One entry of ``jobs_in_flight`` (a slotted class: one is built per job).

    Attributes:
        msgid: the REQUEST's message id.
        queue: the queue it came on.
        headers: its parsed headers.
        request: what to run; None for a request that could not be read.
        done: set once the job has finished.
    """

    __slots__ = ("msgid", "queue", "headers", "request", "started", "greenlet", "done")

    def __init__(self, msgid: str, queue: str, headers: Headers,
                 request: Optional[RunRequest] = None, started: Optional[float] = None) -> None:
        self.msgid = msgid
        self.queue = queue
        self.headers = headers
        self.request = request
        #: monotonic time the job started (or was received, until it starts);
        #: ``started`` when given (a ``time.monotonic()`` value), else now
        self.started = time.monotonic() if started is None else started
        #: the greenlet running it, once started
        self.greenlet: Any = None
        self.done = False

    def __repr__(self) -> str:
        return f"<JobRecord {self.msgid} {self.callable_name} queue={self.queue}>"

    @property
    def callable_name(self) -> str:
        """The callable's full name (``module.function``, ``module:Class.method``)."""
        return self.request.name if self.request else INVALID_REQUEST

    @property
    def age(self) -> float:
        """Seconds since the job started (or was received)."""
        return time.monotonic() - self.started


__all__ = ["INVALID_REQUEST", "STATUS_KEYS", "JobRecord", "State", "StopMode"]
