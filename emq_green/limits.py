"""What one peer's message may cost us: the limits on what peers send, and
one rate limiter for the log lines their messages cause.

The limits are constants, not settings: they bound what a stranger can make
the router or the worker hold or compute per message, and no legitimate
peer comes near them (docs/security.md says what each protects).

:class:`LogLimiter` is the one way a message-driven warning is logged: the
first :attr:`~LogLimiter.burst` lines of each window go out one by one, the
rest are counted by kind and summed up in one line when the window ends
(:meth:`LogLimiter.flush`, called by a periodic tick, or by the next line).
So 6,000 malformed messages make at most ``burst`` + 1 lines per window,
while STATUS (or the worker's counters) still counts every one.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Optional, Sequence

#: bytes of a message id; a longer one is refused (router and worker) and
#: never held. EventMQ's ids are uuid4 text (36 bytes).
MAX_MSGID_BYTES = 128
#: ``[weight, name]`` pairs one INFORM may list; more: the INFORM is refused
MAX_INFORM_QUEUES = 256
#: bytes (UTF-8) of one queue name in an INFORM; longer: the INFORM is refused
MAX_QUEUE_NAME_BYTES = 256
#: a queue's weight is an integer of at most this size, either sign (a
#: probe's 1e308 was kept as a 309-digit number, which the dashboard's
#: JavaScript reads as Infinity); larger: the INFORM is refused
MAX_QUEUE_WEIGHT = 10**9
#: characters of an INFORM's queue text, checked before it is parsed: the
#: longest valid list (every name at its longest, JSON-escaped, plus weights)
#: is far below this, and a longer text is refused without reading it
MAX_INFORM_TEXT = MAX_INFORM_QUEUES * (6 * MAX_QUEUE_NAME_BYTES + 32)
#: characters of a frame a log line or an error text shows
PREVIEW = 40

#: lines logged one by one per window; the rest are counted
LOG_BURST = 100
#: seconds of one window
LOG_WINDOW = 10.0


def msgid_too_long(msgid: str) -> bool:
    """Whether a message id is over :data:`MAX_MSGID_BYTES` (UTF-8). O(1)
    for ASCII text (``isascii`` is a flag of the string in CPython)."""
    n = len(msgid)
    return n > MAX_MSGID_BYTES or (
        n > MAX_MSGID_BYTES // 4 and not msgid.isascii()
        and len(msgid.encode("utf-8", "surrogatepass")) > MAX_MSGID_BYTES)


def frames_preview(frames: Sequence[bytes], count: int = 4) -> str:
    """A message for an error text: its frame count and a short prefix of
    its first frames, never the whole of any frame."""
    shown = " ".join(repr(bytes(f[:PREVIEW])) + ("..." if len(f) > PREVIEW else "")
                     for f in frames[:count])
    more = " ..." if len(frames) > count else ""
    return f"{len(frames)} frame(s): {shown}{more}"


class LogLimiter:
    """At most :attr:`burst` lines per :attr:`window` seconds through one
    logger; the rest are counted by ``kind`` and logged as one summary line
    when the window ends.

    ``summary`` is the summary's format, given the count and the counts by
    kind (a dict).
    """

    def __init__(self, logger: logging.Logger, *, burst: int = LOG_BURST,
                 window: float = LOG_WINDOW,
                 summary: str = "%d more warning(s) not logged one by one: %s") -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.summary = summary
        self._window_start = 0.0
        self._logged = 0
        self._unlogged: collections.Counter[str] = collections.Counter()

    def log(self, level: int, kind: str, msg: str, *args: object,
            via: Optional[logging.Logger] = None, stacklevel: int = 2,
            exc_info: bool = False) -> bool:
        """Log ``msg % args`` (through ``via``, else the limiter's logger) if
        the window has room, else count it under ``kind``; True when it was
        logged. The arguments are formatted only when the line is logged;
        the record names the caller's line; ``exc_info``: with the
        traceback of the exception being handled."""
        now = time.monotonic()
        if now - self._window_start >= self.window:
            self.flush(now)
        if self._logged < self.burst:
            self._logged += 1
            (via or self.logger).log(level, msg, *args, stacklevel=stacklevel,
                                     exc_info=exc_info)
            return True
        self._unlogged[kind] += 1
        return False

    def warning(self, kind: str, msg: str, *args: object,
                via: Optional[logging.Logger] = None) -> bool:
        return self.log(logging.WARNING, kind, msg, *args, via=via, stacklevel=3)

    def error(self, kind: str, msg: str, *args: object,
              via: Optional[logging.Logger] = None) -> bool:
        return self.log(logging.ERROR, kind, msg, *args, via=via, stacklevel=3)

    def info(self, kind: str, msg: str, *args: object,
             via: Optional[logging.Logger] = None) -> bool:
        return self.log(logging.INFO, kind, msg, *args, via=via, stacklevel=3)

    def flush(self, now: Optional[float] = None) -> None:
        """Past the window: log the summary of what was not logged, start a
        new window. Cheap when there is nothing to do (call it often)."""
        now = time.monotonic() if now is None else now
        if now - self._window_start < self.window:
            return
        if self._unlogged:
            self.logger.warning(self.summary, sum(self._unlogged.values()),
                                dict(self._unlogged))
            self._unlogged.clear()
        self._window_start = now
        self._logged = 0

    def reset(self) -> None:
        """A new window, nothing counted (tests: each starts with a full burst)."""
        self._window_start = 0.0
        self._logged = 0
        self._unlogged.clear()

    @property
    def pending(self) -> int:
        """Lines counted and not summed up yet."""
        return sum(self._unlogged.values())


#: the worker process's limiter, for every line a REQUEST from the router can
#: cause (malformed, invalid, refused, not found); flushed by the worker's
#: heartbeat loop. Subprocess children have their own (one per process).
worker_log = LogLimiter(logging.getLogger("emq_green.worker"),
                        summary="%d more warning(s) caused by REQUESTs, not logged one by "
                                "one: %s")


__all__ = ["LOG_BURST", "LOG_WINDOW", "MAX_INFORM_QUEUES", "MAX_INFORM_TEXT",
           "MAX_MSGID_BYTES", "MAX_QUEUE_NAME_BYTES", "MAX_QUEUE_WEIGHT", "PREVIEW", "LogLimiter",
           "frames_preview", "msgid_too_long", "worker_log"]
