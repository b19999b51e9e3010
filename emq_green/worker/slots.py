"""The job slots: admission, backlog, parked greenlets, run, complete, repair, kill.

:class:`JobSlots` owns ``jobs_in_flight``: a REQUEST's body is checked
here (parsed, its callable allowed, its msgid not already in flight), and
the job starts in a parked greenlet, or waits in the backlog when the
router sent more than the slots it was offered. Every request ends in
exactly one of the two callbacks the manager gives: ``finished`` (the job
ran, or was killed) or ``rejected`` (it never ran). The manager turns
those into REPLY and READY.

The slots are configured from the settings (:meth:`JobSlots.configure_from`:
the job runner with its entry/exit functions, the callable policy), and
:meth:`JobSlots.status` gives their part of the manager's status.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import gevent
import gevent.pool

from ..callables import NOT_ALLOWED, CallablePolicy
from ..extensions import HookRegistry
from ..jobs import (
    JOB_EXITS,
    JobOutcome,
    JobRunner,
    Status,
    encode_reply,
    exception_text,
    import_dotted,
    logged,
    refused_once_resolved,
)
from ..limits import MAX_MSGID_BYTES, msgid_too_long, worker_log
from ..protocol import Headers, ProtocolError, RunRequest, printable, reply_requested_in
from ..records import STATUS_KEYS, JobRecord
from ..settings import Settings, SettingsError

logger = logging.getLogger(__name__)

#: logged when serving starts with allowed_callables unset
OPEN_WARNING = ("allowed_callables is not set: a REQUEST may run any callable this process "
                "can import (os.system included). Set allowed_callables (INI key, "
                "EVENTMQ_ALLOWED_CALLABLES or --allowed-callables) to the job callables, "
                'e.g. ["myapp.jobs.*"]')

#: guaranteed jobs that ended kept (msgid, job, encoded reply) for a copy
#: sent again as their REPLY crossed it: at most this many, for this long,
#: and their replies at most this many bytes in all (a larger reply alone is
#: not kept: such a copy runs again, as "at least once" allows)
ENDED_MEMORY = 10_000
ENDED_MEMORY_SECONDS = 60.0
ENDED_MEMORY_BYTES = 32 * 1024 * 1024

Finished = Callable[[JobRecord, JobOutcome, int], None]
Rejected = Callable[[str, Headers, JobOutcome], None]


def _hook_function(setting: str, path: str) -> Optional[Callable[[], Any]]:
    """The function ``path`` names (None when empty); a path that cannot be
    imported, whatever the reason, raises a SettingsError naming ``setting``."""
    if not path:
        return None
    try:
        return import_dotted(path)
    except Exception as exc:  # ImportError, or anything the module raises on import
        reason = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise SettingsError(f"{setting}: cannot import {path!r}: {reason}") from exc


def killed(detail: str, attempts: int = 1) -> JobOutcome:
    return JobOutcome(Status.KILLED, "Killed", "Killed", detail, attempts)


#: seconds the worker waits for its killed jobs to end before it stops anyway
KILL_WAIT = 5.0


def _stubborn(slots: JobSlots) -> None:
    """Jobs that did not end when killed (they catch GreenletExit and run
    on): answered as Killed now; they end with the process."""
    stubborn = [r for r in slots.jobs_in_flight.values() if not r.done]
    logger.error("%d job(s) did not end within %g s of being killed (they catch "
                 "GreenletExit): %s; answered as Killed, they end with the process",
                 len(stubborn), KILL_WAIT,
                 ", ".join(printable(r.callable_name) for r in stubborn[:5]))
    for record in stubborn:
        slots.complete(record, killed("the job did not end when the worker killed it"))



def _log_unseen_failure(record: JobRecord, outcome: JobOutcome, sent: JobOutcome,
                        in_loop: bool) -> None:
    """A WARNING for the failures nothing else logs (a job that raised is
    logged where it raised, the subprocess pool logs its own timeouts): a
    timeout in the loop, and a value JSON cannot carry, which without
    ``reply-requested`` no one would ever see (a probe)."""
    if sent is not outcome:
        worker_log.warning("unsendable", "job %s (%s) returned a value JSON cannot carry: "
                           "%s", record.callable_name, printable(record.msgid),
                           printable(sent.error_message, 300), via=logger)
    elif in_loop and outcome.status is Status.TIMED_OUT:
        worker_log.warning("timed-out", "job %s (%s): %s", record.callable_name,
                           printable(record.msgid), outcome.error_message, via=logger)

class JobSlots:
    """``concurrent_jobs`` slots, each run by a reusable job greenlet."""

    def __init__(self, *, hooks: HookRegistry, finished: Finished, rejected: Rejected,
                 counters: collections.Counter[str]) -> None:
        self._hooks = hooks
        self._finished = finished
        self._rejected = rejected
        self.counters = counters
        self.concurrent_jobs = 0
        self.runner = JobRunner()
        self.policy = CallablePolicy(None)
        #: Jobs accepted and not yet finished, by msgid.
        self.jobs_in_flight: dict[str, JobRecord] = {}
        #: job greenlet -> the job it runs or ran last (read by the loop-block
        #: monitor from its own thread: one dict lookup, atomic under the GIL)
        self.job_of_greenlet: dict[gevent.Greenlet, JobRecord] = {}
        self.backlog: collections.deque[JobRecord] = collections.deque()
        #: jobs running (greenlets busy), the backlog not counted
        self.running = 0
        #: True once the worker kills its jobs, in kill_all or close; only
        #: then is a GreenletExit in a job the worker's, answered ``Killed``
        self.stopping = False
        # A Group, not Pool(concurrent_jobs): a Pool frees its slot only when
        # the finished greenlet's link callback runs, one hub iteration
        # later, so a REQUEST arriving in between would make the reader wait
        # on the pool. The limit is kept exactly by ``running`` instead.
        self.pool = gevent.pool.Group()
        self._idle: list[gevent.Greenlet] = []
        self._hub = gevent.get_hub()
        self._loop = self._hub.loop
        self.pid = os.getpid()
        #: Guaranteed jobs that ended lately, by msgid (ended at, queue,
        #: request, reply). A copy the router sends while the REPLY crosses
        #: it is answered with that reply, not run again (see :meth:`admit`).
        self.ended_guaranteed: collections.OrderedDict[
            str, tuple[float, str, RunRequest, str]] = collections.OrderedDict()
        #: the length of the replies in :attr:`ended_guaranteed`, in all
        self.ended_bytes = 0
        #: While a subclass's ``on_request`` runs: what the base method's
        #: admission returned, if it was called (see jobmanager.py)
        self.via_override: Optional[list[bool]] = None
        #: Called with (reply, msgid) to send a REPLY again; the manager sets it.
        self.reply_again: Callable[[Any, str], None] = lambda reply, msgid: None

    def configure(self, *, concurrent_jobs: int, runner: JobRunner,
                  policy: CallablePolicy) -> None:
        self.concurrent_jobs = concurrent_jobs
        self.runner = runner
        self.policy = policy

    def begin(self) -> None:
        """Serving starts: jobs run in this process (its pid is taken now), and
        a warning is logged when any callable may run."""
        self.pid = os.getpid()
        if self.policy.allowed is None:
            logger.warning(OPEN_WARNING)

    def configure_from(self, settings: Settings) -> None:
        """Slots, runner (timeouts, ``job_entry_func``/``job_exit_func``) and
        allowed callables from ``settings``; unchanged when a function cannot
        be imported (:class:`SettingsError`)."""
        entry = _hook_function("job_entry_func", settings.job_entry_func)
        exit_ = _hook_function("job_exit_func", settings.job_exit_func)
        policy = CallablePolicy(settings.allowed_callables)
        self.configure(
            concurrent_jobs=settings.concurrent_jobs,
            runner=JobRunner(global_timeout=settings.global_timeout, entry_func=entry,
                             exit_func=exit_, deadlines=self.runner.deadlines, policy=policy),
            policy=policy)

    def free(self) -> int:
        """Slots not taken by a job in flight (0, not less, while more jobs
        run than ``concurrent_jobs`` allows after a reload shrank it)."""
        return max(0, self.concurrent_jobs - len(self.jobs_in_flight))

    def status(self, now: float) -> dict[str, Any]:
        """Free slots, backlog, job greenlets, and the jobs in flight oldest
        first (their ages at ``now``, a ``time.monotonic()`` value)."""
        return {
            "free_slots": self.free(),
            "backlog": len(self.backlog),
            "greenlets": len(self.pool),
            # no msgids: they name results, and these figures are served over
            # HTTP (/status, /dashboard.json); the SIGUSR1 log dump has them
            "jobs_in_flight": [
                {"queue": r.queue, "callable": r.callable_name,
                 "age": round(now - r.started, 3)}
                for r in sorted(self.jobs_in_flight.values(), key=lambda r: r.started)
            ],
        }

    # ------------------------------------------------------------------
    # admission

    def admit(self, msgid: str, body: Sequence[str]) -> bool:
        """A REQUEST body ``[queue, headers_csv, payload_json]``: start it,
        backlog it, or reject it (never raises, never blocks). A msgid over
        :data:`~emq_green.limits.MAX_MSGID_BYTES` is rejected and never held.

        Returns True for a job this worker already has in flight, sent again
        (:meth:`handed_again`): it is not run twice, and its one REPLY
        answers the router's copy; the caller sends that REPLY on the
        connection the copy came on."""
        size = len(msgid)  # (no call for a uuid: this runs per job)
        if size > MAX_MSGID_BYTES // 4 and (size > MAX_MSGID_BYTES or not msgid.isascii()) \
                and msgid_too_long(msgid):
            self.reject_malformed(msgid, body, ProtocolError(
                f"its msgid is longer than {MAX_MSGID_BYTES} bytes"))
            return False
        try:
            queue, raw_headers, payload = body
            headers = Headers.parse(raw_headers)
            request = RunRequest.parse(payload)
        except Exception as exc:  # whatever the frames hold, the slot comes back
            self.reject_malformed(msgid, body, exc)
            return False
        refused = self.policy.refusal(request)
        if refused is not None:
            self.counters["refused"] += 1
            worker_log.warning("refused", "REQUEST %s refused: %s", printable(msgid),
                               printable(refused, 300), via=logger)
            self._rejected(msgid, headers, JobOutcome.rejected(NOT_ALLOWED, refused))
            return False
        running = self.jobs_in_flight.get(msgid)
        if running is not None:
            if running.queue == queue and running.request == request:
                self.handed_again(running, headers)
                return True
            self.reject_malformed(msgid, body, ProtocolError(
                "its msgid is already in flight here, with another job"))
            return False
        if self.ended_guaranteed and msgid in self.ended_guaranteed:
            _at, ended_queue, ended_request, reply = self.ended_guaranteed[msgid]
            if ended_queue == queue and ended_request == request:
                self.counters["handed_again"] += 1
                worker_log.warning("handed-again", "REQUEST %s ended here a moment ago (the "
                                   "router sent it again as its REPLY crossed); not run "
                                   "twice, its REPLY sent again", printable(msgid),
                                   via=logger)
                self.reply_again(reply, msgid)
                return True
        now = time.monotonic()  # (received and started at once, as a rule: one reading)
        record = JobRecord(msgid, queue, headers, request, now)
        self.jobs_in_flight[msgid] = record
        if self.running >= self.concurrent_jobs:
            self.counters["backlogged"] += 1
            worker_log.warning("backlogged", "REQUEST %s beyond the %d slots offered; it "
                               "waits in the worker", printable(msgid),
                               self.concurrent_jobs, via=logger)
            self.backlog.append(record)
        else:
            self.start(record, now)
        return False

    def ended(self, record: JobRecord, reply: Any) -> None:
        """A guaranteed job ended with ``reply``: kept, encoded, for
        :data:`ENDED_MEMORY_SECONDS` (at most :data:`ENDED_MEMORY` of them and
        :data:`ENDED_MEMORY_BYTES` of replies), for a copy the router may
        send while the REPLY crosses it."""
        ended = self.ended_guaranteed
        now = time.monotonic()
        text = reply if isinstance(reply, str) else encode_reply(reply)
        previous = ended.pop(record.msgid, None)
        if previous is not None:
            self.ended_bytes -= len(previous[3])
        if len(text) <= ENDED_MEMORY_BYTES:
            ended[record.msgid] = (now, record.queue, record.request, text)
            self.ended_bytes += len(text)
        while ended and (len(ended) > ENDED_MEMORY or self.ended_bytes > ENDED_MEMORY_BYTES
                         or next(iter(ended.values()))[0] < now - ENDED_MEMORY_SECONDS):
            self.ended_bytes -= len(ended.popitem(last=False)[1][3])

    def handed_again(self, record: JobRecord, headers: Headers) -> None:
        """The router sent a job again that runs (or waits) here: it took this
        worker for dead (a stop with SIGSTOP, a network split) or restarted
        from its journal, and this worker came back under a new identity.
        Running it twice, or answering the copy with an error (which the
        router would take as the job's end), would break the guarantee; its
        one REPLY answers both."""
        self.counters["handed_again"] += 1
        if headers.reply_requested and not record.headers.reply_requested:
            record.headers = headers
        worker_log.warning("handed-again", "REQUEST %s is already %s here (the router sent "
                           "it again after losing this worker); not run twice, its REPLY "
                           "answers the new copy", printable(record.msgid),
                           "running" if record.greenlet is not None else "waiting",
                           via=logger)

    def reject_malformed(self, msgid: str, body: Sequence[Any], error: BaseException) -> None:
        """An invalid REQUEST: InvalidRequest when a reply was requested."""
        if isinstance(error, ProtocolError):
            text = str(error)
        elif isinstance(error, ValueError) and len(body) != 3:
            text = f"REQUEST needs 3 body frames, got {len(body)}"
        else:
            text = f"{type(error).__name__}: {error}"
        raw_headers = body[1] if len(body) > 1 and isinstance(body[1], str) else ""
        self.counters["invalid_requests"] += 1
        worker_log.warning("invalid", "invalid REQUEST %s: %s", printable(msgid),
                           printable(text, 300), via=logger)
        self._rejected(msgid, Headers(reply_requested=reply_requested_in(raw_headers)),
                       JobOutcome.rejected("InvalidRequest", text))

    # ------------------------------------------------------------------
    # running

    def start(self, record: JobRecord, now: Optional[float] = None) -> None:
        """Run ``record`` in a parked job greenlet, or a new one if none is
        idle; it starts ``now`` (a ``time.monotonic()`` value; default now).

        Job greenlets are kept and reused (at most ``concurrent_jobs`` of
        them): handing a job to a parked greenlet costs a few microseconds,
        creating one costs ten times that, which was the largest single cost
        of a short job. Like threads in a thread pool, a reused greenlet keeps
        its greenlet-local (patched ``threading.local``) state between jobs.
        """
        self.running += 1
        record.started = time.monotonic() if now is None else now
        if self._idle:
            greenlet = record.greenlet = self._idle.pop()
            self._loop.run_callback(greenlet.switch, record)
        else:
            record.greenlet = self.pool.spawn(self._job_greenlet, record)

    def _job_greenlet(self, record: Optional[JobRecord]) -> None:
        """The body of a job greenlet: run jobs, parking in between.

        Parked, it waits in the hub like any waiting greenlet, and is resumed
        only by :meth:`start`'s callback, with the next record. A throw (a
        kill at shutdown) ends it.
        """
        me = gevent.getcurrent()
        hub = self._hub
        idle = self._idle
        try:
            while record is not None:
                self._run_with_backlog(record, me)
                idle.append(me)
                record = hub.switch()
        finally:
            self.job_of_greenlet.pop(me, None)
            if me in idle:
                idle.remove(me)

    def _run_with_backlog(self, record: Optional[JobRecord], me: gevent.Greenlet) -> None:
        # A finished job's greenlet (``me``) takes the next backlogged request
        # itself: spawning into the pool from here would wait on our own pool slot.
        try:
            while record is not None:
                self.job_of_greenlet[me] = record
                self._run_record(record)
                record = self.backlog.popleft() if self.backlog else None
                if record is not None:
                    record.started = time.monotonic()
                    record.greenlet = me
        finally:
            self.running -= 1

    def _run_record(self, record: JobRecord) -> None:
        outcome: Optional[JobOutcome] = None
        pid = self.pid
        hooks = self._hooks
        started, executors, _ = hooks.per_job
        try:
            if self.policy.allowed is not None:
                refused = refused_once_resolved(record.request, self.policy)  # type: ignore[arg-type]
                if refused is not None:  # no hook runs, as for a refusal by name
                    outcome = self._refused(record, refused)
                    self.complete(record, outcome, pid, hooks=False)
                    return
            if started:
                hooks.call(started, "job_started", (record,))
            executor = hooks.executor_for(executors, record) if executors else None
            if executor is None:
                outcome = self.runner.run(record.request, record.headers)  # type: ignore[arg-type]
            else:
                outcome, pid = executor.run(record.request, record.headers)  # type: ignore[arg-type]
        except gevent.GreenletExit as exc:
            if self.stopping:
                outcome = killed("the job was killed when the worker stopped")
                raise
            # The job raised it itself (or some code of its own killed its
            # greenlet): an error like any other. Answered as Killed, a
            # guaranteed job would be sent again and again.
            logger.warning("job %s raised GreenletExit while the worker was not stopping",
                           printable(record.callable_name))
            outcome = JobOutcome.failure(exc)
        except JOB_EXITS as exc:  # sys.exit() in a job: its error
            logger.warning("job %s raised %s: %s", printable(record.callable_name),
                           type(exc).__name__, logged(exc))
            outcome = JobOutcome.failure(exc)
        except BaseException as exc:  # a job must never take the worker down
            logger.exception("job %s crashed the runner", record.msgid)
            outcome = JobOutcome.failure(exc)
        finally:
            if outcome is None:
                outcome = killed("the job greenlet died")
            self.complete(record, outcome, pid)

    def _refused(self, record: JobRecord, exc: Exception) -> JobOutcome:
        worker_log.warning("refused", "REQUEST %s refused: %s", printable(record.msgid),
                           printable(exc, 300), via=logger)
        return JobOutcome.rejected(NOT_ALLOWED, exception_text(exc))

    def complete(self, record: JobRecord, outcome: JobOutcome,
                 pid: Optional[int] = None, hooks: bool = True) -> None:
        """Count the job, tell the extensions, hand it to ``finished`` (once)."""
        if record.done:
            return
        record.done = True
        sent = outcome.sendable()
        if sent is not outcome or outcome.status is Status.TIMED_OUT:  # (else it logs nothing)
            _log_unseen_failure(record, outcome, sent, pid is None or pid == self.pid)
        outcome = sent
        refused = not outcome.attempts and outcome.error_type == NOT_ALLOWED
        # refused once resolved (callables.py): counted as refused, not failed
        self.counters["refused" if refused else STATUS_KEYS[outcome.status]] += 1
        if not hooks:  # refused once resolved: answered as a refusal by its name is
            del self.jobs_in_flight[record.msgid]  # (not a job run: no pid counted)
            self._rejected(record.msgid, record.headers, outcome)  # type: ignore[arg-type]
            return
        finished = self._hooks.per_job[2]
        if finished:
            self._hooks.call(finished, "job_finished",
                             (record, outcome, time.monotonic() - record.started))
        self._finished(record, outcome, pid or self.pid)

    # ------------------------------------------------------------------
    # repair and end

    def repair(self) -> int:
        """Jobs whose greenlet is gone without reporting are completed as
        killed; backlogged jobs start where slots allow. Returns the number
        repaired."""
        repaired = 0
        for record in list(self.jobs_in_flight.values()):
            if record.greenlet is not None and record.greenlet.dead and not record.done:
                repaired += 1
                self.running -= 1
                self.complete(record, killed("the job greenlet died without a result"))
        while self.backlog and self.running < self.concurrent_jobs:
            self.start(self.backlog.popleft())
        if repaired:
            logger.error("check_worker_health repaired %d job(s)", repaired)
        return repaired

    def kill_all(self) -> None:
        """Backlogged jobs end unstarted; running ones are killed (their
        greenlets report Killed)."""
        self.stopping = True
        if self.jobs_in_flight:
            logger.warning("killing %d job(s) still running", len(self.jobs_in_flight))
        for record in list(self.backlog):
            self.complete(record, killed("the worker stopped before the job started", 0))
        self.backlog.clear()
        greenlets = [r.greenlet for r in self.jobs_in_flight.values() if r.greenlet]
        try:
            gevent.killall(greenlets, timeout=KILL_WAIT)
        except gevent.Timeout:
            _stubborn(self)

    def close(self) -> None:
        """End the parked job greenlets."""
        self.stopping = True
        self._idle.clear()
        self.pool.kill(block=False)


__all__ = ["JobSlots"]
