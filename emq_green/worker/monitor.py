"""Who blocked the event loop: detection, attribution, patch-state warnings.

Code that was never written for gevent (a C database driver, a CPU loop, a
library imported before patching) holds the hub: every job and the
heartbeats wait. :class:`BlockMonitor` makes each such incident visible:

- gevent's own monitor thread (a native thread; its greenlet tracer is
  C-accelerated and costs nothing measurable) runs our check every half
  threshold, which asks the tracer whether no greenlet switch happened
  since the last check (gevent's own check, which first renders a costly
  report of every greenlet, is pushed out of the way). There we only
  collect: the blocked greenlet, the job it runs (its record, or the record
  of the job that spawned it) and the blocking stack of the hub's thread.
  Nothing is logged from the thread: after monkeypatching, the logging
  locks are gevent locks.
- The thread then watches the hub's thread every few milliseconds until
  the next greenlet switch there (the tracer counts them) or until the
  blocked greenlet's frames leave it: that is the end of the incident.
  Its start is the last run of a cheap loop timer (every threshold/10), or
  the end of the incident just before. One report per incident; one
  shorter than the threshold is dropped. One block is watched once for
  every manager of the process (gevent's monitor thread is one per hub).
- The loop, free again, logs the incident once (job, queue, msgid, time
  in the job, block duration, stack) and counts it per callable; listeners
  (the offload extension) hear of it.

Limits: a block is reported when it ends, so one that never ends is never
logged (the heartbeat thread of :mod:`emq_green.worker.lifeline` is what the router
sees meanwhile). The tracer sees greenlet switches only: a loop busy with
many short greenlets is not "blocked".
"""

from __future__ import annotations

import collections
import logging
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import gevent
from gevent import monkey

from ..extensions import Extension

if TYPE_CHECKING:  # pragma: no cover
    from ..extensions import WorkerView
    from ..records import JobRecord

logger = logging.getLogger(__name__)

_HUB_RUN_CODE = gevent.hub.Hub.run.__code__
#: gevent's own periodic blocking check, effectively never (see _start)
_GEVENT_CHECK_OFF = 365 * 24 * 3600.0
#: monitors started and not stopped, in start order
_ACTIVE: list[BlockMonitor] = []


def _check_all(hub: Any) -> None:
    """Runs in gevent's monitor thread every half threshold. gevent's switch
    tracer answers (True, greenlet) when no greenlet switch happened in the
    hub's thread since the last call and a greenlet other than the hub ran;
    asking resets it, so it is asked once here, and one block is watched
    once, for every monitor of this hub."""
    tracer = getattr(hub.periodic_monitoring_thread, "_greenlet_tracer", None)
    if tracer is None:
        return
    now, cpu = time.monotonic(), _thread_cpu(hub.thread_ident)
    before, cpu_before = _LAST_CHECK.get(id(hub), (now, cpu))
    _LAST_CHECK[id(hub)] = (now, cpu)
    found = tracer.did_block_hub(hub)
    monitors = [m for m in list(_ACTIVE) if m._hub is hub and m._subscribed]
    threshold = min((m.threshold for m in monitors), default=0.0)
    # computing for at least half of it: a stopped process (SIGSTOP) does not
    held_gil = bool(monitors) and now - before >= threshold and (
        cpu - cpu_before >= (now - before) / 2)
    if held_gil:
        # This thread itself could not run for a threshold while the hub's
        # thread computed: a C call there held the GIL (a regular expression
        # backtracking, a C library that does not release it). This thread
        # runs again as soon as that call returns, the greenlet that made it
        # still the active one; but greenlets switched before the block, so
        # the tracer alone says nothing (a probe: 0.6-10 s blocks unreported).
        # (A stopped process, SIGSTOP, computes nothing: not a block.)
        active = found[1] if found else tracer.active_greenlet
        if active is None or active is hub:
            # another thread took the GIL first and the loop moved on: the
            # blocker is not known, the block is: the loop's ticks saw it
            # (a greenlet moved on since is seen so in _watch_block)
            for monitor in monitors:
                monitor._close(*monitor._gap_seen(before, now))
            return
        found = (True, active)
    if not found:
        return
    if monitors:
        try:
            _watch_block(hub, tracer, found[1], monitors, before if held_gil else None)
        except Exception:  # a monitor thread must not die; report in the loop
            exc_info = sys.exc_info()
            hub.loop.run_callback_threadsafe(
                lambda: logger.error("loop-block monitor failed", exc_info=exc_info))
        finally:
            # the block was watched to its end: the next check counts from
            # now (a probe: a 3 s Python loop was seen once more, as a call
            # holding the GIL for the whole block, two incidents for one)
            _LAST_CHECK[id(hub)] = (time.monotonic(), _thread_cpu(hub.thread_ident))


def _watch_block(hub: Any, tracer: Any, greenlet: Any, monitors: list[BlockMonitor],
                 late_since: Optional[float] = None) -> None:
    """A block found: take its stack, open an incident in every monitor,
    wait for the end once and close them all. Collect only, never log.
    ``late_since``: found late (see :func:`_check_all`), this thread's run
    before."""
    now = time.monotonic()
    frame = sys._current_frames().get(hub.thread_ident)
    if frame is None or frame.f_code is _HUB_RUN_CODE or getattr(
            greenlet, "gr_frame", None) is not None:
        # The hub itself is running, or the greenlet gevent names is
        # suspended (a running greenlet has no saved frame): the
        # tracer's idea of the active greenlet is stale (it is read from
        # another thread without a lock). Not a block; and waiting below
        # for frames that never leave would keep this thread from seeing
        # the next real one. (Found late, the block was real: its blocker
        # is not known.)
        if late_since is not None:
            del frame
            for monitor in monitors:
                monitor._close(*monitor._gap_seen(late_since, now))
        return
    stack = traceback.format_stack(frame)[-STACK_LIMIT:]
    base = frame
    while base.f_back is not None:
        base = base.f_back
    del frame
    opened = [(m, m._open(greenlet, stack, now, late_since)) for m in monitors]
    del greenlet
    # This thread has nothing else to do while the loop is held: watch the
    # hub's thread until the block ends. Its end is the first greenlet
    # switch there (the tracer counts them; the call that found the block
    # set the count to 0). The blocked greenlet's frames leaving the thread
    # are not enough: a job greenlet is reused for the next job, so the
    # same frames hold two blocks in a row with a gap of a few microseconds
    # between them, shorter than this thread's poll.
    while any(m._subscribed for m in monitors):
        _real_sleep(END_POLL)
        if tracer.greenlet_switch_counter:
            break
        top = sys._current_frames().get(hub.thread_ident)
        if top is None or not _has_frame(top, base):
            break
        del top
    ended = time.monotonic()
    for monitor, incident in opened:
        monitor._close(incident, ended)


def _thread_cpu(ident: int) -> float:
    """CPU seconds the thread ``ident`` used (0.0 where that is not known)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (AttributeError, OSError):
        return 0.0


#: the callable of an incident whose blocker, a call holding the GIL, is not known
GIL_HOLDER = "<a call holding the GIL>"
#: id(hub) -> when :func:`_check_all` last ran for it (monotonic), and the
#: CPU seconds the hub's thread had used then
_LAST_CHECK: dict[int, tuple[float, float]] = {}
#: Frames of the blocking stack kept (innermost).
STACK_LIMIT = 25
#: Callables counted by name; later ones are counted as "other".
MAX_CALLABLES = 64
#: Incidents kept for the status.
RECENT_INCIDENTS = 20
#: How often the monitor thread looks whether a block it found has ended.
END_POLL = 0.005

_real_sleep = monkey.get_original("time", "sleep")


def _has_frame(top: Any, frame: Any) -> bool:
    while top is not None:
        if top is frame:
            return True
        top = top.f_back
    return False

#: Modules a job worker needs patched, and what goes wrong when one is not.
IO_MODULES = {
    "socket": "network IO blocks every job",
    "ssl": "TLS connections block every job",
    "time": "time.sleep blocks every job",
    "select": "select/poll block every job",
    "threading": "locks and thread waits block every job",
}

PATCH_FIX = ("run jobs with the emq-green console script (it patches first), or call "
             "gevent.monkey.patch_all() before importing anything else")


def _psycopg2_green() -> bool:
    extensions = sys.modules.get("psycopg2.extensions")
    return extensions is not None and extensions.get_wait_callback() is not None


#: module -> (is it made cooperative?, the fix). Drivers written in C do
#: their IO below Python, where monkeypatching cannot reach.
KNOWN_DRIVERS: dict[str, tuple[Callable[[], bool], str]] = {
    "psycopg2": (_psycopg2_green,
                 "pip install psycogreen and call psycogreen.gevent.patch_psycopg() at "
                 "start, or use psycopg 3"),
    "MySQLdb": (lambda: False,
                "use PyMySQL (pure Python, patched with the socket module), or route "
                "these jobs to the subprocess pool"),
    "pylibmc": (lambda: False, "use pymemcache (pure Python)"),
    "cx_Oracle": (lambda: False, "route these jobs to the subprocess pool"),
    "pyodbc": (lambda: False, "route these jobs to the subprocess pool"),
}


def patch_problems(modules: Optional[dict[str, Any]] = None) -> list[str]:
    """Warnings, each with its fix: IO modules gevent has not patched, and
    known blocking drivers imported without their cooperative variant."""
    modules = sys.modules if modules is None else modules
    problems = []
    unpatched = [m for m in IO_MODULES if not monkey.is_module_patched(m)]
    if unpatched:
        harm = "; ".join(f"{m}: {IO_MODULES[m]}" for m in unpatched)
        problems.append(f"gevent has not patched {', '.join(unpatched)} ({harm}). "
                        f"Fix: {PATCH_FIX}.")
    for name, (is_green, fix) in KNOWN_DRIVERS.items():
        if name in modules:
            try:
                green = is_green()
            except Exception:  # a half-imported driver: say nothing wrong
                green = True
            if not green:
                problems.append(f"{name} is imported and blocks the event loop on every "
                                f"query (its IO is in C). Fix: {fix}.")
    return problems


@dataclass
class Incident:
    """One stretch of time the loop was held by one greenlet."""

    callable: str
    msgid: Optional[str]
    queue: Optional[str]
    greenlet: str
    stack: list[str]
    #: time.monotonic() values
    started: float
    detected: float
    job_started: Optional[float] = None
    ended: Optional[float] = None

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def in_job(self) -> Optional[float]:
        """Seconds from the job's start to the block's, None outside a job.
        The block's start is known only to the loop's last tick, which may
        come before the job began: 0 then, never less."""
        if self.job_started is None:
            return None
        return max(0.0, self.started - self.job_started)

    def summary(self) -> dict[str, Any]:
        """For the status (served over HTTP): no msgid, which names a result
        (the WARNING line logged for the incident has it)."""
        return {"callable": self.callable, "queue": self.queue,
                "blocked_seconds": round(self.duration, 3),
                "in_job_seconds": None if self.in_job is None else round(self.in_job, 3),
                "stack_tail": self.stack[-1].strip() if self.stack else ""}


@dataclass
class CallableBlocks:
    incidents: int = 0
    blocked_seconds: float = 0.0
    longest: float = 0.0


class BlockMonitor(Extension):
    """Reports each block of the event loop longer than ``threshold`` s.

    ``threshold`` defaults to the ``block_threshold`` setting, read when the
    manager starts and on SIGHUP; 0 turns detection off (the patch-state
    warnings remain). ``listeners`` are called in the loop with each
    finished :class:`Incident`.
    """

    def __init__(self, threshold: Optional[float] = None) -> None:
        self._fixed_threshold = threshold
        self.threshold = threshold or 0.0
        self.by_callable: dict[str, CallableBlocks] = collections.defaultdict(CallableBlocks)
        self.recent: collections.deque[Incident] = collections.deque(maxlen=RECENT_INCIDENTS)
        self.incidents = 0
        self.blocked_seconds = 0.0
        self.longest = 0.0
        self.listeners: list[Callable[[Incident], None]] = []
        self._manager: Optional[WorkerView] = None
        self._hub: Any = None
        self._last_tick = self._last_end = time.monotonic()
        #: the last gap between two of the loop's ticks (start, end), see _tick
        self._gap = (0.0, 0.0)
        self._tick_period = 0.25
        self._ticker: Any = None
        self._thread: Any = None
        self._subscribed = False

    # -- lifecycle ------------------------------------------------------------
    def manager_started(self, manager: WorkerView) -> None:
        self._manager = manager
        for problem in patch_problems():
            logger.warning("%s", problem)
        if self._fixed_threshold is None:
            self.threshold = manager.settings.block_threshold
        self._start()

    def manager_stopped(self, manager: WorkerView) -> None:
        self._stop()

    def reload(self, manager: WorkerView) -> None:
        threshold = manager.settings.block_threshold
        if self._fixed_threshold is None and threshold != self.threshold:
            logger.info("block_threshold %g s -> %g s", self.threshold, threshold)
            self._stop()
            self.threshold = threshold
            self._start()

    def _start(self) -> None:
        if self.threshold <= 0:
            logger.info("loop-block monitor off (block_threshold 0)")
            return
        hub = gevent.get_hub()
        gevent.config.print_blocking_reports = False  # we log our own, once
        gevent.config.monitor_thread = True
        with warnings.catch_warnings():
            # gevent also offers to watch memory (max_memory_usage, unused
            # here) and warns at every start when psutil is not installed
            warnings.filterwarnings("ignore", message="Unable to monitor memory usage")
            thread = hub.start_periodic_monitoring_thread()
        if thread is None:
            logger.warning("gevent's monitor thread did not start: loop blocks go unseen")
            return
        # gevent's own blocking check renders a report of every greenlet
        # (a walk of all objects and of every stack, with a stat() per line)
        # before it tells anyone: in a process holding many objects that took
        # seconds, so short blocks were over before they were seen. Its check
        # is pushed out of the way and ours asks the same switch tracer
        # directly. A period of half the threshold catches every block of at
        # least the threshold ("no switch for one whole period").
        gevent.config.max_blocking_time = _GEVENT_CHECK_OFF
        self._thread = thread
        self._hub = hub
        _ACTIVE.append(self)
        # One check function per process, never removed: removing it would
        # let the thread sleep the next longest period (5 s) and miss the
        # first blocks of the next monitor. Its period is the smallest asked.
        period = min(m.threshold for m in _ACTIVE) / 2
        thread.add_monitoring_function(_check_all, period)
        tick = self._tick_period = min(0.25, max(0.01, self.threshold / 10))
        self._last_tick = time.monotonic()
        self._ticker = hub.loop.timer(tick, tick)
        self._ticker.ref = False
        self._ticker.start(self._tick)
        self._subscribed = True

    def _stop(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._subscribed:
            self._subscribed = False
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker.close()
            self._ticker = None

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_tick > 2 * self._tick_period:
            self._gap = (self._last_tick, now)  # (read by the monitor thread)
        self._last_tick = now

    def _gap_seen(self, before: float, now: float) -> tuple[Incident, float]:
        """A block by an unknown call holding the GIL, found late (the
        monitor thread last ran at ``before``): its incident and its end,
        timed by the loop's ticks (see :meth:`_open`)."""
        gap_end = self._gap[1]
        return self._open(None, [], now, before), gap_end if gap_end > before else now

    # -- in gevent's monitor thread: collect, never log -------------------------
    def _open(self, greenlet: Any, stack: list[str], detected: float,
              late_since: Optional[float] = None) -> Incident:
        """The incident of a block found in ``greenlet``, not ended yet.
        ``late_since``: found late (this thread could not run since then),
        the blocker maybe gone: a job that began too late to have held the
        loop a threshold is not it (the next one its reused greenlet took),
        and when the loop ran again before this thread, the gap between two
        of its ticks is the block."""
        record = self._record_for(greenlet)
        started = max(self._last_tick, self._last_end)
        if late_since is not None:
            gap_start, gap_end = self._gap
            if gap_end > late_since:
                started = gap_start
            if record is not None and record.started > detected - self.threshold / 2:
                record = None
        return Incident(
            callable=record.callable_name if record else (
                GIL_HOLDER if late_since is not None else "<not a job>"),
            msgid=record.msgid if record else None,
            queue=record.queue if record else None,
            greenlet=repr(greenlet),
            stack=stack,
            # the loop last ran its tick (every threshold/10) at _last_tick;
            # a block that just ended may have handed over to this one
            started=started,
            detected=detected,
            job_started=record.started if record else None,
        )

    def _close(self, incident: Incident, ended: float) -> None:
        incident.ended = self._last_end = ended
        if self._subscribed:
            self._hub.loop.run_callback_threadsafe(self._loop_free, incident)

    def _record_for(self, greenlet: Any) -> Optional[JobRecord]:
        """The job running in ``greenlet``, or in the greenlet that spawned
        it. The manager keeps each job greenlet's current (or last) job, so
        a job that ended while this thread waited for the GIL is still
        found; one dict lookup per greenlet, atomic under the GIL."""
        if self._manager is None:
            return None
        job_of = self._manager.job_of
        seen = 0
        while greenlet is not None and seen < 50:
            record = job_of(greenlet)
            if record is not None:
                return record
            parent = getattr(greenlet, "spawning_greenlet", None)
            greenlet = parent() if parent is not None else None
            seen += 1
        return None

    # -- back in the loop ---------------------------------------------------------
    def _loop_free(self, incident: Incident) -> None:
        gevent.spawn(self._finish, incident)  # log outside the hub greenlet

    def _finish(self, incident: Incident) -> None:
        duration = incident.duration
        if duration < self.threshold:
            return
        self.incidents += 1
        self.blocked_seconds += duration
        self.longest = max(self.longest, duration)
        name = incident.callable
        if name not in self.by_callable and len(self.by_callable) >= MAX_CALLABLES:
            name = "other"
        stats = self.by_callable[name]
        stats.incidents += 1
        stats.blocked_seconds += duration
        stats.longest = max(stats.longest, duration)
        self.recent.append(incident)
        if incident.msgid is not None:
            where = (f"by job {incident.callable} (queue {incident.queue}, msgid "
                     f"{incident.msgid}, {incident.in_job or 0.0:.2f} s "
                     f"into the job)")
        elif incident.callable == GIL_HOLDER:
            where = ("by a call that held the GIL (the monitor thread could not run "
                     "either, and by the time it could, the loop had moved on: the job is "
                     "not known)")
        else:
            where = f"outside any job, by {incident.greenlet}"
        logger.warning(
            "event loop blocked for %.2f s %s; every job and the heartbeats waited "
            "(incident %d of %s). Blocking stack, most recent call last:\n%s",
            duration, where, stats.incidents, incident.callable,
            "".join(incident.stack).rstrip())
        for listener in list(self.listeners):
            try:
                listener(incident)
            except Exception:
                logger.exception("loop-block listener failed")

    # -- status -----------------------------------------------------------------
    def status(self, manager: WorkerView) -> dict[str, Any]:
        return {"loop_blocks": {
            "threshold": self.threshold,
            "incidents": self.incidents,
            "blocked_seconds": round(self.blocked_seconds, 3),
            "longest": round(self.longest, 3),
            "by_callable": {name: {"incidents": s.incidents,
                                   "blocked_seconds": round(s.blocked_seconds, 3),
                                   "longest": round(s.longest, 3)}
                            for name, s in self.by_callable.items()},
            "recent": [i.summary() for i in self.recent],
        }}


__all__ = ["BlockMonitor", "Incident", "patch_problems"]
