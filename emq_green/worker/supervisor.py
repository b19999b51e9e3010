"""The job manager's supervisor: when to connect, reconnect and leave.

:class:`Supervisor` owns the manager's lifecycle (the one place that
changes it), the stop and reload requests, the signal handlers, and the
greenlet that runs the connections one after the other::

    connecting -> running -> (router dead / SIGHUP) -> connecting -> ...
    running|connecting -> draining -> stopped

Each connection (:meth:`Supervisor._session`): INFORM to the next address
(``worker_addr``, then the two failover addresses in turn), wait for the
ACK, offer the free slots, and serve until the router is lost (reconnect),
a reload is asked for (KBYE on this connection, a new one with a new
identity; the old one stays open for the REPLYs of the jobs it brought)
or a stop.

Graceful stop order (:meth:`Supervisor._shutdown`): KBYE to the router; no
more READY or HEARTBEAT; the socket is still read while the router may send
REQUESTs it had credit for (until it has been quiet for
``heartbeat_timeout``), and those run; running jobs get
``kill_grace_period``; what is left is killed (their replies say
``Killed``); the socket closes with a short linger so the last replies
leave. A stop asked for twice, or "now", skips the drain.

What a reload re-reads, and everything EventMQ's API shows, stay with
:class:`~emq_green.jobmanager.JobManager`, which drives this class.
"""

from __future__ import annotations

import collections
import functools
import logging
import signal
from typing import Any, Callable, Mapping, Optional

import gevent
import gevent.event

from ..extensions import HookRegistry, WorkerView
from ..lifecycle import Lifecycle, install_signal_handlers
from ..records import State, StopMode
from .session import KBYE_FROM_ROUTER, RouterLink
from .slots import JobSlots

logger = logging.getLogger(__name__)


class Supervisor:
    """Runs one job manager's connections and the order of its stop.

    Args:
        worker: the manager, as its extensions see it: the name and queues
            an INFORM announces, the settings in force.
        link: the link to the router.
        slots: the job slots.
        hooks: the extensions' hooks (``manager_started``, ``connected``,
            ``disconnected``, ``manager_stopped``).
        wake: set when the supervisor should look again (a stop or reload
            asked for, an ACK, the router gone, a slot freed).
        counters: the manager's counters (``reloads``, ``router_lost``).
        reload_settings: re-reads the settings when a reload is due.
    """

    def __init__(self, *, worker: WorkerView, link: RouterLink, slots: JobSlots,
                 hooks: HookRegistry, wake: gevent.event.Event,
                 counters: collections.Counter[str],
                 reload_settings: Callable[[], bool]) -> None:
        self._worker = worker
        self._link = link
        self._slots = slots
        self._hooks = hooks
        self._wake = wake
        self._counters = counters
        self._reload_settings = reload_settings
        #: the lifecycle; changed only here
        self.lifecycle: Lifecycle[State] = Lifecycle(State.STOPPED, "")
        #: set once stopped for good
        self.stopped = gevent.event.Event()
        self._stop_mode: Optional[StopMode] = None
        self._reload_requested = False
        self._main: Optional[gevent.Greenlet] = None
        #: what ended the loop when it crashed (a job's ``gevent.killall``),
        #: None while it runs and after a stop
        self.crash: Optional[BaseException] = None
        self._signal_handlers: list[Any] = []

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def started(self) -> bool:
        return self._main is not None

    def start(self, signals: Optional[Mapping[int, Callable[[], Any]]]) -> None:
        """Start the slots, install the signal handlers (SIGTERM, SIGINT and
        SIGQUIT stop, plus ``signals``; none when ``signals`` is None), then
        connect in a greenlet of its own; the heartbeats start too."""
        if self._main is not None:
            raise RuntimeError("JobManager already started" if self.lifecycle.state
                               is not State.STOPPED else "this JobManager has stopped; a "
                               "JobManager runs once: make a new one")
        self._slots.begin()
        if signals is not None:
            self._install_signals(signals)
        self.lifecycle.set(State.CONNECTING)
        try:
            self._hooks.notify("manager_started")
        finally:
            # A hook that raised past the extensions' guard (a GreenletExit:
            # the caller's greenlet killed while in it) still leaves a
            # manager that runs, and that stop() ends, not a half-started one.
            self._main = gevent.spawn(self._run)
            self._link.start_heartbeats()

    def in_job(self) -> bool:
        """Whether the calling greenlet is one that runs jobs."""
        return gevent.getcurrent() in self._slots.pool

    def request_stop(self, mode: StopMode, why: str = "") -> None:
        """Ask for a stop; a graceful one asked twice becomes "now"."""
        if why:
            logger.info("%s: stopping%s", why, " at once" if self._stop_mode else " gracefully")
        if self._stop_mode is StopMode.GRACEFUL and mode is StopMode.GRACEFUL:
            mode = StopMode.NOW  # asked twice: stop at once
        if self._stop_mode is not StopMode.NOW:
            self._stop_mode = mode
        self._wake.set()

    def request_reload(self) -> None:
        """Ask for a reload; the supervisor's greenlet does it."""
        self._reload_requested = True
        self._wake.set()

    def _install_signals(self, signals: Mapping[int, Callable[[], Any]]) -> None:
        def stop(signum: int) -> Callable[[], None]:
            return functools.partial(self.request_stop, StopMode.GRACEFUL,
                                     f"{signal.Signals(signum).name} received")

        self._signal_handlers = install_signal_handlers({
            signal.SIGTERM: stop(signal.SIGTERM), signal.SIGINT: stop(signal.SIGINT),
            signal.SIGQUIT: stop(signal.SIGQUIT), **signals})

    def _reload_if_asked(self) -> bool:
        """When a reload was asked for: re-read the settings; whether they
        were (then the connection is made anew)."""
        if not self._reload_requested:
            return False
        self._reload_requested = False
        return self._reload_settings()

    def _offer_slots(self) -> None:
        self._link.offer_slots(self._slots.free())

    # ------------------------------------------------------------------
    # the loop: connect, serve, reconnect, leave

    def _run(self) -> None:
        try:
            while self._stop_mode is None:
                self._session()
            self._shutdown()
        except BaseException as exc:
            self.crash = exc
            logger.exception("job manager loop crashed; stopping")
            self._slots.kill_all()
            raise
        finally:
            for handler in self._signal_handlers:
                handler.cancel()
            self._slots.close()
            self._link.close()
            self.lifecycle.set(State.STOPPED)
            self._hooks.notify("manager_stopped")
            self.stopped.set()

    def _session(self) -> None:
        """One connection: INFORM, wait for ACK, serve until it must end.

        A reload asked for while the INFORM waits for its ACK is done once
        the connection is up (or before the next one, whose address comes
        from the settings it read: a probe's worker tried the old address
        once more)."""
        self._reload_if_asked()
        addr = self._link.next_addr()
        link, worker = self._link, self._worker
        self.lifecycle.set(State.CONNECTING)
        link.open(addr, worker.name, worker.queues, self._slots.pid)
        try:
            if not link.wait_for_ack(lambda: self._stop_mode is not None):
                return
            logger.info("ACK from %s; %d job(s) still running, %d slot(s) free", addr,
                        len(self._slots.jobs_in_flight), self._slots.free())
            self.lifecycle.set(State.RUNNING)
            self._hooks.notify("connected", addr, link.outgoing.identity)  # type: ignore[union-attr]
            link.up()
            # flags first, then wait: a wake-up taken by the wait for the ACK
            # must not hide a reload asked for meanwhile
            while self._stop_mode is None:
                if self._reload_if_asked():
                    self._counters["reloads"] += 1
                    self._hooks.notify("disconnected", "settings reloaded")
                    # the REPLYs of the jobs running now leave on this connection
                    link.retire(running=list(self._slots.jobs_in_flight))
                    return
                if link.router_gone:
                    logger.log(logging.WARNING if link.router_gone == KBYE_FROM_ROUTER
                               else logging.ERROR, "%s; reconnecting", link.router_gone)
                    self._counters["router_lost"] += 1
                    self._hooks.notify("disconnected", link.router_gone)
                    if self._slots.jobs_in_flight and link.router_gone == KBYE_FROM_ROUTER:
                        # Taken for dead (a SIGSTOP): the REPLYs of the jobs
                        # running leave under the identity their REQUESTs
                        # came to, the one the router's copies of them name
                        # (such a REPLY ends the copy that waits there).
                        link.retire(running=list(self._slots.jobs_in_flight),
                                    say_kbye=False)
                    return
                self._offer_slots()
                self._wake.wait()
                self._wake.clear()
        finally:
            link.end(stopping=self._stop_mode is not None)

    def _shutdown(self) -> None:
        """KBYE; drain (graceful) or not (now); kill what is left; leave."""
        was_running = self.state is State.RUNNING
        self.lifecycle.set(State.DRAINING)
        if was_running:
            self._link.say_kbye()
        if self._stop_mode is StopMode.GRACEFUL:
            jobs = self._slots.jobs_in_flight
            self._link.drain(self._worker.settings.kill_grace_period,
                             requests_may_come=was_running, busy=lambda: len(jobs),
                             keep_waiting=lambda: self._stop_mode is StopMode.GRACEFUL)
        self._slots.kill_all()
        self._link.stop_reading()
        if was_running:
            self._hooks.notify("disconnected", "stopping")
