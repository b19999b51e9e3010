"""Periodic and delayed jobs from the client: SCHEDULE and UNSCHEDULE as
EventMQ 0.3.13's client sends them, so they work with EventMQ's
``emq-scheduler`` as with ``emq-green-scheduler``.

* :func:`~emq_green.client.api.schedule` (every N seconds, or a cron text)
  and :func:`~emq_green.client.api.unschedule` (in ``api.py``, built here):
  EventMQ's ``schedule(..., interval_secs=, cron=)`` and
  ``schedule(..., unschedule=True)``. A schedule is keyed by the call
  (path, callable, arguments), not by the queue: scheduling the same call
  again replaces it.
* A delayed job (``defer_job(..., delay=seconds)`` or ``eta=datetime``,
  ``@job`` functions' ``.delay_for(seconds, ...)``) is a one-shot SCHEDULE:
  ``run_count:1`` and ``nohaste``, the delay as whole seconds (EventMQ's
  scheduler reads it with ``int()``), plus two headers EventMQ's scheduler
  ignores: ``eta:EPOCH`` (the exact time, for emq-green's scheduler) and
  ``delay-id:ID``, so that two delayed runs of the same call are two
  schedules. With EventMQ's scheduler they are one (its key is the call):
  the later replaces the earlier.

Nothing comes back for a SCHEDULE (EventMQ's router sends nothing; emq-green's
answers only a refusal, which is logged here when it is read).
"""

from __future__ import annotations

import datetime
import math
import time
import uuid
from typing import Any, Optional, Sequence, Union

from ..protocol import Command, Message, RunRequest, check_job_options
from ..schedules import MAX_INTERVAL, MAX_RUN_COUNT, parse_schedule, schedule_body

#: a time: seconds since the epoch, or a datetime (naive: local time)
When = Union[float, datetime.datetime]


def send_schedule(client: Any, command: Command, body: Sequence[str]) -> str:
    """Send a SCHEDULE or UNSCHEDULE on one of ``client``'s sockets (a
    :class:`~emq_green.client.api.Client`); returns its msgid.

    Raises:
        ValueError: a SCHEDULE a scheduler would refuse (ProtocolError).
    """
    if command is Command.SCHEDULE:
        parse_schedule(body)
    message = Message.new(command, *body)
    sock = client._take()
    try:
        client._send_message(sock, message)
    except BaseException:
        sock.close()
        raise
    client._give_back(sock)
    return message.msgid


def call_payload(run: RunRequest) -> dict[str, Any]:
    """The ``{...}`` of ``["run", {...}]`` with every key EventMQ's scheduler hashes."""
    return {"callable": run.callable, "path": run.path, "args": list(run.args),
            "kwargs": dict(run.kwargs), "class_args": list(run.class_args),
            "class_kwargs": dict(run.class_kwargs)}


def job_headers(guarantee: bool, retry_count: int, timeout: float) -> list[str]:
    check_job_options(retry_count, timeout)
    headers = ["guarantee"] if guarantee else []
    if retry_count:
        headers.append(f"retry-count:{retry_count}")
    if timeout:
        headers.append(f"timeout:{timeout:g}")
    return headers


def periodic_body(run: RunRequest, *, every: Optional[float], cron: Optional[str],
                  queue: Optional[str], run_count: Optional[int], nohaste: bool,
                  guarantee: bool, retry_count: int, timeout: float) -> tuple[str, ...]:
    """A SCHEDULE body for every ``every`` seconds or the times of ``cron``."""
    if (every is None) == (cron is None):
        raise ValueError("give one of every (seconds) or cron: " + (
            "both were given" if every is not None else "neither was given"))
    if cron is not None and not isinstance(cron, str):
        raise TypeError(f"cron must be a str, not {type(cron).__name__}")
    if run_count is not None and (isinstance(run_count, bool) or not isinstance(run_count, int)
                                  or not 1 <= run_count <= MAX_RUN_COUNT):
        # (a probe: "5" went into the header as it was; 10**30 overflowed the
        # scheduler's SQLite file, and the client was told nothing)
        raise ValueError(f"run_count must be a whole number from 1 to {MAX_RUN_COUNT:,}, "
                         f"not {run_count!r}")
    check_job_options(retry_count, timeout, queue)
    if every is not None and not isinstance(every, (int, float)):
        raise TypeError(f"every must be a number of seconds, not {type(every).__name__}")
    if every is not None and (isinstance(every, bool) or not (
            1 <= every <= MAX_INTERVAL and float(every).is_integer())):
        raise ValueError(f"every must be a whole number of seconds, 1 to {MAX_INTERVAL:.0f} "
                         f"(ten years; EventMQ's scheduler reads it as an int); got {every!r}")
    headers = job_headers(guarantee, retry_count, timeout)
    if run_count is not None:
        headers.append(f"run_count:{run_count}")
    if nohaste:
        headers.append("nohaste")
    return schedule_body(queue=queue or "default", headers=headers,
                         payload=call_payload(run), interval=every, cron=cron or "")


def finite_seconds(what: str, value: Any, *, text: bool = False) -> float:
    """``value`` as a finite number of seconds, at least 0 (ValueError otherwise).

    A string is refused unless ``text`` (a command line's argument): an API
    caller's ``delay="5"`` is a mistake ``float()`` would hide."""
    try:
        seconds = math.nan if isinstance(value, (str, bytes)) and not text else float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (0 <= seconds < math.inf):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    return seconds


def defer_later(client: Any, run: RunRequest, *, delay: Optional[float] = None,
                eta: Optional[When] = None, queue: Optional[str] = None,
                result: bool = False, guarantee: bool = False, retry_count: int = 0,
                timeout: float = 0) -> str:
    """Run the call once, ``delay`` seconds from now or at ``eta``.

    With ``guarantee`` the scheduler keeps it on disk until the router has
    accepted the job it fires (emq-green's scheduler with ``scheduler_file``):
    it survives a scheduler restart. Returns the SCHEDULE's msgid.

    Raises:
        ValueError: both or neither of ``delay`` and ``eta``; a ``delay``
            that is not a finite number of seconds >= 0, an ``eta`` that is
            not a time (epoch seconds >= 0, or a datetime); ``result``: the
            scheduler fires the job later, and nobody is there to take its
            result.
    """
    if (delay is None) == (eta is None):
        raise ValueError("give one of delay (seconds) or eta: " + (
            "both were given" if delay is not None else "neither was given"))
    check_job_options(retry_count, timeout, queue)
    if result:
        raise ValueError("a delayed job (delay or eta) cannot return a result: a scheduler "
                         "sends it later, and no result comes back; drop result=True")
    now = time.time()
    if eta is not None:
        at = finite_seconds("eta (epoch seconds)",
                      eta.timestamp() if isinstance(eta, datetime.datetime) else eta)
    else:
        at = now + finite_seconds("delay", delay)
    if at - now > MAX_INTERVAL:
        raise ValueError(f"a delayed job runs at most ten years ({MAX_INTERVAL:.0f} s) from "
                         f"now; got {'eta' if eta is not None else 'delay'} {at - now:.0f} s "
                         "ahead")
    headers = [*job_headers(guarantee, retry_count, timeout), "run_count:1", "nohaste",
               f"eta:{at:.6f}", f"delay-id:{uuid.uuid4().hex}"]
    body = schedule_body(queue=queue or "default", headers=headers,
                         payload=call_payload(run), interval=max(1.0, at - now))
    msgid = send_schedule(client, Command.SCHEDULE, body)
    client.sent += 1
    return msgid


__all__ = ["When", "call_payload", "defer_later", "finite_seconds", "job_headers",
           "periodic_body", "send_schedule"]
