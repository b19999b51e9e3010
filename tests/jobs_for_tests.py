"""Job functions the tests send by module path."""

from __future__ import annotations

import collections
import os
import time

import gevent
import gevent.event

#: name -> Event a job waits on; tests release jobs by setting them.
gates: dict[str, gevent.event.Event] = collections.defaultdict(gevent.event.Event)
calls: collections.Counter[str] = collections.Counter()
events: list[str] = []
#: tag -> times a ``tag`` job ran
tags: collections.Counter[str] = collections.Counter()


#: the JobManager a job may stop (set by the test)
manager = None


def reset() -> None:
    global manager
    gates.clear()
    calls.clear()
    events.clear()
    tags.clear()
    manager = None


def stop_the_manager():
    """What ``manager.stop()`` returns when a job calls it."""
    return manager.stop()


def tag(name):
    tags[name] += 1


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def repeat(text, times):
    return text * times


def nap(seconds):
    gevent.sleep(seconds)
    return seconds


def wait_gate(name):
    """Run until the test opens gate ``name``."""
    calls["wait_gate"] += 1
    gates[name].wait()
    return name


def boom(message="boom"):
    raise ValueError(message)


def exit_greenlet():
    """A job that raises GreenletExit itself (the worker is not stopping)."""
    raise gevent.GreenletExit("the job's own")


def unserialisable():
    return {1, 2, 3}


def flaky(key, failures):
    """Raise on the first ``failures`` calls for ``key``, then succeed."""
    calls[key] += 1
    if calls[key] <= failures:
        raise RuntimeError(f"failure {calls[key]}")
    return calls[key]


def swallow_everything(seconds):
    """A job that catches Exception: it must still be stopped by its timeout."""
    try:
        gevent.sleep(seconds)
    except Exception:
        return "swallowed"
    return "finished"


def catch_the_timeout(seconds, step=0.05):
    """A job whose bare except swallows its JobTimeout and runs on."""
    deadline = time.monotonic() + seconds
    caught = 0
    while time.monotonic() < deadline:
        try:
            gevent.sleep(step)
        except BaseException:  # noqa: BLE001 - what the test is about
            caught += 1
    return f"done after catching {caught}"


def counted_nap(key, seconds):
    """Count the call under ``key``, then sleep (cooperatively)."""
    calls[key] += 1
    gevent.sleep(seconds)
    return calls[key]


def counted_gate(key, gate):
    """Count the call under ``key``, then wait for gate ``gate``."""
    calls[key] += 1
    gates[gate].wait()
    return calls[key]


def entry_boom():
    events.append("entry")
    raise RuntimeError("entry failed")


def pid():
    return os.getpid()


def entry():
    events.append("entry")


def exit_():
    events.append("exit")


class Greeter:
    def __init__(self, greeting, punctuation="!"):
        self.greeting = greeting
        self.punctuation = punctuation

    def greet(self, name):
        return f"{self.greeting}, {name}{self.punctuation}"


not_callable = 42


class _Hidden:
    def run(self):
        return "hidden"


#: a module-level lambda: importable by no name a worker could use
module_lambda = lambda: 1  # noqa: E731


class Unprintable(Exception):
    """An exception whose message cannot be read: ``str()`` raises."""

    def __str__(self):
        raise RuntimeError("no str")


def raise_unprintable(key, raises="RuntimeError"):
    """Count the call, then raise :class:`Unprintable`, whose ``__str__``
    raises ``raises`` (a builtin name, or ``GreenletExit``)."""
    calls[key] += 1
    error = gevent.GreenletExit if raises == "GreenletExit" else __builtins__[raises]

    class Unreadable(Unprintable):
        def __str__(self):
            raise error("no str")

    Unreadable.__name__ = "Unprintable"
    raise Unreadable()


def raise_huge(size):
    """Raise a ValueError whose message is ``size`` characters long."""
    raise ValueError("x" * size)


def refuse_to_die(seconds):
    """A job that swallows every BaseException, GreenletExit included, and
    runs on for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            gevent.sleep(0.05)
        except BaseException:  # noqa: BLE001 - what the test is about
            pass
    return "outlived"
