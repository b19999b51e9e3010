"""Native threads in a gevent-patched process, for the client.

Under ``gevent.monkey.patch_all()`` the ``threading`` and ``time`` modules
are gevent's: their locks, events and sleeps switch greenlets on the hub of
the calling native thread. A client used from another native thread (a
``gevent.threadpool`` worker, or a real thread under ``patch_all(thread=False)``)
cannot share the main thread's green sockets, reader greenlet and events: a
reader greenlet runs only while its own thread is inside its hub, so results
stopped arriving once the first thread that asked for one was done. Such a
thread gets plain sockets and a reader thread of its own, built from the
interpreter's original primitives, here.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Optional


def _original(module: str, name: str) -> Any:
    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


#: the interpreter's own primitives, whatever gevent patched
allocate_lock: Callable[[], Any] = _original("_thread", "allocate_lock")
start_new_thread: Callable[..., int] = _original("_thread", "start_new_thread")
native_ident: Callable[[], int] = _original("_thread", "get_ident")
native_sleep: Callable[[float], None] = _original("time", "sleep")
native_select: Callable[..., Any] = _original("select", "select")

_native_id: Callable[[], int] = _original("_thread", "get_native_id")
#: the native thread that imported the client: taken for the main one where
#: the kernel cannot tell (on Linux it can: see :func:`in_main_thread`)
MAIN_IDENT = native_ident()


def in_main_thread() -> bool:
    """Whether the caller runs on the process's main native thread (where
    the program's hub runs). Under gevent ``threading.main_thread()`` names
    the main greenlet, not a native thread; on Linux the main thread's
    kernel id is the pid (after a fork too: the forking thread is the
    child's main one)."""
    if sys.platform.startswith("linux"):
        return _native_id() == os.getpid()
    return native_ident() == MAIN_IDENT

__all__ = ["NativeEvent", "allocate_lock", "current_hub", "foreign_thread", "in_main_thread",
           "native_ident", "native_select", "native_sleep", "spawn_on", "start_new_thread"]


def _threads_patched() -> bool:
    if "gevent.monkey" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("threading"))


def foreign_thread(green: bool) -> bool:
    """Whether the caller is a native thread other than the main one in a
    process where the main thread's primitives are gevent's (a ``green``
    client, or ``threading`` patched)."""
    if not (green or _threads_patched()):
        return False
    return not in_main_thread()


def current_hub(green: bool) -> Any:
    """The gevent hub of the calling thread, or None where no other native
    thread can be foreign (:func:`foreign_thread`): no hub is made for a
    plain client's threads in a process that merely imported gevent."""
    if not (green or _threads_patched()):
        return None
    import gevent

    return gevent.get_hub()


def spawn_on(hub: Any, func: Callable[..., Any], *args: Any) -> None:
    """Run ``func(*args)`` in a new greenlet of ``hub`` (another thread's),
    without waiting: a hub's callback may not block, a greenlet may."""
    import gevent

    hub.loop.run_callback_threadsafe(gevent.spawn, func, *args)


class NativeEvent:
    """``threading.Event`` from the original lock: blocks its native thread."""

    __slots__ = ("_flag", "_lock")

    def __init__(self) -> None:
        self._flag = False
        self._lock = allocate_lock()
        self._lock.acquire()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            self._lock.release()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._flag:
            return True
        if self._lock.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            self._lock.release()
        return self._flag
