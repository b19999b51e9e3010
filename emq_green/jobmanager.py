"""The cooperative job manager: EventMQ's ``JobManager`` API, run on gevent.

Greenlets stand in for EventMQ's worker processes. The work is split along
the manager's loops:

- :class:`~emq_green.worker.slots.JobSlots` (``slots.py``): admission, backlog,
  parked job greenlets, run, complete, repair, kill; the job runner and
  callable policy built from the settings; it owns ``jobs_in_flight``;
- :class:`~emq_green.worker.session.RouterLink` (``session.py``): the connection,
  INFORM/ACK, the reader and dispatch, heartbeats and liveness, READY
  credit, REPLY sending, and the wait of a graceful stop's drain;
- :class:`~emq_green.worker.supervisor.Supervisor` (``supervisor.py``): the
  lifecycle, stop and reload requests, signal handlers, and the greenlet
  that decides when to connect, reconnect and leave (and the order of a
  stop);
- :class:`JobManager` (here): the EventMQ face: the constructor and its
  settings, what a reload re-reads, start/stop, the status (the parts give
  theirs), and the members the EventMQ documentation lists (as properties
  or thin delegates).

Lifecycle (a :class:`~emq_green.lifecycle.Lifecycle`; only the supervisor
changes it)::

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
from typing import Any, Callable, Collection, Optional, Sequence, TypeVar, Union

import gevent.event
import zmq.green as zmq

from . import __version__
from .extensions import HOOK_FAILURES, Extension, HookRegistry
from .jobs import JobOutcome, Status, import_dotted
from .protocol import Headers, ProtocolError, printable, queue_names, queue_pairs, queues_json
from .records import JobRecord, State, StopMode
from .settings import Settings, SettingsError, default_name, load_settings
from .worker.connection import Connection
from .worker.defaults import default_extensions
from .worker.session import RouterLink, job_ended
from .worker.slots import JobSlots
from .worker.supervisor import Supervisor

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=Extension)
QueuesArg = Union[None, str, Sequence[Union[str, Sequence[Any]]]]
Callback = Callable[[Any, Optional[str], bool, int], None]


def settings_logging_warnings(load: Callable[[], tuple[Settings, Any]] = lambda: load_settings(
        [], os.environ), *, reloading: bool = False, known: Collection[str] = ()) -> Settings:
    """The settings ``load`` reads (:func:`~emq_green.settings.load_settings`'s
    pair; by default the ``EVENTMQ_*`` variables and the INI file), with a
    WARNING for each of the warnings it found (settings that run, as in
    EventMQ, but may not do what was meant): a program logs them at its
    start; a reload and an embedded manager read settings later. With
    ``reloading``, an INI file that could not be read, or has no section of
    this program, raises SettingsError, unless it was so at the start
    (``known``: the start's ``config_warnings``)."""
    settings, ns = load()
    new = [text for text in getattr(ns, "config_warnings", ()) if text not in known]
    if reloading and new:
        # at a start EventMQ reads such a file and runs on its defaults; at
        # a reload that moved a running worker to the default router and
        # queue (a probe): the current settings stay
        raise SettingsError("; ".join(new))
    for text in getattr(ns, "start_warnings", ()):
        logger.warning("settings: %s", text)
    return settings


def _first_settings(manager: JobManager) -> Settings:
    """:meth:`JobManager.jobmanager_main`'s settings: from the manager's
    loader, or the ``EVENTMQ_*`` variables and the INI file, which a reload
    then reads again (a file gone or without its section is then refused)."""
    if manager._settings_loader is not None:
        return manager._settings_loader()
    first = load_settings([], os.environ)
    manager._settings_loader = functools.partial(settings_logging_warnings, reloading=True,
                                                 known=first[1].config_warnings)
    return settings_logging_warnings(lambda: first)


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

    All arguments are optional and keyword-only; EventMQ's keywords
    (``name``, ``queues``, ``concurrent_jobs``, ``skip_signal``) win over the
    settings. Nothing runs before :meth:`start` (in the background) or
    :meth:`jobmanager_main` and :meth:`serve_forever` (blocking).

    Args:
        name: unique name of this instance; default host-pid-random.
        queues: queues to listen on: names (``"email"``, ``"email:20"``) or
            ``[weight, name]`` pairs.
        concurrent_jobs: jobs run at once (greenlets in the pool).
        skip_signal: do not install signal handlers (for tests and embedding).
        settings: a :class:`~emq_green.settings.Settings`; read from the
            usual sources by :meth:`jobmanager_main` when not given.
        settings_loader: called on SIGHUP (:meth:`reload`) to read the
            settings again.
        context: the ``zmq.green`` context; default the process's shared one.
        extensions: :class:`~emq_green.extensions.Extension` objects (hooks
            into each step of a job's and a connection's life); defaults
            (:func:`~emq_green.worker.defaults.default_extensions`) for the rest.

    Other arguments are accepted and ignored (logged at debug level).
    """

    #: The name of this instance, in logs, the process title and socket identities.
    name: str
    #: The ``(weight, name)`` pairs this manager listens on, as INFORM sends them.
    queues: tuple[tuple[int, str], ...]
    #: The number of jobs run at once (greenlet and subprocess jobs alike).
    concurrent_jobs: int
    #: The settings in force, with the constructor's keywords applied.
    settings: Settings

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
        #: When true, :meth:`start` installs no signal handlers.
        self.skip_signal = skip_signal
        #: Other counters (reloads, invalid and refused requests, jobs backlogged, ...).
        self.counters: collections.Counter[str] = collections.Counter()
        #: The number of jobs finished by each process id (killed jobs not counted).
        self.pid_distribution: dict[int, int] = {}
        self._hooks = HookRegistry(self, default_extensions(extensions))
        wake = gevent.event.Event()
        self._slots = JobSlots(hooks=self._hooks, finished=functools.partial(_finished, self),
                               rejected=self._rejected, counters=self.counters)
        self._slots.reply_again = self._reply_again
        self._link = RouterLink(
            context or zmq.Context.instance(), settings=lambda: self.settings,
            counters=self.counters, wake=wake, admit=self._slots.admit,
            reject=self._slots.reject_malformed, on_heartbeat=self.on_heartbeat,
            on_disconnect=lambda: self._supervisor.request_stop(
                StopMode.GRACEFUL, "DISCONNECT from the router"),
            # (the lifecycle read directly: this is asked once per job)
            running=lambda: self._supervisor.lifecycle.state is State.RUNNING)
        self._supervisor = Supervisor(worker=self, link=self._link, slots=self._slots,
                                      hooks=self._hooks, wake=wake, counters=self.counters,
                                      reload_settings=self._reload_settings)
        self._apply_settings(settings or Settings())
        _honour_overrides(self, self._link, self._slots)

    # ------------------------------------------------------------------
    # the members EventMQ documents, and the view extensions get

    @property
    def extensions(self) -> list[Extension]:
        """The extensions, in the order their hooks run."""
        return self._hooks.extensions

    @property
    def outgoing(self) -> Optional[Connection]:
        """The current connection to the router, or None between connections."""
        return self._link.outgoing

    @property
    def jobs_in_flight(self) -> dict[str, JobRecord]:
        """The jobs accepted and not yet finished, by msgid (read only)."""
        return self._slots.jobs_in_flight

    @property
    def total_requests(self) -> int:
        """The number of REQUEST messages received, over all connections."""
        return self._link.total_requests

    @property
    def total_ready_sent(self) -> int:
        """The number of READY messages sent, over all connections."""
        return self._link.total_ready_sent

    @property
    def free_slots(self) -> int:
        """The number of slots not taken by a job."""
        return self._slots.free()

    def timeout_for(self, headers: Headers) -> Optional[float]:
        """A job's timeout (s): its ``timeout:N`` header, else ``global_timeout``; or None."""
        return self._slots.runner.timeout_for(headers)

    def job_of(self, greenlet: Any) -> Optional[JobRecord]:
        """The job ``greenlet`` runs, or ran last; safe from any thread."""
        return self._slots.job_of_greenlet.get(greenlet)

    def extension(self, kind: type[E]) -> Optional[E]:
        """The first extension of type ``kind``, or None."""
        return self._hooks.find(kind)

    # ------------------------------------------------------------------
    # settings

    def _apply_settings(self, settings: Settings) -> None:
        settings = settings.replace(**self._overrides)
        settings = settings.replace(name=settings.name or default_name())  # Settings(): ''
        self._slots.configure_from(settings)  # first: it may raise SettingsError
        self.settings = settings
        self.name = settings.name
        self.queues = settings.queues
        self.concurrent_jobs = settings.concurrent_jobs
        self._supervisor.lifecycle.label = self.name
        self._link.configure(settings)

    def _reload_settings(self) -> bool:
        """A reload is due: re-read the settings, if there is a source; False
        when they could not be read (the current ones stay, and so does the
        connection: nothing changed, a probe saw a KBYE and a new identity
        for nothing)."""
        if self._settings_loader is None:
            logger.info("SIGHUP: no settings source to re-read; reconnecting only")
        else:
            try:
                self._apply_settings(self._settings_loader().replace(name=self.name))
            except SettingsError as exc:
                logger.error("SIGHUP: settings not reloaded, keeping the current ones and "
                             "the connection: %s", exc)
                return False
            logger.info("SIGHUP: settings reloaded (queues %s, concurrent_jobs %d)",
                        queues_json(self.queues), self.concurrent_jobs)
        self._hooks.notify("reload")
        return True

    # ------------------------------------------------------------------
    # lifecycle (the supervisor, emq_green.worker.supervisor, runs it)

    @property
    def state(self) -> State:
        """The lifecycle state (connecting, running, draining or stopped)."""
        return self._supervisor.state

    @property
    def crashed(self) -> Optional[BaseException]:
        """What ended the loop if it crashed, else None (``emq-green`` exits 1)."""
        return self._supervisor.crash

    def wait_for_state(self, state: State | str, timeout: Optional[float] = None) -> bool:
        """Block (cooperatively) until the manager is in ``state``; False
        when ``timeout`` seconds passed first."""
        return self._supervisor.lifecycle.wait_for(state, timeout)

    def start(self, addr: Optional[str] = None, queues: QueuesArg = None) -> None:
        """Start serving in the background and return at once: install the
        signal handlers (unless :attr:`skip_signal`), then connect.

        ``start(addr, queues)``, EventMQ's form, connects to ``addr`` with
        those queues (either may be None) and blocks until stopped, as
        EventMQ's does.

        Raises:
            RuntimeError: when started before (a stopped one too: make a new one).
        """
        if addr is not None or queues is not None:
            _override(self, addr, queues)
            self.serve_forever()
            return
        if not self._supervisor.started:
            _run_setup_func(self.settings.subprocess_setup_func)
        self._supervisor.start(None if self.skip_signal else {
            signal.SIGHUP: self.reload, signal.SIGUSR1: self.log_status})

    def serve_forever(self) -> None:
        """Start (if needed) and block until stopped."""
        if not self._supervisor.started:
            self.start()
        self._supervisor.stopped.wait()

    def stop(self, timeout: Optional[float] = None, graceful: bool = True) -> bool:
        """Ask for a stop and wait up to ``timeout`` seconds for it; True once
        stopped.

        A graceful stop says KBYE, runs what the router had already sent,
        gives running jobs ``kill_grace_period`` and kills the rest; asked
        twice, or with ``graceful=False``, it kills at once.

        Called from a job, it asks for the stop and returns False at once: a
        job cannot wait for the end of the jobs, its own included (it would
        wait ``kill_grace_period`` and be killed).
        """
        if not self._supervisor.started:
            return True
        self._supervisor.request_stop(StopMode.GRACEFUL if graceful else StopMode.NOW)
        if self._supervisor.in_job():
            return self._supervisor.stopped.is_set()
        return self._supervisor.stopped.wait(timeout)

    def reload(self) -> None:
        """What SIGHUP does: re-read the settings (when a settings source was
        given), say KBYE and reconnect with a new identity. Returns at once;
        the manager's own greenlet does the work."""
        self._supervisor.request_reload()

    def jobmanager_main(self, broker_addr: Optional[str] = None) -> None:
        """Read the settings (unless the constructor was given them: from
        ``EVENTMQ_*`` variables and the INI file, no command line), connect
        to ``broker_addr`` and serve until stopped (blocks).

        Args:
            broker_addr: the router's backend address; it replaces
                ``worker_addr`` and both failover addresses.
        """
        if not self._settings_given:
            self._apply_settings(_first_settings(self))
        _override(self, broker_addr, None)
        self.serve_forever()

    # ------------------------------------------------------------------
    # requests and their ends

    def on_request(self, msgid: str, msg: Sequence[str]) -> None:
        """Admit a REQUEST body ``[queue, headers_csv, payload_json]`` as if it
        came from the router on the current connection; never raises, never
        blocks.

        Args:
            msgid: the REQUEST's message id.
            msg: its body; the payload is ``["run", {"path", "callable",
                "args", "kwargs", "class_args", "class_kwargs"}]``, with
                ``"path": "module:Class"`` for a method.
        """
        if self._slots.via_override is not None:  # a subclass's on_request called us
            self._slots.via_override.append(self._slots.admit(msgid, msg))
        elif type(self).on_request is not JobManager.on_request:
            self._slots.admit(msgid, msg)  # by an override later, or directly: not again
        else:
            self._link.request(self._link.outgoing, msgid, msg)

    def on_heartbeat(self, msgid: str, message: list[str]) -> None:
        """Called for each HEARTBEAT from the router: while running, a health
        check (:meth:`check_worker_health`)."""
        if self.state is State.RUNNING:
            self.check_worker_health()

    def _finished(self, record: JobRecord, outcome: JobOutcome, pid: int) -> None:
        _finished(self, record, outcome, pid)  # (the slots call that directly)

    def _reply_again(self, reply: Any, msgid: str) -> None:
        """A guaranteed job that ended here, sent again as its REPLY crossed
        the router's copy: the same REPLY answers the copy (no READY: the
        copy took no slot; the link offers the READY it used again)."""
        self._link.send_reply(reply, msgid)
        if self._link.origins.conn_of:
            self._link.origins.ended(msgid)

    def _rejected(self, msgid: str, headers: Headers, outcome: JobOutcome) -> None:
        """A request that will not run: answered, its slot given back. It
        never entered :attr:`jobs_in_flight` (its msgid may be another job's)."""
        callback = self.worker_done_with_reply if headers.reply_requested else self.worker_done
        callback(outcome.reply(), msgid, False, self._slots.pid)
        if self._link.origins.conn_of:
            self._link.origins.ended(msgid)

    def handle_response(self, resp: dict[str, Any]) -> None:
        """Account for a finished job reported as EventMQ's worker processes
        report one, and call the callback it names.

        Args:
            resp: ``{"callback": name, "msgid": ..., "return": reply,
                "pid": ..., "death": ...}``; ``name`` is ``worker_done``,
                ``worker_done_with_reply`` or ``worker_death``.

        Raises:
            ValueError: for any other callback name.
        """
        name = resp["callback"]
        if name not in _CALLBACKS:
            raise ValueError(f"unknown callback {name!r}")
        self._account(resp.get("msgid"), resp.get("return"), resp.get("pid") or self._slots.pid,
                      bool(resp.get("death")), getattr(self, name))

    def _account(self, msgid: Optional[str], reply: Any, pid: int, death: bool,
                 callback: Callback) -> None:
        _account(self, msgid, reply, pid, death, callback)

    def worker_done(self, reply: Any, msgid: Optional[str], death: bool, pid: int) -> None:
        """Called when a job ends that asked for no reply: offer the freed
        slot to the router (READY), unless the manager is not running.

        Args:
            reply: the job's reply (not sent).
            msgid: the REQUEST's message id.
            death: the job was killed (a stop, a repair).
            pid: the process that ran it.
        """
        job_ended(self._link, msgid, death, self._offer_slots)

    def worker_done_with_reply(self, reply: Any, msgid: Optional[str], death: bool,
                               pid: int) -> None:
        """Called when a job ends whose request had ``reply-requested``:
        :meth:`send_reply`, then offer the freed slot.

        Args:
            reply: ``{"value": ...}``, plus ``"error": {"type", "message"}``
                when the job did not succeed.
            msgid: the REQUEST's message id.
            death: the job was killed (its reply says ``Killed``).
            pid: the process that ran it.
        """
        if msgid is not None:
            self.send_reply(reply, msgid)
        job_ended(self._link, msgid, death, self._offer_slots, replied=True)

    def worker_death(self, reply: Any, msgid: Optional[str], death: bool, pid: int) -> None:
        """Called for a response that names it (:meth:`handle_response`): log
        a warning, check the pool (:meth:`check_worker_health`) and offer the
        free slots."""
        logger.warning("worker %s died (job %s)", pid, msgid)
        self.check_worker_health()
        self._offer_slots()

    def premature_death(self, reply: Any, msgid: Optional[str]) -> None:
        """Does nothing; kept so that code that calls or overrides it works."""

    def check_worker_health(self) -> int:
        """Repair the books and return the number of jobs repaired (0 when
        healthy); called on each HEARTBEAT from the router."""
        return self._slots.repair()

    def _offer_slots(self, running: Optional[bool] = None) -> None:
        self._link.offer_slots(self._slots.free(), running)

    def send_ready(self) -> None:
        """Send one READY: the router may send one more REQUEST.

        Raises:
            RuntimeError: when not connected.
        """
        self._link.send_ready()

    def send_reply(self, reply: Any, msgid: str) -> None:
        """Send ``REPLY [reply_json, msgid]`` to the router, or after the next
        ACK when no connection is up.

        Args:
            reply: JSON text, or a value to encode (one that JSON cannot
                encode becomes the encoder's error text).
            msgid: the REQUEST's message id.
        """
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
        """Log what SIGUSR1 logs: :meth:`status` as one JSON line, then the
        jobs in flight, oldest first (with their msgids, which the HTTP status
        leaves out)."""
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
    """Build a manager from the settings and serve (blocks): the module-level
    entry, as in EventMQ (whose function takes no ``broker_addr``)."""
    JobManager().jobmanager_main(broker_addr=broker_addr)


def _run_setup_func(path: str) -> None:
    """``subprocess_setup_func``, once in this process before it takes jobs:
    EventMQ runs it in each of its worker processes, where its jobs run (a
    ``django.setup()``, say); here jobs run in this process (and in each
    subprocess child, which runs it too). A failure is logged and the
    manager starts, as EventMQ's worker does."""
    if not path:
        return
    try:
        import_dotted(path)()
    except (Exception, SystemExit):  # (sys.exit() in it must not end the worker unsaid)
        logger.exception("subprocess_setup_func %s failed", printable(path))


def _override(manager: JobManager, addr: Optional[str], queues: QueuesArg) -> None:
    """An address (it replaces both failover addresses) and queues given in
    code (:meth:`JobManager.start`, :meth:`JobManager.jobmanager_main`)."""
    if addr:
        manager._overrides.update(worker_addr=addr, worker_addr_default=addr,
                                  worker_addr_failover=addr)
    if queues:
        weight = manager.settings.default_queue_weight
        manager._overrides.update(_overrides(None, queues, None, weight))
    if addr or queues:
        manager._apply_settings(manager.settings)


def _honour_overrides(manager: JobManager, link: RouterLink, slots: JobSlots) -> None:
    """A subclass's :meth:`~JobManager.on_request` is called for every REQUEST
    and its :meth:`~JobManager.send_ready` for every READY, as in EventMQ."""
    cls = type(manager)
    if cls.send_ready is not JobManager.send_ready:
        link.ready_sender = functools.partial(_ready_through, manager, link)
    if cls.on_request is not JobManager.on_request:
        link.admit = functools.partial(_admit_through, manager, slots)


def _finished(manager: JobManager, record: JobRecord, outcome: JobOutcome, pid: int) -> None:
    """A job of the manager's own ended (the slots' ``finished``): a
    guaranteed one's reply is kept (:meth:`JobSlots.ended`), and it is
    accounted and answered (:func:`_respond`)."""
    # (outcome.reply() written out for a success: this runs per job)
    reply = {"value": outcome.value} if outcome.status is Status.SUCCEEDED else outcome.reply()
    killed = outcome.status is Status.KILLED
    if record.headers.guarantee and not killed:
        manager._slots.ended(record, reply)
    if type(manager).handle_response is JobManager.handle_response:  # (_respond's usual case)
        _account(manager, record.msgid, reply, pid, killed, manager.worker_done_with_reply
                 if record.headers.reply_requested else manager.worker_done)
    else:
        _respond(manager, record, reply, pid, killed)


def _respond(manager: JobManager, record: JobRecord, reply: Any, pid: int,
             killed: bool) -> None:
    """A job of the manager's own ended: accounted and answered, through a
    subclass's :meth:`~JobManager.handle_response` when it has one (EventMQ
    passes every finished job through it). One that raises before the base
    method accounted for the job is logged, and the base method does."""
    name = "worker_done_with_reply" if record.headers.reply_requested else "worker_done"
    if type(manager).handle_response is not JobManager.handle_response:
        try:
            manager.handle_response({"callback": name, "msgid": record.msgid,
                                     "return": reply, "pid": pid, "death": killed})
            return
        except HOOK_FAILURES:
            logger.exception("handle_response of %s raised for job %s",
                             type(manager).__name__, printable(record.msgid))
        if record.msgid not in manager.jobs_in_flight:
            return  # accounted for (by the base method) before it raised
    manager._account(record.msgid, reply, pid, killed, getattr(manager, name))


def _account(manager: JobManager, msgid: Optional[str], reply: Any, pid: int, death: bool,
             callback: Callback) -> None:
    """:meth:`JobManager._account`: the job leaves the books, its pid is
    counted (unless killed), ``callback`` is called: ``worker_done`` or
    ``worker_done_with_reply``, maybe a subclass's (one that raises:
    :func:`_call_back_failed`)."""
    if msgid is not None:
        manager._slots.jobs_in_flight.pop(msgid, None)
    if not death:
        manager.pid_distribution[pid] = manager.pid_distribution.get(pid, 0) + 1
    link = manager._link
    ready_sent = link.total_ready_sent
    try:
        callback(reply, msgid, death, pid)
    except HOOK_FAILURES:
        _call_back_failed(manager, callback, (reply, msgid, death, pid), ready_sent)
    if link.origins.conn_of:  # a reload happened with jobs running
        link.origins.ended(msgid)


def _call_back_failed(manager: JobManager, callback: Callback,
                      args: tuple[Any, Optional[str], bool, int], ready_sent: int) -> None:
    """``callback(*args)`` raised (being handled): logged; when it had offered
    no READY yet (none since ``ready_sent``), the base method answers and
    offers the slot (else it would never be offered again)."""
    name = callback.__name__
    logger.exception("%s of %s raised for job %s", name, type(manager).__name__,
                     printable(args[1]))
    base = getattr(JobManager, name, None)
    if (base is not None and getattr(callback, "__func__", None) is not base
            and manager._link.total_ready_sent == ready_sent):
        try:
            base(manager, *args)
        except HOOK_FAILURES:
            logger.exception("%s raised for job %s", name, printable(args[1]))


def _ready_through(manager: JobManager, link: RouterLink) -> None:
    """One READY through a subclass's ``send_ready``; one that raises is
    logged, and the READY sent (else the slot would never be offered again)."""
    sent = link.total_ready_sent
    try:
        manager.send_ready()
    except HOOK_FAILURES:
        logger.exception("send_ready of %s raised", type(manager).__name__)
        if link.total_ready_sent == sent and link.outgoing is not None:
            link.send_ready()


def _admit_through(manager: JobManager, slots: JobSlots, msgid: str,
                   body: Sequence[str]) -> bool:
    """A REQUEST through a subclass's ``on_request``: admitted when it calls
    the base method. One that raises first is an InvalidRequest (the slot
    comes back); one that drops the request gives its READY back."""
    slots.via_override = admitted = []
    try:
        manager.on_request(msgid, body)
    except HOOK_FAILURES as exc:
        logger.exception("on_request of %s raised for REQUEST %s", type(manager).__name__,
                         printable(msgid))
        if not admitted:
            slots.reject_malformed(msgid, body, exc)
    finally:
        slots.via_override = None
    if not admitted:
        manager._offer_slots()
    return bool(admitted and admitted[0])


__all__ = ["JobManager", "JobRecord", "State", "StopMode", "jobmanager_main",
           "settings_logging_warnings"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the emq-green console script")

