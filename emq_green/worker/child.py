"""The main of a subprocess child: run jobs sent by the worker, one at a time.

A child is a fresh interpreter (``python -m emq_green.worker.child``), never a fork
of the worker: it holds no ZeroMQ socket and no gevent hub, and it does not
monkeypatch. It talks to its pool over its stdin and stdout, one JSON object
per line:

    child  -> pool   {"ready": pid}                     once, after the setup function
    pool   -> child  {"payload": run_payload_json, "retry_count": n}
    child  -> pool   {"attempt": n}                     before each attempt
    child  -> pool   {"status": ..., "value": ..., "error_type": ...,
                      "error_message": ..., "attempts": n[, "retire": true]}

"retire": the child exits after this job (a job lowered one of its hard
resource limits, which it cannot raise again); the pool starts another. An
outcome longer than ``max_message_size`` is sent as a ReplyTooLarge failure
instead. A process a job forked (without exec) that returns from the job
exits at once: it must not answer on the child's pipes.

The protocol uses private copies of file descriptors 0 and 1: a job that
prints writes to stderr, a job that reads stdin reads ``/dev/null``. The
child exits when its stdin closes (the worker asked it to, or died).
Timeouts are the pool's business: it kills the child's process group.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import IO, Any, Callable, Optional

from ..callables import NOT_ALLOWED, CallablePolicy
from ..jobs import (
    JOB_EXITS,
    JobOutcome,
    Status,
    exception_text,
    import_dotted,
    logged,
    not_found,
    resolve,
    run_attempts,
)
from ..protocol import ProtocolError, RunRequest, printable

#: the error type of an outcome too large to send (as the worker's REPLY check names it)
REPLY_TOO_LARGE = "ReplyTooLarge"

logger = logging.getLogger("emq_green.worker.child")

#: Environment variables the pool sets for its children.
ENV_SETUP = "EMQ_GREEN_CHILD_SETUP_FUNC"
ENV_ENTRY = "EMQ_GREEN_CHILD_ENTRY_FUNC"
ENV_EXIT = "EMQ_GREEN_CHILD_EXIT_FUNC"
ENV_PARENT = "EMQ_GREEN_CHILD_PARENT_PID"
#: ``allowed_callables`` as JSON, or empty when unset
ENV_ALLOWED = "EMQ_GREEN_CHILD_ALLOWED_CALLABLES"
#: the longest outcome line the pool reads (``max_message_size``), or -1
ENV_MAX_LINE = "EMQ_GREEN_CHILD_MAX_LINE"


def _die_with_parent(parent_pid: int) -> None:
    """Linux: ask for SIGKILL when the worker dies, so no child outlives it
    even while it computes (closing stdin only stops an idle child)."""
    if not sys.platform.startswith("linux") or not _prctl_pdeathsig(signal.SIGKILL):
        return
    if parent_pid and os.getppid() != parent_pid:  # the worker died before prctl
        os._exit(1)


def _prctl_pdeathsig(signum: int) -> bool:
    try:
        import ctypes

        pr_set_pdeathsig = 1
        return ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum) == 0
    except (OSError, AttributeError):
        return False


def _guard_the_group() -> Optional[int]:
    """Linux: fork a sentinel that SIGKILLs this child's process group once
    the child is gone, so a process a job forked does not outlive it; its
    pid, or None when there is none.

    While the worker lives it kills the group itself (a timeout, a stop);
    a SIGKILLed worker cannot, and the child's PDEATHSIG ends the child
    alone. The sentinel is a second process in the group, so it acts even
    while the child computes in C code that holds the GIL. A process that
    leaves the group (``setsid``) is out of its reach."""
    child = os.getpid()
    if not sys.platform.startswith("linux") or os.getpgrp() != child:
        return None  # not a group of its own (not started by the pool): not ours to end
    try:
        pid = os.fork()
    except OSError as exc:
        logger.warning("no sentinel for the process group (%s): what a job forks may "
                       "outlive a killed worker", exc)
        return None
    if pid:
        return pid
    try:  # the sentinel: never returns
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):  # the pipes: the worker sees EOF when the child ends
            os.dup2(devnull, fd)
        for fd in map(int, os.listdir("/proc/self/fd")):  # (Linux only, as the sentinel)
            if fd > 2:  # the pipes' private copies too, when the child made them
                try:
                    os.close(fd)
                except OSError:
                    pass  # the listing's own
        armed = _prctl_pdeathsig(signal.SIGUSR1)
        if armed and os.getppid() == child:
            signal.sigwait({signal.SIGUSR1})
        if armed:  # the child is gone
            os.killpg(child, signal.SIGKILL)
    finally:
        os._exit(0)  # not armed: a child no sentinel guards, as before


class _Guard:
    """The sentinel of :func:`_guard_the_group`, replaced before the next job
    when it has ended (killed from outside: it would stay a zombie, and what
    later jobs fork would outlive a killed worker)."""

    def __init__(self) -> None:
        self.pid = _guard_the_group()

    def check(self) -> None:
        if self.pid is None:
            return
        try:
            ended, _status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by a job's os.wait()
            ended = self.pid
        if ended:
            logger.warning("the sentinel of this process group (%d) ended; starting "
                           "another", self.pid)
            self.pid = _guard_the_group()


def _optional(env: str) -> Optional[Callable[[], Any]]:
    path = os.environ.get(env, "")
    return import_dotted(path) if path else None


def _outcome_line(outcome: JobOutcome, max_line: int = -1, retire: bool = False,
                  name: str = "?") -> str:
    """The outcome of job ``name`` as the pool reads it; ``retire``: this
    child exits after it."""
    doc = {"status": outcome.status.value, "value": outcome.value,
           "error_type": outcome.error_type, "error_message": outcome.error_message,
           "attempts": outcome.attempts}
    if retire:
        doc["retire"] = True
    try:
        line = json.dumps(doc)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        # as on the wire: an unencodable (or too deeply nested) return value
        # is an error reply; said here, the worker sees only a failure
        logger.warning("job %s returned a value JSON cannot carry: %s", name,
                       printable(exception_text(exc), 300))
        failure = JobOutcome.failure(exc, outcome.attempts)
        return _outcome_line(failure, max_line, retire, name)
    if 0 <= max_line < len(line) + 1:
        # the pool would not read it whole (nor could the router take it)
        message = (f"the job's outcome is {len(line)} bytes of JSON, larger than "
                   f"max_message_size ({max_line} bytes)")
        # (not checked again: under a few hundred bytes of limit this line
        # is itself longer; the pool reads 64 KiB beyond the limit)
        return _outcome_line(JobOutcome(Status.FAILED, message, REPLY_TOO_LARGE, message,
                                        outcome.attempts), -1, retire)
    return line


class _Limits:
    """The child's resource limits as it started, set back after each job: a
    job that lowers one (``RLIMIT_AS`` to cap itself) would otherwise leave
    it on every later job of this child. A hard limit a job lowered cannot be
    raised again by an unprivileged process; the child then exits after
    that job's outcome, and the pool starts a fresh one."""

    def __init__(self) -> None:
        self.start: dict[int, tuple[int, int]] = {}
        try:
            import resource
        except ImportError:  # not POSIX
            self._resource = None
            return
        self._resource = resource
        for name in dir(resource):
            if name.startswith("RLIMIT_"):
                which = getattr(resource, name)
                try:
                    self.start[which] = resource.getrlimit(which)
                except (OSError, ValueError):
                    pass

    def restore(self) -> bool:
        """Set back what a job changed; False when that is impossible."""
        resource = self._resource
        restored = True
        for which, limits in self.start.items():
            try:
                if resource.getrlimit(which) != limits:
                    resource.setrlimit(which, limits)
            except (OSError, ValueError):
                restored = False
        return restored


class _Final(BaseException):
    """A job's SystemExit, KeyboardInterrupt or GeneratorExit, as its
    outcome: it ends the job's attempts (as in the worker, where it passes
    through them), the exit function still runs."""

    def __init__(self, outcome: JobOutcome) -> None:
        super().__init__(outcome.error_type)
        self.outcome = outcome


class Child:
    """One job at a time, with the worker's entry and exit functions around it."""

    def __init__(self, out: IO[str], *, entry_func: Optional[Callable[[], Any]] = None,
                 exit_func: Optional[Callable[[], Any]] = None,
                 policy: Optional[CallablePolicy] = None, max_line: int = -1) -> None:
        self.out = out
        self.policy = policy or CallablePolicy(None)
        self.entry_func = entry_func
        self.exit_func = exit_func
        self.max_line = max_line
        #: the name of the job run last (its outcome's log line names it)
        self.job_name = "?"
        #: this process: a job's ``os.fork()`` copy that returns here must not answer
        self.pid = os.getpid()

    def send(self, doc: dict[str, Any]) -> None:
        self.out.write(json.dumps(doc) + "\n")
        self.out.flush()

    def run(self, message: dict[str, Any]) -> JobOutcome:
        try:
            request = RunRequest.parse(message["payload"])
            self.job_name = request.name  # (named in the outcome's line)
        except (KeyError, TypeError, ProtocolError) as exc:
            return JobOutcome.rejected("InvalidRequest", str(exc))
        refused = self.policy.refusal(request)
        if refused is not None:  # the worker checks first; this is the second lock
            logger.warning("job refused: %s", refused)
            return JobOutcome.rejected(NOT_ALLOWED, refused)
        retry_count = int(message.get("retry_count") or 0)

        def attempt(n: int) -> JobOutcome:
            self.send({"attempt": n})  # the worker restarts the timeout per attempt
            return self._attempt(request, n)

        try:
            return run_attempts(request.name, attempt, retry_count, self.entry_func,
                                self.exit_func)
        except _Final as final:
            return final.outcome
        except JOB_EXITS as exc:  # from the entry or exit function (serve ends a fork's copy)
            logger.warning("%s around job %s: %s", type(exc).__name__, request.name, logged(exc))
            return JobOutcome.failure(exc)

    def _attempt(self, request: RunRequest, attempt: int) -> JobOutcome:
        try:
            # the allowed list again, on what the name resolved to (a module.*
            # entry allows what a module defines, not what it imported)
            func = resolve(request, self.policy)
        except Exception as exc:
            return not_found(request, exc)
        try:
            value = func(*request.args, **request.kwargs)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too, as in the worker
            self._only_here()
            logger.warning("job %s raised %s: %s", request.name, type(exc).__name__, logged(exc))
            if isinstance(exc, Exception):
                return JobOutcome.failure(exc, attempt)
            raise _Final(JobOutcome.failure(exc, attempt)) from None  # not retried
        self._only_here()
        # a value JSON cannot carry is still a success here (a failure would be
        # retried, the job run again): _outcome_line turns it into one
        return JobOutcome(Status.SUCCEEDED, value, attempts=attempt)

    def _only_here(self) -> None:
        """A process the job forked without exec, returning from the job
        (``if os.fork() == 0: ...`` that falls through): it ends now, quietly.
        Serving on, it would answer jobs on this child's pipes in its place."""
        if os.getpid() != self.pid:
            os._exit(0)

    def serve(self, lines: IO[str], guard: Optional[_Guard] = None,
              limits: Optional[_Limits] = None) -> None:
        for line in lines:
            if not line.strip():
                continue
            if guard is not None:
                guard.check()
            try:
                outcome = self.run(json.loads(line))
            finally:
                self._only_here()  # (also from the entry and exit functions)
            retire = limits is not None and not limits.restore()
            self.out.write(_outcome_line(outcome, self.max_line, retire, self.job_name)
                           + "\n")
            self.out.flush()
            if retire:
                logger.warning("a job lowered a hard resource limit of this child; it "
                               "exits, and the pool starts a fresh one")
                return


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s - emq-green child {os.getpid()} "
                               "%(levelname)s - %(message)s")
    _die_with_parent(int(os.environ.get(ENV_PARENT, "0") or 0))
    guard = _Guard()
    # Keep private copies of the pipes; fd 1 becomes stderr and fd 0 /dev/null.
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # The worker's SIGINT (Ctrl-C in a terminal) is not ours: the worker
    # decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    entry, exit_ = _optional(ENV_ENTRY), _optional(ENV_EXIT)
    setup = os.environ.get(ENV_SETUP, "")
    if setup:
        try:
            import_dotted(setup)()
        except Exception:
            # as EventMQ: a failed setup is logged, the child still serves
            logger.exception("subprocess_setup_func %s failed", setup)
    allowed = os.environ.get(ENV_ALLOWED, "")
    policy = CallablePolicy(json.loads(allowed) if allowed else None)
    child = Child(proto_out, entry_func=entry, exit_func=exit_, policy=policy,
                  max_line=int(os.environ.get(ENV_MAX_LINE, "") or -1))
    limits = _Limits()
    child.send({"ready": os.getpid()})
    try:
        child.serve(proto_in, guard, limits)
    except (BrokenPipeError, KeyboardInterrupt):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
