"""``emq-green-scheduler``: EventMQ's scheduler on gevent, with its state in SQLite.

It speaks to a router as EventMQ 0.3.13's ``emq-scheduler`` does: one
DEALER socket to the router's client socket (``scheduler_addr``, EventMQ's
``SCHEDULER_ADDR``), ``INFORM ['', 'scheduler']``, HEARTBEATs both ways,
SCHEDULE and UNSCHEDULE in, a REQUEST (with ``reply-requested``) out for
each firing. When firings happen is :mod:`emq_green.scheduler.table`'s
business; what is kept on disk, :mod:`emq_green.scheduler.store`'s.

Where it differs from EventMQ's (each of these is a defect there):

* schedules are restored from ``scheduler_file`` at start (EventMQ's never
  reads Redis back: its ``redis_server`` is None on the first call);
* UNSCHEDULE removes cron schedules too, from memory and disk;
* a cron schedule keeps its queue;
* interval schedules fire on a fixed grid (no drift), a restart fires a
  missed schedule once, and ``run_count`` is kept on disk for cron and
  interval alike;
* a bad SCHEDULE (bad cron text, bad interval, a callable outside
  ``allowed_callables``, oversized) is logged and counted, never fatal.

A schedule with the ``guarantee`` header (EventMQ's client's default) fires
a guaranteed REQUEST. A one-shot guaranteed schedule (a delayed job) stays
on disk until the router has acknowledged its REQUEST, so it survives a
scheduler restart (at least once).

Greenlets: the link (connect, INFORM, read every message, heartbeats, the
router's liveness; the only one that reads the socket) and the ticker (fires
what is due; wakes at the soonest time or when the table changes). Sends
come from both, each one whole message with NOBLOCK.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from enum import Enum
from typing import Any, Callable, Optional

import gevent
import gevent.event
import zmq.green as zmq

from ..callables import refusal
from ..curve import client_curve
from ..lifecycle import Lifecycle
from ..limits import LogLimiter
from ..protocol import Command, Message, ProtocolError, RunRequest, new_msgid, printable
from ..schedules import FOREVER, KBYE_CONNECTING, parse_schedule, unschedule_key
from ..settings import Settings
from .store import ScheduleStore
from .table import Entry, ScheduleTable

logger = logging.getLogger(__name__)

#: schedules one scheduler holds at most; a SCHEDULE beyond is refused
MAX_SCHEDULES = 100_000
#: rows listed in each HEARTBEAT for the router's STATUS and dashboard
LISTING_ROWS = 200
#: firings sent and not yet acknowledged that are remembered (guaranteed one-shots)
MAX_UNACKED = 100_000


#: delayed jobs fired that are remembered (a hand-over of one is ignored)
MAX_ENDED = 100_000

#: seconds between tries to fire while the router cannot be reached
RETRY_INTERVAL = 0.1

#: a firing later than this (s) after its time is logged
LATE_WARNING = 0.05


#: a wall clock that goes back more than this (seconds) against the
#: monotonic clock has been stepped (by hand, or NTP stepping it)
CLOCK_STEP = 1.0


class ClockWatch:
    """Tells a step back of the wall clock ``clock`` from its pace against
    the monotonic clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._wall, self._mono = clock(), time.monotonic()

    def stepped_back(self, wall: float) -> float:
        """The step back (negative seconds) since the last call, or 0."""
        mono = time.monotonic()
        step = wall - (self._wall + (mono - self._mono))
        self._wall, self._mono = wall, mono
        return step if step < -CLOCK_STEP else 0.0


def _follow_the_clock(scheduler: Scheduler, step: float, now: float) -> None:
    if step:
        logger.warning("scheduler: the wall clock went back %.1f s; interval schedules keep "
                       "their pace, cron ones take their next time from the clock", -step)
        scheduler.table.clock_stepped_back(step, now)


#: said when a router does not answer a plain scheduler
_NO_CURVE_HINT = (" (a router with CURVE drops plain peers without a word: it needs "
                  "curve_server_key_file here)")
#: (a probe: a scheduler whose key the router refused said nothing of it)
_CURVE_HINT = (" (or the router refused this CURVE key, or has another server key: its "
               "log names the keys it refuses)")

#: refusals are caused by peers' messages: at most LOG_BURST lines a window
_refusals = LogLimiter(logger)


def _refused(scheduler: Scheduler, message: Message, exc: ProtocolError,
             dropped: bool = False) -> None:
    """A SCHEDULE or UNSCHEDULE refused: counted, logged (rate-limited).
    ``dropped``: a well-formed SCHEDULE this scheduler will not run (not
    allowed, or one too many), sent back as an UNSCHEDULE, so that
    emq-green's router forgets it and hands it to no other scheduler (it
    did, and EventMQ's, with no allowed list, ran it)."""
    scheduler.counts["refused"] += 1
    _refusals.error("refused", "scheduler: %s %s refused: %s", message.command.value,
                    printable(message.msgid), printable(exc, 200))
    if dropped:
        scheduler._send(Message.new(Command.UNSCHEDULE, *message.body))


def _introduce(send: Callable[[Message], bool], inform: Message) -> bool:
    """KBYE, then the INFORM: EventMQ's router lists a scheduler once more
    at each INFORM under the same name (this one keeps its name across
    restarts), and crashes (KeyError) when it later removes the silent name
    twice; a KBYE removes every entry of the name there. emq-green's router
    ignores a KBYE with this body (:data:`KBYE_CONNECTING`)."""
    return send(Message.new(Command.KBYE, KBYE_CONNECTING)) and send(inform)


def _woke_late(now: float, last: float, interval: float) -> bool:
    """Whether the link's loop woke up late by more than a heartbeat
    interval: this process was stopped (SIGSTOP, a frozen VM), which is not
    the router's silence. The router's messages may still be on their way
    in, and the socket closed at once (to connect again) lost them: an
    UNSCHEDULE, and the schedule fired on (a probe)."""
    return now - last > max(1.0, interval)


class SchedulerState(str, Enum):
    """stopped -> running -> stopping -> stopped."""

    STOPPED = "stopped"
    RUNNING = "running"
    STOPPING = "stopping"


class Scheduler:
    """A scheduler for one router.

    Args:
        settings: ``scheduler_addr`` (the router's client socket),
            ``scheduler_file`` (SQLite; empty: memory only), heartbeat
            settings, ``reconnect_timeout``, ``allowed_callables``, ``name``.
        context: the ``zmq.green`` context (an ``inproc://`` router needs its own).
        addr: overrides ``scheduler_addr`` (an embedded router's inproc address).
        clock: epoch seconds; tests may give another.
    """

    def __init__(self, *, settings: Settings, context: Optional[zmq.Context] = None,
                 addr: Optional[str] = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.addr = addr or settings.scheduler_addr
        #: CURVE to the router's client address, as any client (None: plain,
        #: or in-process); raises CurveError for half a configuration
        self._curve = client_curve(settings.curve_secret_key_file,
                                   settings.curve_server_key_file, self.addr, who="scheduler")
        self._context = context or zmq.Context.instance()
        self._clock = clock
        self.table = ScheduleTable()
        self.store: Optional[ScheduleStore] = None
        #: counted events: ``fired``, ``fire_failed``, ``scheduled``, ``unscheduled``,
        #: ``refused`` (bad SCHEDULEs), ``restored``, ``reconnects``
        self.counts: collections.Counter[str] = collections.Counter()
        #: lateness (s) of each firing sent, the last 100,000
        self.lateness: collections.deque[float] = collections.deque(maxlen=100_000)
        #: REQUEST msgid -> a guaranteed last run waiting for the router's ACK
        self._unacked: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        #: a firing could not be sent (no connection to the router): the
        #: ticker retries after RETRY_INTERVAL
        self._blocked = False
        #: the router said KBYE: the link connects again
        self._kbye = False
        #: firings fail since the last one sent (logged once)
        self._unreachable = False
        #: key -> :meth:`Schedule.core` of the finite schedules (delayed jobs
        #: included) whose runs ended since start, the last MAX_ENDED: the
        #: router handing one over is late (see on_schedule)
        self._ended: collections.OrderedDict[str, tuple[str, ...]] = \
            collections.OrderedDict()
        self._lifecycle = Lifecycle(SchedulerState.STOPPED, f"scheduler {settings.name}")
        self._sock: Optional[zmq.Socket] = None
        self.connected = gevent.event.Event()
        self._wake = gevent.event.Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._stopped = gevent.event.Event()

    # ------------------------------------------------------------------
    # start and stop

    def start(self) -> None:
        """Open the store, restore its schedules, start connecting."""
        if self._lifecycle.state is not SchedulerState.STOPPED or self._stopped.is_set():
            raise RuntimeError("a Scheduler starts once")
        self.store = ScheduleStore(self.settings.scheduler_file, take=True)
        logger.info("scheduler: schedules kept in %s", self.settings.scheduler_file
                    or "memory only (no scheduler_file)")
        for entry in self.store.load():
            self.table.put(entry)
            self.counts["restored"] += 1
        if self.counts["restored"]:
            logger.info("scheduler: %d schedule(s) restored from %s", self.counts["restored"],
                        self.settings.scheduler_file)
        self._lifecycle.set(SchedulerState.RUNNING)
        self._greenlets = [gevent.spawn(self._link), gevent.spawn(self._tick)]

    def serve_forever(self) -> None:
        if self._lifecycle.state is SchedulerState.STOPPED and not self._stopped.is_set():
            self.start()
        self._stopped.wait()

    def stop(self, timeout: Optional[float] = 5.0) -> bool:
        """KBYE to the router, stop both greenlets, close the socket and the file."""
        if self._lifecycle.state is not SchedulerState.RUNNING:
            return self._stopped.wait(timeout)
        self._lifecycle.set(SchedulerState.STOPPING)
        self._send(Message.new(Command.KBYE))
        current = gevent.getcurrent()
        gevent.killall([g for g in self._greenlets if g is not current], timeout=timeout)
        self._close_socket()
        if self.store is not None:
            self.store.close()
        self._lifecycle.set(SchedulerState.STOPPED)
        self._stopped.set()
        return True

    @property
    def state(self) -> SchedulerState:
        return self._lifecycle.state

    # ------------------------------------------------------------------
    # the link to the router

    def _link(self) -> None:
        s = self.settings
        while True:
            self._open_socket()
            inform = Message.new(Command.INFORM, "", "scheduler")
            informed = False
            started = heard = last = time.monotonic()
            beat_at = 0.0
            silence_limit = s.heartbeat_timeout * s.heartbeat_liveness
            self._kbye = False
            while True:
                sock = self._sock
                assert sock is not None
                if not informed and sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
                    informed = _introduce(self._send, inform)  # IMMEDIATE: once connected
                if sock.poll(100):
                    frames = sock.recv_multipart()
                    if len(frames) < 3 or frames[2] != b"REPLY":
                        # a REPLY acknowledges one of our firings: EventMQ's
                        # router restarted sends those and nothing else (no
                        # HEARTBEAT, no KBYE) to a scheduler it does not know
                        heard = time.monotonic()
                    try:
                        self._on_message(frames, inform.msgid)
                    except Exception:  # a bug must not leave the link deaf
                        self.counts["errors"] += 1
                        logger.exception("scheduler: error handling a message from the router")
                    if self._kbye:
                        break
                now = time.monotonic()
                if _woke_late(now, last, s.heartbeat_interval):
                    heard = max(heard, now)
                last = now
                if not self.connected.is_set():
                    if now - started >= s.reconnect_timeout:
                        logger.warning("scheduler: no ACK from %s in %g s; trying again (an "
                                       "emq-green router takes 64 schedulers at most: see "
                                       "its log)%s", self.addr, s.reconnect_timeout,
                                       _CURVE_HINT if self._curve else _NO_CURVE_HINT)
                        break
                    continue
                if s.disable_heartbeats:
                    continue
                if now - beat_at >= s.heartbeat_interval:
                    beat_at = now
                    self._send(Message.new(Command.HEARTBEAT, f"{time.time():.6f}",
                                           self._listing()))
                if now - heard >= silence_limit:
                    logger.error("scheduler: nothing from the router for %.1f s; "
                                 "connecting again", now - heard)
                    break
            self.connected.clear()
            self.counts["reconnects"] += 1
            self._close_socket()

    def _open_socket(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # IMMEDIATE: with no connection to the router a send fails (EAGAIN)
        # and the schedule stays due, instead of waiting in the socket to be
        # lost when it closes or sent in a burst when the router is back
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.IDENTITY, f"{self.settings.name}:scheduler".encode())
        if self._curve is not None:
            self._curve.apply(sock)
        sock.connect(self.addr)
        self._sock = sock

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)

    def _send(self, message: Message) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.send_multipart(message.frames(), zmq.NOBLOCK)
            return True
        except zmq.Again:
            logger.debug("scheduler: %s not sent: no connection to the router",
                         message.command.value)
            return False
        except zmq.ZMQError as exc:
            logger.error("scheduler: could not send %s to the router: %s",
                         message.command.value, exc)
            return False

    def _on_message(self, frames: list[bytes], inform_msgid: str) -> None:
        try:
            message = Message.parse(frames)
        except ProtocolError as exc:
            logger.warning("scheduler: malformed message from the router: %s",
                           printable(exc, 200))
            return
        command = message.command
        if command is Command.ACK:
            if message.body and message.body[0] == inform_msgid:
                logger.info("scheduler: connected to %s (%d schedule(s))", self.addr,
                            len(self.table))
                self._refire_unacked()
                self.connected.set()
                self._wake.set()
        elif command is Command.SCHEDULE:
            self.on_schedule(message)
        elif command is Command.UNSCHEDULE:
            self.on_unschedule(message)
        elif command is Command.REPLY:
            self._on_reply(message)
        elif command is Command.KBYE:
            # the link connects again itself: a second greenlet doing it raced
            # the link's own reconnection (two sockets under one name)
            logger.info("scheduler: the router said KBYE; connecting again")
            self.connected.clear()
            self._kbye = True
        elif command is Command.DISCONNECT:
            gevent.spawn(self.stop)

    # ------------------------------------------------------------------
    # schedules in

    def on_schedule(self, message: Message) -> None:
        """Take a SCHEDULE (a new one replaces one of the same key)."""
        schedule = None
        try:
            schedule = parse_schedule(message.body)
            why = refusal(RunRequest.parse(schedule.payload), self.settings.allowed_callables)
            if why is not None:
                raise ProtocolError(why)
            if schedule.key not in self.table.entries and len(self.table) >= MAX_SCHEDULES:
                raise ProtocolError(f"{MAX_SCHEDULES} schedules held already")
        except ProtocolError as exc:
            _refused(self, message, exc, dropped=schedule is not None)
            return
        held = self.table.entries.get(schedule.key)
        if held is not None and (held.schedule.body() == schedule.body() or (
                schedule.handed_over and held.schedule.core() == schedule.core())):
            # the same again (a router handing over what it sent before, a
            # client repeating itself): the schedule keeps its grid and runs,
            # and at most the runs the router has not seen fired yet
            self.counts["unchanged"] += 1
            left = schedule.run_count
            if schedule.handed_over and left != FOREVER and not 0 < held.runs_left <= left:
                held.runs_left = left
                self._save(held)
            logger.debug("scheduler: %s unchanged", schedule.key[:12])
            return
        if held is None and self._ended.get(schedule.key) == schedule.core() and (
                schedule.handed_over or schedule.eta is not None):
            # its runs ended here already: the router's hand-over of it, sent
            # on the INFORM before the last firing of what this scheduler
            # restored from its file reached the router. A delayed job's
            # body holds its time and its delay-id, so only a repeat is the
            # same (a client asking for another run sends another)
            self.counts["fired_already"] += 1
            logger.info("scheduler: %s ran its last run already; SCHEDULE %s ignored",
                        schedule.key[:12], printable(message.msgid))
            return
        now = self._clock()
        replaced = held is not None
        entry, haste = self.table.add(schedule, now)
        self.counts["scheduled"] += 1
        logger.info("scheduler: %s %s: %s %s on queue %s%s", "replaced" if replaced else "new",
                    schedule.key[:12], schedule.name, schedule.what(),
                    printable(schedule.queue), "" if schedule.run_count < 0
                    else f", {schedule.run_count} run(s)")
        if haste and self.connected.is_set():
            self._fire(entry, now, due=None)
        self._save(entry)
        self._wake.set()

    def on_unschedule(self, message: Message) -> None:
        try:
            key = unschedule_key(message.body)
        except ProtocolError as exc:
            _refused(self, message, exc)
            return
        entry = self.table.remove(key)
        if self.store is not None:
            self.store.delete(key)
        if entry is not None:
            self.counts["unscheduled"] += 1
            logger.info("scheduler: unscheduled %s (%s, %d run(s))", key[:12],
                        entry.schedule.name, entry.runs)

    def _on_reply(self, message: Message) -> None:
        """The router's acknowledgement of a firing (``REPLY [msgid]``), or
        its refusal (``REPLY [refusal_json, msgid]``)."""
        if not message.body:
            return
        msgid = message.body[-1]
        entry = self._unacked.pop(msgid, None)
        if len(message.body) > 1:
            logger.error("scheduler: the router refused REQUEST %s: %s", printable(msgid),
                         printable(message.body[0], 200))
            return
        if entry is not None and entry.key not in self.table.entries and \
                self.store is not None:
            self.store.delete(entry.key)  # a guaranteed last run, now held by the router

    def _refire_unacked(self) -> None:
        """Connected (again): the guaranteed last runs fired and never
        acknowledged (sent to a router that died, or lost with the
        connection) are due again. At least once: one whose acknowledgement
        alone was lost runs twice."""
        unacked, self._unacked = self._unacked, collections.OrderedDict()
        again = 0
        for msgid, entry in unacked.items():
            if entry.key in self.table.entries:
                continue  # scheduled anew meanwhile
            entry.refire_msgid = msgid  # (a router that holds it, or ran it, confirms it)
            entry.runs -= 1
            entry.runs_left = 1
            self.table.put(entry)
            again += 1
        if again:
            logger.warning("scheduler: %d guaranteed run(s) sent and not acknowledged by "
                           "the router; firing them again", again)

    # ------------------------------------------------------------------
    # firing

    def _tick(self) -> None:
        watch = ClockWatch(self._clock)
        while True:
            if self.connected.is_set():
                now = self._clock()
                _follow_the_clock(self, watch.stepped_back(now), now)
                for entry in self.table.due(now):
                    if self._blocked:
                        self.table.put(entry)  # due still: tried with the first
                        continue
                    self._fire(entry, now, entry.next_at)
                    self._save(entry)
            at = self.table.next_due()
            wait = 1.0 if at is None or not self.connected.is_set() else \
                min(1.0, max(0.0, at - self._clock()))
            if self._blocked:
                wait = max(wait, RETRY_INTERVAL)
                self._blocked = False
            self._wake.clear()
            self._wake.wait(wait)

    def _fire(self, entry: Entry, now: float, due: Optional[float]) -> None:
        s = entry.schedule
        request = Message(Command.REQUEST, entry.refire_msgid or new_msgid(),
                          (s.queue, s.request_headers(), s.payload))
        if not self._send(request):
            self.counts["fire_failed"] += 1
            if not self._unreachable:
                self._unreachable = True
                logger.warning("scheduler: the router cannot be reached; what falls due "
                               "runs once it can")
            self._blocked = True
            if due is not None:
                # due still: fired once when the router can be reached, however
                # many of its times pass meanwhile (the next time is set then)
                self.table.put(entry)
            return
        self.counts["fired"] += 1
        entry.refire_msgid = ""
        self._unreachable = False
        if due is not None:
            late = now - due
            self.lateness.append(late)
            if late > LATE_WARNING:
                self.counts["fired_late"] += 1
                logger.warning("scheduler: %s fired %.0f ms late", s.name, late * 1000)
        more = self.table.fired(entry, now, due)
        if not more:
            self._ended.pop(entry.key, None)
            self._ended[entry.key] = s.core()
            while len(self._ended) > MAX_ENDED:
                self._ended.popitem(last=False)
        if not more and s.guaranteed:
            self._unacked[request.msgid] = entry  # deleted on disk once acknowledged
            while len(self._unacked) > MAX_UNACKED:
                self._unacked.popitem(last=False)

    def _save(self, entry: Entry) -> None:
        store = self.store
        if store is None:
            return
        if entry.key in self.table.entries:
            store.save(entry)
        elif all(e is not entry for e in self._unacked.values()) or \
                not entry.schedule.guaranteed:
            store.delete(entry.key)
        else:
            # a guaranteed last run, sent: on disk until the router acknowledges
            # it; if the scheduler stops first, it fires once more at start
            store.save(entry)

    # ------------------------------------------------------------------
    # what it reports

    def _listing(self) -> str:
        rows = [e.row() for e in self.table.soonest(LISTING_ROWS)]
        return json.dumps({"schedules": rows, "count": len(self.table)})

    def status(self) -> dict[str, Any]:
        return {"state": self.state.value, "connected": self.connected.is_set(),
                "schedules": len(self.table), **dict(self.counts)}


__all__ = ["MAX_SCHEDULES", "Scheduler", "SchedulerState"]
