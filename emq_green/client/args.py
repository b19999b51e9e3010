"""Checks of the numbers a caller passes to the client (timeouts, sizes,
counts): a wrong type or value raises at the call, naming the argument,
instead of failing deep inside ZeroMQ or gevent (``Client(hwm="x")``), or
meaning something else than asked (``get(timeout=-1)`` waited no time at
all and said the result had not come)."""

from __future__ import annotations

from typing import Any

#: the most seconds a wait may last: ZeroMQ's and gevent's waits take
#: milliseconds as a C int (a probe: ``confirm_timeout=1e12`` sent its
#: guaranteed job, then raised OverflowError: a retry ran it twice)
MAX_SECONDS = (2**31 - 1) // 1000
#: the largest count (a high-water mark, a pool's size, a batch's window)
MAX_COUNT = 2**31 - 1


def check_number(name: str, value: Any, *, low: float = 0, integer: bool = False,
                 optional: bool = False) -> None:
    """``value`` must be a number (an int with ``integer``) from ``low`` to
    :data:`MAX_COUNT` (an int) or :data:`MAX_SECONDS`, or None with
    ``optional``. Raises TypeError or ValueError naming ``name``."""
    if value is None and optional:
        return
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an int" if integer else "a number"
        none = " or None" if optional else ""
        raise TypeError(f"{name} must be {what}{none}, not {type(value).__name__}")
    high = MAX_COUNT if integer else MAX_SECONDS
    if not low <= value <= high:  # (NaN is neither)
        raise ValueError(f"{name} must be a finite number from {low:g} to {high:,}, "
                         f"not {value!r}")
