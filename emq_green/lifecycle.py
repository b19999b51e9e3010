"""An explicit lifecycle state with one place that changes it.

The job manager and the router each keep their state in a
:class:`Lifecycle`: ``set`` is the only way to change it (and logs the
transition), ``wait_for`` blocks the calling greenlet until a state is
reached.
"""

from __future__ import annotations

import logging
import signal
import time
from enum import Enum
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar

import gevent
import gevent.event

S = TypeVar("S", bound=Enum)


class SignalHandler:
    """A gevent signal handler that, cancelled, gives the signal back to
    the handler Python had for it before (an embedding application's own, or
    the default): cancelling the libev watcher alone leaves the signal at
    SIG_DFL while ``signal.getsignal`` still names the old handler."""

    def __init__(self, signum: int, handler: Callable[[], Any]) -> None:
        self.signum = signum
        self._previous = signal.getsignal(signum)
        self._watcher = gevent.signal_handler(signum, handler)

    def cancel(self) -> None:
        self._watcher.cancel()
        if self._previous is not None:  # None: set outside Python, cannot be restored
            try:
                signal.signal(self.signum, self._previous)
            except (ValueError, OSError, TypeError) as exc:
                logger.warning("signal %s: the previous handler not restored: %s",
                               self.signum, exc)


def install_signal_handlers(table: Mapping[int, Callable[[], Any]]) -> list[SignalHandler]:
    """gevent signal handlers for ``table`` (signal number -> callable run
    in the loop); none outside the main thread, with a warning. Returns the
    handlers, to ``cancel()`` at the end (which restores the handlers that
    were there before)."""
    handlers: list[SignalHandler] = []
    try:
        for signum, handler in table.items():
            handlers.append(SignalHandler(signum, handler))
    except ValueError:  # not the main thread
        logger.warning("signal handlers not installed (not in the main thread)")
    return handlers

logger = logging.getLogger(__name__)


class Lifecycle(Generic[S]):
    def __init__(self, initial: S, label: str) -> None:
        self.state = initial
        self.label = label
        self._changed = gevent.event.Event()

    def set(self, state: S) -> None:
        if state is not self.state:
            logger.info("%s: %s -> %s", self.label, self.state.value, state.value)
            self.state = state
            self._changed.set()
            self._changed.clear()

    def wait_for(self, state: S | str, timeout: Optional[float] = None) -> bool:
        """Wait (cooperatively) until ``state`` (a member, or its value such
        as ``"running"``: ValueError for no state of this lifecycle); False
        when ``timeout`` passed."""
        state = type(self.state)(state)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state is not state:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._changed.wait(left)
        return True
