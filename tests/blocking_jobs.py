"""Jobs that hold the event loop, the way legacy code does.

``real_sleep`` is the unpatched ``time.sleep`` even in a monkeypatched
process: it stands for a C driver waiting on its own socket.
"""

from __future__ import annotations

import os
import time

import gevent
from gevent import monkey

real_sleep = monkey.get_original("time", "sleep")


def block_unpatched(seconds):
    """A blocking call gevent cannot see (like a C database driver)."""
    real_sleep(seconds)
    return seconds


def block_holding_the_gil(seconds):
    """One C call that keeps the GIL while it computes (``sum`` over a
    range never lets another thread in), as a regular expression that
    backtracks does: gevent's monitor thread cannot run meanwhile either.
    Then a little Python work, as a job does with what the call returned
    (so the job is still running when the monitor thread runs again)."""
    per_item = float("inf")
    for _ in range(3):  # the fastest of three: a slow one would make the call short
        started = time.perf_counter()
        sum(range(200_000))
        per_item = min(per_item, (time.perf_counter() - started) / 200_000)
    sum(range(int(1.5 * seconds / per_item)))
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline:
        pass
    return seconds


def cpu_loop(seconds):
    """A forgotten CPU loop: never yields."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return n


def block_in_child(seconds):
    """Blocks in a greenlet the job spawned: still the job's fault."""
    return gevent.spawn(block_unpatched, seconds).get()


def nap(seconds):
    gevent.sleep(seconds)
    return seconds


def block_and_pid(seconds):
    """Blocks, then says which process ran it."""
    real_sleep(seconds)
    return os.getpid()


def block_timed(seconds):
    """Blocks like :func:`block_unpatched`; returns when the block began and
    ended (``time.time()``, the clock heartbeats carry)."""
    started = time.time()
    real_sleep(seconds)
    return [started, time.time()]


def spin_yielding(seconds):
    """Compute for ``seconds``, yielding to the loop every 2 ms: busy, but
    never holding the loop."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        burst = time.monotonic() + 0.002
        while time.monotonic() < burst:
            pass
        gevent.sleep(0)
    return seconds


def block_in_bursts(seconds, burst):
    """Hold the loop ``burst`` s at a time, yielding between, for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        real_sleep(burst)
        gevent.sleep(0)
    return seconds


def sleep_then_hold_the_gil(sleep_for, hold_for):
    """A C call that releases the GIL (a driver waiting), then one that
    holds it (a regular expression backtracking): the heartbeat thread can
    send only during the first. Returns when the whole began and ended."""
    started = time.time()
    real_sleep(sleep_for)
    block_holding_the_gil(hold_for)
    return [started, time.time()]


def nap_then_block(nap_for, block_for):
    """Wait cooperatively, then hold the loop (a C call gevent cannot see)."""
    gevent.sleep(nap_for)
    real_sleep(block_for)
    return block_for
