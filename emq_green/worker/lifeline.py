"""Heartbeats from a native thread while a job holds the event loop.

EventMQ's router drops a worker it has not heard from for
``heartbeat_timeout`` (5 s by default), and does not requeue its jobs. A job
that holds the gevent loop for longer (a C driver, a CPU loop) would get the
whole worker dropped. :class:`Lifeline` runs one native thread (the real
``_thread``, not gevent's) that looks every quarter interval whether the
loop's heartbeat greenlet is late (or, the loop not running at all, half an
interval has passed without a message); only then does it send a HEARTBEAT
itself, on the worker's own DEALER socket, through
:meth:`Connection.send_from_thread` (a second socket would have a second
identity, which the router drops as an unknown worker).

It covers blocks that release the GIL (sleeping or waiting C calls, most
database drivers) and pure-Python CPU loops (the GIL is handed over every
few milliseconds). A C call that holds the GIL stops this thread too.

A loop held for longer than ``global_timeout`` is taken for hung: the thread
stops covering it, so the router removes a worker that will never come
back (0 means no job timeout, and no limit here either).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Optional

import gevent
from gevent import monkey

from ..extensions import Extension
from ..protocol import heartbeat
from ..records import State

if TYPE_CHECKING:  # pragma: no cover
    from ..extensions import WorkerView

logger = logging.getLogger(__name__)

_start_thread = monkey.get_original("_thread", "start_new_thread")
_sleep = monkey.get_original("time", "sleep")


class Lifeline(Extension):
    """The heartbeat thread; on when the ``thread_heartbeats`` setting is.

    ``force_every`` (tests only) makes the thread send every that many
    seconds whatever the loop does, to stress the socket sharing.
    """

    def __init__(self, *, enabled: Optional[bool] = None,
                 force_every: Optional[float] = None) -> None:
        self._enabled = enabled
        self.force_every = force_every
        #: HEARTBEATs the thread sent, and times it found the socket busy or full
        self.sent = 0
        self.failed = 0
        #: times the thread stopped covering a loop held past global_timeout
        self.gave_up = 0
        self._manager: Optional[WorkerView] = None
        self._loop: Any = None
        #: when the loop last ran its ticker (see :meth:`_run`)
        self._ticked = 0.0
        self._ticker: Any = None
        self._tick_every = 0.5
        self._running = False
        self._generation = 0

    def manager_started(self, manager: WorkerView) -> None:
        enabled = manager.settings.thread_heartbeats if self._enabled is None else self._enabled
        if not enabled or manager.settings.disable_heartbeats:
            logger.info("heartbeats from a native thread are off: a job that holds the "
                        "event loop past heartbeat_timeout gets this worker dropped")
            return
        self._manager = manager
        self._loop = gevent.get_hub().loop
        self._ticked = time.monotonic()
        # a timer of the loop's own (not a callback asked from the thread:
        # those wake the loop and join its callback queue), not keeping it alive
        tick = self._tick_every = min(0.5, max(0.01, manager.settings.heartbeat_interval / 4))
        self._ticker = self._loop.timer(tick, tick)
        self._ticker.ref = False
        self._ticker.start(self._tick)
        self._running = True
        self._generation += 1
        _start_thread(self._run, (self._generation,))

    def manager_stopped(self, manager: WorkerView) -> None:
        self._running = False
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker.close()
            self._ticker = None

    def status(self, manager: WorkerView) -> dict[str, Any]:
        return {"thread_heartbeats": {"on": self._running, "sent": self.sent,
                                      "failed": self.failed, "gave_up": self.gave_up}}

    def _tick(self) -> None:
        self._ticked = time.monotonic()

    # -- the native thread: no logging, no gevent objects, only the connection --
    def _run(self, generation: int) -> None:
        """Every ``period``: a HEARTBEAT when the loop is late with its own
        (``interval + period`` of silence), or already at half an interval
        of silence when the loop has not run its ticker (:meth:`_tick`) for
        two of its periods: a loop held by a call that releases the GIL may
        be held next by one that does not, when this thread cannot send (a
        probe: a 3 s sleep in C, then a 2.5 s regular expression: 5.5 s of
        silence, the worker removed as dead). The ticker is a timer of the
        loop's: callbacks asked from this thread would wake the loop and
        join its callback queue each period (tried: a dead router was then
        seen 6 s late behind a job holding the loop in 1 s bursts)."""
        manager = self._manager
        assert manager is not None
        covering_since: Optional[float] = None
        last_own = 0.0
        while self._running and generation == self._generation:
            s = manager.settings
            interval = s.heartbeat_interval
            period = self.force_every or min(0.5, max(0.01, interval / 4))
            _sleep(period)
            conn = manager.outgoing
            if conn is None or manager.state is not State.RUNNING or s.disable_heartbeats:
                covering_since = None
                continue
            now = time.monotonic()
            if conn.last_sent != last_own:
                covering_since = None  # the loop sent something itself: not held
            # the loop has not run its ticker for two of its periods (or ours)
            held = now - self._ticked > 2 * max(period, self._tick_every)
            if not self.force_every and now - conn.last_sent < (
                    interval / 2 if held else interval + period):
                continue
            if covering_since is None:
                covering_since = now
            elif s.global_timeout and now - covering_since > s.global_timeout:
                if covering_since > 0:
                    self.gave_up += 1
                    covering_since = -1.0  # given up until the loop sends again
                continue
            if covering_since < 0:
                continue
            message = heartbeat()
            if conn.send_from_thread(message.frames(), self._loop):
                self.sent += 1
                last_own = conn.last_sent
            else:
                self.failed += 1


__all__ = ["Lifeline"]
