"""The cooperative job manager: EventMQ's ``JobManager`` API, run on gevent.

Greenlets stand in for EventMQ's worker processes. One greenlet reads the
router socket, one sends heartbeats, one drives the lifecycle; each job runs
in a greenlet of a :class:`gevent.pool.Pool` of ``concurrent_jobs``.

Lifecycle (changed only by :meth:`JobManager._set_state`)::

    connecting -> running -> (router dead / SIGHUP) -> connecting -> ...
    running|connecting -> draining -> stopped

Slot accounting. The router trusts READY counts completely, so the manager
keeps one invariant: READYs outstanding on the current connection never
exceed ``concurrent_jobs - len(jobs_in_flight)``. After each ACK it offers
exactly the free slots (jobs still running from an old connection stay
counted); after each job it offers a slot only if the invariant allows. A
REQUEST beyond the slots offered (an over-committing router) is still run,
in a backlog, and costs no extra READY.

Graceful stop order: KBYE to the router; no more READY or HEARTBEAT; REQUESTs
already on the wire are still run; running jobs get ``kill_grace_period``;
what is left is killed (their replies say ``Killed``); the socket closes
with a short linger so the last replies leave.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from enum import Enum
from typing import Any, Callable, Optional, Sequence, Union

import gevent
import gevent.event
import gevent.pool
import zmq.green as zmq

from . import __version__
from .callables import NOT_ALLOWED, CallablePolicy
from .connection import Connection
from .curve import client_curve_from_settings
from .extensions import Executor, Extension
from .jobs import JobOutcome, JobRunner, Status, encode_reply, import_dotted
from .lifecycle import Lifecycle
from .monitor import monitoring_extensions
from .protocol import (
    Command,
    Headers,
    Message,
    ProtocolError,
    RunRequest,
    printable,
    queues_json,
    ready_frames,
    reply_frames,
    reply_requested_in,
    request_parts,
)
from .settings import Settings, SettingsError, load_settings
from .subprocess_pool import SubprocessExtension

logger = logging.getLogger(__name__)

# Messages the reader takes from the socket before it lets other greenlets run.
READ_CHUNK = 32
# How long the last replies may take to leave when the socket closes.
CLOSE_LINGER = 2.0


class State(str, Enum):
    CONNECTING = "connecting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


_STATUS_KEYS = {status: status.value for status in Status}


class StopMode(str, Enum):
    GRACEFUL = "graceful"
    NOW = "now"


class JobRecord:
    """One entry of :attr:`JobManager.jobs_in_flight` (a slotted class:
    one is built per job)."""

    __slots__ = ("msgid", "queue", "headers", "request", "started", "greenlet", "done")

    def __init__(self, msgid: str, queue: str, headers: Headers,
                 request: Optional[RunRequest] = None) -> None:
        self.msgid = msgid
        self.queue = queue
        self.headers = headers
        self.request = request
        #: monotonic time the job started (or was received, until it starts)
        self.started = time.monotonic()
        #: the greenlet running it, once started
        self.greenlet: Optional[gevent.Greenlet] = None
        self.done = False

    def __repr__(self) -> str:
        return f"<JobRecord {self.msgid} {self.callable_name} queue={self.queue}>"

    @property
    def callable_name(self) -> str:
        return self.request.name if self.request else "<invalid request>"

    @property
    def age(self) -> float:
        return time.monotonic() - self.started


QueuesArg = Union[None, str, Sequence[Union[str, Sequence[Any]]]]


def _normalise_queues(queues: QueuesArg, weight: int) -> Optional[tuple[tuple[int, str], ...]]:
    """Accept EventMQ's forms: "a,b", ["a", "b"], [[10, "a"], ...]."""
    if not queues:
        return None
    if isinstance(queues, str):
        queues = [q for q in queues.split(",") if q]
    result = []
    for q in queues:
        if isinstance(q, str):
            name, sep, w = q.partition(":")
            result.append((int(w) if sep else weight, name))
        else:
            w, name = q
            result.append((int(w), str(name)))
    return tuple(result)


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
        settings_loader: called on SIGHUP to read the settings again.
        extensions: :class:`~emq_green.extensions.Extension` objects whose
            hooks run at each step of a job's and a connection's life.
    """

    def __init__(
        self,
        *args: Any,
        settings: Optional[Settings] = None,
        name: Optional[str] = None,
        queues: QueuesArg = None,
        concurrent_jobs: Optional[int] = None,
        skip_signal: bool = False,
        settings_loader: Optional[Callable[[], Settings]] = None,
        context: Optional[zmq.Context] = None,
        extensions: Sequence[Extension] = (),
        **kwargs: Any,
    ) -> None:
        if args or kwargs:
            logger.debug("ignoring JobManager arguments %r %r", args, kwargs)
        self._overrides: dict[str, Any] = {}
        if name:
            self._overrides["name"] = name
        if concurrent_jobs is not None:
            self._overrides["concurrent_jobs"] = int(concurrent_jobs)
        weight = (settings or Settings()).default_queue_weight
        normalised = _normalise_queues(queues, weight)
        if normalised:
            self._overrides["queues"] = normalised
        self._settings_given = settings is not None
        self._settings_loader = settings_loader
        self.skip_signal = skip_signal
        self._context = context or zmq.Context.instance()
        self.extensions: list[Extension] = list(extensions)
        self._hook_cache: dict[str, list[Callable[..., Any]]] = {}
        self._hooks_for = 0  # len(self.extensions) when the cache was filled
        self._job_hooks: Optional[tuple[list[Callable[..., Any]], ...]] = None
        if not any(isinstance(e, SubprocessExtension) for e in self.extensions):
            # CPU-bound jobs ("subprocess": true, subprocess_callables); its
            # pool starts on the first such job.
            self.extensions.append(SubprocessExtension())
        # loop-block monitor, heartbeats while the loop is blocked, offload,
        # metrics endpoint, process title (docs/monitoring.md)
        self.extensions.extend(monitoring_extensions(self.extensions))

        #: Name of this instance, as used in logs and socket identities.
        self.name: str = ""
        #: ``(weight, name)`` pairs this manager listens on.
        self.queues: tuple[tuple[int, str], ...] = ()
        #: Jobs run at once: the pool size.
        self.concurrent_jobs: int = 0
        self.settings: Settings = Settings()
        self._apply_settings(settings or Settings())

        #: The current :class:`~emq_green.connection.Connection` to the
        #: router (None between connections). Every send goes through it.
        self.outgoing: Optional[Connection] = None
        #: Jobs accepted and not yet finished: msgid -> :class:`JobRecord`.
        self.jobs_in_flight: dict[str, JobRecord] = {}
        #: REQUEST messages received.
        self.total_requests = 0
        #: READY messages sent.
        self.total_ready_sent = 0
        #: Jobs finished per process id: this process for greenlet jobs,
        #: the child's pid for subprocess jobs.
        self.pid_distribution: dict[int, int] = {}
        #: Other counters, shown in the SIGUSR1 status dump.
        self.counters: collections.Counter[str] = collections.Counter()

        self._lifecycle: Lifecycle[State] = Lifecycle(State.STOPPED, self.name)
        self._wake = gevent.event.Event()
        self._stop_mode: Optional[StopMode] = None
        self._reload_requested = False
        self._router_gone: Optional[str] = None
        self._acked = gevent.event.Event()
        #: connections left after a reload, still read until the router is quiet
        self._retiring: list[Connection] = []
        self._lingering = gevent.pool.Group()
        self._running = 0
        self._backlog: collections.deque[JobRecord] = collections.deque()
        self._pending_replies: list[tuple[str, str]] = []
        # A Group, not Pool(concurrent_jobs): a Pool frees its slot only when
        # the finished greenlet's link callback runs, one hub iteration
        # later, so a REQUEST arriving in between would make the reader wait
        # on the pool. The limit is kept exactly by ``_running`` instead.
        self._pool = gevent.pool.Group()
        #: parked job greenlets, ready for the next job
        self._idle: list[gevent.Greenlet] = []
        #: job greenlet -> the job it runs or ran last (for the loop-block
        #: monitor, which reads it from its own thread)
        self.job_of_greenlet: dict[gevent.Greenlet, JobRecord] = {}
        self._hub = gevent.get_hub()
        self._loop = self._hub.loop
        self._pid = os.getpid()
        self._connections_made = 0
        self._addr_index = 0
        self._main: Optional[gevent.Greenlet] = None
        self._stopped = gevent.event.Event()
        self._signal_handlers: list[Any] = []
        self._callbacks: dict[str, Callable[[Any, Optional[str], bool, int], None]] = {
            "worker_done": self.worker_done,
            "worker_done_with_reply": self.worker_done_with_reply,
            "worker_death": self.worker_death,
        }
        self._dispatch: dict[Command, Callable[[Message], None]] = {
            Command.ACK: self._on_ack,
            Command.REQUEST: lambda m: self.on_request(m.msgid, m.body),
            Command.HEARTBEAT: lambda m: self.on_heartbeat(m.msgid, list(m.body)),
            Command.DISCONNECT: self._on_disconnect,
            Command.KBYE: self._on_router_kbye,
        }

    # ------------------------------------------------------------------
    # settings

    def _apply_settings(self, settings: Settings) -> None:
        settings = settings.replace(**self._overrides)
        self.settings = settings
        self._debug_log = settings.super_debug
        self.name = settings.name
        if hasattr(self, "_lifecycle"):
            self._lifecycle.label = self.name
        self.queues = settings.queues
        self.concurrent_jobs = settings.concurrent_jobs
        self._policy = CallablePolicy(settings.allowed_callables)
        self._max_size = settings.max_message_size
        try:
            entry = import_dotted(settings.job_entry_func) if settings.job_entry_func else None
            exit_ = import_dotted(settings.job_exit_func) if settings.job_exit_func else None
        except ImportError as exc:
            raise SettingsError(f"job_entry_func/job_exit_func: {exc}") from exc
        previous = getattr(self, "runner", None)
        self.runner = JobRunner(global_timeout=settings.global_timeout,
                                entry_func=entry, exit_func=exit_,
                                deadlines=previous.deadlines if previous else None)

    def _reload_settings(self) -> None:
        if self._settings_loader is None:
            logger.info("SIGHUP: no settings source to re-read; reconnecting only")
            self._notify("reload")
            return
        try:
            new = self._settings_loader()
        except SettingsError as exc:
            logger.error("SIGHUP: settings not reloaded, keeping the current ones: %s", exc)
            return
        self._apply_settings(new.replace(name=self.name))
        self._notify("reload")
        logger.info("SIGHUP: settings reloaded (queues %s, concurrent_jobs %d)",
                    queues_json(self.queues), self.concurrent_jobs)

    # ------------------------------------------------------------------
    # extensions

    def _hooks(self, hook: str) -> list[Callable[..., Any]]:
        """The extensions' own implementations of ``hook`` (the base class's
        no-ops are skipped: three hooks are looked at per job)."""
        if len(self.extensions) != self._hooks_for:
            self._hook_cache.clear()
            self._job_hooks = None
            self._hooks_for = len(self.extensions)
        found = self._hook_cache.get(hook)
        if found is None:
            base = getattr(Extension, hook)
            found = [getattr(ext, hook) for ext in self.extensions
                     if getattr(type(ext), hook, base) is not base]
            self._hook_cache[hook] = found
        return found

    @property
    def _per_job_hooks(self) -> tuple[list[Callable[..., Any]], ...]:
        """job_started, executor_for and job_finished, in one look-up."""
        if len(self.extensions) != self._hooks_for or self._job_hooks is None:
            self._job_hooks = (self._hooks("job_started"), self._hooks("executor_for"),
                               self._hooks("job_finished"))
        return self._job_hooks

    def _notify(self, hook: str, *args: Any) -> None:
        self._call_hooks(self._hooks(hook), hook, args)

    def _call_hooks(self, hooks: list[Callable[..., Any]], hook: str,
                    args: tuple[Any, ...]) -> None:
        for fn in hooks:
            try:
                fn(self, *args)
            except Exception:
                logger.exception("extension %s failed in %s",
                                 type(fn.__self__).__name__, hook)

    def _executor_for(self, record: JobRecord,
                      hooks: list[Callable[..., Any]]) -> Optional[Executor]:
        for fn in hooks:
            try:
                executor = fn(self, record)
            except Exception:
                logger.exception("extension %s failed in executor_for",
                                 type(fn.__self__).__name__)
                continue
            if executor is not None:
                return executor
        return None

    # ------------------------------------------------------------------
    # lifecycle

    @property
    def state(self) -> State:
        """connecting, running, draining or stopped."""
        return self._lifecycle.state

    def _set_state(self, state: State) -> None:
        self._lifecycle.set(state)

    def wait_for_state(self, state: State, timeout: Optional[float] = None) -> bool:
        """Block (cooperatively) until the manager is in ``state``."""
        return self._lifecycle.wait_for(state, timeout)

    def start(self) -> None:
        """Start serving in the background; returns at once."""
        if self._main is not None:
            raise RuntimeError("JobManager already started")
        self._pid = os.getpid()
        if self.settings.allowed_callables is None:
            logger.warning(
                "allowed_callables is not set: a REQUEST may run any callable this "
                "process can import (os.system included). Set allowed_callables (INI "
                "key, EVENTMQ_ALLOWED_CALLABLES or --allowed-callables) to the job "
                "callables, e.g. [\"myapp.jobs.*\"]")
        if not self.skip_signal:
            self._install_signals()
        self._set_state(State.CONNECTING)
        self._notify("manager_started")
        self._main = gevent.spawn(self._run)
        self._heart = gevent.spawn(self._heartbeat_loop)

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

    def _request_stop(self, mode: StopMode) -> None:
        if self._stop_mode is StopMode.GRACEFUL and mode is StopMode.GRACEFUL:
            mode = StopMode.NOW  # asked twice: stop at once
        if self._stop_mode is not StopMode.NOW:
            self._stop_mode = mode
        self._wake.set()

    def _install_signals(self) -> None:
        import signal

        def stop(_signum: int = 0) -> None:
            logger.info("signal received: stopping%s",
                        " at once" if self._stop_mode else " gracefully")
            self._request_stop(StopMode.GRACEFUL)

        def quit_now() -> None:
            self._request_stop(StopMode.GRACEFUL)

        table = {
            signal.SIGTERM: stop,
            signal.SIGINT: stop,
            signal.SIGQUIT: quit_now,
            signal.SIGHUP: self.reload,
            signal.SIGUSR1: self.log_status,
        }
        try:
            for signum, handler in table.items():
                self._signal_handlers.append(gevent.signal_handler(signum, handler))
        except ValueError:  # not the main thread
            logger.warning("signal handlers not installed (not in the main thread)")

    def _run(self) -> None:
        try:
            while self._stop_mode is None:
                addr = self._next_addr()
                self._session(addr)
            self._shutdown()
        except BaseException:
            logger.exception("job manager loop crashed; stopping")
            self._kill_jobs()
            raise
        finally:
            for handler in self._signal_handlers:
                handler.cancel()
            self._heart.kill(block=False)
            self._idle.clear()
            self._pool.kill(block=False)  # the parked job greenlets
            self._lingering.kill(block=False)
            for conn in [*self._retiring, self.outgoing]:
                if conn is not None:
                    self._close(conn, CLOSE_LINGER)
            for _reply, msgid in self._pending_replies:
                self.counters["replies_dropped"] += 1
                logger.error("REPLY to %s dropped: the worker stopped before a router "
                             "took it", printable(msgid))
            self._pending_replies.clear()
            self._set_state(State.STOPPED)
            self._notify("manager_stopped")
            self._stopped.set()

    def _next_addr(self) -> str:
        if self._connections_made == 0:
            return self.settings.worker_addr
        addrs = self.settings.worker_addresses()
        addr = addrs[self._addr_index % 2]
        self._addr_index += 1
        return addr

    def _session(self, addr: str) -> None:
        """One connection: INFORM, wait for ACK, serve until it must end.

        A reload asked for while the INFORM waits for its ACK is done once
        the connection is up (or before the next one): closing a socket in
        the middle of its handshake and opening the next at once left
        libzmq connecting nowhere (the worker retried for ever)."""
        if self._reload_requested:
            self._reload_requested = False
            self._reload_settings()
        self._connections_made += 1
        identity = f"{self.name}:{os.getpid()}:{self._connections_made}"
        conn = Connection(self._context, addr, identity, hwm=self.settings.hwm,
                          debug_log=self.settings.super_debug,
                          hide_heartbeats=self.settings.hide_heartbeat_logs,
                          curve=client_curve_from_settings(self.settings, addr),
                          counters=self.counters)
        conn.set_max_message_size(self.settings.max_message_size)
        self.outgoing = conn
        self._acked.clear()
        self._router_gone = None
        self._set_state(State.CONNECTING)
        reader = gevent.spawn(self._read_loop, conn)
        try:
            logger.info("connecting to %s as %s (queues %s)", addr, identity,
                        queues_json(self.queues))
            conn.send(Message.new(Command.INFORM, queues_json(self.queues), "worker"))
            if not self._wait_for_ack():
                return
            self.counters["connections"] += 1
            logger.info("ACK from %s; %d job(s) still running, %d slot(s) free", addr,
                        len(self.jobs_in_flight), self.free_slots)
            self._set_state(State.RUNNING)
            self._notify("connected", addr, identity)
            for reply, msgid in self._pending_replies:
                self.send_reply(reply, msgid)
            self._pending_replies.clear()
            self._offer_slots()
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stop_mode is not None:
                    return
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload_settings()
                    self.counters["reloads"] += 1
                    conn.send(Message.new(Command.KBYE))
                    self._notify("disconnected", "settings reloaded")
                    self._retire(conn, reader)
                    return
                if self._router_gone:
                    logger.error("%s; reconnecting", self._router_gone)
                    self.counters["router_lost"] += 1
                    self._notify("disconnected", self._router_gone)
                    return
        finally:
            if conn in self._retiring:
                self.outgoing = None
            elif self._stop_mode is None:
                reader.kill()
                self._close(conn, 0 if self._router_gone else CLOSE_LINGER)
                self.outgoing = None
            else:
                self._reader = reader

    def _close(self, conn: Connection, linger: float) -> None:
        conn.close(linger)
        self.counters["replies_dropped"] += conn.dropped
        conn.dropped = 0

    def _retire(self, conn: Connection, reader: gevent.Greenlet) -> None:
        """After a KBYE on reload: keep reading ``conn`` until the router has
        been quiet for ``heartbeat_timeout`` (REQUESTs it sent before it saw
        the KBYE still arrive, and run), then close it."""
        self._retiring.append(conn)

        since = time.monotonic()

        def linger() -> None:
            try:
                while True:
                    left = self._quiet(conn, self.settings.heartbeat_timeout, since)
                    if left <= 0:
                        break
                    gevent.sleep(min(left, 0.25))
            finally:
                reader.kill()
                if conn.ready_outstanding:
                    logger.info("connection %s closed; %d READY(s) it had offered were "
                                "not used", conn.identity, conn.ready_outstanding)
                self._close(conn, CLOSE_LINGER)
                self._retiring.remove(conn)
                self._offer_slots()

        self._lingering.spawn(linger)

    @staticmethod
    def _quiet(conn: Connection, quiet: float, since: float) -> float:
        """Seconds until no more REQUESTs are expected on ``conn`` after a
        KBYE sent at ``since`` (0: none): the router may send one per READY
        it has not used, until it has been quiet for ``quiet`` seconds."""
        if not conn.ready_outstanding:
            return 0.0
        return max(0.0, max(conn.last_request, since) + quiet - time.monotonic())

    def _wait_for_ack(self) -> bool:
        deadline = time.monotonic() + self.settings.reconnect_timeout
        while not self._acked.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._stop_mode is not None:
                if self._stop_mode is None:
                    logger.warning("no ACK from %s in %g s; trying again",
                                   self.outgoing.addr if self.outgoing else "?",
                                   self.settings.reconnect_timeout)
                return False
            self._wake.wait(min(left, 0.5))
        return True

    def _shutdown(self) -> None:
        """Drain (graceful) or kill (now), then leave."""
        conn = self.outgoing
        was_running = self.state is State.RUNNING
        self._set_state(State.DRAINING)
        if conn is not None and was_running:
            conn.send(Message.new(Command.KBYE))
        if self._stop_mode is StopMode.GRACEFUL:
            grace = self.settings.kill_grace_period
            deadline = time.monotonic() + grace
            # REQUESTs the router sent before it saw the KBYE still arrive:
            # read until it has been quiet for heartbeat_timeout (not past the
            # grace period), as after a reload.
            quiet = min(self.settings.heartbeat_timeout, grace)
            since = time.monotonic()
            logger.info("draining: %d job(s) running, waiting up to %g s",
                        len(self.jobs_in_flight), grace)
            while time.monotonic() < deadline and self._stop_mode is StopMode.GRACEFUL:
                if not self.jobs_in_flight and not self._retiring and (
                        conn is None or not was_running or self._quiet(conn, quiet, since) <= 0):
                    break
                self._wake.clear()
                self._wake.wait(0.05)
        if self.jobs_in_flight:
            logger.warning("killing %d job(s) still running", len(self.jobs_in_flight))
            self._kill_jobs()
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.kill()

    def _kill_jobs(self) -> None:
        for record in list(self._backlog):
            self._complete(record, JobOutcome(Status.KILLED, "Killed", "Killed",
                                              "the worker stopped before the job started", 0))
        self._backlog.clear()
        greenlets = [r.greenlet for r in self.jobs_in_flight.values() if r.greenlet]
        gevent.killall(greenlets, timeout=5)

    # ------------------------------------------------------------------
    # reading the socket: exactly one greenlet per connection

    def _read_loop(self, conn: Connection) -> None:
        handle = self._handle_frames
        while True:
            try:
                batch = conn.recv_batch(READ_CHUNK)
            except zmq.ZMQError as exc:
                if not conn.closed:
                    logger.error("receiving from %s failed: %s", conn.addr, exc)
                    if conn is self.outgoing:
                        self._router_gone = f"socket error: {exc}"
                        self._wake.set()
                return
            for frames in batch:
                handle(frames, conn)
            if len(batch) == READ_CHUNK:
                # More may be waiting: let the jobs just handed out start
                # first. Reading everything at once started hundreds of jobs
                # in one burst, which came back as one burst of READYs; the
                # bursts kept the loop's turns long and cost the sleep
                # benchmark ~10% of its rate (docs/benchmarks.md).
                gevent.sleep(0)

    def _handle_frames(self, frames: list[bytes], conn: Optional[Connection] = None) -> None:
        """One message from the router, as received on ``conn``."""
        request = None if self._debug_log else request_parts(frames)
        if request is not None and (
                self._max_size < 0 or sum(map(len, frames)) <= self._max_size):
            try:
                self._on_request(conn, *request)
            except Exception:
                logger.exception("error handling REQUEST %s", printable(request[0]))
            return
        if len(frames) > 2 and frames[2].upper() == b"REQUEST":
            # The router took a slot for anything it sent as a REQUEST: whatever
            # else is wrong with it, the slot comes back.
            self._on_bad_request(frames, conn)
            return
        try:
            message = Message.parse(frames)
        except ProtocolError as exc:
            self.counters["malformed_messages"] += 1
            logger.warning("dropped a malformed message from the router: %s", exc)
            return
        if self._debug_log and not (
            self.settings.hide_heartbeat_logs and message.command is Command.HEARTBEAT
        ):
            logger.debug("<- %s %s %s", message.command.value, message.msgid, message.body)
        if conn is not None and conn is not self.outgoing:
            return  # a connection left after a reload is read for its REQUESTs only
        handler = self._dispatch.get(message.command)
        if handler is None:
            self.counters["unexpected_messages"] += 1
            logger.warning("ignored %s from the router: a worker does not handle it",
                           message.command.value)
            return
        try:
            handler(message)
        except Exception:
            logger.exception("error handling %s %s", message.command.value, message.msgid)

    def _on_bad_request(self, frames: list[bytes], conn: Optional[Connection]) -> None:
        """A REQUEST that is too large, not UTF-8, of the wrong shape or
        logged in debug mode: parse it the slow way, or reject it."""
        size = sum(map(len, frames))
        if 0 <= self._max_size < size:
            error: Optional[ProtocolError] = ProtocolError(
                f"message of {size} bytes is larger than max_message_size "
                f"({self._max_size} bytes)")
        else:
            try:
                message = Message.parse(frames)
            except ProtocolError as exc:
                error = exc
            else:
                if self._debug_log:
                    logger.debug("<- REQUEST %s %s", message.msgid, message.body)
                self._on_request(conn, message.msgid, message.body)
                return
        msgid = frames[3].decode("utf-8", "backslashreplace") if len(frames) > 3 else ""
        body = [f.decode("utf-8", "replace") for f in frames[4:7]]
        self.total_requests += 1
        if conn is not None:
            conn.last_request = time.monotonic()
            if conn.ready_outstanding > 0:
                conn.ready_outstanding -= 1
        self._reject_malformed(msgid, body, error)

    def _on_ack(self, message: Message) -> None:
        self._acked.set()
        self._wake.set()

    def _on_disconnect(self, message: Message) -> None:
        logger.info("DISCONNECT from the router: stopping gracefully")
        self._request_stop(StopMode.GRACEFUL)

    def _on_router_kbye(self, message: Message) -> None:
        if self.state is State.RUNNING:
            self._router_gone = "the router said KBYE (it is shutting down)"
            self._wake.set()

    def on_heartbeat(self, msgid: str, message: list[str]) -> None:
        """HEARTBEAT from the router. Liveness itself is counted for every
        message in :meth:`Connection.recv_batch`; here the pool gets a health check,
        as EventMQ does on each heartbeat."""
        if self.state is State.RUNNING:
            self.check_worker_health()

    def _heartbeat_loop(self) -> None:
        s = self.settings
        while True:
            conn = self.outgoing
            wait = s.heartbeat_interval
            if conn is not None and self.state is State.RUNNING and not s.disable_heartbeats:
                now = time.monotonic()
                if now - conn.last_sent >= s.heartbeat_interval:
                    conn.send(Message.new(Command.HEARTBEAT, f"{time.time():.6f}"))
                    self.counters["heartbeats_sent"] += 1
                silence = now - conn.last_received
                dead_after = s.heartbeat_timeout * s.heartbeat_liveness
                if silence >= dead_after and self._router_gone is None and not conn.has_input():
                    self._router_gone = f"nothing from the router for {silence:.1f} s"
                    self._wake.set()
                wait = min(conn.last_sent + s.heartbeat_interval - time.monotonic(),
                           conn.last_received + dead_after - time.monotonic())
            gevent.sleep(max(0.05, min(wait, s.heartbeat_interval)))
            s = self.settings

    # ------------------------------------------------------------------
    # requests and jobs

    @property
    def free_slots(self) -> int:
        return self.concurrent_jobs - len(self.jobs_in_flight)

    def on_request(self, msgid: str, msg: Sequence[str]) -> None:
        """Handle a REQUEST body ``[queue, headers_csv, payload_json]`` that
        came on the current connection.

        The payload is ``["run", {path, callable, args, kwargs, class_args,
        class_kwargs}]``; ``path`` may be ``module:Class``. Never blocks: the
        job starts in the pool, or waits in the backlog if the router sent
        more than it was offered. A request that cannot be parsed, names a
        callable that may not run, or reuses the msgid of a job in flight is
        answered at once (an error REPLY when one was requested) and its
        slot returned.
        """
        self._on_request(self.outgoing, msgid, msg)

    def _on_request(self, conn: Optional[Connection], msgid: str, msg: Sequence[str]) -> None:
        self.total_requests += 1
        if conn is not None:
            conn.last_request = time.monotonic()
            if conn.ready_outstanding > 0:
                conn.ready_outstanding -= 1
        try:
            queue, raw_headers, payload = msg
            headers = Headers.parse(raw_headers)
            request = RunRequest.parse(payload)
        except Exception as exc:  # whatever the frames hold, the slot comes back
            self._reject_malformed(msgid, msg, exc)
            return
        refused = self._policy.refusal(request)
        if refused is not None:
            self.counters["refused"] += 1
            logger.warning("REQUEST %s refused: %s", printable(msgid), printable(refused, 300))
            self._reject(msgid, headers, NOT_ALLOWED, refused)
            return
        if msgid in self.jobs_in_flight:
            self._reject_malformed(msgid, msg, ProtocolError("its msgid is already in flight"))
            return
        record = JobRecord(msgid, queue, headers, request)
        self.jobs_in_flight[msgid] = record
        if self._running >= self.concurrent_jobs:
            self.counters["backlogged"] += 1
            logger.warning("REQUEST %s beyond the %d slots offered; it waits in the worker",
                           msgid, self.concurrent_jobs)
            self._backlog.append(record)
        else:
            self._start(record)

    def _reject_malformed(self, msgid: str, body: Sequence[Any], error: BaseException) -> None:
        """An invalid REQUEST: InvalidRequest when a reply was requested."""
        if isinstance(error, ProtocolError):
            text = str(error)
        elif isinstance(error, ValueError) and len(body) != 3:
            text = f"REQUEST needs 3 body frames, got {len(body)}"
        else:
            text = f"{type(error).__name__}: {error}"
        raw_headers = body[1] if len(body) > 1 and isinstance(body[1], str) else ""
        self.counters["invalid_requests"] += 1
        logger.warning("invalid REQUEST %s: %s", printable(msgid), printable(text, 300))
        self._reject(msgid, Headers(reply_requested=reply_requested_in(raw_headers)),
                     "InvalidRequest", text)

    def _reject(self, msgid: str, headers: Headers, error_type: str, message: str) -> None:
        """Answer a request that will not run, and give its slot back. It
        never enters :attr:`jobs_in_flight` (its msgid may be another job's)."""
        outcome = JobOutcome.rejected(error_type, message)
        callback = self.worker_done_with_reply if headers.reply_requested else self.worker_done
        callback(outcome.reply(), msgid, False, self._pid)

    def _start(self, record: JobRecord) -> None:
        """Run ``record`` in a parked job greenlet, or a new one if none is idle.

        Job greenlets are kept and reused (at most ``concurrent_jobs`` of
        them): handing a job to a parked greenlet costs a few microseconds,
        creating one costs ten times that, which was the largest single cost
        of a short job. Like threads in a thread pool, a reused greenlet keeps
        its greenlet-local (patched ``threading.local``) state between jobs.
        """
        self._running += 1
        record.started = time.monotonic()
        if self._idle:
            greenlet = record.greenlet = self._idle.pop()
            self._loop.run_callback(greenlet.switch, record)
        else:
            record.greenlet = self._pool.spawn(self._job_greenlet, record)

    def _job_greenlet(self, record: JobRecord) -> None:
        """The body of a job greenlet: run jobs, parking in between.

        Parked, it waits in the hub like any waiting greenlet, and is resumed
        only by :meth:`_start`'s callback, with the next record (or None to
        end). A throw (a kill at shutdown) ends it.
        """
        me = gevent.getcurrent()
        hub = self._hub
        idle = self._idle
        job_of = self.job_of_greenlet
        try:
            while record is not None:
                self._run_with_backlog(record)
                idle.append(me)
                record = hub.switch()
        finally:
            job_of.pop(me, None)
            if me in idle:
                idle.remove(me)

    def _run_with_backlog(self, record: Optional[JobRecord]) -> None:
        # A finished job's greenlet takes the next backlogged request itself:
        # spawning into the pool from here would wait on our own pool slot.
        me = gevent.getcurrent()
        try:
            while record is not None:
                self.job_of_greenlet[me] = record
                self._run_record(record)
                record = self._backlog.popleft() if self._backlog else None
                if record is not None:
                    record.started = time.monotonic()
                    record.greenlet = me
        finally:
            self._running -= 1

    def _run_record(self, record: JobRecord) -> None:
        outcome: Optional[JobOutcome] = None
        pid = self._pid
        started, executors, _ = self._per_job_hooks
        try:
            if started:
                self._call_hooks(started, "job_started", (record,))
            executor = self._executor_for(record, executors) if executors else None
            if executor is None:
                outcome = self.runner.run(record.request, record.headers)  # type: ignore[arg-type]
            else:
                outcome, pid = executor.run(record.request, record.headers)
        except gevent.GreenletExit:
            outcome = JobOutcome(Status.KILLED, "Killed", "Killed",
                                 "the job was killed when the worker stopped")
            raise
        except BaseException as exc:  # a job must never take the worker down
            logger.exception("job %s crashed the runner", record.msgid)
            outcome = JobOutcome.failure(exc)
        finally:
            if outcome is None:
                outcome = JobOutcome(Status.KILLED, "Killed", "Killed", "the job greenlet died")
            self._complete(record, outcome, pid)

    def _complete(self, record: JobRecord, outcome: JobOutcome,
                  pid: Optional[int] = None) -> None:
        if record.done:
            return
        record.done = True
        status = outcome.status
        self.counters[_STATUS_KEYS[status]] += 1
        finished = self._per_job_hooks[2]
        if finished:
            self._call_hooks(finished, "job_finished",
                             (record, outcome, time.monotonic() - record.started))
        self._account(record.msgid, outcome.reply(), pid or self._pid,
                      status is Status.KILLED,
                      self.worker_done_with_reply if record.headers.reply_requested
                      else self.worker_done)

    def handle_response(self, resp: dict[str, Any]) -> None:
        """Account for a finished job described as EventMQ's worker
        processes report one, and call its callback.

        ``resp``: ``{"callback": "worker_done" | "worker_done_with_reply" |
        "worker_death", "msgid": str, "return": {"value": ...}, "pid": int,
        "death": bool}``. The job leaves :attr:`jobs_in_flight` before the
        callback runs, so the callback sees its slot as free. (Greenlet and
        subprocess jobs go through the same accounting without the dict.)
        """
        callback = self._callbacks.get(resp["callback"])
        if callback is None:
            raise ValueError(f"unknown callback {resp['callback']!r}")
        self._account(resp.get("msgid"), resp.get("return"), resp.get("pid") or self._pid,
                      bool(resp.get("death")), callback)

    def _account(self, msgid: Optional[str], reply: Any, pid: int, death: bool,
                 callback: Callable[[Any, Optional[str], bool, int], None]) -> None:
        if msgid is not None:
            self.jobs_in_flight.pop(msgid, None)
        if not death:
            self.pid_distribution[pid] = self.pid_distribution.get(pid, 0) + 1
        callback(reply, msgid, death, pid)

    def worker_done(self, reply: Any, msgid: Optional[str], death: bool, pid: int) -> None:
        """A job finished without a reply requested: offer its slot."""
        self._offer_slots()

    def worker_done_with_reply(
        self, reply: Any, msgid: Optional[str], death: bool, pid: int
    ) -> None:
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
        """Repair the books: jobs whose greenlet is gone without reporting are
        completed as failed, and backlogged jobs are started if slots allow.
        Returns the number of jobs repaired (0 when healthy)."""
        repaired = 0
        for record in list(self.jobs_in_flight.values()):
            if record.greenlet is not None and record.greenlet.dead and not record.done:
                repaired += 1
                self._running -= 1
                self._complete(record, JobOutcome(Status.KILLED, "Killed", "Killed",
                                                  "the job greenlet died without a result"))
        while self._backlog and self._running < self.concurrent_jobs:
            self._start(self._backlog.popleft())
        if repaired:
            logger.error("check_worker_health repaired %d job(s)", repaired)
        return repaired

    def _offer_slots(self) -> None:
        conn = self.outgoing
        if conn is None or self.state is not State.RUNNING:
            return
        free = self.concurrent_jobs - len(self.jobs_in_flight)
        if self._retiring:
            # REQUESTs may still come on a connection left after a reload,
            # one per READY it was sent: those slots are not offered again.
            free -= sum(old.ready_outstanding for old in self._retiring)
        while conn.ready_outstanding < free:
            self.send_ready()

    def send_ready(self) -> None:
        """Send one READY: the router may send one more REQUEST."""
        conn = self.outgoing
        if conn is None:
            raise RuntimeError("not connected")
        conn.send_frames(ready_frames())
        self.total_ready_sent += 1
        conn.ready_outstanding += 1

    def send_reply(self, reply: Any, msgid: str) -> None:
        """Send ``REPLY [reply_json, msgid]``; a dict is encoded first. Kept
        until the next ACK when no connection is up."""
        text = reply if isinstance(reply, str) else encode_reply(reply)
        if self.outgoing is None or self.state is State.CONNECTING:
            self._pending_replies.append((text, msgid))
            return
        self.outgoing.send_frames(reply_frames(text, msgid))
        self.counters["replies_sent"] += 1

    # ------------------------------------------------------------------
    # status

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        extra: dict[str, Any] = {}
        for ext in self.extensions:
            try:
                extra.update(ext.status(self))
            except Exception:
                logger.exception("extension %s failed in status", type(ext).__name__)
        return {
            **extra,
            "name": self.name,
            "version": __version__,
            "state": self.state.value,
            "router": self.outgoing.addr if self.outgoing else None,
            "identity": self.outgoing.identity if self.outgoing else None,
            "concurrent_jobs": self.concurrent_jobs,
            "free_slots": self.free_slots,
            "ready_outstanding": self.outgoing.ready_outstanding if self.outgoing else 0,
            "retiring_connections": len(self._retiring),
            "backlog": len(self._backlog),
            "greenlets": len(self._pool),
            "total_requests": self.total_requests,
            "total_ready_sent": self.total_ready_sent,
            "counters": dict(self.counters),
            "jobs_in_flight": [
                {"msgid": r.msgid, "queue": r.queue, "callable": r.callable_name,
                 "age": round(now - r.started, 3)}
                for r in sorted(self.jobs_in_flight.values(), key=lambda r: r.started)
            ],
        }

    def log_status(self) -> None:
        """The SIGUSR1 dump: counters, then jobs in flight oldest first."""
        status = self.status()
        jobs = status.pop("jobs_in_flight")
        logger.info("status: %s", json.dumps(status, sort_keys=True))
        for job in jobs[:200]:
            logger.info("  in flight %.3fs %s %s (queue %s)", job["age"], job["callable"],
                        job["msgid"], job["queue"])
        if len(jobs) > 200:
            logger.info("  ... and %d more", len(jobs) - 200)


def jobmanager_main(broker_addr: Optional[str] = None) -> None:
    """Module-level entry, as in EventMQ: build a manager from the settings."""
    JobManager().jobmanager_main(broker_addr=broker_addr)


__all__ = ["JobManager", "JobRecord", "State", "jobmanager_main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the emq-green console script")
