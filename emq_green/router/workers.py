"""The router's worker side: what job managers send it, and what it sends them.

:class:`WorkerSide` handles the backend socket's commands, as EventMQ
0.3.13's router does:

* INFORM ``[queues_json, "worker"]`` registers a worker (a worker that
  informs again replaces its old record) and is answered with ACK;
* READY is one free slot: the oldest request buffered for the worker's
  queues goes to it at once (heaviest queue first), else the slot is kept;
* REPLY ``[reply_json, orig_msgid]`` ends a job; its result goes on to the
  client that asked (:class:`~emq_green.router.results.ResultRelay`). Only
  the worker that holds ``orig_msgid`` in flight may end it
  (:meth:`WorkerSide._settle`): any other REPLY is refused, counted
  (``replies_refused``) and logged through the shared rate limiter, so no
  worker can forge or steal another job's result;
* KBYE removes the worker as leaving: its running jobs still finish there,
  and their REPLYs are settled against its record, kept for that;
* HEARTBEAT, like every message of a known worker, proves it alive.

It also hands requests over (:meth:`WorkerSide.hand_over`, used by the
client side too), sends the heartbeats and removes workers silent for
``heartbeat_timeout`` (:meth:`WorkerSide.check`). Requests a worker had in
flight when it is removed as dead are logged one by one (msgid, queue, age);
they are not re-dispatched, because a job may have run already and eMQP has
no way to tell. A READY does not say which job ended, so for requests sent
without ``reply-requested`` the oldest one is retired on each READY: that
list is a best estimate, exact only for requests that asked for a reply.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Optional, Protocol

from ..limits import LogLimiter
from ..protocol import Command, Message, ProtocolError, heartbeat, parse_queues, printable
from ..settings import Settings
from .results import ResultRelay
from .routing import Request, Routing, Sent, Worker
from .sockets import RouterSockets

logger = logging.getLogger(__name__)


class RouterObserver(Protocol):
    """What the router's observer is told; each call is on the hot path and
    must be O(1) (the dashboard appends to bounded deques)."""

    def handed_over(self, queue: str, waited: float) -> None:
        """A REQUEST went to a worker after ``waited`` s in the router."""

    def replied(self, queue: str, latency: float) -> None:
        """A REPLY came back ``latency`` s after its REQUEST was handed out."""

    def worker_left(self, worker: Worker, dead: bool) -> None:
        """A worker was removed: it said KBYE (draining) or went silent (dead)."""


class WorkerSide:
    """The backend's handlers over :class:`~emq_green.router.routing.Routing`."""

    def __init__(self, *, settings: Settings, routing: Routing, sockets: RouterSockets,
                 relay: ResultRelay, counters: collections.Counter[str],
                 limiter: Optional[LogLimiter] = None) -> None:
        self.settings = settings
        self.routing = routing
        self._sockets = sockets
        self._relay = relay
        self._pending = relay.pending
        self._counters = counters
        #: every line a worker's message causes goes through it (shared with
        #: the rest of the router)
        self._log = limiter or LogLimiter(logger)
        self._last_heartbeat = 0.0
        #: Told of each job (see :class:`RouterObserver`); None: nobody listens.
        self.observer: Optional[RouterObserver] = None
        #: command -> handler, for the backend socket's reader
        self.table = {
            Command.INFORM: self.on_inform,
            Command.READY: self.on_ready,
            Command.REPLY: self.on_reply,
            Command.HEARTBEAT: self._ignore,
            Command.KBYE: self.on_kbye,
        }

    def known(self, identity: bytes, message: Message) -> bool:
        """The gate before every handler: any message from a known worker
        counts as a heartbeat; others are dropped unless they are an INFORM,
        or a REPLY of a worker that left with KBYE for a job it still held."""
        worker = self.routing.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
            return True
        if message.command is Command.INFORM:
            return True
        if self.routing.departed(identity):
            if message.command is Command.REPLY:
                departed = self.routing.departed_worker(identity)
                if departed is not None:  # a job that ran on after KBYE
                    self._reply(departed, message)
                else:  # removed as dead (its jobs were reported lost), or nothing held
                    self._refuse_reply(identity, message, "it was removed")
                return False
            logger.debug("router: %s from departed worker %s dropped",
                         message.command.value, printable(identity))
        else:
            self._counters["unknown_worker_messages"] += 1
            self._log.warning("unknown_worker",
                              "router: unknown worker %s sent %s; dropped (it must INFORM "
                              "first)", printable(identity), message.command.value)
        return False

    @staticmethod
    def _ignore(identity: bytes, message: Message) -> None:
        """HEARTBEAT: the gate already counted it."""

    def on_inform(self, identity: bytes, message: Message) -> None:
        queues_text = message.body[0] if message.body else ""
        kind = message.body[1] if len(message.body) > 1 else "worker"
        if kind != "worker":
            self._counters["informs_refused"] += 1
            self._log.warning("inform", "router: INFORM of type %s on the worker socket ignored",
                              printable(kind, 40))
            return
        try:
            queues = parse_queues(queues_text) if queues_text else self.settings.queues
        except ProtocolError as exc:
            # no ACK: the worker is not registered (EventMQ's and emq-green's
            # workers retry the INFORM after reconnect_timeout, and say so)
            self._counters["informs_refused"] += 1
            self._log.error("inform", "router: INFORM from %s refused, not ACKed: %s",
                            printable(identity), printable(exc, 200))
            return
        old = self.routing.workers.get(identity)
        if old is not None:
            self._log.warning("inform", "router: worker %s informed again; its old record "
                              "is replaced", old.log_name)
            self.forget(old, "it informed again", dead=True)
        worker = self.routing.add(identity, queues, time.monotonic())
        self._log.info("inform", "router: worker %s joined (queues %s)", worker.log_name,
                       printable(json.dumps([list(q) for q in worker.queues]), 400))
        self._sockets.send("backend", identity, Message.new(Command.ACK, message.msgid))

    def on_ready(self, identity: bytes, message: Message) -> None:
        routing = self.routing
        worker = routing.workers[identity]
        if worker.unreplied or worker.replied_unasked:
            routing.retire_oldest_unreplied(worker)
        found = routing.next_for(worker)
        if found is None:
            worker.slots += 1
            return
        name, request = found
        if not self.hand_over(worker, request, name):
            return
        if routing.taken(name):
            logger.info("router: the buffer of queue %s is empty again", printable(name))
        if self._sockets.frontend_paused and routing.may_resume():
            self._sockets.resume_clients(
                f"{sum(map(len, routing.waiting.values()))} requests, "
                f"{routing.buffered_bytes} bytes buffered")

    def on_reply(self, identity: bytes, message: Message) -> None:
        self._reply(self.routing.workers[identity], message)

    def _reply(self, worker: Worker, message: Message) -> None:
        """A REPLY of ``worker``: its result goes on only when ``worker``
        holds the request."""
        # eMQP quirk kept by EventMQ: [reply_json, orig_msgid]
        orig = message.body[1] if len(message.body) > 1 else ""
        sent = self._settle(worker, orig)
        if sent is None:
            self._refuse_reply(worker.identity, message, "it does not hold that request")
            return
        if self.observer is not None:
            self.observer.replied(sent.queue, time.monotonic() - sent.sent)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("router: %s job %s done in %.1f ms", printable(sent.queue),
                         printable(orig), (time.monotonic() - sent.sent) * 1000)
        if self._pending:
            self._relay.forward(message)

    def _settle(self, worker: Worker, msgid: str) -> Optional[Sent]:
        """The one rule for REPLYs: one counts only when ``worker`` holds
        ``msgid`` in flight (a connected worker, or the record of one that
        left with KBYE). Returns the request it ends, forgotten in the books
        (``in_flight``, :attr:`Routing.holders`); None: refuse the REPLY."""
        sent = worker.in_flight.pop(msgid, None)
        if sent is None:
            return None
        holders = self.routing.holders
        if holders.get(msgid) is worker:
            del holders[msgid]
        if not sent.reply_requested:  # replied anyway: its READY retires nothing
            worker.unreplied -= 1
            worker.replied_unasked += 1
        return sent

    def _refuse_reply(self, identity: bytes, message: Message, why: str) -> None:
        self._counters["replies_refused"] += 1
        orig = message.body[1] if len(message.body) > 1 else ""
        self._log.warning("reply_refused", "router: REPLY for %s from worker %s refused (%s)",
                          printable(orig, 60), printable(identity), why)

    def on_kbye(self, identity: bytes, message: Message) -> None:
        self.forget(self.routing.workers[identity], "it said KBYE", dead=False)

    def hand_over(self, worker: Worker, request: Request, queue: str) -> bool:
        """Send ``request`` to ``worker``; a worker that cannot be reached is
        removed and False returned."""
        message = Message(Command.REQUEST, request.msgid, request.body)
        if not self._sockets.send("backend", worker.identity, message):
            self.forget(worker, "it cannot be reached", dead=True)
            return False
        now = time.monotonic()
        self.routing.sent(worker, request, queue, now)
        if self.observer is not None:
            self.observer.handed_over(queue, now - request.received)
        return True

    def forget(self, worker: Worker, reason: str, *, dead: bool) -> None:
        """Remove a worker from every queue. Requests it had in flight are
        logged, as lost when it died, as still running there when it left
        (its record is then kept, so that their REPLYs are still settled)."""
        self.routing.remove(worker, time.monotonic(), keep=not dead)
        if self.observer is not None:
            self.observer.worker_left(worker, dead)
        log = logger.error if dead and worker.in_flight else logger.info
        log("router: worker %s removed (%s); %d request(s) in flight there%s", worker.log_name,
            reason, len(worker.in_flight),
            ", not re-dispatched:" if dead and worker.in_flight else "")
        if dead:
            now = time.monotonic()
            for sent in worker.in_flight.values():
                logger.error("router: possibly lost REQUEST %s (queue %s, sent %.1f s ago%s)",
                             printable(sent.msgid), printable(sent.queue), now - sent.sent,
                             "" if sent.reply_requested else ", no reply requested")
                self._counters["possibly_lost"] += 1
                self._relay.worker_lost(sent.msgid)

    def say_goodbye(self) -> None:
        """The router stops: KBYE to every worker, each removed as leaving."""
        for worker in list(self.routing.workers.values()):
            self._sockets.send("backend", worker.identity, Message.new(Command.KBYE))
            self.forget(worker, "the router is stopping", dead=False)

    def check(self, now: float) -> None:
        """Heartbeats to every worker each ``heartbeat_interval``; removal of
        workers silent for ``heartbeat_timeout``."""
        s = self.settings
        self._log.flush(now)
        self.routing.prune_departed(now, s.result_ttl)
        if s.disable_heartbeats:
            return
        workers = self.routing.workers
        if now - self._last_heartbeat >= s.heartbeat_interval:
            self._last_heartbeat = now
            beat = heartbeat()
            for identity in list(workers):
                self._sockets.send("backend", identity, beat)
        if self._sockets.has_unread("backend"):
            return  # messages not read yet may be the heartbeats we wait for
        for worker in list(workers.values()):
            silence = now - worker.last_seen
            if silence >= s.heartbeat_timeout:
                self.forget(worker, f"nothing received for {silence:.1f} s", dead=True)


__all__ = ["RouterObserver", "WorkerSide"]
