"""Checks of the numbers a caller passes to the client (timeouts, sizes,
counts): a wrong type or value raises at the call, naming the argument,
instead of failing deep inside ZeroMQ or gevent (``Client(hwm="x")``), or
meaning something else than asked (``get(timeout=-1)`` waited no time at
all and said the result had not come)."""

from __future__ import annotations

import math
from typing import Any


def check_number(name: str, value: Any, *, low: float = 0, integer: bool = False,
                 optional: bool = False) -> None:
    """``value`` must be a finite number (an int with ``integer``) of at
    least ``low``, or None with ``optional``. Raises TypeError or
    ValueError naming ``name``."""
    if value is None and optional:
        return
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an int" if integer else "a number"
        none = " or None" if optional else ""
        raise TypeError(f"{name} must be {what}{none}, not {type(value).__name__}")
    if not low <= value < math.inf:
        raise ValueError(f"{name} must be a finite number, {low:g} or more, not {value!r}")
