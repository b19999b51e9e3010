"""The subprocess pool: CPU-bound jobs run in child processes, off the hub.

A greenlet that computes for seconds never yields, so heartbeats stop and
every other job stalls. Jobs flagged ``"subprocess": true`` in their run
options, or named by the ``subprocess_callables`` setting, run in a pool of
children instead (see :mod:`emq_green.worker.child`), while their job greenlet waits
cooperatively. They stay ordinary jobs for the manager: each holds a job slot
(``concurrent_jobs``) and a READY goes out when it finishes.

- Children are fresh interpreters (not forks of the hub), started lazily on
  the first subprocess job, ``subprocess_pool_size`` of them (0: the CPUs
  this process may use), each leading its own process group.
- A job waits for a free child inside its own greenlet; other jobs go on.
- Timeout: ``timeout:N`` or ``global_timeout``, per attempt, counted from
  when a child takes the job. Past it the child's whole process group is
  killed, the reply says ``TimeoutError``, and a fresh child replaces it.
- A child that dies mid-job fails that job only (``ChildProcessError``).
- After ``max_job_count`` jobs a child is retired; its replacement starts
  when it takes its last job, so queued jobs find a warm child.
- ``job_exit_func`` does not run for a job whose child was killed.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import gevent
import gevent.lock
import gevent.pool
import gevent.queue
from gevent import subprocess

from ..callables import matches
from ..extensions import Extension
from ..jobs import TIMEOUT_VALUE, JobOutcome, Status
from ..protocol import Headers, RunRequest, printable
from . import child as child_main

if TYPE_CHECKING:  # pragma: no cover
    from ..extensions import WorkerView
    from ..records import JobRecord
    from ..settings import Settings

logger = logging.getLogger(__name__)

#: How long a child may take to start and run ``subprocess_setup_func``.
STARTUP_TIMEOUT = 120.0
#: How long closing the pool waits for idle children to exit by themselves.
CLOSE_TIMEOUT = 2.0
#: How long after a child's death the pool still reads its last line, s.
DEATH_GRACE = 0.5
#: Bytes a child's line may hold beyond ``max_message_size``: the outcome's
#: other fields (the child itself sends ReplyTooLarge for a longer value).
LINE_SLACK = 64 * 1024
#: Children one job may start before it is answered ChildStartError (each
#: died before it could be taken: a broken setup, a killer from outside).
MAX_STARTS_PER_JOB = 3


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runs_in_subprocess(request: RunRequest, patterns: Sequence[str]) -> bool:
    """The request's own flag, or a ``subprocess_callables`` entry: a full
    name (``reports.build``, ``app.jobs:Mailer.send``) or a module prefix
    (``imaging.*`` matches ``imaging.resize`` and ``imaging.fx.blur``)."""
    return request.subprocess or matches(request, patterns)


@dataclass(frozen=True)
class PoolConfig:
    """What the children are made of; a change (SIGHUP) means a new pool."""

    size: int
    max_job_count: int = 1024
    setup_func: str = ""
    entry_func: str = ""
    exit_func: str = ""
    #: ``allowed_callables``: the children check it too
    allowed: Optional[tuple[str, ...]] = None
    #: the interpreter the children run
    executable: str = sys.executable
    #: ``max_message_size``: the longest outcome a child sends (-1: no limit)
    max_result_bytes: int = -1

    @classmethod
    def from_settings(cls, settings: Settings, **changes: Any) -> PoolConfig:
        return cls(**{"size": settings.subprocess_pool_size or cpu_count(),
                      "max_job_count": settings.max_job_count,
                      "setup_func": settings.subprocess_setup_func,
                      "entry_func": settings.job_entry_func,
                      "exit_func": settings.job_exit_func,
                      "allowed": settings.allowed_callables,
                      "max_result_bytes": settings.max_message_size, **changes})


class ChildDied(Exception):
    """The child's stdout closed (it exited or was killed), or it never
    became ready; ``str()`` is the reason when known."""


class ChildStartError(Exception):
    """No subprocess child could be started for a job (``str()``: why)."""


class ChildStarting(Exception):
    """A child was not ready within a job's timeout, and may still start."""


class _ChildTimedOut(BaseException):
    """Raised by ``gevent.Timeout`` in the waiting greenlet; a BaseException
    so that nothing between it and the pool swallows it."""


class _ChildGone(BaseException):
    """Thrown into the greenlet reading a child that has died while its
    output stays open (a grandchild forked by the job holds the pipe)."""


class _Child:
    """One child process and its two pipes. Only the greenlet that took it
    from the pool reads or writes it."""

    def __init__(self, config: PoolConfig,
                 died_idle: Callable[[_Child], None] = lambda child: None) -> None:
        env = dict(os.environ)
        # The worker's import path, so job modules import the same way.
        path = [p or os.getcwd() for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        env[child_main.ENV_SETUP] = config.setup_func
        env[child_main.ENV_ENTRY] = config.entry_func
        env[child_main.ENV_EXIT] = config.exit_func
        env[child_main.ENV_PARENT] = str(os.getpid())
        env[child_main.ENV_ALLOWED] = "" if config.allowed is None else json.dumps(
            list(config.allowed))
        env[child_main.ENV_MAX_LINE] = str(config.max_result_bytes)
        # what the pool reads of one line: the child keeps its outcomes under
        # max_result_bytes; a longer line (a child that misbehaves) is not
        # read whole into the worker, the child is replaced
        self.max_line = -1 if config.max_result_bytes < 0 else \
            config.max_result_bytes + LINE_SLACK
        self.proc = subprocess.Popen(
            [config.executable, "-m", "emq_green.worker.child"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            close_fds=True, start_new_session=True,
        )
        self.pid: int = self.proc.pid
        self.started = time.monotonic()
        self.jobs = 0
        self.ready = False
        #: waiting in the pool's idle queue (no job holds it)
        self.idle = False
        #: its death while idle was seen and counted (it is being replaced)
        self.gone = False
        self._died_idle = died_idle
        #: the greenlet in :meth:`receive`, if any
        self._reader: Optional[gevent.Greenlet] = None
        # EOF on the pipe is not enough to see a death: a process the job
        # forked inherits the pipe and may hold it open for ever
        gevent.spawn(self._watch)

    def _watch(self) -> None:
        self.proc.wait()
        gevent.sleep(DEATH_GRACE)  # a line it wrote before dying is read first
        reader = self._reader
        if reader is not None:
            gevent.get_hub().loop.run_callback(self._interrupt, reader)
        elif self.idle:
            self._died_idle(self)

    def _interrupt(self, reader: gevent.Greenlet) -> None:
        if self._reader is reader:  # still waiting in receive
            reader.throw(_ChildGone())

    def send(self, doc: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(doc).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self, timeout: Optional[float]) -> dict[str, Any]:
        """The next message; raises ChildDied at EOF or once the child is
        dead, _ChildTimedOut."""
        self._reader = gevent.getcurrent()
        try:
            with gevent.Timeout(timeout, _ChildTimedOut):
                line = self.proc.stdout.readline(self.max_line)
        except _ChildGone:
            raise ChildDied() from None
        finally:
            self._reader = None
        if not line:
            raise ChildDied()
        if not line.endswith(b"\n") and len(line) == self.max_line:
            raise ChildDied(f"sent a line longer than {self.max_line} bytes")
        doc = json.loads(line)
        if type(doc) is not dict:  # (a job that wrote on the pool's pipe itself)
            raise ChildDied(f"sent {printable(line, 80)} instead of an outcome")
        return doc

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Until the child says it is ready. Raises ChildDied (it died, or is
        not ready :data:`STARTUP_TIMEOUT` after it started), or
        :class:`ChildStarting` when ``timeout`` passes first: it goes on
        starting, for the next job."""
        if self.ready:
            return
        left = STARTUP_TIMEOUT - (time.monotonic() - self.started)
        try:
            msg = self.receive(max(0.0, left if timeout is None else min(timeout, left)))
        except _ChildTimedOut:
            if timeout is not None and timeout < left:
                raise ChildStarting() from None
            raise ChildDied(f"did not start within {STARTUP_TIMEOUT:g} s") from None
        if "ready" not in msg:
            raise ChildDied(f"sent {msg!r} instead of ready")
        self.ready = True

    def kill(self) -> None:
        """SIGKILL the child's process group (grandchildren too) and reap it."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._close_pipes()

    def retire(self, timeout: float) -> None:
        """Close stdin (the child exits), wait a little, then kill."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def death_reason(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "closed its output"
        if code is not None and code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


class SubprocessPool:
    """``config.size`` children; :meth:`run` runs one job in one of them."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.counters: collections.Counter[str] = collections.Counter()
        self._slots = gevent.lock.Semaphore(config.size)
        self._idle: gevent.queue.Queue[_Child] = gevent.queue.Queue()
        self._children: dict[int, _Child] = {}
        self._ending = gevent.pool.Group()  # greenlets ending children
        self._users = 0  # jobs inside run(), waiting or running
        self._starting = 0  # children being started
        self._busy = 0
        self._started = False
        self._draining = False
        self._closed = False

    # -- children ------------------------------------------------------------
    def _start_child(self) -> Optional[str]:
        """Start one child; the reason when it cannot be started."""
        self._starting += 1  # starting may let other greenlets run
        try:
            child = _Child(self.config, self._died_idle)
        except (OSError, ValueError) as exc:
            self.counters["spawn_failures"] += 1
            logger.error("cannot start a subprocess child (%s -m emq_green.worker.child): %s",
                         self.config.executable, exc)
            return f"{type(exc).__name__}: {exc}"
        finally:
            self._starting -= 1
        self._children[child.pid] = child
        self.counters["children_started"] += 1
        self._put_idle(child)
        return None

    def _put_idle(self, child: _Child) -> None:
        child.idle = True
        self._idle.put(child)

    def _take_idle(self, timeout: Optional[float]) -> _Child:
        """The next idle child that is alive (one found dead: :meth:`_died_idle`).
        With no idle child and room in the pool (a child that could not be
        started, or that died before its first job and was not replaced), one
        is started first: waiting for the queue alone, the job would wait
        for ever (a probe: a pool of one whose replacement child was killed
        before its first job took no job again, its slots leaking).

        Raises:
            ChildStartError: no child could be started, or each one started
                here died before it could be taken.
            gevent.queue.Empty: none was free within ``timeout``.
        """
        starts = 0
        while True:
            if self._idle.empty() and len(self._children) + self._starting < self.config.size:
                if starts == MAX_STARTS_PER_JOB:
                    raise ChildStartError(f"{starts} subprocess children died before their "
                                          "first job")
                starts += 1
                failed = self._start_child()
                if failed is not None:
                    raise ChildStartError(failed)
            child = self._idle.get(timeout=timeout)
            child.idle = False
            if child.gone:
                continue  # counted and replaced when it died
            if child.proc.poll() is None:
                return child
            self._died_idle(child)

    def _died_idle(self, child: _Child) -> None:
        """A child died with no job in it (the OOM killer, an operator): not
        a job's failure. It is counted and forgotten at once, so ``/status``
        does not list a dead pid until the next job comes, and replaced at
        once if it had run a job; one that never did (it may die as it
        starts) is left to the next job, or a child that cannot start would
        be restarted for ever."""
        if child.gone or child.pid not in self._children:
            return  # retired, recycled or already seen
        child.gone = True
        self.counters["children_died"] += 1
        proven = child.jobs > 0  # (age is no proof: a slow setup may end in death)
        logger.warning("subprocess child %d died while idle (%s); %s", child.pid,
                       child.death_reason(),
                       "replacing it" if proven else "the next job starts another")
        if proven:
            self._replace(child, kill=True)
        else:
            self._end(child, kill=True)

    def _end(self, child: _Child, *, kill: bool) -> None:
        """Forget a child and end it in the background: SIGKILL, or close
        its stdin (a retired child)."""
        self._children.pop(child.pid, None)
        if kill:
            self._ending.spawn(child.kill)
        else:
            self._ending.spawn(child.retire, CLOSE_TIMEOUT)

    def _replace(self, child: _Child, *, kill: bool) -> None:
        self._end(child, kill=kill)
        if not (self._closed or self._draining) and len(self._children) < self.config.size:
            self._start_child()

    @property
    def closed(self) -> bool:
        return self._closed

    def pids(self) -> list[int]:
        return sorted(self._children)

    # -- jobs ----------------------------------------------------------------
    def run(self, request: RunRequest, headers: Headers,
            timeout: Optional[float]) -> tuple[JobOutcome, int]:
        """Run one job in a child, cooperatively; (outcome, child pid)."""
        if self._closed:
            raise RuntimeError("the subprocess pool is closed")
        if not self._started:
            self._started = True
            # (a count read each time: starting a child lets other jobs in)
            while len(self._children) + self._starting < self.config.size:
                if self._start_child() is not None:
                    break
        self._users += 1
        try:
            with self._slots:
                try:
                    child = self._take_idle(timeout)
                except ChildStartError as exc:
                    return self._cannot_start(request, str(exc))
                except gevent.queue.Empty:
                    return self._cannot_start(request, f"no child was free within the "
                                                       f"job's timeout of {timeout:g} s")
                self._busy += 1
                try:
                    return self._run_in(child, request, headers, timeout)
                finally:
                    self._busy -= 1
        finally:
            self._users -= 1
            if self._draining and not self._users:
                gevent.spawn(self.close)

    def _cannot_start(self, request: RunRequest, reason: str) -> tuple[JobOutcome, int]:
        message = f"{request.name} could not run in a subprocess child: {reason}"
        return JobOutcome(Status.FAILED, message, "ChildProcessError", message, 0), os.getpid()

    def _run_in(self, child: _Child, request: RunRequest, headers: Headers,
                timeout: Optional[float]) -> tuple[JobOutcome, int]:
        clean = False
        attempt = 1
        try:
            child.wait_ready(timeout)
            child.jobs += 1
            last = child.jobs >= self.config.max_job_count
            if last:
                # its replacement warms up while it runs its last job
                self.counters["children_recycled"] += 1
                self._children.pop(child.pid, None)
                if not self._draining:
                    self._start_child()
            child.send({"payload": request.payload(), "retry_count": headers.retry_count})
            while True:
                msg = child.receive(timeout)
                if "attempt" not in msg:
                    break
                attempt = msg["attempt"]  # each attempt gets the whole timeout
            outcome = JobOutcome(Status(msg["status"]), msg["value"], msg["error_type"],
                                 msg["error_message"], msg["attempts"])
            clean = True
            if msg.get("retire") and not last:
                self.counters["children_recycled"] += 1
                self._replace(child, kill=False)  # it exits by itself
            elif last or self._draining:
                self._end(child, kill=False)
            else:
                self._put_idle(child)
            return outcome, child.pid
        except ChildStarting:
            # A slow start-up (subprocess_setup_func) is not the job's: this
            # job gives up at its timeout, and the child, not killed, goes on
            # starting for the next one (killed mid-setup by each job, no
            # child was ever ready while jobs kept coming).
            clean = True
            self.counters["not_ready_in_time"] += 1
            if self._draining:
                self._end(child, kill=True)
            else:
                self._put_idle(child)
            return self._cannot_start(request, (
                f"no subprocess child was ready within the job's timeout of {timeout:g} s "
                f"(child {child.pid} is still starting: its start-up and "
                "subprocess_setup_func; it takes the next job once ready)"))
        except _ChildTimedOut:
            clean = True
            self.counters["timed_out"] += 1
            logger.warning("%s timed out after %g s in child %d; killing its process group",
                           request.name, timeout, child.pid)
            self._replace(child, kill=True)
            message = f"{request.name} exceeded its timeout of {timeout:g} s"
            return (JobOutcome(Status.TIMED_OUT, TIMEOUT_VALUE, "TimeoutError", message,
                               attempt), child.pid)
        except (ChildDied, OSError, ValueError, KeyError) as exc:
            clean = True
            self.counters["children_died"] += 1
            if isinstance(exc, ChildDied):
                reason = str(exc) or child.death_reason()
            else:
                reason = f"failed: {exc!r}"
            message = f"the subprocess child {child.pid} running {request.name} {reason}"
            if not child.ready:
                message = (f"the subprocess child {child.pid} {reason} before it was ready (in "
                           f"its start-up or subprocess_setup_func): {request.name} did not "
                           "start")
            logger.error("%s; replacing it", message)
            self._replace(child, kill=True)
            return (JobOutcome(Status.FAILED, message, "ChildProcessError", message, attempt),
                    child.pid)
        finally:
            if not clean:
                # the job greenlet was killed (a hard stop) while the child worked
                self._replace(child, kill=True)

    # -- end -----------------------------------------------------------------
    def drain(self) -> None:
        """Take no more jobs from new callers (a new pool does): jobs already
        here finish, then every child ends."""
        self._draining = True
        if not self._users:
            gevent.spawn(self.close)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """End every child: idle ones exit when their stdin closes; what is
        still alive after ``timeout`` is killed with its process group.
        Returns once every child is reaped."""
        self._closed = True
        for child in list(self._children.values()):
            self._end(child, kill=False)
        self._ending.join(timeout + 10)

    def status(self) -> dict[str, Any]:
        return {"size": self.config.size, "started": self._started, "busy": self._busy,
                "waiting": self._users - self._busy, "pids": self.pids(),
                "counters": dict(self.counters)}


@dataclass(frozen=True)
class SubprocessExecutor:
    """What :meth:`SubprocessExtension.executor_for` hands the manager."""

    pool: SubprocessPool
    timeout: Optional[float]

    def run(self, request: RunRequest, headers: Headers) -> tuple[JobOutcome, int]:
        return self.pool.run(request, headers, self.timeout)


class SubprocessExtension(Extension):
    """Routes flagged and listed callables to a :class:`SubprocessPool`.

    The manager registers one by default; the pool and its children exist
    only once a subprocess job arrives. ``pool_options`` override fields of
    the :class:`PoolConfig` read from the settings (e.g. ``executable``).
    """

    def __init__(self, **pool_options: Any) -> None:
        self._pool_options = pool_options
        self.pool: Optional[SubprocessPool] = None
        self._retired: list[SubprocessPool] = []
        # callables sent to the pool at run time (see offload()), name ->
        # details with a ``jobs`` count
        self._routed: dict[str, dict[str, Any]] = {}

    def offload(self, name: str, **details: Any) -> None:
        """Run the jobs of callable ``name`` in the pool from now on (until
        :meth:`clear_offloaded`); ``details`` are shown in the status."""
        self._routed[name] = {**details, "jobs": 0}

    def clear_offloaded(self) -> list[str]:
        """Forget every :meth:`offload` decision; the names that were routed."""
        names = sorted(self._routed)
        self._routed.clear()
        return names

    def offloaded(self) -> dict[str, dict[str, Any]]:
        """A copy of the callables routed by :meth:`offload`, with their details."""
        return {name: dict(entry) for name, entry in self._routed.items()}

    def executor_for(self, manager: WorkerView,
                     record: JobRecord) -> Optional[SubprocessExecutor]:
        request = record.request
        if request is None:
            return None
        if not request.subprocess:  # checked in order of cost: this runs per job
            routed = self._routed.get(request.name) if self._routed else None
            if routed is not None:
                routed["jobs"] += 1
            else:
                patterns = manager.settings.subprocess_callables
                if not patterns or not runs_in_subprocess(request, patterns):
                    return None
        if self.pool is None:
            self.pool = SubprocessPool(self._config(manager))
        return SubprocessExecutor(self.pool, manager.timeout_for(record.headers))

    def _config(self, manager: WorkerView) -> PoolConfig:
        return PoolConfig.from_settings(manager.settings, **self._pool_options)

    def reload(self, manager: WorkerView) -> None:
        if self.pool is not None and \
                self.pool.config != self._config(manager):
            # jobs already in the old pool finish there; new ones start a new pool
            self._retired = [p for p in self._retired if not p.closed]
            self._retired.append(self.pool)
            self.pool.drain()
            self.pool = None

    def manager_stopped(self, manager: WorkerView) -> None:
        pools = [p for p in [self.pool, *self._retired] if p is not None]
        self.pool = None
        self._retired.clear()
        for pool in pools:
            pool.close()

    def status(self, manager: WorkerView) -> dict[str, Any]:
        return {"subprocess_pool": self.pool.status() if self.pool is not None else None}


__all__ = ["ChildDied", "PoolConfig", "SubprocessExtension", "SubprocessPool", "cpu_count",
           "runs_in_subprocess"]
