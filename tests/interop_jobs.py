"""Jobs the interop tests and the side-by-side benchmark send through the
real router. Imported by module path (``interop_jobs``) in the worker, so
the worker's PYTHONPATH holds this directory.

Each job appends ``EVENT TAG PID TIME`` lines to the file named by
``$EMQ_INTEROP_RECORD``: completion is observed for real, not inferred from
sends. One ``os.write`` on an ``O_APPEND`` descriptor per line keeps lines
whole when many processes or greenlets write at once.
"""

from __future__ import annotations

import os
import time

RECORD_ENV = "EMQ_INTEROP_RECORD"


def _append(event: str, tag: str) -> None:
    line = f"{event} {tag} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def record(tag: str) -> str:
    """Record ``done TAG``; returns the tag (for reply-requested jobs)."""
    _append("done", tag)
    return tag


def sleep_record(tag: str, seconds: float) -> str:
    """IO-bound: record ``start``, ``time.sleep`` (patched by gevent in
    emq-green), record ``done``."""
    _append("start", tag)
    time.sleep(seconds)
    _append("done", tag)
    return tag


def gated_record(tag: str, gate: str, deadline: float = 60.0) -> str:
    """IO-bound and gated on an event, not on a duration: record ``start``,
    wait (``time.sleep``, patched in emq-green) until the file ``gate``
    exists, record ``done``. After ``deadline`` seconds it gives up and
    records ``expired`` instead, so a test that never opens the gate fails
    instead of hanging."""
    _append("start", tag)
    end = time.monotonic() + deadline
    while not os.path.exists(gate):
        if time.monotonic() > end:
            _append("expired", tag)
            raise TimeoutError(f"gate {gate} not opened within {deadline} s")
        time.sleep(0.05)
    _append("done", tag)
    return tag


def delayed_record(tag: str) -> str:
    """Sent with the ``@job`` decorator's ``.delay()`` by the tests."""
    _append("done", tag)
    return tag


def sleep_then_record(tag: str, seconds: float) -> str:
    """The benchmark's IO-bound job: ``time.sleep``, then record ``done``."""
    time.sleep(seconds)
    _append("done", tag)
    return tag


def record_then_die(tag: str) -> None:
    """Record ``start``, then end the worker's whole process at once
    (``os._exit``): a job that kills every worker it runs on."""
    _append("start", tag)
    os._exit(3)
