"""The cooperative job manager: EventMQ's ``JobManager`` API, run on gevent.

Greenlets stand in for EventMQ's worker processes. The work is split along
the manager's loops:

- :class:`~emq_green.worker.slots.JobSlots` (``slots.py``): admission, backlog,
  parked job greenlets, run, complete, repair, kill; the job runner and
  callable policy built from the settings; it owns ``jobs_in_flight``;
- :class:`~emq_green.worker.session.RouterLink` (``session.py``): the connection,
  INFORM/ACK, the reader and dispatch, heartbeats and liveness, READY
  credit, REPLY sending, and the wait of a graceful stop's drain;
- :class:`JobManager` (here): the EventMQ face: the constructor and its
  settings, reload, start/stop and signals, the supervisor that decides
  when to connect, reconnect and leave (and the order of a stop), the
  status (the parts give theirs), and the members the EventMQ
  documentation lists (as properties or thin delegates).

Lifecycle (a :class:`~emq_green.lifecycle.Lifecycle`; only :meth:`JobManager.start`
and the supervisor change it)::

    connecting -> running -> (router dead / SIGHUP) -> connecting -> ...
    running|connecting -> draining -> stopped

Graceful stop order: KBYE to the router; no more READY or HEARTBEAT; the
socket is still read while the router may send REQUESTs it had credit for
(until it has been quiet for ``heartbeat_timeout``), and those run; running
jobs get ``kill_grace_period``; what is left is killed (their replies say
``Killed``); the socket closes with a short linger so the last replies leave.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import gevent
import gevent.event
import zmq.green as zmq

from . import __version__
from .extensions import Extension, HookRegistry
from .jobs import JobOutcome, Status
from .lifecycle import Lifecycle, install_signal_handlers
from .protocol import Headers, ProtocolError, queue_names, queue_pairs, queues_json
from .records import JobRecord, State, StopMode
from .settings import Settings, SettingsError, load_settings
from .worker.connection import Connection
from .worker.defaults import default_extensions
from .worker.session import RouterLink
from .worker.slots import JobSlots

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=Extension)
QueuesArg = Union[None, str, Sequence[Union[str, Sequence[Any]]]]
Callback = Callable[[Any, Optional[str], bool, int], None]


def _overrides(name: Optional[str], queues: QueuesArg, concurrent_jobs: Optional[int],
               weight: int) -> dict[str, Any]:
    """The constructor's keywords as settings that win over every source.
    Queues come in EventMQ's forms: "a,b", ["a", "b:20"], [[10, "a"], ...]."""
    overrides: dict[str, Any] = {}
    if name:
        overrides["name"] = name
    if concurrent_jobs is not None:
        overrides["concurrent_jobs"] = int(concurrent_jobs)
    if queues:
        items = [queues] if isinstance(queues, str) else list(queues)
        try:
            overrides["queues"] = (queue_names(items, weight)  # type: ignore[arg-type]
                                   if all(isinstance(q, str) for q in items)
                                   else queue_pairs(items))
        except ProtocolError as exc:
            raise ValueError(f"queues: {exc}") from None
    return overrides


#: the callbacks :meth:`JobManager.handle_response` may name (called through
#: the manager, so a subclass's overrides run)
_CALLBACKS = frozenset({"worker_done", "worker_done_with_reply", "worker_death"})

class JobManager:
    """A drop-in for ``eventmq.jobmanager.JobManager`` that runs jobs in greenlets.

    Keyword arguments (all optional):
        name: unique name of this instance; default host-pid-random. Socket
            identities are derived from it, one fresh identity per connection.
        queues: queue names (or ``[weight, name]`` pairs) to listen on.
        concurrent_jobs: jobs run at once (greenlets in the pool).
        skip_signal: do not install signal handlers (for tests and embedding).
        settings: a :class:`~emq_green.settings.Settings`; read from the
            usual sources by :meth:`jobmanager_main` when not given.
        settings_loader: called on SIGHUP (:meth:`reload`) to read the
            settings again.
        extensions: :class:`~emq_green.extensions.Extension` objects whose
            hooks run at each step of a job's and a connection's life; the
            defaults of :func:`~emq_green.worker.defaults.default_extensions` are
            added for the kinds not given.
    """

    def __init__(self, *args: Any, settings: Optional[Settings] = None,
                 name: Optional[str] = None, queues: QueuesArg = None,
                 concurrent_jobs: Optional[int] = None, skip_signal: bool = False,
                 settings_loader: Optional[Callable[[], Settings]] = None,
                 context: Optional[zmq.Context] = None,
                 extensions: Sequence[Extension] = (), **kwargs: Any) -> None:
        if args or kwargs:
            logger.debug("ignoring JobManager arguments %r %r", args, kwargs)
        self._overrides = _overrides(name, queues, concurrent_jobs,
                                     (settings or Settings()).default_queue_weight)
        self._settings_given = settings is not None
        self._settings_loader = settings_loader
        self.skip_signal = skip_signal

        #: Other counters, shown in the SIGUSR1 status dump.
        self.counters: collections.Counter[str] = collections.Counter()
        #: Jobs finished per process id: this process for greenlet jobs,
        #: the child's pid for subprocess jobs.
        self.pid_distribution: dict[int, int] = {}
        self._hooks = HookRegistry(self, default_extensions(extensions))
        self._wake = gevent.event.Event()
        self._slots = JobSlots(hooks=self._hooks, finished=self._finished,
                               rejected=self._rejected, counters=self.counters)
        self._link = RouterLink(
            context or zmq.Context.instance(), settings=lambda: self.settings,
            counters=self.counters, wake=self._wake, admit=self._slots.admit,
            reject=self._slots.reject_malformed, on_heartbeat=self.on_heartbeat,
            on_disconnect=functools.partial(self._request_stop, StopMode.GRACEFUL,
                                            "DISCONNECT from the router"),
            running=lambda: self._lifecycle.state is State.RUNNING)
        self._lifecycle: Lifecycle[State] = Lifecycle(State.STOPPED, "")
        self._apply_settings(settings or Settings())

        self._stop_mode: Optional[StopMode] = None
        self._reload_requested = False
        self._main: Optional[gevent.Greenlet] = None
        self._stopped = gevent.event.Event()
        self._signal_handlers: list[Any] = []

    # ------------------------------------------------------------------
    # the members EventMQ documents, and the view extensions get

    @property
    def extensions(self) -> list[Extension]:
        """The extensions, in the order their hooks run."""
        return self._hooks.extensions

    @property
    def outgoing(self) -> Optional[Connection]:
        """The current :class:`~emq_green.worker.connection.Connection` to the
        router (None between connections). Every send goes through it."""
        return self._link.outgoing

    @property
    def jobs_in_flight(self) -> dict[str, JobRecord]:
        """Jobs accepted and not yet finished: msgid -> :class:`JobRecord`."""
        return self._slots.jobs_in_flight

    @property
    def total_requests(self) -> int:
        """REQUEST messages received."""
        return self._link.total_requests

    @property
    def total_ready_sent(self) -> int:
        """READY messages sent."""
        return self._link.total_ready_sent

    @property
    def free_slots(self) -> int:
        return self._slots.free()

    def timeout_for(self, headers: Headers) -> Optional[float]:
        return self._slots.runner.timeout_for(headers)

    def job_of(self, greenlet: Any) -> Optional[JobRecord]:
        return self._slots.job_of_greenlet.get(greenlet)

    def extension(self, kind: type[E]) -> Optional[E]:
        return self._hooks.find(kind)

    # ------------------------------------------------------------------
    # settings

    def _apply_settings(self, settings: Settings) -> None:
        settings = settings.replace(**self._overrides)
        self._slots.configure_from(settings)  # first: it may raise SettingsError
        self.settings: Settings = settings
        #: Name of this instance, as used in logs and socket identities.
        self.name: str = settings.name
        #: ``(weight, name)`` pairs this manager listens on.
        self.queues: tuple[tuple[int, str], ...] = settings.queues
        #: Jobs run at once: the pool size.
        self.concurrent_jobs: int = settings.concurrent_jobs
        self._lifecycle.label = self.name
        self._link.configure(settings)

    def _reload_if_asked(self) -> bool:
        """When a reload was asked for: re-read the settings, if there is a
        source (a bad one keeps the current settings), and return True."""
        if not self._reload_requested:
            return False
        self._reload_requested = False
        if self._settings_loader is None:
            logger.info("SIGHUP: no settings source to re-read; reconnecting only")
        else:
            try:
                self._apply_settings(self._settings_loader().replace(name=self.name))
            except SettingsError as exc:
                logger.error("SIGHUP: settings not reloaded, keeping the current ones: %s", exc)
                return True
            logger.info("SIGHUP: settings reloaded (queues %s, concurrent_jobs %d)",
                        queues_json(self.queues), self.concurrent_jobs)
        self._hooks.notify("reload")
        return True

    # ------------------------------------------------------------------
    # lifecycle

    @property
    def state(self) -> State:
        """connecting, running, draining or stopped."""
        return self._lifecycle.state

    def wait_for_state(self, state: State, timeout: Optional[float] = None) -> bool:
        """Block (cooperatively) until the manager is in ``state``."""
        return self._lifecycle.wait_for(state, timeout)

    def start(self) -> None:
        """Start serving in the background; returns at once."""
        if self._main is not None:
            raise RuntimeError("JobManager already started")
        self._slots.begin()
        if not self.skip_signal:
            self._install_signals()
        self._lifecycle.set(State.CONNECTING)
        self._hooks.notify("manager_started")
        self._main = gevent.spawn(self._run)
        self._link.start_heartbeats()

    def serve_forever(self) -> None:
        """Start (if needed) and block until stopped."""
        if self._main is None:
            self.start()
        self._stopped.wait()

    def stop(self, timeout: Optional[float] = None, graceful: bool = True) -> bool:
        """Ask for a stop and wait up to ``timeout`` for it; True when stopped."""
        if self._main is None:
            return True
        self._request_stop(StopMode.GRACEFUL if graceful else StopMode.NOW)
        return self._stopped.wait(timeout)

    def reload(self) -> None:
        """What SIGHUP does: re-read the settings (when a settings source was
        given), say KBYE and reconnect with a new identity. Returns at once;
        the manager's own greenlet does the work."""
        self._reload_requested = True
        self._wake.set()

    def jobmanager_main(self, broker_addr: Optional[str] = None) -> None:
        """Read the settings (unless given), connect to ``broker_addr`` and serve."""
        if not self._settings_given:
            if self._settings_loader is None:
                self._settings_loader = lambda: load_settings([], os.environ)[0]
            self._apply_settings(self._settings_loader())
        if broker_addr:
            self._overrides.update(worker_addr=broker_addr, worker_addr_default=broker_addr,
                                   worker_addr_failover=broker_addr)
            self._apply_settings(self.settings)
        self.serve_forever()

    def _request_stop(self, mode: StopMode, why: str = "") -> None:
        if why:
            logger.info("%s: stopping%s", why, " at once" if self._stop_mode else " gracefully")
        if self._stop_mode is StopMode.GRACEFUL and mode is StopMode.GRACEFUL:
            mode = StopMode.NOW  # asked twice: stop at once
        if self._stop_mode is not StopMode.NOW:
            self._stop_mode = mode
        self._wake.set()

    def _install_signals(self) -> None:
        stop = functools.partial(self._request_stop, StopMode.GRACEFUL, "signal received")
        self._signal_handlers = install_signal_handlers({
            signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: self.reload,
            signal.SIGQUIT: functools.partial(self._request_stop, StopMode.GRACEFUL),
            signal.SIGUSR1: self.log_status})

    # ------------------------------------------------------------------
    # the supervisor: connect, serve, reconnect, leave

    def _run(self) -> None:
        try:
            while self._stop_mode is None:
                self._session(self._link.next_addr())
            self._shutdown()
        except BaseException:
            logger.exception("job manager loop crashed; stopping")
            self._slots.kill_all()
            raise
        finally:
            for handler in self._signal_handlers:
                handler.cancel()
            self._slots.close()
            self._link.close()
            self._lifecycle.set(State.STOPPED)
            self._hooks.notify("manager_stopped")
            self._stopped.set()

    def _session(self, addr: str) -> None:
        """One connection: INFORM, wait for ACK, serve until it must end.

        A reload asked for while the INFORM waits for its ACK is done once
        the connection is up (or before the next one)."""
        self._reload_if_asked()
        link = self._link
        self._lifecycle.set(State.CONNECTING)
        link.open(addr, self.name, self.queues, self._slots.pid)
        try:
            if not link.wait_for_ack(lambda: self._stop_mode is not None):
                return
            logger.info("ACK from %s; %d job(s) still running, %d slot(s) free", addr,
                        len(self.jobs_in_flight), self.free_slots)
            self._lifecycle.set(State.RUNNING)
            self._hooks.notify("connected", addr, link.outgoing.identity)  # type: ignore[union-attr]
            link.up()
            # flags first, then wait: a wake-up taken by the wait for the ACK
            # must not hide a reload asked for meanwhile
            while self._stop_mode is None:
                if self._reload_if_asked():
                    self.counters["reloads"] += 1
                    self._hooks.notify("disconnected", "settings reloaded")
                    link.retire(running=list(self.jobs_in_flight))
                    return
                if link.router_gone:
                    logger.error("%s; reconnecting", link.router_gone)
                    self.counters["router_lost"] += 1
                    self._hooks.notify("disconnected", link.router_gone)
                    return
                self._offer_slots()  # (after a retired connection closed: its READYs)
                self._wake.wait()
                self._wake.clear()
        finally:
            link.end(stopping=self._stop_mode is not None)

    def _shutdown(self) -> None:
        """KBYE; drain (graceful) or not (now); kill what is left; leave."""
        was_running = self.state is State.RUNNING
        self._lifecycle.set(State.DRAINING)
        if was_running:
            self._link.say_kbye()
        if self._stop_mode is StopMode.GRACEFUL:
            self._link.drain(self.settings.kill_grace_period, requests_may_come=was_running,
                             busy=lambda: len(self.jobs_in_flight),
                             keep_waiting=lambda: self._stop_mode is StopMode.GRACEFUL)
        self._slots.kill_all()
        self._link.stop_reading()

    # ------------------------------------------------------------------
    # requests and their ends

    def on_request(self, msgid: str, msg: Sequence[str]) -> None:
        """A REQUEST body ``[queue, headers_csv, payload_json]`` on the current
        connection: it runs, waits in the backlog, or is answered at once
        (:meth:`JobSlots.admit <emq_green.worker.slots.JobSlots.admit>`); never blocks."""
        self._link.request(self._link.outgoing, msgid, msg)

    def on_heartbeat(self, msgid: str, message: list[str]) -> None:
        """HEARTBEAT from the router: a health check of the pool, as in EventMQ
        (liveness is counted for every message, in ``Connection.recv_batch``)."""
        if self.state is State.RUNNING:
            self.check_worker_health()

    def _finished(self, record: JobRecord, outcome: JobOutcome, pid: int) -> None:
        self._account(record.msgid, outcome.reply(), pid, outcome.status is Status.KILLED,
                      self.worker_done_with_reply if record.headers.reply_requested
                      else self.worker_done)

    def _rejected(self, msgid: str, headers: Headers, outcome: JobOutcome) -> None:
        """A request that will not run: answered, its slot given back. It
        never entered :attr:`jobs_in_flight` (its msgid may be another job's)."""
        callback = self.worker_done_with_reply if headers.reply_requested else self.worker_done
        callback(outcome.reply(), msgid, False, self._slots.pid)
        if self._link.origins.conn_of:
            self._link.origins.ended(msgid)

    def handle_response(self, resp: dict[str, Any]) -> None:
        """Account for a finished job as EventMQ's worker processes report
        one (``{"callback": "worker_done" | "worker_done_with_reply" |
        "worker_death", "msgid", "return", "pid", "death"}``) and call its
        callback, after the job left :attr:`jobs_in_flight`. Greenlet and
        subprocess jobs go through the same accounting."""
        name = resp["callback"]
        if name not in _CALLBACKS:
            raise ValueError(f"unknown callback {name!r}")
        self._account(resp.get("msgid"), resp.get("return"), resp.get("pid") or self._slots.pid,
                      bool(resp.get("death")), getattr(self, name))

    def _account(self, msgid: Optional[str], reply: Any, pid: int, death: bool,
                 callback: Callback) -> None:
        if msgid is not None:
            self._slots.jobs_in_flight.pop(msgid, None)
        if not death:
            self.pid_distribution[pid] = self.pid_distribution.get(pid, 0) + 1
        callback(reply, msgid, death, pid)
        if self._link.origins.conn_of:  # a reload happened with jobs running
            self._link.origins.ended(msgid)

    def worker_done(self, reply: Any, msgid: Optional[str], death: bool, pid: int) -> None:
        """A job finished without a reply requested: offer its slot."""
        self._offer_slots()

    def worker_done_with_reply(self, reply: Any, msgid: Optional[str], death: bool,
                               pid: int) -> None:
        """A job finished and its caller asked for the result: REPLY, then READY."""
        if msgid is not None:
            self.send_reply(reply, msgid)
        self._offer_slots()

    def worker_death(self, reply: Any, msgid: Optional[str], death: bool, pid: int) -> None:
        """The unit that ran a job died (a killed greenlet, a crashed child).
        Its slot is already free; this logs it and checks the pool."""
        logger.warning("worker %s died (job %s)", pid, msgid)
        self.check_worker_health()
        self._offer_slots()

    def premature_death(self, reply: Any, msgid: Optional[str]) -> None:
        """A worker died before running any job. Greenlets cannot; kept for
        API compatibility (subprocess children are restarted by their pool)."""

    def check_worker_health(self) -> int:
        """Repair the books (:meth:`JobSlots.repair <emq_green.worker.slots.JobSlots.repair>`);
        returns the number of jobs repaired (0 when healthy)."""
        return self._slots.repair()

    def _offer_slots(self) -> None:
        self._link.offer_slots(self._slots.free())

    def send_ready(self) -> None:
        """Send one READY: the router may send one more REQUEST."""
        self._link.send_ready()

    def send_reply(self, reply: Any, msgid: str) -> None:
        """Send ``REPLY [reply_json, msgid]``; a dict is encoded first. Kept
        until the next ACK when no connection is up."""
        self._link.send_reply(reply, msgid)

    # ------------------------------------------------------------------
    # status

    def status(self) -> dict[str, Any]:
        """What the SIGUSR1 dump, the metrics and the worker page show: the
        extensions' keys, then the manager's, the link's and the slots'."""
        return {
            **self._hooks.status(),
            "name": self.name, "version": __version__, "state": self.state.value,
            "concurrent_jobs": self.concurrent_jobs,
            **self._link.status(),
            "pid_distribution": dict(self.pid_distribution),
            "counters": dict(self.counters),
            **self._slots.status(time.monotonic()),
        }

    def log_status(self) -> None:
        """The SIGUSR1 dump: counters, then jobs in flight oldest first (with
        their msgids, which the HTTP status leaves out)."""
        _log_status(self.status(), list(self.jobs_in_flight.values()))


def _log_status(status: dict[str, Any], records: list[JobRecord], most: int = 200) -> None:
    """Log ``status`` as one JSON line, then up to ``most`` of the jobs in flight."""
    status.pop("jobs_in_flight", None)
    logger.info("status: %s", json.dumps(status, sort_keys=True))
    now = time.monotonic()
    records.sort(key=lambda r: r.started)
    for record in records[:most]:
        logger.info("  in flight %.3fs %s %s (queue %s)", now - record.started,
                    record.callable_name, record.msgid, record.queue)
    if len(records) > most:
        logger.info("  ... and %d more", len(records) - most)


def jobmanager_main(broker_addr: Optional[str] = None) -> None:
    """Module-level entry, as in EventMQ: build a manager from the settings."""
    JobManager().jobmanager_main(broker_addr=broker_addr)


__all__ = ["JobManager", "JobRecord", "State", "StopMode", "jobmanager_main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the emq-green console script")
