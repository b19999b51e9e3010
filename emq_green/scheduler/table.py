"""The scheduler's table: what fires when. No sockets, no files, no clock of
its own: every call takes ``now`` (seconds since the epoch), so tests drive
it with any time they like.

When a schedule fires next, and why:

* **interval**: on a fixed grid, ``anchor + n * interval``, where the
  anchor is when the SCHEDULE arrived. A firing never moves the grid, so a
  schedule does not drift however late one firing is; a firing that comes
  after several ticks were missed (the scheduler was down, or the process
  stalled) fires once and goes on at the next tick of the grid, it does not
  catch up tick by tick (when that run is sent less than half a period
  before the next tick, it stands for that tick too).
* **cron**: the first time the cron text names after the later of now and
  the time that was due (croniter, UTC), so a missed cron time fires once
  (and, sent less than half a period before the next time, stands for it
  too, as with intervals).
* **eta** (a delayed job, ``eta:EPOCH``): once at that time.
* **haste**: without ``nohaste`` a new schedule fires at once as well (as
  EventMQ's scheduler does), and that run counts in ``run_count``.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..schedules import FOREVER, Schedule, next_cron


@dataclass
class Entry:
    """One schedule and its state."""

    schedule: Schedule
    #: interval schedules: the grid's origin
    anchor: float
    #: when it fires next (epoch seconds)
    next_at: float
    #: runs still to come; FOREVER (-1): no end
    runs_left: int
    runs: int = 0
    last_at: Optional[float] = None
    #: lateness of the last firing (s): when it was sent minus when it was due
    last_lateness: float = 0.0
    #: a guaranteed last run fired and never acknowledged goes out again
    #: under this msgid (the router confirms one it holds or ran already)
    refire_msgid: str = field(default="", repr=False)
    _seq: int = field(default=0, repr=False)

    @property
    def key(self) -> str:
        return self.schedule.key

    def row(self) -> dict[str, Any]:
        """The listing's row (STATUS, the dashboard)."""
        s = self.schedule
        return {"key": s.key, "callable": s.name, "queue": s.queue, "schedule": s.what(),
                "next_run": round(self.next_at, 3),
                "last_run": None if self.last_at is None else round(self.last_at, 3),
                "runs": self.runs, "runs_left": self.runs_left}


class ScheduleTable:
    """Schedules by key, and a heap of next times to find the due ones."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, schedule: Schedule, now: float) -> tuple[Entry, bool]:
        """Take a new schedule (replacing one of the same key); returns the
        entry and whether it fires at once (haste)."""
        haste = not schedule.nohaste and schedule.eta is None
        if schedule.eta is not None:
            first = schedule.eta
        elif schedule.interval is not None:
            first = now + schedule.interval
        else:
            first = next_cron(schedule.cron, now)
        entry = Entry(schedule, anchor=now, next_at=first, runs_left=schedule.run_count)
        self.put(entry)
        return entry, haste

    def put(self, entry: Entry) -> None:
        """Keep ``entry`` (a new one, or one restored from the store)."""
        self.entries[entry.key] = entry
        self._push(entry)

    def _push(self, entry: Entry) -> None:
        self._seq += 1
        entry._seq = self._seq
        heapq.heappush(self._heap, (entry.next_at, self._seq, entry.key))

    def remove(self, key: str) -> Optional[Entry]:
        """Forget a schedule, interval or cron alike (its heap item goes stale)."""
        return self.entries.pop(key, None)

    def next_due(self) -> Optional[float]:
        """When the soonest schedule fires, or None with none."""
        heap = self._heap
        while heap:
            at, seq, key = heap[0]
            entry = self.entries.get(key)
            if entry is not None and entry._seq == seq:
                return at
            heapq.heappop(heap)  # stale: removed or moved
        return None

    def due(self, now: float) -> list[Entry]:
        """The schedules whose time has come, soonest first (each once)."""
        found = []
        while True:
            at = self.next_due()
            if at is None or at > now:
                return found
            _at, _seq, key = heapq.heappop(self._heap)
            found.append(self.entries[key])

    def fired(self, entry: Entry, now: float, due: Optional[float] = None) -> bool:
        """Count a run of ``entry`` sent at ``now`` for the time ``due``
        (None: a haste run) and set its next time; False when that was its
        last run (it is then removed)."""
        entry.runs += 1
        entry.last_at = now
        if due is not None:
            entry.last_lateness = now - due
        if entry.runs_left != FOREVER:
            entry.runs_left -= 1
            if entry.runs_left <= 0:
                self.remove(entry.key)
                return False
        if due is not None:  # a haste run leaves the next time as it is
            entry.next_at = self.following(entry, now)
        if self.entries.get(entry.key) is entry:
            self._push(entry)
        return True

    @staticmethod
    def following(entry: Entry, now: float) -> float:
        """The next time after ``now`` (and after the time that was due)."""
        s = entry.schedule
        if s.interval is not None and s.eta is None:
            ticks = math.floor((now - entry.anchor) / s.interval) + 1
            at = entry.anchor + ticks * s.interval
            while at <= entry.next_at:  # rounding: never the same tick twice
                at += s.interval
            if at - now < s.interval / 2 <= now - entry.next_at:
                # a run half a period late or more (missed ticks), sent in the
                # second half of a period: it stands for the tick just after
                # it too, not two runs a moment apart
                at += s.interval
            return at
        if s.cron:
            at = next_cron(s.cron, max(now, entry.next_at))
            late = now - entry.next_at
            # (the first test spares an on-time firing the second cron search)
            if at - now < late and late >= (next_cron(s.cron, at) - at) / 2 > at - now:
                # the same rule for missed cron times, by the period after it
                at = next_cron(s.cron, at)
            return at
        return now  # an eta one-shot has no next time; it ends after one run

    def clock_stepped_back(self, step: float, now: float) -> None:
        """The wall clock went back ``step`` seconds (negative): interval
        schedules keep their pace in elapsed time (their times move back
        with the clock, or they would stall for the step's length); cron ones
        take their next time from the clock now; one-shots at an eta keep it
        (an absolute time)."""
        for entry in self.entries.values():
            s = entry.schedule
            if s.eta is not None:
                continue
            if s.interval is not None:
                entry.anchor += step
                entry.next_at += step
            elif s.cron:
                entry.next_at = next_cron(s.cron, now)
        self._heap = []
        for entry in self.entries.values():
            self._push(entry)

    def soonest(self, limit: int) -> list[Entry]:
        """At most ``limit`` entries, the soonest first (the listing)."""
        return heapq.nsmallest(limit, self.entries.values(), key=lambda e: e.next_at)


__all__ = ["Entry", "ScheduleTable"]
