"""The router's schedulers: who fires periodic and delayed jobs.

A scheduler (EventMQ's ``emq-scheduler`` or ``emq-green-scheduler``) is a
client that says ``INFORM ['', 'scheduler']`` on the client socket, as with
EventMQ's router: it gets an ACK, HEARTBEATs every ``heartbeat_interval``,
and is removed when silent for ``heartbeat_timeout`` or when it says KBYE.
Its jobs come back to the router as ordinary REQUESTs.

What the router does with schedules, as EventMQ's does, and where it
differs:

* ``SCHEDULE`` goes to one scheduler. Which one is chosen by rendezvous
  hashing of the schedule's key over the schedulers connected, so the same
  schedule sent again goes to the same scheduler and replaces itself there;
  the other schedulers get an ``UNSCHEDULE`` of that key at the same time.
  A schedule is therefore held, and fired, by exactly one scheduler even
  when two or more are connected (EventMQ sends every SCHEDULE to the last
  scheduler that registered and nothing to the others).
* ``UNSCHEDULE`` goes to every scheduler.
* With no scheduler connected, SCHEDULE and UNSCHEDULE are kept, in order,
  up to :data:`MAX_HELD` (then refused and counted), and forwarded when a
  scheduler arrives (EventMQ discards the SCHEDULE).
* A SCHEDULE is checked first (:func:`~emq_green.schedules.parse_schedule`:
  shape, size, interval, cron text, payload): a bad one is refused with
  ``REPLY [refusal_json, msgid]``, logged and counted, and never reaches a
  scheduler (a bad cron text stops EventMQ's scheduler).
* The router keeps a book of the schedules it forwarded (queue, interval
  or cron, scheduler); emq-green's scheduler adds next run, last run and
  runs to it in the second frame of its HEARTBEATs. STATUS (``schedules``)
  and the dashboard show that book.
* Hand-over: the router remembers each live schedule's SCHEDULE and which
  scheduler holds it. When that scheduler goes (KBYE, silence, a send that
  fails) its schedules are sent to another one, or kept for the next to
  connect; a scheduler that (re)connects gets its own again. So schedules
  survive a restart of EventMQ's scheduler, which does not restore its own
  (emq-green's keeps the state of one it restored). A finite schedule is
  handed over with ``run_count`` set to the runs the router has not seen
  fired yet, and whose runs are over is not handed over.
* Two defects of EventMQ's scheduler are mended on the way: a cron
  schedule it was told to UNSCHEDULE keeps firing there (its REQUESTs are
  dropped here and counted), and it fires cron schedules on the default
  queue (their REQUESTs are put back on the schedule's queue).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import gevent

from ..limits import LogLimiter
from ..protocol import Command, Message, ProtocolError, printable
from ..schedules import (
    FOREVER,
    KBYE_CONNECTING,
    Schedule,
    handed_over,
    parse_schedule,
    schedule_key,
    unschedule_key,
)
from ..settings import Settings
from .results import refusal_body
from .routing import remember
from .sockets import RouterSockets

logger = logging.getLogger(__name__)

#: SCHEDULE / UNSCHEDULE messages kept while no scheduler is connected
MAX_HELD = 10_000
#: schedules the router's book keeps (the oldest go first beyond)
MAX_BOOK = 100_000
#: bytes of a scheduler's listing (HEARTBEAT's second frame) read at most
MAX_LISTING_BYTES = 1024 * 1024
#: characters of a text a scheduler's listing gives (key, callable, queue,
#: schedule) the book keeps, and the fields it reads
MAX_LISTED_TEXT = 200
_LISTED_TEXT = ("callable", "queue", "schedule")
_LISTED_NUMBERS = ("next_run", "last_run", "runs", "runs_left")
#: unscheduled cron keys remembered, to drop what EventMQ's scheduler still fires
MAX_CANCELLED = 10_000
#: schedules unscheduled lately, told again to every scheduler that connects
MAX_UNSCHEDULED = 1_000
#: identities of schedulers (connected or gone) whose REQUESTs are checked
MAX_FIRERS = 1_000
#: schedulers connected at once, at most (a deployment runs one or a few)
MAX_SCHEDULERS = 64
#: (scheduler, key) of schedules that ended on another scheduler than that
#: one, which may still hold a copy (it was taken for gone), remembered
MAX_STALE = 10_000
#: live schedules at most: a SCHEDULE of a new one past it is refused
MAX_LIVE = 100_000
#: messages waiting for slow schedulers: client SCHEDULE / UNSCHEDULE are
#: refused while one has this many (a hand-over may add up to MAX_LIVE)
MAX_OUTBOX = 100_000
#: a slow scheduler's waiting messages are sent for at most this long a
#: turn, then the loop is left to others this long (seconds)
DRAIN_BUDGET = 0.002
DRAIN_PAUSE = 0.005
#: a hand-over sends this many messages a turn, then lets the loop poll
HAND_OVER_BATCH = 2_000
HAND_OVER_PAUSE = 0.001
#: a finite schedule is handed over until this long after its last run was
#: due, unless its runs are seen before (a safety net: firings are counted)
_ENDS_MARGIN = 3600.0


@dataclass
class LiveSchedule:
    """What the router needs to hand a schedule to another scheduler."""

    body: tuple[str, ...]
    owner: Optional[bytes]
    cron: bool
    queue: str
    #: when its last run is due (monotonic clock), None for ever
    ends: Optional[float]
    #: runs not yet seen (REQUESTs from a scheduler), FOREVER for ever
    runs_left: int = FOREVER
    #: every scheduler it was sent to (those it was taken from may keep a copy)
    holders: set[bytes] = field(default_factory=set)


def _ends(schedule: Schedule, now: float, wall: float) -> Optional[float]:
    """When a finite schedule's last run is due (monotonic), or None."""
    count = schedule.run_count
    if count == FOREVER or count > 1000:
        return None
    if schedule.eta is not None:
        last = max(0.0, schedule.eta - wall) + (count - 1) * (schedule.interval or 0.0)
    elif schedule.interval is not None:
        last = count * schedule.interval
    else:
        # cron: none (a cron time can take milliseconds to find, and a
        # SCHEDULE must not hold the router); its firings are counted
        return None
    return now + last + _ENDS_MARGIN


def for_any_scheduler(schedule: Schedule, body: tuple[str, ...]) -> tuple[str, ...]:
    """A SCHEDULE body EventMQ's scheduler can hold too (the router does not
    know which kind will hold it, now or after a hand-over).

    Raises:
        ProtocolError: an interval it reads with ``int()`` and dies on
            (``0.5``, ``5.0``), or ``-1`` without a cron text (a one-shot at
            its ``eta``: it reads ``-1`` as cron and dies on the empty text).

    A cron schedule with ``run_count`` and without ``nohaste`` gets
    ``nohaste``: EventMQ's scheduler dies on its first run at once (it counts
    that run down in its book of interval jobs, where a cron one is not).
    """
    if schedule.interval is None and not schedule.cron:
        raise ProtocolError("interval -1 needs a cron text (a one-shot needs its delay "
                            "as whole seconds, as EventMQ's scheduler reads it)")
    if schedule.interval is not None:
        try:
            int(body[2])
        except ValueError:
            raise ProtocolError(f"interval {printable(body[2], 40)} is not a whole number "
                                "of seconds (EventMQ's scheduler reads it with int())") from None
    elif schedule.run_count != FOREVER and not schedule.nohaste:
        return (body[0], f"{body[1]},nohaste" if body[1] else "nohaste", *body[2:])
    return body


def _note(book: collections.OrderedDict[Any, Any], key: Any, limit: int,
          value: Any = None) -> None:
    """``key`` into ``book`` as its newest; the book keeps the ``limit`` newest."""
    book.pop(key, None)
    book[key] = value
    while len(book) > limit:
        book.popitem(last=False)


def _listed(row: dict[str, Any]) -> dict[str, Any]:
    """What the book keeps of a scheduler's listing row: texts cut at
    :data:`MAX_LISTED_TEXT`, numbers only (a peer says what it likes)."""
    kept = {name: row[name][:MAX_LISTED_TEXT] for name in _LISTED_TEXT
            if isinstance(row.get(name), str)}
    for name in _LISTED_NUMBERS:
        value = row.get(name, "")
        # finite only: a NaN or Infinity made STATUS and the dashboard's
        # JSON invalid, until the router restarted (a probe)
        if value is None or (isinstance(value, (int, float)) and math.isfinite(value)):
            kept[name] = value
    return kept


@dataclass
class SchedulerPeer:
    """A connected scheduler."""

    identity: bytes
    hb: float
    since: float = field(default_factory=time.time)
    forwarded: int = 0
    #: SCHEDULE / UNSCHEDULE waiting while its pipe is full (see _to_scheduler)
    outbox: collections.deque[Message] = field(default_factory=collections.deque)
    drainer: Any = None


def _to_scheduler(side: SchedulerSide, identity: bytes, message: Message) -> bool:
    """Send a SCHEDULE or UNSCHEDULE to a scheduler, after what waits for it
    already: True when sent, or queued behind a full pipe (a scheduler busy
    with a burst is slow, not gone: taken for gone, it was sent every
    schedule again on its return, and again, for ever: a probe's 25,000);
    False when it is gone (or not connected)."""
    peer = side.schedulers.get(identity)
    if peer is not None and peer.outbox:
        peer.outbox.append(message)
        return True
    sent = side._sockets.send_or_full("frontend", identity, message)
    if sent is None and peer is not None:
        peer.outbox.append(message)
        side.counts["queued_for_slow_scheduler"] += 1
        if peer.drainer is None:
            peer.drainer = gevent.spawn(_drain, side, peer)
        return True
    return bool(sent)


def _drain(side: SchedulerSide, peer: SchedulerPeer) -> None:
    """Send a slow scheduler what waits for it as its pipe takes it: for at
    most :data:`DRAIN_BUDGET` s a turn, then a pause of :data:`DRAIN_PAUSE`."""
    try:
        while peer.outbox and side.schedulers.get(peer.identity) is peer:
            deadline = time.monotonic() + DRAIN_BUDGET
            while peer.outbox and time.monotonic() < deadline:
                sent = side._sockets.send_or_full("frontend", peer.identity, peer.outbox[0])
                if sent is None:
                    break
                peer.outbox.popleft()
                if not sent and side.schedulers.pop(peer.identity, None) is not None:
                    side._log.error("schedule_lost", "router: scheduler %s is gone with "
                                    "messages waiting for it; taken for gone",
                                    printable(peer.identity))
                    side._hand_over(None)
                    return
            gevent.sleep(DRAIN_PAUSE)
    finally:
        peer.drainer = None
        if side.schedulers.get(peer.identity) is not peer:
            peer.outbox.clear()  # gone, or connected anew: its own are sent again


def _hand_over_once(side: SchedulerSide, arrived: Optional[bytes],
                    skip: frozenset[str]) -> tuple[int, bool, Optional[frozenset[str]]]:
    """One pass of :meth:`SchedulerSide._hand_over`: (schedules sent,
    whether a scheduler was found gone, and, when the pass stopped after
    :data:`HAND_OVER_BATCH` messages, ``skip`` with the keys done: the rest
    go in the next turns of the loop; else None). A probe's 60,000 live
    schedules handed over at once stalled the router 1-2.7 s."""
    now = time.monotonic()
    moved, gone, sent, done = 0, False, 0, set()
    for key, live in list(side.live.items()):
        if sent >= HAND_OVER_BATCH:
            return moved, gone, skip | done
        if live.ends is not None and now > live.ends:
            side._forget(key, ended=True)  # its runs are over
            continue
        if key in skip:
            continue
        if live.owner in side.schedulers and live.owner != arrived:
            if arrived is not None and arrived in live.holders:
                # held by another: a copy the newcomer kept (it was
                # stopped, taken for gone, and handed over) must go (one
                # never sent it holds none: 60,000 UNSCHEDULEs, before)
                _to_scheduler(side, arrived, Message.new(Command.UNSCHEDULE, *live.body))
                done.add(key)
                sent += 1
            continue
        done.add(key)
        sent += 1
        placed, lost = _place(side, key, live, arrived if live.owner == arrived else None)
        moved += placed
        gone = gone or lost
    return moved, gone, None


def _hand_over_rest(side: SchedulerSide, arrived: Optional[bytes],
                    skip: frozenset[str]) -> None:
    """The next batch of a hand-over, after the loop has polled its sockets."""
    gevent.sleep(HAND_OVER_PAUSE)
    side._hand_over(arrived if arrived in side.schedulers else None, skip)


def _admit(side: SchedulerSide, client: bytes, message: Message, key: str) -> bool:
    """Whether a client's SCHEDULE (``key`` a new one) or UNSCHEDULE may go
    on: refused with a reply past :data:`MAX_LIVE` live schedules, or while
    :data:`MAX_OUTBOX` messages wait for a slow scheduler."""
    behind = max((len(p.outbox) for p in side.schedulers.values()), default=0)
    if behind >= MAX_OUTBOX:
        side._refuse(client, message, "refused_full", f"a scheduler is {behind} schedule "
                     "messages behind; try again later")
        return False
    if key and key not in side.live and len(side.live) >= MAX_LIVE:
        side._refuse(client, message, "refused_full", f"{len(side.live)} schedules are live "
                     f"already (at most {MAX_LIVE})")
        return False
    return True


def _merge_rows(book: collections.OrderedDict[str, dict[str, Any]],
                live: dict[str, LiveSchedule], client: bytes, scheduler: str,
                rows: list[Any], before: frozenset[str]) -> tuple[list[str], frozenset[str]]:
    """The listing of scheduler ``client`` (its name ``scheduler``) into the
    router's ``book`` (``before``: the keys of its last listing); the keys
    whose runs are over there, and the keys listed. A schedule live on
    another scheduler is not its (a probe: a scheduler restarted on its file
    listed what had been handed over meanwhile, before dropping it, and the
    row was credited to it for good)."""
    listed: set[str] = set()
    ended = []
    for row in rows[:MAX_BOOK]:
        key = str(row["key"])[:MAX_LISTED_TEXT]
        holder = live.get(key)
        if holder is not None and holder.owner is not None and holder.owner != client:
            continue
        entry = book.get(key)
        if entry is None:
            if len(book) >= MAX_BOOK:
                continue  # full: a listing adds nothing more
            entry = book[key] = {"key": key}
        listed.add(key)
        entry.update(_listed(row))
        entry["scheduler"] = scheduler
        if row.get("runs_left") == 0:
            ended.append(key)
    if len(rows) <= MAX_BOOK:
        # what this scheduler no longer lists has ended there (a listing
        # written before a SCHEDULE arrived misses a live one); looked for
        # among what it listed last, not in the whole book: a HEARTBEAT of 40
        # bytes cost a pass over 50,000 rows (a probe: 2,000 of them, 10 s)
        for key in before - listed:
            entry = book.get(key)
            if entry is not None and entry.get("scheduler") == scheduler and key not in live:
                del book[key]
    return ended, frozenset(listed)


def _tell_unscheduled(side: SchedulerSide, client: bytes, told: set[tuple[str, ...]],
                      skip: frozenset[str] = frozenset()) -> None:
    """UNSCHEDULE again, to a scheduler that (re)connects, what was
    unscheduled lately (but not what it was ``told`` just now, held for
    it): one killed or stopped when its UNSCHEDULE went out (the send
    failed, or the message was lost with its connection) restored the
    schedule from its file and fired it for ever (a probe)."""
    for key, body in side._unscheduled.items():
        if body not in told and key not in skip:
            _to_scheduler(side, client, Message.new(Command.UNSCHEDULE, *body))


def _no_room(side: SchedulerSide, client: bytes, counted: bool = False) -> bool:
    """True (logged, counted) when ``client`` would be a scheduler past
    :data:`MAX_SCHEDULERS`: each SCHEDULE tells every other scheduler to
    drop its copy, and a crowd of peers that vanish made every hand-over
    walk them all (a probe: 2,500, and a valid SCHEDULE refused)."""
    if client in side.schedulers or len(side.schedulers) < MAX_SCHEDULERS:
        return False
    if counted:  # (an INFORM; not each HEARTBEAT of one refused)
        side._counters["scheduler_informs_refused"] += 1
    side._log.error("scheduler_inform", "router: scheduler %s refused: %d schedulers are "
                    "connected already (at most %d)", printable(client),
                    len(side.schedulers), MAX_SCHEDULERS)
    return True


def _place(side: SchedulerSide, key: str, live: LiveSchedule,
           prefer: Optional[bytes]) -> tuple[bool, bool]:
    """Send ``live`` (its runs left) to ``prefer`` if connected, else to its
    rendezvous owner; a scheduler it cannot be sent to (gone with the one
    before it, or its pipe full) is taken for gone and the next one tried.
    Returns (placed, whether a scheduler was found gone)."""
    live.owner, gone = None, False
    message = Message.new(Command.SCHEDULE, *handed_over(live.body, live.runs_left))
    while side.schedulers:
        owner = prefer if prefer is not None and prefer in side.schedulers else \
            side._owner(key.partition(":")[0])
        if _to_scheduler(side, owner, message):
            live.owner = owner
            live.holders.add(owner)
            entry = side.book.get(key)
            if entry is not None:
                # what the last holder listed is not the new holder's (a probe:
                # its next_run long past, EventMQ's scheduler never lists)
                for name in _LISTED_NUMBERS:
                    entry.pop(name, None)
                entry["scheduler"] = printable(owner, 60)
            return True, gone
        gone = True
        side.schedulers.pop(owner, None)
        side._log.error("schedule_lost", "router: scheduler %s could not be sent a schedule "
                        "(gone); taken for gone", printable(owner))
    return False, gone


def _ended(side: SchedulerSide, key: str, live: LiveSchedule,
           unscheduled: bool = False) -> None:
    """``live`` ended (its runs over, a delayed job fired) on its holder: a
    scheduler it was taken from may still hold a copy and fire it (restored
    from its file after a kill -9, or back from a SIGSTOP): a probe's 100
    delayed jobs ran 148 times, a ``run_count`` 10 schedule 17. Remembered,
    so that those firings are dropped and the scheduler told to drop it.
    ``unscheduled``: the copies of holders not connected, or whose
    UNSCHEDULE waits behind others (it goes with them if the scheduler is
    taken for gone: a probe's 2,000 of 3,000 unscheduled fired on)."""
    base = key.partition(":")[0]
    stale, bases = side.stale, side.stale_bases
    peers = side.schedulers
    holders = {h for h in live.holders if h not in peers or peers[h].outbox} \
        if unscheduled else live.holders - {live.owner}
    for holder in holders:
        if (holder, key) in stale:
            continue
        stale[holder, key] = live.body
        bases[holder, base] += 1
        while len(stale) > MAX_STALE:
            (old, old_key), _body = stale.popitem(last=False)
            old_base = (old, old_key.partition(":")[0])
            bases[old_base] -= 1
            if bases[old_base] <= 0:
                del bases[old_base]


def _delayed_fired(side: SchedulerSide, client: bytes, key: str) -> bool:
    """A firing of a call ``key`` with delayed jobs: one of those ``client``
    holds (the soonest ends: nothing to hand over), else, when others hold
    them, a copy it kept of one handed over (False: dropped)."""
    delayed = side._delayed[key]
    owners = [side.live[k].owner if k in side.live else None for k in delayed]
    if client not in owners:
        if any(o in side.schedulers for o in owners):
            side.counts["firing_dropped_not_holder"] += 1
            return False
        if _stale_firing(side, client, key):
            return False
    side._forget(delayed[owners.index(client) if client in owners else 0], ended=True)
    return True


def _stale_firing(side: SchedulerSide, client: bytes, key: str) -> bool:
    """A firing of ``key`` (a call's key) that matches no live schedule: one
    of a copy ``client`` kept of a schedule that ended elsewhere (True:
    logged, counted, to be dropped)?"""
    if side.stale_bases.get((client, key), 0) <= 0:
        return False
    side.counts["firing_dropped_ended"] += 1
    side._log.warning("firing_ended", "router: scheduler %s fired %s, which ended on the "
                      "scheduler it was handed to; dropped", printable(client), key[:12])
    return True


def _tell_ended(side: SchedulerSide, client: bytes) -> frozenset[str]:
    """A scheduler (re)connects: UNSCHEDULE its copies of schedules that
    ended elsewhere or were unscheduled while it was away (not of one live
    now: it may get that one back); the keys told."""
    told = set()
    for _holder, key in [hk for hk in side.stale if hk[0] == client]:
        if key not in side.live:
            _to_scheduler(side, client, Message.new(Command.UNSCHEDULE, *side.stale[client, key]))
            told.add(key)
    return frozenset(told)


def _merge_listing(side: SchedulerSide, client: bytes, text: str) -> None:
    """emq-green's scheduler lists its schedules in its HEARTBEATs:
    ``{"schedules": [{key, callable, queue, schedule, next_run,
    last_run, runs, runs_left}, ...]}``."""
    name = printable(client, 60)
    try:
        ended, listed = _merge_rows(side.book, side.live, client, name,
                                    json.loads(text).get("schedules", []),
                                    side.listed_by.get(name, frozenset()))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        side._log.warning("listing", "router: scheduler %s sent a listing that cannot "
                          "be read: %s", printable(client), printable(exc, 80))
        return
    # the keys remembered are bounded like the book: the oldest listings go
    # first (a review: 128 listings of 70,000 keys each, 0.77 GB)
    listed_by = side.listed_by
    listed_by.pop(name, None)
    total = sum(map(len, listed_by.values())) + len(listed)
    while listed_by and (total > MAX_BOOK or len(listed_by) >= 2 * MAX_SCHEDULERS):
        total -= len(listed_by.popitem(last=False)[1])
    listed_by[name] = listed
    for key in ended:
        side._forget(key, ended=True)  # over: nothing to hand over


class SchedulerSide:
    """Scheduler INFORM, HEARTBEAT, KBYE, and SCHEDULE / UNSCHEDULE on the
    client socket (handlers for the router's frontend table)."""

    def __init__(self, *, settings: Settings, sockets: RouterSockets,
                 counters: collections.Counter[str], limiter: Optional[LogLimiter] = None,
                 max_held: int = MAX_HELD) -> None:
        self.settings = settings
        self._sockets = sockets
        self._counters = counters
        self._log = limiter or LogLimiter(logger)
        self.max_held = max_held
        #: connected schedulers by identity, in the order they registered
        self.schedulers: dict[bytes, SchedulerPeer] = {}
        #: every scheduler seen, connected or gone (the last MAX_FIRERS): the
        #: REQUESTs they send are checked (:meth:`vet_firing`)
        self.firers: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        #: (client identity, message) kept while no scheduler is connected
        self.held: collections.deque[tuple[bytes, Message]] = collections.deque()
        #: key -> what is known of that schedule (see :meth:`listing`)
        self.book: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        #: the keys of each scheduler's last listing (see :func:`_merge_rows`)
        self.listed_by: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()
        #: schedules handled, by outcome: ``forwarded``, ``unscheduled``,
        #: ``held``, ``refused_malformed``, ``refused_full`` (STATUS
        #: ``schedule_messages``)
        self.counts: collections.Counter[str] = collections.Counter()
        #: key -> the live schedule and its holder (for hand-over)
        self.live: dict[str, LiveSchedule] = {}
        #: cron keys unscheduled: True (their firings from a scheduler are
        #: dropped); False: forgotten once their counted runs were seen (EventMQ's
        #: scheduler fires them on), dropped once they are unscheduled
        self._cancelled: collections.OrderedDict[str, bool] = collections.OrderedDict()
        #: key -> body of its last UNSCHEDULE (the MAX_UNSCHEDULED newest; a
        #: SCHEDULE of the key clears it): see ``_tell_unscheduled``
        self._unscheduled: collections.OrderedDict[str, tuple[str, ...]] = \
            collections.OrderedDict()
        #: call key -> keys of its delayed jobs (``key:delay-id``), soonest first
        self._delayed: dict[str, list[str]] = {}
        #: (scheduler, key) -> body of a schedule that ended elsewhere, and the
        #: count of those per (scheduler, call key): see ``_ended``
        self.stale: collections.OrderedDict[tuple[bytes, str], tuple[str, ...]] = \
            collections.OrderedDict()
        self.stale_bases: collections.Counter[tuple[bytes, str]] = collections.Counter()
        #: unknown identities that sent a HEARTBEAT and were told KBYE
        self._told_unknown: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._last_heartbeat = 0.0
        self.judge_after = 0.0  #: none judged silent before then (``broker.AWAY``)

    # ------------------------------------------------------------------
    # schedulers coming and going

    def on_inform(self, client: bytes, message: Message) -> None:
        kind = message.body[1] if len(message.body) > 1 else ""
        if kind != "scheduler":
            self._log.warning("client_inform", "router: INFORM %s of type %s from %s on the "
                              "client socket ignored (workers connect to the worker socket)",
                              printable(message.msgid), printable(kind, 40), printable(client))
            return
        if _no_room(self, client, counted=True):
            return
        self._sockets.send("frontend", client, Message.new(Command.ACK, message.msgid))
        self._register(client)

    def _register(self, client: bytes) -> None:
        self._told_unknown.pop(client, None)
        self.schedulers.pop(client, None)
        self.schedulers[client] = SchedulerPeer(client, time.monotonic())
        _note(self.firers, client, MAX_FIRERS)
        self._log.info("scheduler_inform", "router: scheduler %s connected (%d in all)",
                       printable(client), len(self.schedulers))
        told = {m.body for _, m in self.held if m.command is Command.UNSCHEDULE}
        ended = _tell_ended(self, client)
        # a held SCHEDULE is delivered once: not again by the hand-over
        self._hand_over(client, skip=self._release_held())
        _tell_unscheduled(self, client, told, ended)

    def on_heartbeat(self, client: bytes, message: Message) -> None:
        peer = self.schedulers.get(client)
        if peer is None:
            self._unknown(client)
            return
        peer.hb = time.monotonic()
        if len(message.body) > 1 and len(message.body[1]) <= MAX_LISTING_BYTES:
            _merge_listing(self, client, message.body[1])

    def _unknown(self, client: bytes) -> None:
        """A HEARTBEAT (only schedulers send one here) from a scheduler of the
        router before a restart, or one removed as silent: it would never
        INFORM again. First KBYE (emq-green's scheduler INFORMs again); if it
        heartbeats on (EventMQ's ignores KBYE), it is taken as connected."""
        self._counters["unknown_scheduler_heartbeats"] += 1
        if client[:1] == b"\0":
            # ZeroMQ's name for an old connection of a scheduler that came
            # back under its name (ROUTER_HANDOVER): the scheduler is the
            # new one; taken as another, its runs were dropped (a probe)
            return
        if client not in self._told_unknown:
            remember(self._told_unknown, client)
            self._log.warning("unknown_scheduler", "router: HEARTBEAT from unknown scheduler "
                              "%s; told to connect anew (KBYE)", printable(client))
            self._sockets.send("frontend", client, Message.new(Command.KBYE))
            return
        if _no_room(self, client):
            return
        self._log.warning("unknown_scheduler", "router: scheduler %s heartbeats on after "
                          "KBYE without an INFORM; taken as connected", printable(client))
        self._register(client)

    def on_kbye(self, client: bytes, message: Message) -> None:
        if message.body[:1] == (KBYE_CONNECTING,):
            return  # not leaving: its INFORM follows (see KBYE_CONNECTING)
        if self.schedulers.pop(client, None) is not None:
            self._log.info("scheduler_kbye", "router: scheduler %s said KBYE", printable(client))
            self._hand_over(None)

    def check(self, now: float) -> None:
        """HEARTBEATs to schedulers; removal of silent ones."""
        s = self.settings
        if s.disable_heartbeats or not self.schedulers:
            return
        if now - self._last_heartbeat >= s.heartbeat_interval:
            self._last_heartbeat = now
            beat = Message.new(Command.HEARTBEAT, f"{time.time():.6f}")
            for identity in list(self.schedulers):
                self._sockets.send("frontend", identity, beat)
        sockets = self._sockets
        if now < self.judge_after or sockets.frontend_paused or sockets.has_unread("frontend"):
            return  # its heartbeats may be waiting there
        for peer in list(self.schedulers.values()):
            silence = now - peer.hb  # (one a hand-over in this loop found gone is gone)
            if silence >= s.heartbeat_timeout and self.schedulers.pop(peer.identity, None):
                logger.warning("router: scheduler %s removed: nothing received for %.1f s",
                               printable(peer.identity), silence)
                self._hand_over(None)

    def say_goodbye(self) -> None:
        """The router stops: KBYE to every scheduler; held messages are lost."""
        if self.held:
            logger.error("router stopping: %d schedule message(s) held for a scheduler "
                         "dropped", len(self.held))
        for identity in list(self.schedulers):
            self._sockets.send("frontend", identity, Message.new(Command.KBYE))
        self.schedulers.clear()

    # ------------------------------------------------------------------
    # schedules

    def on_schedule(self, client: bytes, message: Message) -> None:
        try:
            schedule = parse_schedule(message.body, min_interval=1.0)
            message = message._replace(body=for_any_scheduler(schedule, tuple(message.body)))
        except ProtocolError as exc:
            self._refuse(client, message, "refused_malformed", str(exc))
            return
        if not _admit(self, client, message, schedule.key):
            return
        if not self.schedulers:
            self._hold(client, message)
            return
        now = time.monotonic()
        live = self.live.get(schedule.key)
        base, _, delay_id = schedule.key.partition(":")
        # where it is already (maybe handed over), else by the call's key
        # without a delayed job's own id: every delayed run of one call
        # lives on one scheduler
        owner = live.owner if live is not None and live.owner in self.schedulers else None
        gone = False
        while not self._forward(owner := owner or self._owner(base), message):
            # gone without a KBYE (kill -9): the next one, or held
            self.schedulers.pop(owner, None)
            owner, gone = None, True
            if not self.schedulers:
                self._hold(client, message)
                self._hand_over(None)
                return
        self._cancelled.pop(base, None)
        self._unscheduled.pop(base, None)
        if delay_id and schedule.key not in self.live:
            self._delayed.setdefault(base, []).append(schedule.key)
        self.live[schedule.key] = LiveSchedule(
            tuple(message.body), owner, schedule.interval is None and schedule.eta is None,
            schedule.queue, _ends(schedule, now, time.time()), schedule.run_count, {owner})
        self._book(schedule.key, schedule.name, schedule.queue, schedule.what(), owner)
        if gone:
            self._hand_over(None)
        if len(self.schedulers) > 1:
            # so that no other scheduler keeps (and fires) an older copy
            drop = Message.new(Command.UNSCHEDULE, *message.body)
            for identity in self.schedulers:
                if identity != owner:
                    _to_scheduler(self, identity, drop)

    def on_unschedule(self, client: bytes, message: Message) -> None:
        try:
            key = unschedule_key(message.body)
        except ProtocolError as exc:
            self._refuse(client, message, "refused_malformed", str(exc))
            return
        if not _admit(self, client, message, ""):
            return
        _note(self._unscheduled, key, MAX_UNSCHEDULED, tuple(message.body))
        if not self.schedulers:
            self._hold(client, message)
            return
        lost = False
        for identity in list(self.schedulers):
            if not self._forward(identity, message):
                self.schedulers.pop(identity, None)
                lost = True
        self.counts["unscheduled"] += 1
        self.book.pop(key, None)
        live = self._forget(key)
        if live.cron if live is not None else key in self._cancelled:  # (False: spent)
            _note(self._cancelled, key, MAX_CANCELLED, True)
        if lost:
            self._hand_over(None)

    # ------------------------------------------------------------------
    # hand-over, and what EventMQ's scheduler fires

    def _hand_over(self, arrived: Optional[bytes], skip: frozenset[str] = frozenset()) -> None:
        """Send the schedules held by no connected scheduler to one that is;
        ``arrived`` (a scheduler that just said INFORM) also gets its own
        again: it may have restarted with nothing. ``skip``: keys whose
        SCHEDULE was just forwarded (held ones, released). A scheduler that
        cannot be sent to is taken for gone, and what it held moves too."""
        moved = 0
        while self.live:
            count, gone, rest = _hand_over_once(self, arrived, skip)
            moved += count
            if rest is not None:  # the rest in the next turns: others are served between
                gevent.spawn(_hand_over_rest, self, arrived, rest)
                break
            if not gone:
                break
            arrived = None  # (its own went in the first pass, or it is gone)
        if moved:
            self.counts["handed_over"] += moved
            self._log.warning("handed_over", "router: %d schedule(s) sent (again) to a "
                              "connected scheduler", moved)

    def vet_firing(self, client: bytes, message: Message) -> Optional[Message]:
        """A REQUEST from a scheduler: None to drop it (a cron schedule that
        was unscheduled), else the message, on its schedule's queue."""
        try:
            key = schedule_key(message.body[2])
        except ProtocolError:
            return message
        if self._cancelled.get(key):
            self.counts["firing_dropped"] += 1
            self._log.warning("firing_dropped", "router: scheduler %s fired %s, unscheduled "
                              "(EventMQ's scheduler keeps cron schedules); dropped",
                              printable(client), key[:12])
            return None
        live = self.live.get(key)
        if live is None:
            if key in self._delayed:
                return message if _delayed_fired(self, client, key) else None
            return None if _stale_firing(self, client, key) else message
        if live.owner != client and live.owner in self.schedulers:
            # a stale copy (its scheduler was taken for gone, the schedule
            # handed over): the holder fires it, not this one
            self.counts["firing_dropped_not_holder"] += 1
            self._log.warning("firing_not_holder", "router: scheduler %s fired %s, which "
                              "%s holds; dropped", printable(client), key[:12],
                              printable(live.owner))
            return None
        if live.runs_left > 0:
            live.runs_left -= 1
            if live.runs_left == 0:
                self._forget(key, ended=True)
                if live.cron:  # EventMQ's scheduler fires it on: UNSCHEDULE must know it
                    _note(self._cancelled, key, MAX_CANCELLED, False)
        if live.cron and message.body[0] != live.queue:
            self.counts["firing_requeued"] += 1
            return message._replace(body=(live.queue, *message.body[1:]))
        return message

    def _forget(self, key: str, ended: bool = False) -> Optional[LiveSchedule]:
        """A schedule that is over (unscheduled, or ``ended``: its runs done,
        a delayed job fired): nothing to hand over, and gone from the book."""
        live = self.live.pop(key, None)
        if live is not None and (not ended or len(live.holders) > 1):
            _ended(self, key, live, unscheduled=not ended)
        self.book.pop(key, None)
        base, _, delay_id = key.partition(":")
        if delay_id:
            delayed = self._delayed.get(base)
            if delayed is not None and key in delayed:
                delayed.remove(key)
                if not delayed:
                    del self._delayed[base]
        return live

    def _owner(self, key: str) -> bytes:
        """Rendezvous hashing: the scheduler with the highest hash of
        (identity, key); the same while the same schedulers are connected."""
        return max(self.schedulers,
                   key=lambda ident: hashlib.sha1(ident + key.encode()).digest())

    def _forward(self, identity: bytes, message: Message) -> bool:
        if _to_scheduler(self, identity, message):
            peer = self.schedulers.get(identity)
            if peer is not None:
                peer.forwarded += 1
            if message.command is Command.SCHEDULE:
                self.counts["forwarded"] += 1
            return True
        self._log.error("schedule_lost", "router: %s %s could not be sent to scheduler %s, "
                        "gone; taken for gone", *(printable(x) for x in (
                            message.command.value, message.msgid, identity)))
        self.counts["send_failed"] += 1
        return False

    def _hold(self, client: bytes, message: Message) -> None:
        if len(self.held) >= self.max_held:
            self._refuse(client, message, "refused_full",
                         f"no scheduler connected and {self.max_held} schedule messages "
                         "held already")
            return
        if not self.held:
            logger.warning("router: no scheduler connected; holding %s %s until one comes",
                           message.command.value, printable(message.msgid))
        self.held.append((client, message))
        self.counts["held"] += 1

    def _release_held(self) -> frozenset[str]:
        """Forward what was held; the keys of the SCHEDULEs among it."""
        held, self.held = self.held, collections.deque()
        if held:
            logger.info("router: forwarding %d held schedule message(s)", len(held))
        keys = set()
        for client, message in held:
            if message.command is Command.SCHEDULE:
                self.on_schedule(client, message)
                with contextlib.suppress(ProtocolError):  # (checked before it was held)
                    keys.add(parse_schedule(message.body).key)
            else:
                self.on_unschedule(client, message)
        return frozenset(keys)

    def _refuse(self, client: bytes, message: Message, reason: str, text: str) -> None:
        self.counts[reason] += 1
        self._log.error("schedule_refused", "router: %s %s from %s refused: %s",
                        message.command.value, printable(message.msgid), printable(client),
                        printable(text, 200))
        self._sockets.send("frontend", client, Message.new(
            Command.REPLY, refusal_body("InvalidSchedule", text, reason), message.msgid))

    # ------------------------------------------------------------------
    # the book

    def _book(self, key: str, name: str, queue: str, what: str, owner: bytes) -> None:
        entry = self.book.pop(key, None) or {}
        entry.update(key=key, callable=name, queue=queue, schedule=what,
                     scheduler=printable(owner, 60), scheduled_at=time.time())
        self.book[key] = entry
        while len(self.book) > MAX_BOOK:
            self.book.popitem(last=False)

    def listing(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The schedules known, soonest next run first (at most ``limit``)."""
        rows = list(self.book.values())
        rows.sort(key=lambda r: (r.get("next_run") is None, r.get("next_run") or 0))
        return [dict(r) for r in rows[:limit]]

    def show(self) -> dict[str, Any]:
        """ROUTER_SHOW_SCHEDULERS, in EventMQ's shape."""
        return {"connected_schedulers": {
            printable(ident): {"hb": peer.hb} for ident, peer in self.schedulers.items()}}

    def status(self) -> dict[str, Any]:
        return {
            "schedulers": len(self.schedulers),
            "schedule_messages": dict(self.counts),
            "schedule_messages_held": len(self.held),
            "schedule_messages_waiting": sum(len(p.outbox) for p in self.schedulers.values()),
            "unknown_scheduler_heartbeats": self._counters["unknown_scheduler_heartbeats"],
            "scheduler_informs_refused": self._counters["scheduler_informs_refused"],
            "schedules": self.listing(200),
        }


__all__ = ["MAX_HELD", "LiveSchedule", "SchedulerPeer", "SchedulerSide"]
