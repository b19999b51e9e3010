"""The router (broker): EventMQ 0.3.13's router, rebuilt on gevent and ``zmq.green``.

Three ROUTER sockets, bound to loopback by default, each read by exactly one
greenlet (:mod:`emq_green.router.sockets`):

* frontend (clients): REQUEST and DISCONNECT, handled by
  :class:`~emq_green.router.clients.ClientSide`; schedulers' INFORM,
  HEARTBEAT and KBYE, and SCHEDULE / UNSCHEDULE, handled by
  :class:`~emq_green.router.schedulers.SchedulerSide`;
* backend (workers): INFORM / ACK, READY, REPLY, HEARTBEAT, KBYE, handled by
  :class:`~emq_green.router.workers.WorkerSide`;
* administrative: STATUS, ROUTER_SHOW_WORKERS, ROUTER_SHOW_SCHEDULERS,
  answered with the JSON shapes EventMQ's ``emq-cli`` prints, and DISCONNECT,
  the only message that stops the router.

A fourth greenlet sends heartbeats, removes silent workers and expires
results nobody collected.

Where things are: :class:`Router` (here) starts and stops, handles the
admin commands and answers STATUS;
:class:`~emq_green.router.routing.Routing` keeps the books and the routing policy;
:class:`~emq_green.router.workers.WorkerSide` the worker side;
:class:`~emq_green.router.clients.ClientSide` the client side;
:class:`~emq_green.router.sockets.RouterSockets` the sockets;
:class:`~emq_green.router.results.ResultRelay` results back to the caller.

Routing, as EventMQ does it. A worker's INFORM lists ``[weight, queue]``
pairs; each READY is one free slot. A REQUEST goes to the worker with a free
slot that has the highest weight for its queue, the least recently used among
equal weights; the client gets ``REPLY [msgid]`` as an acknowledgement. A
REQUEST for a queue no worker serves goes to the default queue. With no free
slot it waits in a per-queue buffer and leaves on the next READY of a worker
serving that queue (its queues in INFORM order), without acknowledgement.

Limits, where emq-green differs from EventMQ:

* Backpressure, never loss. When a queue's buffer holds ``hwm`` requests or
  all buffers hold ``max_buffer_bytes``, the frontend reader stops reading;
  ZeroMQ's high-water marks then block the senders. Reading resumes once
  READYs have brought every bound down to three quarters. Workers, admin
  and heartbeats are served meanwhile.
* Size. ``max_message_size`` is ZeroMQ's MAXMSGSIZE on every socket (per
  frame; libzmq disconnects the sender), and the whole message's size is
  checked before any handler. An oversized message is logged and counted.
* Every request the router drops (malformed, oversized, buffered or unread
  at stop) is logged with its msgid and counted by reason in STATUS. Text a
  peer supplied (msgids, queue names, identities) goes through
  :func:`~emq_green.protocol.printable` before it reaches a log.
* Requests a worker had in flight when it is removed as dead are logged and
  not re-dispatched (see :mod:`emq_green.router.workers`).

Results, an extension EventMQ lacks: for a REQUEST with the
``result-requested`` header the router remembers the client and sends it the
worker's REPLY body (no acknowledgement then); the map is bounded in
count, bytes, per client and age. See :mod:`emq_green.router.results` and
docs/router.md.

Refused requests (:class:`~emq_green.router.clients.ClientSide`,
docs/security.md): a msgid over 128 bytes, a msgid already buffered, in
flight or waiting for its result, a result request the map has no room
for. Every line a peer's message causes goes through one
:class:`~emq_green.limits.LogLimiter` (:attr:`Router.log_limiter`).

Lifecycle: ``stopped -> running -> stopping -> stopped``, changed only by
:meth:`Router._set_state`. :meth:`stop` says KBYE to every worker, logs
every buffered and unread request it drops, then closes the sockets.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from enum import Enum
from typing import Any, Callable, Optional, Sequence

import gevent
import gevent.event
import zmq
import zmq.green

from ..curve import server_curve
from ..lifecycle import Lifecycle
from ..limits import LogLimiter
from ..protocol import CLIENT_FLUSH, Command, Message, new_msgid, printable
from ..settings import Settings
from . import lastchance
from .clients import ClientSide
from .guarantee import Guarantees
from .journal import Journal
from .results import PendingResults, ResultRelay
from .routing import QueueBook, Request, Routing, Worker, settled
from .schedulers import SchedulerSide
from .sockets import Handler, RouterSockets
from .workers import RouterObserver, WorkerSide, freeze
from .zap import ZapHandler

logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")



#: a failing housekeeping step's traceback: five a minute at most
_housekeeping_log = LogLimiter(logger, burst=5, window=60.0,
                               summary="router: %d more housekeeping failure(s): %s")


#: a housekeeping tick this many seconds late says the router itself was
#: away (SIGSTOP, a paused VM, a stalled loop): what its peers sent
#: meanwhile may still be in the kernel, not yet in ZeroMQ's queue, so
#: nobody is judged silent until they have had ``heartbeat_interval`` to be
#: heard (a worker whose REPLYs waited was removed as dead, its results
#: reported lost, in the millisecond the router came back)
AWAY = 1.0
#: back from such a gap, what a worker sends is fresh (proves it is still
#: there) this long after: before, it is what it sent during the gap
FRESH = 0.3


def _back(router: Router, gap: float, now: float) -> None:
    """The router's loop ran again after ``gap`` s away."""
    router.counters["loop_gaps"] += 1
    freeze(router.routing, now, now + FRESH)
    after = now + router.settings.heartbeat_interval
    router.worker_side.judge_after = router.scheduler_side.judge_after = after
    logger.warning("router: its loop did not run for %.1f s (the process stopped, or the "
                   "machine or the loop stalled): workers get requests again once heard "
                   "from anew; no peer is taken for silent for %g s", gap,
                   router.settings.heartbeat_interval)


def _guarded(step: Callable[[float], Any], now: float,
             counters: collections.Counter[str]) -> None:
    """One housekeeping step; what it raises is logged and counted
    (``housekeeping_errors``), and the next steps and ticks still run: the
    router's heartbeats, dead-worker checks, result expiry and redeliveries
    all live in that one greenlet (a probe: one bad hand-over of schedules
    ended it, silently, for good)."""
    try:
        step(now)
    except Exception:
        counters["housekeeping_errors"] += 1
        _housekeeping_log.log(logging.ERROR, "housekeeping", "router: a housekeeping step "
                              "failed; it runs again at the next tick", exc_info=True)

class RouterState(str, Enum):
    """The router's lifecycle: stopped -> running -> stopping -> stopped."""

    STOPPED = "stopped"
    RUNNING = "running"
    STOPPING = "stopping"


def _begin_settling(router: Router) -> None:
    """A restarted router knows no queue until the workers connect again:
    for :attr:`Router.settle_for` seconds a request for a queue no worker
    has announced waits for one; then it goes to the default queue, where
    EventMQ's router sends it at once. Default (None): ``heartbeat_timeout x
    heartbeat_liveness + 2 x heartbeat_interval + 1``, 22 s at the defaults.
    An emq-green worker, told KBYE at its first message, comes at once;
    EventMQ's job manager takes any message for a heartbeat, so that KBYE
    (within a heartbeat_interval of the start) starts its wait of
    ``heartbeat_timeout x heartbeat_liveness`` anew (a probe: back 15 s
    after the KBYE, 17.5 s after the start, every time)."""
    s = router.settings
    settle = (s.heartbeat_timeout * s.heartbeat_liveness + 2 * s.heartbeat_interval + 1
              if router.settle_for is None else router.settle_for)
    router.settle_for, router._settled_at = settle, time.monotonic() + settle
    router.routing.settling = settle > 0


def _settling_left(router: Router, now: float) -> float:
    """STATUS: seconds of the start-up grace left (0 once it is over)."""
    return round(max(0.0, router._settled_at - now), 1) if router.routing.settling else 0.0


def _settle(router: Router, now: float) -> None:
    """A housekeeping step: once the router's first :attr:`Router.settle_for`
    seconds are over, requests waiting for a queue no worker has announced
    go to the default queue (:func:`~emq_green.router.routing.settled`)."""
    routing = router.routing
    if not routing.settling or now < router._settled_at:
        return
    moved = settled(routing)
    if moved:
        named = [f"{printable(name, 60)} ({count})" for name, count in list(moved.items())[:20]]
        if len(moved) > 20:
            named.append(f"and {len(moved) - 20} more")
        logger.warning("router: no worker announced queue(s) %s in the %g s after the start; "
                       "their %d request(s) go to %s", ", ".join(named), router.settle_for,
                       sum(moved.values()), routing.default_queue)
        router.worker_side.dispatch(routing.default_queue)
        # the moved queues' bounds are gone, the default's may be reached (a
        # review: clients paused by a full queue that moved stayed paused)
        if routing.may_resume():
            router.worker_side.resume_clients()
        else:
            router.sockets.pause_clients(f"queue {routing.default_queue} full after the "
                                         "start's requests for unserved queues came to it")


class Router:
    """An eMQP/1.0 router for emq-green, EventMQ's job managers and clients.

    Wire-compatible with EventMQ 0.3.13's ``emq-router``; where it behaves
    differently (backpressure instead of loss, results back to the caller,
    CURVE, a client's DISCONNECT ignored) is in the module's text above.

    Args:
        settings: the addresses (``frontend_addr``, ``backend_addr``,
            ``administrative_addr``; ``tcp://host:*`` picks a free port, see
            :attr:`endpoints`), ``hwm``, heartbeat settings, the default
            queue and the queues of a worker whose INFORM names none.
        extra_backend_addrs: more addresses for the backend socket, e.g. an
            ``inproc://`` one for a job manager in the same process.
        extra_frontend_addrs: more addresses for the client socket, e.g. an
            ``inproc://`` one for a scheduler in the same process.
        context: the ``zmq.green`` context to use; a router with CURVE
            (``curve_secret_key_file``) makes one of its own when none is
            given, as its ZAP handler needs the context to itself.
    """

    #: Seconds after :meth:`start` a request for a queue no worker has
    #: announced waits in its own buffer, not the default's (see ``_begin_settling``)
    settle_for: Optional[float] = None

    def __init__(
        self,
        *,
        settings: Settings,
        extra_backend_addrs: Sequence[str] = (),
        extra_frontend_addrs: Sequence[str] = (),
        context: Optional[zmq.green.Context] = None,
    ) -> None:
        self.settings = settings
        self._extra_backend_addrs = tuple(extra_backend_addrs)
        self._extra_frontend_addrs = tuple(extra_frontend_addrs)
        self._context = context or (zmq.green.Context() if settings.curve_secret_key_file
                                    else zmq.green.Context.instance())
        #: the CURVE key check (see :mod:`emq_green.router.zap`); None on plain sockets
        self.zap: Optional[ZapHandler] = None
        self._lifecycle: Lifecycle[RouterState] = Lifecycle(RouterState.STOPPED, "router")
        #: Workers, queues, slots and the buffer (the routing policy).
        self.routing = Routing(default_queue=settings.default_queue_name, hwm=settings.hwm,
                               max_buffer_bytes=settings.max_buffer_bytes)
        #: Requests dropped when the router stopped with them buffered, by queue.
        self.dropped_by_queue: collections.Counter[str] = collections.Counter()
        #: Every request dropped, counted by reason; the reasons are ``malformed``
        #: (not eMQP/1.0, or not 3 body frames), ``oversized``, ``stopping`` (buffered at stop),
        #: ``unread`` (still in the client socket's queue at stop),
        #: ``error`` (a bug: the
        #: handler raised; logged with a traceback).
        self.dropped_by_reason: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        #: Every line a peer's message causes goes through it (a burst per
        #: window, then a summary line).
        self.log_limiter = LogLimiter(logger, summary="router: %d more warning(s) caused by "
                                      "peers' messages, not logged one by one: %s")
        #: The three sockets, their readers and the one send path.
        self.sockets = RouterSockets(context=self._context, settings=settings,
                                     counters=self.counters, limiter=self.log_limiter,
                                     dropped_by_reason=self.dropped_by_reason)
        #: Clients waiting for a job's result (the result-requested header).
        self.relay = ResultRelay(
            PendingResults(settings.max_pending_results, settings.result_ttl,
                           max_bytes=settings.max_pending_result_bytes,
                           per_client=settings.max_pending_results_per_client),
            lambda client, message: self.sockets.send("frontend", client, message),
            lambda frames: self.sockets.send_frames("frontend", frames),
            send_later=lambda frames: self.sockets.send_later("frontend", frames),
            send_tracked=lambda frames, big: self.sockets.send_tracked("frontend", frames, big),
            call_later=gevent.spawn_later)
        self.sockets.flushed["frontend"] = self.relay.flushed
        #: Guaranteed requests (held until they finish, journaled if configured).
        self.guarantees = Guarantees(
            Journal(settings.journal_file, sync=settings.journal_sync)
            if settings.journal_file else None, settings.max_redeliveries)
        #: The worker side (INFORM, READY, REPLY, KBYE, heartbeats, hand-over).
        self.worker_side = WorkerSide(settings=settings, routing=self.routing,
                                      sockets=self.sockets, relay=self.relay,
                                      counters=self.counters, guarantees=self.guarantees,
                                      limiter=self.log_limiter)
        self.guarantees.send_alone = lambda request: lastchance.place(self.worker_side, request)
        self.guarantees.alone_ended = lambda: lastchance.ended(self.worker_side)
        #: The client side (REQUEST plain or guaranteed, the buffer, DISCONNECT).
        self.client_side = ClientSide(settings=settings, routing=self.routing,
                                      sockets=self.sockets, relay=self.relay,
                                      guarantees=self.guarantees, worker_side=self.worker_side,
                                      counters=self.counters, limiter=self.log_limiter,
                                      dropped_by_reason=self.dropped_by_reason)
        #: Schedulers and the SCHEDULE / UNSCHEDULE they are sent.
        self.scheduler_side = SchedulerSide(settings=settings, sockets=self.sockets,
                                            counters=self.counters, limiter=self.log_limiter)
        self.client_side.schedulers = self.scheduler_side.firers
        self.client_side.vet_firing = self.scheduler_side.vet_firing
        self._greenlets: list[gevent.Greenlet] = []
        self._stopped = gevent.event.Event()
        #: Called in a greenlet for an administrator's DISCONNECT, :meth:`stop`
        #: by default; ``emq-green --standalone`` drains its job manager first.
        self.on_admin_disconnect: Callable[[], Any] = self.stop
        self._tables: dict[str, dict[Command, Handler]] = {
            "frontend": {
                Command.REQUEST: self.client_side.on_request,
                Command.SCHEDULE: self.scheduler_side.on_schedule,
                Command.UNSCHEDULE: self.scheduler_side.on_unschedule,
                Command.INFORM: self.scheduler_side.on_inform,
                Command.HEARTBEAT: self._on_client_heartbeat,
                Command.KBYE: self.scheduler_side.on_kbye,
                Command.DISCONNECT: self.client_side.on_disconnect,
            },
            "backend": self.worker_side.table,
            "administrative": {
                Command.STATUS: lambda who, m: self._answer(who, self.status()),
                Command.ROUTER_SHOW_WORKERS: lambda who, m: self._answer(
                    who, self.show_workers()),
                Command.ROUTER_SHOW_SCHEDULERS: lambda who, m: self._answer(
                    who, self.scheduler_side.show()),
                Command.DISCONNECT: self._on_admin_disconnect,
            },
        }

    def _on_client_heartbeat(self, client: bytes, message: Message) -> None:
        """A scheduler's HEARTBEAT, or a client's flush probe (answered now,
        after the acknowledgements of this turn: every request it sent
        before has been read)."""
        if message.body[1:2] == (CLIENT_FLUSH,) and client not in self.scheduler_side.schedulers:
            answer = Message(Command.HEARTBEAT, new_msgid(),
                             (f"{time.time():.6f}", CLIENT_FLUSH, message.msgid))
            self.sockets.send_later("frontend", [client, *answer.frames()])
        else:
            self.scheduler_side.on_heartbeat(client, message)

    # ------------------------------------------------------------------
    # the books and parts, as the router's own members

    @property
    def state(self) -> RouterState:
        """Stopped, running or stopping."""
        return self._lifecycle.state

    @property
    def endpoints(self) -> dict[str, str]:
        """Bound addresses after :meth:`start`: frontend, backend, administrative."""
        return self.sockets.endpoints

    @property
    def observer(self) -> Optional[RouterObserver]:
        """Told of each job (see :class:`RouterObserver`); None: nobody listens."""
        return self.worker_side.observer

    @observer.setter
    def observer(self, observer: Optional[RouterObserver]) -> None:
        self.worker_side.observer = observer

    @property
    def results(self) -> PendingResults:
        """Clients waiting for a job's result (the result-requested header)."""
        return self.relay.pending

    @property
    def frontend_paused(self) -> bool:
        """True while the buffer is at a bound and the client socket is not read."""
        return self.sockets.frontend_paused

    @property
    def workers(self) -> dict[bytes, Worker]:
        """Connected workers by identity."""
        return self.routing.workers

    @property
    def queues(self) -> dict[str, QueueBook]:
        """Queue name -> its workers (only queues some worker serves)."""
        return self.routing.queues

    @property
    def waiting(self) -> dict[str, collections.deque[Request]]:
        """Queue name -> requests waiting for a free slot, oldest first."""
        return self.routing.waiting

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the requests waiting in the buffer (bounded by ``max_buffer_bytes``)."""
        return self.routing.buffered_bytes

    @property
    def processed_by_queue(self) -> collections.Counter[str]:
        """Requests handed to a worker, by queue (STATUS ``processed_messages_by_queue``)."""
        return self.routing.processed_by_queue

    @property
    def processed_by_worker(self) -> collections.Counter[str]:
        """Requests handed to a worker, by worker (STATUS ``processed_messages_by_worker``)."""
        return self.routing.processed_by_worker

    # ------------------------------------------------------------------
    # lifecycle

    def _set_state(self, state: RouterState) -> None:
        self._lifecycle.set(state)

    def wait_for_state(self, state: RouterState | str,
                       timeout: Optional[float] = None) -> bool:
        """Block (cooperatively) until the router is in ``state``; False when
        ``timeout`` seconds passed first."""
        return self._lifecycle.wait_for(state, timeout)

    def start(self) -> None:
        """Bind the three sockets and start serving in the background.

        Raises:
            RuntimeError: when started before (a router starts once).
            OSError: an address cannot be bound, or CURVE is misconfigured
                (:class:`~emq_green.curve.CurveError`).
        """
        if self.state is not RouterState.STOPPED or self._stopped.is_set():
            raise RuntimeError("a Router starts once")
        s = self.settings
        # CurveError (an OSError) when misconfigured
        curve = server_curve(s.curve_secret_key_file, s.curve_authorized_keys)
        _begin_settling(self)
        self.client_side.restore()  # JournalError (an OSError): the journal cannot be used
        if curve is not None:
            # bound before any CURVE socket: with no handler libzmq lets every key in
            self.zap = ZapHandler(context=self._context, authorized_keys=curve.authorized_keys)
            self.zap.start()
        try:
            if self.guarantees.journal is not None:
                self.guarantees.journal.start()
            self.sockets.bind({"frontend": (s.frontend_addr, *self._extra_frontend_addrs),
                               "backend": (s.backend_addr, *self._extra_backend_addrs),
                               "administrative": (s.administrative_addr,)}, curve, self.zap)
        except OSError:
            self._close()
            raise
        self._greenlets = self.sockets.readers(self._tables, self.worker_side.known)
        self._greenlets.append(gevent.spawn(self._housekeeping))
        self._set_state(RouterState.RUNNING)
        logger.info("router listening: clients on %s, workers on %s, admin on %s%s",
                    self.endpoints["frontend"], self.endpoints["backend"],
                    self.endpoints["administrative"],
                    "; CURVE required on all three" if curve is not None else "")
        admin_host = s.administrative_addr.partition("://")[2].rpartition(":")[0]
        if s.administrative_addr.startswith("tcp://") and admin_host not in _LOOPBACK_HOSTS:
            logger.warning("router: the administrative socket (%s) is not on loopback: "
                           "whoever can connect to it can stop the router",
                           s.administrative_addr)
        if s.heartbeat_timeout <= s.heartbeat_interval:
            logger.warning("router: heartbeat_timeout (%g s) is not longer than "
                           "heartbeat_interval (%g s): an idle worker or scheduler that beats "
                           "at that interval will be taken for dead and lose its jobs; make "
                           "the timeout several intervals", s.heartbeat_timeout,
                           s.heartbeat_interval)

    def serve_forever(self) -> None:
        """Start (if needed) and block until stopped."""
        if self.state is RouterState.STOPPED and not self._stopped.is_set():
            self.start()
        self._stopped.wait()

    def stop(self, timeout: Optional[float] = 5.0) -> bool:
        """KBYE to every worker, drop (and log) buffered requests, close.

        Must not be called from one of the router's own reader greenlets
        (spawn it instead).

        Args:
            timeout: seconds to wait for the readers to end.

        Returns:
            True once stopped.
        """
        if self.state is not RouterState.RUNNING:
            return self._stopped.wait(timeout)
        self._set_state(RouterState.STOPPING)
        current = gevent.getcurrent()
        readers = [g for g in self._greenlets if g is not current]
        # Stop reading first: no new work arrives while the books are closed.
        gevent.killall(readers, timeout=timeout)
        self.worker_side.say_goodbye()
        self.scheduler_side.say_goodbye()
        journaled = self.guarantees.journal is not None
        # guaranteed jobs out at workers stay in the journal too, and run
        # again under the next router: their results are not lost yet
        kept = {sent.msgid for worker in (*self.routing.workers.values(),
                                          *self.routing.leaving.values())
                for sent in worker.in_flight.values() if sent.request is not None
                } if journaled else set()
        for queue, request in self.routing.clear_buffer():
            if request.guaranteed and journaled:
                kept.add(request.msgid)
                continue  # it stays in the journal
            logger.error("router stopping: buffered REQUEST %s (queue %s) dropped",
                         printable(request.msgid), printable(queue))
            self.dropped_by_queue[queue] += 1
            self.dropped_by_reason["stopping"] += 1
        self.relay.stop(kept)
        self.sockets.drop_unread_requests()
        self.guarantees.close()  # commits what is queued
        self._close()
        self._set_state(RouterState.STOPPED)
        self._stopped.set()
        return True

    def _close(self) -> None:
        if self.state is RouterState.STOPPED and self.guarantees.journal is not None:
            self.guarantees.journal.close()  # a start that failed
        self.sockets.close()
        if self.zap is not None:
            self.zap.stop()

    def reload_authorized_keys(self) -> int:
        """Re-read ``curve_authorized_keys`` (SIGHUP on ``emq-green-router``):
        a removed key cannot connect any more. Returns the number of keys;
        0 on a router without CURVE."""
        return self.zap.reload() if self.zap is not None else 0

    def _housekeeping(self) -> None:
        """Heartbeats, silent workers, expired results: a few times a second."""
        s = self.settings
        tick = max(0.05, min(1.0, s.heartbeat_interval / 2, s.heartbeat_timeout / 4))
        steps: tuple[Callable[[float], Any], ...] = (
            lambda now: self.relay.expire(now, self._drop_unstarted),
            lambda _now: lastchance.keep_placing(self.worker_side),
            lambda now: _settle(self, now),
            self.worker_side.check, self.scheduler_side.check)
        self.sockets.away_after = tick + AWAY
        self.sockets.on_back = lambda gap, now: _back(self, gap, now)
        while True:
            gevent.sleep(tick)
            now = time.monotonic()
            self.sockets.alive(now)
            for step in steps:
                _guarded(step, now, self.counters)

    def _drop_unstarted(self, msgids: set[str]) -> dict[str, str]:
        """What became of the jobs whose results expired: ``unrun`` (taken
        out of the buffer), ``waiting`` (guaranteed, still buffered); the
        others were out at a worker."""
        dropped = self.routing.drop_unstarted(msgids)
        if dropped:
            self.dropped_by_reason["expired"] += len(dropped)
            self.worker_side.resume_clients()
        holders = self.routing.holders
        fate = {msgid: "waiting" for msgid in msgids if holders.get(msgid, False) is None}
        fate.update(dict.fromkeys(dropped, "unrun"))
        return fate

    # ------------------------------------------------------------------
    # administration

    def _on_admin_disconnect(self, admin: bytes, message: Message) -> None:
        logger.info("router: DISCONNECT from administrator %s: shutting down",
                    printable(admin))
        self.sockets.send("administrative", admin, Message.new(Command.ACK, message.msgid))
        gevent.spawn(self.on_admin_disconnect)

    def _answer(self, admin: bytes, value: dict[str, Any]) -> None:
        self.sockets.send("administrative", admin, Message.new(Command.REPLY, json.dumps(value)))

    def status(self) -> dict[str, Any]:
        """STATUS, in EventMQ's shape (latencies are ages in ms of the requests
        in flight), plus emq-green's own keys: drops (by queue, by reason),
        the buffer's bytes and whether reading clients is paused, and counts
        of oversized and malformed messages and ignored client DISCONNECTs."""
        return {
            **self.routing.status(time.monotonic()),
            "dropped_messages_by_queue": dict(self.dropped_by_queue),
            "dropped_requests_by_reason": dict(self.dropped_by_reason),
            "buffered_bytes": self.buffered_bytes,
            "max_buffer_bytes": self.settings.max_buffer_bytes,
            "hwm": self.settings.hwm,
            **(self.zap.status() if self.zap is not None else {}),
            "frontend_paused": self.frontend_paused,
            "frontend_pauses": self.counters["frontend_pauses"],
            "oversized_messages": self.counters["oversized_messages"],
            "malformed_messages": self.counters["malformed_messages"],
            "client_disconnects_ignored": self.counters["client_disconnects_ignored"],
            "requests_refused_by_reason": dict(self.client_side.refused_by_reason),
            "informs_refused": self.counters["informs_refused"],
            "housekeeping_errors": self.counters["housekeeping_errors"],
            "loop_gaps": self.counters["loop_gaps"],
            "possibly_lost": self.counters["possibly_lost"],
            "unknown_worker_messages": self.counters["unknown_worker_messages"],
            "requests_rerouted": self.counters["requests_rerouted"],
            "settling_seconds_left": _settling_left(self, time.monotonic()),
            "replies_for_buffered_copies": self.counters["replies_for_buffered_copies"],
            **self.results.status(),
            "results_held_for_client": self.relay.held,
            "result_bytes_to_clients": self.relay.on_the_way.bytes,
            **self.guarantees.status(),
            **self.scheduler_side.status(),
        }

    def show_workers(self) -> dict[str, Any]:
        """ROUTER_SHOW_WORKERS, in EventMQ's shape."""
        return self.routing.show_workers()


__all__ = ["Router", "RouterObserver", "RouterState", "Worker", "Request"]
