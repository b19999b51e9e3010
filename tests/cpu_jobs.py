"""CPU-bound, crashing and bookkeeping jobs for the subprocess pool tests
(and scripts/bench_cpu.py). Nothing here yields to gevent."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

#: Set by :func:`setup` in a child; read back by :func:`setup_state`.
_setup_pid = None

#: File the bookkeeping functions append to (set by the tests).
LOG_ENV = "EMQ_GREEN_TEST_CPU_LOG"


def _log(event: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {os.getpid()}\n")


def spin(seconds):
    """Compute (never yield) for ``seconds`` of wall time; return the pid."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return {"pid": os.getpid(), "loops": n}


def spin_until(path, deadline=60.0):
    """Compute (never yield) until the file ``path`` exists, or for
    ``deadline`` seconds at most; the pid and when it started and ended
    (``time.time()``), so tests gate a job on an event, not on its length."""
    started = time.time()
    end = time.monotonic() + deadline
    n = 0
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear within {deadline} s")
        for _ in range(10000):  # look at the file every few milliseconds
            n += 1
    return {"pid": os.getpid(), "loops": n, "started": started, "ended": time.time()}


def logged_spin_until(path, deadline=60.0):
    """:func:`spin_until`, logging ``run PID`` first (attempts are counted)."""
    _log("run")
    return spin_until(path, deadline)


def logged_flaky(marker, failures):
    """Log ``run PID``; fail while fewer than ``failures`` runs are logged
    for this child (the test's log file is the counter)."""
    _log("run")
    path = os.environ.get(LOG_ENV, "")
    with open(path) as f:
        runs = sum(1 for line in f if line.split()[0] == "run")
    if runs <= failures:
        raise RuntimeError(f"failure {runs}")
    return runs


def burn(n):
    """A fixed amount of pure-Python work: the sum of i*i mod 7 below n."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def pid():
    return os.getpid()


def other_pid():
    return os.getpid()


def spawn_and_spin(pid_file, seconds):
    """Start a grandchild (``sleep``), note its pid, then compute."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pid_file, "w") as f:
        f.write(str(proc.pid))
    return spin(seconds)


def fork_then_die(pid_file):
    """Fork a process that keeps every inherited descriptor (the pool's pipe
    too) open for two minutes, then die as if the OOM killer struck."""
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(120)
        os._exit(0)
    with open(pid_file, "w") as f:
        f.write(str(grandchild))
    os.kill(os.getpid(), signal.SIGKILL)


def exit_hard(code):
    os._exit(code)


def kill_self():
    """As if the OS killed the child (OOM killer)."""
    os.kill(os.getpid(), signal.SIGKILL)


def segfault():
    ctypes.string_at(0)


def noisy(text):
    """A job that prints and reads stdin must not disturb the pool's pipes."""
    print(text)
    print("{not json}", flush=True)
    return [text, sys.stdin.read()]


def setup():
    global _setup_pid
    _setup_pid = os.getpid()
    _log("setup")


def setup_state():
    return {"setup_pid": _setup_pid, "pid": os.getpid()}


def entry():
    _log("entry")


def exit_():
    _log("exit")


def entry_boom():
    _log("entry")
    raise RuntimeError("entry failed")


def fork_and_return():
    """``return os.fork()``: the forked copy returns from the job too (0)."""
    return os.fork()


def fork_and_exit():
    """The usual pattern: the forked copy does its part and sys.exit()s, the
    job waits for it. Returns the forked copy's exit status."""
    child = os.fork()
    if child == 0:
        sys.exit(0)
    return os.waitpid(child, 0)[1]


def tag(value):
    return {"tag": value, "pid": os.getpid()}


def big_result(megabytes):
    return "x" * (megabytes * 1024 * 1024)


def lower_soft_limit(limit):
    """Lower this process's soft RLIMIT_NOFILE (the hard one stays)."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def lower_hard_limit(limit):
    """Lower both RLIMIT_NOFILE limits: the child cannot raise them again."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def nofile_limit():
    import resource

    return {"limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)), "pid": os.getpid()}


def interrupt():
    raise KeyboardInterrupt("stop")


def no_message():
    raise MemoryError()


def logged_exit():
    """Log ``run PID``, then sys.exit(): not retried, as in the worker."""
    _log("run")
    sys.exit(4)


def entry_sys_exit():
    sys.exit(5)


def text(length):
    return "x" * length


def slow_setup():
    """A subprocess_setup_func slower than the jobs' timeout (its seconds in
    EMQ_TEST_SETUP_SECONDS), in the children only."""
    if os.environ.get("EMQ_GREEN_CHILD_PARENT_PID"):
        time.sleep(float(os.environ.get("EMQ_TEST_SETUP_SECONDS", "0")))


def dying_setup():
    """A subprocess_setup_func that ends its child (not the worker)."""
    if os.environ.get("EMQ_GREEN_CHILD_PARENT_PID"):
        os._exit(4)


def scribble():
    """A job that writes a JSON line that is no outcome on every descriptor
    it may hold (the pool's pipe among them)."""
    for fd in range(1, 64):
        try:
            os.write(fd, b'"garbage"\n')
        except OSError:
            pass
    return "written"


def set_with_mark(path):
    """Leaves one line in ``path`` per run, and returns what JSON cannot carry."""
    with open(path, "a") as f:
        f.write("ran\n")
    return {1, 2}
