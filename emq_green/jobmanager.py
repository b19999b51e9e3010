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

    All arguments are optional and keyword-only; the keywords EventMQ's
    constructor takes (``name``, ``queues``, ``concurrent_jobs``,
    ``skip_signal``) win over the settings. The constructor starts nothing:
    :meth:`start` (in the background) or :meth:`jobmanager_main` and
    :meth:`serve_forever` (blocking) do.

    Args:
        name: unique name of this instance; default host-pid-random. Socket
            identities are derived from it, one fresh identity per connection.
        queues: queues to listen on: names (``"email"``, ``"email:20"``) or
            ``[weight, name]`` pairs.
        concurrent_jobs: jobs run at once (greenlets in the pool).
        skip_signal: do not install signal handlers (for tests and embedding).
        settings: a :class:`~emq_green.settings.Settings`; read from the
            usual sources by :meth:`jobmanager_main` when not given.
        settings_loader: called on SIGHUP (:meth:`reload`) to read the
            settings again.
        context: the ``zmq.green`` context of the sockets; default the
            process's shared one.
        extensions: :class:`~emq_green.extensions.Extension` objects whose
            hooks run at each step of a job's and a connection's life; the
            defaults of :func:`~emq_green.worker.defaults.default_extensions` are
            added for the kinds not given.

    Other arguments are accepted and ignored (logged at debug level).

    EventMQ: the same keywords. There, ``concurrent_jobs`` overwrote the
    process-wide setting and the constructor started a multiprocessing
    manager and installed the signal handlers at once; here settings are
    this object's own and nothing runs before :meth:`start`.
    """

    #: The name of this instance, as used in logs, the process title and
    #: socket identities (``name:pid:n``, a fresh one per connection). From
    #: the ``name`` keyword, else the ``name`` setting, else host-pid-random.
    #:
    #: EventMQ: the same attribute; its default is a generated device name,
    #: and its socket identity is the name itself, reused on reconnect.
    name: str
    #: The ``(weight, name)`` pairs this manager listens on, as its INFORM
    #: sends them. From the ``queues`` keyword, else the ``queues`` setting
    #: (default ``((10, "default"),)``); a reload may change them.
    #:
    #: EventMQ: the same attribute, holding what the constructor was given
    #: (None when nothing was, the settings' queues being used then); here
    #: always the parsed pairs.
    queues: tuple[tuple[int, str], ...]
    #: The number of jobs run at once (job greenlets; subprocess jobs count
    #: too). From the ``concurrent_jobs`` keyword, else the setting (default
    #: 4). The router is never offered more READY credit than this minus the
    #: jobs in flight.
    #:
    #: EventMQ: the number of worker processes, and the keyword changed the
    #: setting for the whole process; here it is this manager's own, often
    #: hundreds, and a reload may change it.
    concurrent_jobs: int
    #: The settings in force (a reload replaces them), with the
    #: constructor's keywords applied.
    #:
    #: EventMQ: not there; its settings are one module of globals.
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
        #: When true, :meth:`start` installs no signal handlers (for tests, and
        #: for an application that owns its signals). Otherwise SIGTERM, SIGINT
        #: and SIGQUIT stop gracefully (a second SIGTERM or SIGINT at once),
        #: SIGHUP calls :meth:`reload` and SIGUSR1 :meth:`log_status`; the
        #: handlers run in the event loop (gevent's signal handling).
        #:
        #: EventMQ: a constructor keyword only, not kept; the handlers were
        #: installed by the constructor, and SIGUSR1 opened a debugger.
        self.skip_signal = skip_signal

        #: Other counters (reloads, invalid and refused requests, jobs
        #: backlogged, ...), shown in the SIGUSR1 status dump.
        #:
        #: EventMQ: not there; emq-green's own.
        self.counters: collections.Counter[str] = collections.Counter()
        #: The number of jobs finished by each process id, this process's for
        #: greenlet jobs and the child's for subprocess jobs; a killed job
        #: is not counted.
        #:
        #: EventMQ: the same mapping, over its worker processes.
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
        """The extensions, in the order their hooks run.

        EventMQ: not there; emq-green's own.
        """
        return self._hooks.extensions

    @property
    def outgoing(self) -> Optional[Connection]:
        """The current :class:`~emq_green.worker.connection.Connection` to the
        router, or None between connections. Every message to the router
        goes through it: one socket, one reader, one send path. Each
        reconnect and each reload makes a new one, with a new identity.

        EventMQ: the DEALER socket (a ``Sender``) made by the constructor and
        rebuilt on reconnect, under the same identity.
        """
        return self._link.outgoing

    @property
    def jobs_in_flight(self) -> dict[str, JobRecord]:
        """The jobs accepted and not yet finished, by msgid, each a
        :class:`~emq_green.records.JobRecord` (queue, headers, request, start
        time, greenlet); jobs waiting in the worker's backlog included.
        Read it, do not change it.

        EventMQ: the same mapping, to ``(start time, the payload sent to a
        worker process)``.
        """
        return self._slots.jobs_in_flight

    @property
    def total_requests(self) -> int:
        """The number of REQUEST messages received, over all connections
        (those read while draining after KBYE included).

        EventMQ: the same count.
        """
        return self._link.total_requests

    @property
    def total_ready_sent(self) -> int:
        """The number of READY messages sent, over all connections.

        EventMQ: the same count.
        """
        return self._link.total_ready_sent

    @property
    def free_slots(self) -> int:
        """The number of slots not taken by a job (``concurrent_jobs`` minus the
        jobs running).

        EventMQ: not there; emq-green's own.
        """
        return self._slots.free()

    def timeout_for(self, headers: Headers) -> Optional[float]:
        """A job's timeout in seconds: its ``timeout:N`` header, else
        ``global_timeout``; None for no timeout.

        EventMQ: not there; emq-green's own.
        """
        return self._slots.runner.timeout_for(headers)

    def job_of(self, greenlet: Any) -> Optional[JobRecord]:
        """The job ``greenlet`` runs, or ran last; safe from any thread.

        EventMQ: not there; emq-green's own.
        """
        return self._slots.job_of_greenlet.get(greenlet)

    def extension(self, kind: type[E]) -> Optional[E]:
        """The first extension of type ``kind``, or None.

        EventMQ: not there; emq-green's own.
        """
        return self._hooks.find(kind)

    # ------------------------------------------------------------------
    # settings

    def _apply_settings(self, settings: Settings) -> None:
        settings = settings.replace(**self._overrides)
        self._slots.configure_from(settings)  # first: it may raise SettingsError
        self.settings = settings
        self.name = settings.name
        self.queues = settings.queues
        self.concurrent_jobs = settings.concurrent_jobs
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
        """The lifecycle state (connecting, running, draining or stopped).

        EventMQ: not there; it keeps a status and three flags.
        """
        return self._lifecycle.state

    def wait_for_state(self, state: State, timeout: Optional[float] = None) -> bool:
        """Block (cooperatively) until the manager is in ``state``; False
        when ``timeout`` seconds passed first.

        EventMQ: not there; emq-green's own.
        """
        return self._lifecycle.wait_for(state, timeout)

    def start(self) -> None:
        """Start serving in the background and return at once: install the
        signal handlers (unless :attr:`skip_signal`), then connect.

        Raises:
            RuntimeError: when started before.

        EventMQ: ``start(addr, queues)`` blocks in the event loop; here
        :meth:`serve_forever` blocks.
        """
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
        """Start (if needed) and block until stopped.

        EventMQ: not there; emq-green's own.
        """
        if self._main is None:
            self.start()
        self._stopped.wait()

    def stop(self, timeout: Optional[float] = None, graceful: bool = True) -> bool:
        """Ask for a stop and wait up to ``timeout`` seconds for it.

        A graceful stop says KBYE, runs what the router had already sent,
        gives running jobs ``kill_grace_period`` and kills the rest; asked
        twice, or with ``graceful=False``, it kills at once. Returns True
        once stopped.

        EventMQ: not there; a stop is a signal (SIGTERM) or DISCONNECT.
        """
        if self._main is None:
            return True
        self._request_stop(StopMode.GRACEFUL if graceful else StopMode.NOW)
        return self._stopped.wait(timeout)

    def reload(self) -> None:
        """What SIGHUP does: re-read the settings (when a settings source was
        given), say KBYE and reconnect with a new identity. Returns at once;
        the manager's own greenlet does the work.

        EventMQ: its SIGHUP handler re-reads the settings and resets the
        connection; here jobs keep running through it and a bad settings
        file keeps the old settings.
        """
        self._reload_requested = True
        self._wake.set()

    def jobmanager_main(self, broker_addr: Optional[str] = None) -> None:
        """Read the settings (unless given), connect to ``broker_addr`` and
        serve until stopped (blocks).

        The settings come from ``EVENTMQ_*`` variables and the INI file (no
        command line) unless the constructor was given ``settings``.

        Args:
            broker_addr: the router's backend address; it replaces
                ``worker_addr`` and both failover addresses.

        EventMQ: the same call; it also imports the settings into its global
        module and sets up logging. Here logging is the application's (the
        ``emq-green`` console script sets it up).
        """
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
                    link.retire()
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
        """Admit a REQUEST body ``[queue, headers_csv, payload_json]`` as if it
        came from the router on the current connection.

        It starts, waits in the worker's backlog when every slot is busy, or
        is answered at once (invalid, refused by ``allowed_callables``, a
        msgid already in flight) with an error reply when one was requested
        (:meth:`JobSlots.admit <emq_green.worker.slots.JobSlots.admit>`). It
        never raises and never blocks; it counts in :attr:`total_requests`.
        The manager's reader admits requests from the wire directly, without
        calling this method: to act on each job, write an
        :class:`~emq_green.extensions.Extension`.

        Args:
            msgid: the REQUEST's message id.
            msg: its body; the payload is ``["run", {"path", "callable",
                "args", "kwargs", "class_args", "class_kwargs"}]``, with
                ``"path": "module:Class"`` for a method.

        EventMQ: the same message, put on the worker processes' queue, and
        called for every REQUEST; a malformed payload raised there. Here the
        run options may also say ``"subprocess": true``, and the headers
        ``retry-count:N`` and ``timeout:N`` are honoured.
        """
        self._link.request(self._link.outgoing, msgid, msg)

    def on_heartbeat(self, msgid: str, message: list[str]) -> None:
        """Called for each HEARTBEAT from the router: while running, a health
        check (:meth:`check_worker_health`). The router's liveness is counted
        for every message it sends, not here; the manager's own heartbeats
        leave from a greenlet of their own (and from a native thread while
        the event loop is blocked).

        EventMQ: the same; its heartbeats are sent from its main loop.
        """
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

    def handle_response(self, resp: dict[str, Any]) -> None:
        """Account for a finished job reported as EventMQ's worker processes
        report one, and call the callback it names.

        The job leaves :attr:`jobs_in_flight` and, unless it died, counts in
        :attr:`pid_distribution`; then the callback runs, looked up on this
        object (a subclass's override runs). The manager's own greenlet and
        subprocess jobs go through the same accounting.

        Args:
            resp: ``{"callback": name, "msgid": ..., "return": reply,
                "pid": ..., "death": ...}``; ``name`` is ``worker_done``,
                ``worker_done_with_reply`` or ``worker_death``; ``return`` is
                the reply (``{"value": ...}``); ``pid`` defaults to this
                process; ``death`` (default false) means the unit that ran
                the job died.

        Raises:
            ValueError: for any other callback name.

        EventMQ: the same dictionaries, read from the worker processes'
        result queue; it called whatever method ``callback`` named, and
        forgot the job only after the callback.
        """
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

    def worker_done(self, reply: Any, msgid: Optional[str], death: bool, pid: int) -> None:
        """Called when a job ends that asked for no reply: offer the freed
        slot to the router (READY), unless the manager is not running.

        Args:
            reply: the job's reply (not sent).
            msgid: the REQUEST's message id.
            death: the job was killed (a stop, a repair).
            pid: the process that ran it.

        EventMQ: the same callback; it sent no READY after a death. Here the
        slot is offered after a killed job too: its greenlet is free again.
        """
        self._offer_slots()

    def worker_done_with_reply(self, reply: Any, msgid: Optional[str], death: bool,
                               pid: int) -> None:
        """Called when a job ends whose request had ``reply-requested``:
        :meth:`send_reply`, then offer the freed slot. Requests answered
        without running (invalid, refused) come here too, their reply
        carrying the error.

        Args:
            reply: ``{"value": ...}``, plus ``"error": {"type", "message"}``
                when the job did not succeed.
            msgid: the REQUEST's message id.
            death: the job was killed (its reply says ``Killed``).
            pid: the process that ran it.

        EventMQ: the same callback; the reply is EventMQ's ``{"value": ...}``
        with emq-green's ``"error"`` beside it, which EventMQ consumers
        ignore.
        """
        if msgid is not None:
            self.send_reply(reply, msgid)
        self._offer_slots()

    def worker_death(self, reply: Any, msgid: Optional[str], death: bool, pid: int) -> None:
        """Called for a response that names it (:meth:`handle_response`): log
        a warning, check the pool (:meth:`check_worker_health`) and offer the
        free slots.

        The manager's own jobs never end here: a killed job ends through
        :meth:`worker_done` or :meth:`worker_done_with_reply` with ``death``
        true, and a crashed subprocess child fails only its own job (error
        type ``ChildProcessError``) and is replaced by its pool.

        EventMQ: the same callback, for a worker process that died; it
        removed the process from the pool, to be replaced later.
        """
        logger.warning("worker %s died (job %s)", pid, msgid)
        self.check_worker_health()
        self._offer_slots()

    def premature_death(self, reply: Any, msgid: Optional[str]) -> None:
        """Does nothing; kept so that code that calls or overrides it works.

        EventMQ: meant for a worker process that died before running any
        job, and a no-op there too. A greenlet cannot die that way; a
        subprocess child that does is replaced by its pool.
        """

    def check_worker_health(self) -> int:
        """Repair the books and return the number of jobs repaired (0 when
        healthy).

        A job whose greenlet ended without reporting (it should not happen)
        is completed as killed, answered and its slot offered again; jobs
        waiting in the worker's backlog start where slots allow
        (:meth:`JobSlots.repair <emq_green.worker.slots.JobSlots.repair>`).
        Called on each HEARTBEAT from the router.

        EventMQ: the same call; it killed and recreated dead worker
        processes and returned nothing.
        """
        return self._slots.repair()

    def _offer_slots(self) -> None:
        self._link.offer_slots(self._slots.free())

    def send_ready(self) -> None:
        """Send one READY: the router may send one more REQUEST.

        The manager sends READYs itself, exactly its free slots after each
        ACK and one after each job; a READY sent here is credit beyond that,
        and a REQUEST that uses it waits in the worker's backlog.

        Raises:
            RuntimeError: when not connected.

        EventMQ: the same message; after a reconnect it sent one per worker
        process, busy or not.
        """
        self._link.send_ready()

    def send_reply(self, reply: Any, msgid: str) -> None:
        """Send ``REPLY [reply_json, msgid]`` to the router.

        Between connections (after a reconnect, before its ACK) the reply is
        kept and sent after the next ACK.

        Args:
            reply: JSON text, or a value to encode (one that JSON cannot
                encode becomes the encoder's error text).
            msgid: the REQUEST's message id.

        EventMQ: the same message, sent at once; its callers encoded the
        reply first.
        """
        self._link.send_reply(reply, msgid)

    # ------------------------------------------------------------------
    # status

    def status(self) -> dict[str, Any]:
        """What the SIGUSR1 dump, the metrics and the worker page show: the
        extensions' keys, then the manager's, the link's and the slots'.

        EventMQ: not there; emq-green's own.
        """
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
        jobs in flight, oldest first.

        EventMQ: not there; its SIGUSR1 opened a debugger.
        """
        _log_status(self.status())


def _log_status(status: dict[str, Any], most: int = 200) -> None:
    """Log ``status`` as one JSON line, then up to ``most`` of its jobs in flight."""
    jobs = status.pop("jobs_in_flight")
    logger.info("status: %s", json.dumps(status, sort_keys=True))
    for job in jobs[:most]:
        logger.info("  in flight %.3fs %s %s (queue %s)", job["age"], job["callable"],
                    job["msgid"], job["queue"])
    if len(jobs) > most:
        logger.info("  ... and %d more", len(jobs) - most)


def jobmanager_main(broker_addr: Optional[str] = None) -> None:
    """Build a manager from the settings and serve (blocks): the module-level
    entry, as in EventMQ (whose function takes no ``broker_addr``)."""
    JobManager().jobmanager_main(broker_addr=broker_addr)


__all__ = ["JobManager", "JobRecord", "State", "StopMode", "jobmanager_main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the emq-green console script")
