"""SCHEDULE and UNSCHEDULE bodies, as EventMQ 0.3.13's client sends them.

A SCHEDULE's body is ``[queue, headers_csv, interval_secs, payload_json,
cron]``: ``interval_secs`` is ``-1`` when ``cron`` is used. Headers the
scheduler reads: ``run_count:N`` (fire N times, then forget; none: for
ever) and ``nohaste`` (do not fire at once when the schedule arrives).
emq-green adds three, which EventMQ's scheduler ignores: ``eta:EPOCH`` (a
one-shot's exact time, in seconds since the epoch), ``delay-id:ID`` (a
delayed job's own key, so that two delayed runs of the same call do not
replace each other) and ``handed-over`` (the router sends a schedule on to
another scheduler, or back to its own after a restart, with ``run_count``
set to the runs it has not seen yet: :func:`handed_over`).

A schedule is keyed as EventMQ keys it: the SHA-1 of the job's ``path``,
``callable``, ``args``, ``kwargs``, ``class_args`` and ``class_kwargs``
(sorted JSON, not the queue), so a second SCHEDULE of the same call replaces
the first and an UNSCHEDULE of it finds it. :func:`parse_schedule` checks
everything a scheduler needs (shape, interval, cron text, payload, size) so
that a bad SCHEDULE is refused with a reason instead of stopping anything
(EventMQ's scheduler dies on a bad cron text).

Shared by the router (which checks and routes), the scheduler (which
fires) and the client (which builds them); it knows no sockets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .protocol import ProtocolError, RunRequest, printable

#: the most runs a ``run_count`` may ask for (a probe's 10**30 overflowed
#: the scheduler's SQLite INTEGER: the schedule was never saved)
MAX_RUN_COUNT = 10**12
#: run_count of a schedule that fires for ever
FOREVER = -1
#: the largest SCHEDULE (all body frames) a router or scheduler takes
MAX_SCHEDULE_BYTES = 64 * 1024
#: the longest interval accepted (ten years), and the shortest
MAX_INTERVAL = 10 * 365 * 86400.0
MIN_INTERVAL = 0.01
#: what EventMQ's scheduler hashes besides path and callable (it needs all four)
_CALL_KEYS = ("args", "kwargs", "class_args", "class_kwargs")
#: headers only the scheduler reads: never passed on to the REQUEST it sends
_SCHEDULER_HEADERS = ("run_count:", "nohaste", "eta:", "delay-id:", "handed-over")
#: the header of a schedule the router hands over (:func:`handed_over`)
HANDED_OVER = "handed-over"
#: the body of the KBYE a scheduler sends just before its INFORM (for
#: EventMQ's router, which lists a name again at each INFORM): emq-green's
#: router ignores it, so that the scheduler keeps what it holds
KBYE_CONNECTING = "connecting"
#: headers of a schedule that must not reach the REQUEST it fires
_DROPPED_ON_FIRE = ("result-requested", "reply-requested")


def schedule_key(payload_json: str) -> str:
    """EventMQ's key of a schedule: SHA-1 of the call's sorted JSON.

    Raises:
        ProtocolError: the payload is not a ``["run", {...}]`` object.
    """
    try:
        payload = json.loads(payload_json)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"payload is not JSON: {printable(exc, 80)}") from None
    if type(payload) is not list or len(payload) != 2 or type(payload[1]) is not dict:
        raise ProtocolError('payload must be ["run", {options}]')
    opts = payload[1]
    items = {name: opts.get(name, default) for name, default in (
        ("args", []), ("kwargs", {}), ("class_args", []), ("class_kwargs", {}),
        ("path", None), ("callable", None))}
    text = json.dumps(items, sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def header_value(headers_csv: str, name: str) -> Optional[str]:
    """The value of ``name:VALUE`` in a header text, or None."""
    prefix = name + ":"
    for item in headers_csv.split(","):
        item = item.strip()
        if item.startswith(prefix):
            return item[len(prefix):]
    return None


def has_header(headers_csv: str, name: str) -> bool:
    return any(h.strip() == name for h in headers_csv.split(","))


@dataclass(frozen=True)
class Schedule:
    """One SCHEDULE, checked. ``interval`` is None for a cron schedule."""

    key: str
    queue: str
    headers: str
    interval: Optional[float]
    payload: str
    cron: str
    run_count: int
    nohaste: bool
    eta: Optional[float]
    #: ``path.callable``, for logs, listings and the allowlist
    name: str

    def body(self) -> tuple[str, str, str, str, str]:
        """The SCHEDULE body again (what is stored and forwarded)."""
        interval = "-1" if self.interval is None else f"{self.interval:.17g}"
        return (self.queue, self.headers, interval, self.payload, self.cron)

    def request_headers(self) -> str:
        """Headers for the REQUEST a firing sends: the schedule's, without
        the scheduler's own, plus ``reply-requested`` (as EventMQ's
        scheduler asks for)."""
        kept = [h.strip() for h in self.headers.split(",")
                if h.strip() and not h.strip().startswith(_SCHEDULER_HEADERS)
                and h.strip() not in _DROPPED_ON_FIRE]
        return ",".join([*kept, "reply-requested"])

    @property
    def guaranteed(self) -> bool:
        return has_header(self.headers, "guarantee")

    @property
    def handed_over(self) -> bool:
        """Sent by the router from its book (:func:`handed_over`), not by a client."""
        return has_header(self.headers, HANDED_OVER)

    def core(self) -> tuple[str, str, str, str, str]:
        """:meth:`body` without ``run_count``, ``handed-over`` and ``nohaste``:
        the same schedule, whatever count of runs is left; and without a
        delayed job's interval (its ``eta`` says when; a hand-over sends the
        seconds left: :func:`handed_over`)."""
        queue, headers, interval, payload, cron = self.body()
        return (queue, _without_count(headers), "" if self.eta is not None else interval,
                payload, cron)

    def what(self) -> str:
        """``every 60s`` / ``cron */5 * * * *`` / ``at ...``, for listings."""
        if self.eta is not None:
            return f"once at {self.eta:.3f}"
        if self.interval is None:
            return f"cron {self.cron}"
        interval = self.interval
        return f"every {int(interval) if interval.is_integer() else interval}s"


def _without_count(headers: str) -> str:
    """The headers without what is not the schedule itself: ``run_count``,
    ``handed-over`` and ``nohaste`` (what its first arrival does)."""
    return ",".join(h.strip() for h in headers.split(",")
                    if h.strip() and not h.strip().startswith("run_count:")
                    and h.strip() not in (HANDED_OVER, "nohaste"))


def handed_over(body: Sequence[str], runs_left: int) -> tuple[str, ...]:
    """A SCHEDULE body as the router hands it over: ``run_count`` set to
    ``runs_left`` (the runs it has not seen fired; none for ever) and the
    ``handed-over`` header, so that a scheduler restored from its own file
    keeps its state and one that ended the schedule does not start it again;
    and ``nohaste``: the schedule fired its first run when it was made, and
    EventMQ's scheduler, which knows no ``handed-over``, would fire it again
    at once (an extra run of a cron schedule in the middle of its minute).
    A delayed job's interval becomes the whole seconds left until its
    ``eta``: EventMQ's scheduler reads no ``eta`` and would wait the whole
    delay again from the hand-over (a probe: 25 s due, run at 33 s)."""
    queue, headers, interval, *rest = body
    core = _without_count(headers)
    kept = [core] if core else []
    kept.append("nohaste")
    if runs_left != FOREVER:
        kept.append(f"run_count:{runs_left}")
    eta = header_value(headers, "eta")
    if eta is not None:
        with contextlib.suppress(ValueError, OverflowError):
            interval = str(max(1, math.ceil(float(eta) - time.time())))
    return (queue, ",".join([*kept, HANDED_OVER]), interval, *rest)


def unschedule_key(body: Sequence[str]) -> str:
    """The key an UNSCHEDULE names (its payload frame, the fourth).

    Raises:
        ProtocolError: not five body frames, or a payload without a call.
    """
    if len(body) != 5:
        raise ProtocolError(f"UNSCHEDULE has {len(body)} body frames, expected 5")
    key = schedule_key(body[3])
    delay_id = header_value(body[1], "delay-id")
    return f"{key}:{delay_id}" if delay_id else key


def parse_schedule(body: Sequence[str], min_interval: float = MIN_INTERVAL) -> Schedule:
    """Check a SCHEDULE body; :class:`ProtocolError` names what is wrong.
    ``min_interval``: the shortest interval taken (the router's is 1 s, as
    EventMQ's scheduler reads whole seconds).

    Refused: not five frames; over :data:`MAX_SCHEDULE_BYTES`; an interval
    that is not a number, negative (other than ``-1`` with a cron text) or
    out of range; a cron text croniter cannot read; a payload that is not a
    ``["run", {...}]`` call; a bad ``run_count`` or ``eta``.
    """
    if len(body) != 5:
        raise ProtocolError(f"SCHEDULE has {len(body)} body frames, expected 5")
    size = sum(len(part) for part in body)
    if size > MAX_SCHEDULE_BYTES:
        raise ProtocolError(f"SCHEDULE of {size} bytes; at most {MAX_SCHEDULE_BYTES}")
    queue, headers, interval_text, payload, cron = body
    if not queue:
        raise ProtocolError("empty queue name")
    run = RunRequest.parse(payload)  # ProtocolError when not a call
    missing = [name for name in _CALL_KEYS if f'"{name}"' not in payload]
    if missing and any(name not in json.loads(payload)[1] for name in missing):
        # EventMQ's scheduler dies on a KeyError when one is missing
        raise ProtocolError("the payload's options need args, kwargs, class_args and "
                            "class_kwargs (EventMQ's scheduler keys a schedule by them)")
    key = schedule_key(payload)
    delay_id = header_value(headers, "delay-id")
    if delay_id:
        key = f"{key}:{delay_id}"
    run_count = _run_count(headers)
    eta = _eta(headers)
    try:
        interval: Optional[float] = float(interval_text)
    except ValueError:
        raise ProtocolError(f"interval {printable(interval_text, 40)} is not a number") from None
    cron = cron.strip()
    if interval == -1 and eta is None:
        if not cron:
            raise ProtocolError("interval -1 needs a cron text")
        if not _croniter().is_valid(cron):
            raise ProtocolError(f"cron text {printable(cron, 80)} is not valid")
        try:  # valid, yet naming no time (31 February) fails only here
            next_cron(cron, time.time())
        except Exception as exc:  # croniter's errors have no common base
            raise ProtocolError(f"cron text {printable(cron, 80)} names no time: "
                                f"{printable(exc, 80)}") from None
        interval = None
    elif interval == -1:
        if cron:  # (it ran once at its eta, the cron text silently ignored)
            raise ProtocolError("both an eta (a one-shot) and a cron text")
        interval = None  # a one-shot at its eta
    elif not (math.isfinite(interval) and min_interval <= interval <= MAX_INTERVAL):
        raise ProtocolError(f"interval {printable(interval_text, 40)} must be {min_interval:g} "
                            f"to {MAX_INTERVAL:g} seconds (or -1 with a cron text)")
    elif cron:
        raise ProtocolError("both an interval and a cron text")
    return Schedule(key=key, queue=queue, headers=headers, interval=interval,
                    payload=payload, cron=cron, run_count=run_count,
                    nohaste=has_header(headers, "nohaste"), eta=eta, name=run.name)


def _run_count(headers: str) -> int:
    text = header_value(headers, "run_count")
    if text is None:
        return FOREVER
    try:
        count = int(text)
    except ValueError:
        raise ProtocolError(f"run_count {printable(text, 40)} is not a whole number") from None
    if (count < 1 and count != FOREVER) or count > MAX_RUN_COUNT:
        raise ProtocolError(f"run_count {printable(str(count), 40)} must be 1 to "
                            f"{MAX_RUN_COUNT:,} (or -1: for ever)")
    return count


def _eta(headers: str) -> Optional[float]:
    text = header_value(headers, "eta")
    if text is None:
        return None
    try:
        eta = float(text)
    except ValueError:
        raise ProtocolError(f"eta {printable(text, 40)} is not a number") from None
    if not math.isfinite(eta) or eta < 0:
        raise ProtocolError(f"eta {printable(text, 40)} is not a time")
    if eta > time.time() + MAX_INTERVAL:  # (it would never run; handed over, refused)
        raise ProtocolError(f"eta {printable(text, 40)} is more than {MAX_INTERVAL:g} s "
                            "(ten years) ahead")
    return eta


def next_cron(cron: str, after: float) -> float:
    """The first time after ``after`` (epoch seconds) that ``cron`` names (UTC)."""
    return float(_croniter()(cron, after).get_next(float))


def _croniter() -> Any:
    # Imported when a cron text is first read, not with the client: importing
    # croniter asks platform.architecture(), which runs a subprocess, and a
    # client first imported in a gevent threadpool thread failed there
    # ("child watchers are only available on the default loop").
    from croniter import croniter

    return croniter


def schedule_body(*, queue: str, headers: Sequence[str], payload: dict[str, Any],
                  interval: Optional[float] = None, cron: str = "") -> tuple[str, ...]:
    """A SCHEDULE / UNSCHEDULE body as EventMQ's client builds it: the
    interval as a whole number of seconds (EventMQ's scheduler reads it
    with ``int()``), ``-1`` with a cron text."""
    interval_text = "-1" if interval is None else str(max(1, math.ceil(interval)))
    return (queue, ",".join(headers), interval_text, json.dumps(["run", payload]), cron)


__all__ = ["FOREVER", "HANDED_OVER", "KBYE_CONNECTING", "MAX_INTERVAL", "MAX_SCHEDULE_BYTES",
           "Schedule", "handed_over", "header_value", "has_header", "next_cron", "parse_schedule",
           "schedule_body", "schedule_key", "unschedule_key"]
