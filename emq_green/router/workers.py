"""The router's worker side: what job managers send it, and what it sends them.

:class:`WorkerSide` handles the backend socket's commands, as EventMQ
0.3.13's router does:

* INFORM ``[queues_json, "worker"]`` registers a worker (a worker that
  informs again replaces its old record) and is answered with ACK;
* READY is one free slot: the oldest request buffered for the first of the worker's
  queues (in INFORM order) that has one goes to it at once, else the slot is kept;
* REPLY ``[reply_json, orig_msgid]`` ends a job; its result goes on to the
  client that asked (:class:`~emq_green.router.results.ResultRelay`). Only
  the worker that holds ``orig_msgid`` in flight can end it
  (:meth:`WorkerSide._settle`): any other REPLY (a forgery, a job still
  buffered or running elsewhere, a job that ended) is late: dropped,
  counted (``late_replies``) and logged through the router's rate limiter;
* KBYE removes the worker as leaving: its running jobs still finish there,
  and their REPLYs count, until ``kill_grace_period`` has passed;
* HEARTBEAT, like every message of a known worker, proves it alive.

It also hands requests over (:meth:`WorkerSide.hand_over`, used by the
client side too): a request goes on the worker's books at once and on the
wire at the end of the router's turn, with every other request handed out
in it (:meth:`~emq_green.router.sockets.RouterSockets.send_later`), so
that ZeroMQ's I/O thread wakes once per batch instead of once per request. One that cannot be
delivered then (the worker vanished, or its pipe is full) is taken off the
worker's books and routed again, at the head of its queue, and the worker
is removed; one whose worker is removed before the end of the turn never
leaves for it and is routed again too. It sends the heartbeats and removes workers silent for
``heartbeat_timeout`` (:meth:`WorkerSide.check`). Requests a worker had in
flight when it is removed as dead are logged one by one (msgid, queue, age)
and not re-dispatched, because a job may have run already and eMQP has no
way to tell, except guaranteed ones (:mod:`emq_green.router.guarantee`),
which go back to the head of their queue. A READY does not say which job
ended, so for requests sent without ``reply-requested`` the oldest one is
retired on each READY: that list is a best estimate, exact only for
requests that asked for a reply (guaranteed ones always do).
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Optional, Protocol

from ..limits import LogLimiter
from ..protocol import (
    KBYE_LEAVING,
    Command,
    Message,
    ProtocolError,
    ack_frames,
    heartbeat,
    parse_queues,
    printable,
    request_frames,
    same_worker,
)
from ..settings import Settings
from . import lastchance
from .guarantee import AGAIN, LAST_CHANCE, Guarantees, was_killed
from .results import GIVEN_UP, ResultRelay
from .routing import RAN_ON_KEPT, Request, Routing, Sent, Worker, remember
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


def _copies(sent: list[Sent], identity: bytes) -> list[Request]:
    """The guaranteed requests of ``sent``, marked as copies that may have
    run on the worker ``identity`` (:attr:`Request.ran_on`)."""
    requests = [item.request for item in sent if item.request is not None]
    for request in requests:
        if identity not in request.ran_on:
            request.ran_on = (*request.ran_on[1 - RAN_ON_KEPT:], identity)
    return requests


def _possibly_lost(lost: list[Sent], counters: collections.Counter[str],
                   relay: ResultRelay) -> None:
    """Plain jobs a dead worker had in flight: each logged and counted, the
    client of a result told."""
    now = time.monotonic()
    for sent in lost:
        logger.error("router: possibly lost REQUEST %s (queue %s, sent %.1f s ago%s)",
                     printable(sent.msgid), printable(sent.queue), now - sent.sent,
                     "" if sent.reply_requested else ", no reply requested")
        counters["possibly_lost"] += 1
        relay.worker_lost(sent.msgid)


def _not_given_up(sent: list[Sent], worker: Worker, guarantees: Guarantees,
                  relay: ResultRelay) -> list[Sent]:
    """The guaranteed requests of ``sent`` (lost with ``worker``) to send
    again: those on their last chance wait to go out alone, those lost once too
    often are given up, each logged and its client told
    (:meth:`Guarantees.count_loss`)."""
    again = []
    for item in sent:
        request = item.request
        assert request is not None
        decided = guarantees.count_loss(request)
        if decided == AGAIN:
            again.append(item)
            continue
        if decided == LAST_CHANCE:
            logger.warning("router: guaranteed REQUEST %s (queue %s): %d workers died running "
                           "it; on its last chance, it runs alone on a worker "
                           "(max_redeliveries %d)",
                           printable(request.msgid), printable(request.queue),
                           request.losses, guarantees.max_redeliveries)
            continue
        logger.error("router: guaranteed REQUEST %s (queue %s) given up: %d workers died "
                     "running it, the last %s (max_redeliveries %d); dropped from the "
                     "journal, not sent again: %s", printable(request.msgid),
                     printable(request.queue), request.losses, worker.log_name,
                     guarantees.max_redeliveries, printable(request.body[-1], 200))
        relay.worker_lost(request.msgid, GIVEN_UP)
    return again


def _twin(routing: Routing, worker: Worker, msgid: str) -> Optional[Worker]:
    """The worker holding ``msgid`` when it is another connection of
    ``worker``'s own process: one that lost the router (a router SIGSTOPped
    past the worker's patience) connects anew and sends the REPLYs of the
    jobs it ran under its new identity; they were dropped as late, the
    results reported lost (a probe). An emq-green worker's identities say
    their process (``name:pid:...``); EventMQ's job manager takes a new
    uuid4: its REPLY counts when the holder has not been heard from since
    the router came back from a gap (frozen: its connection was left
    behind), the msgid (a uuid4 shown nowhere) telling the job."""
    holder = routing.holders.get(msgid)
    if holder is None or holder is worker or not (
            holder.fresh_after or same_worker(holder.identity, worker.identity)):
        return None
    return holder


def _twin_ready(side: WorkerSide, worker: Worker, msgid: str) -> None:
    """An emq-green worker's READY names the job sent without
    reply-requested that ended: one its old connection holds ends there
    (else, that connection removed, the job was logged "possibly lost")."""
    twin = _twin(side.routing, worker, msgid)
    sent = twin.in_flight.get(msgid) if twin is not None else None
    if sent is not None and not sent.reply_requested:
        side.routing.retire_oldest_unreplied(twin, msgid)  # type: ignore[arg-type]


def _undelivered(side: WorkerSide, unsent: list[tuple[Worker, Request, list[bytes]]],
                 failed: list[list[bytes]]) -> None:
    """Requests of ``unsent`` whose ``failed`` frames did not leave: off
    their workers' books, their workers removed, routed again."""
    lost = {id(frames) for frames in failed}
    routing = side.routing
    again: list[Request] = []
    workers: dict[bytes, Worker] = {}
    for worker, request, frames in unsent:
        if id(frames) in lost:
            routing.unsent(worker, request)
            again.append(request)
            workers[worker.identity] = worker
    for worker in workers.values():
        if routing.workers.get(worker.identity) is worker:
            side.forget(worker, "it cannot be reached", dead=True)
        elif worker.leaving_until and not worker.in_flight:
            routing.leaving.pop(worker.identity, None)
    side._counters["requests_rerouted"] += len(again)
    logger.warning("router: %d request(s) could not be sent to worker(s) %s; routed "
                   "again", len(again), ", ".join(w.log_name for w in workers.values()))
    side.route_again(again)


def freeze(routing: Routing, now: float, fresh_after: float) -> None:
    """The router is back from a gap (SIGSTOP, a paused VM): no worker gets
    a request before it has sent something fresh, read after
    ``fresh_after`` (what it sent during the gap proves nothing: a worker
    that gave up on the router connects anew, and EventMQ's job manager
    leaves its old connection open; requests sent there were lost, a
    probe); its free slots wait, and silence counts from now."""
    for worker in routing.workers.values():
        worker.frozen_slots += worker.slots
        worker.slots = 0
        worker.fresh_after = fresh_after
        worker.last_seen = now


def _thaw(side: WorkerSide, worker: Worker) -> None:
    """``worker`` sent something fresh: its slots back, its queues served."""
    worker.fresh_after = 0.0
    slots, worker.frozen_slots = worker.frozen_slots, 0
    if worker is side.guarantees.reserved:
        worker.held_slots += slots  # (withheld for its last-chance request)
        return
    for _ in range(slots):
        side.routing.give_slot(worker)
    for queue in worker.queue_order:
        side.dispatch(queue)


def _late(side: WorkerSide, message: Message, identity: bytes) -> None:
    """A REPLY from a worker that does not hold the job (any more: it went
    elsewhere or ended; or never: a forgery). Dropped, never forwarded."""
    orig = message.body[1] if len(message.body) > 1 else ""
    side._counters["late_replies"] += 1
    side.guarantees.late_reply(orig, printable(identity))
    side._log.warning("late_reply", "router: REPLY for %s from worker %s dropped: it "
                      "does not hold that request", printable(orig, 60), printable(identity))


def _log_queued_again(why: str, requests: list[Request]) -> None:
    logger.warning("router: %s: %d guaranteed request(s) queued again (%s)", why,
                   len(requests), ", ".join(printable(r.msgid) for r in requests[:5])
                   + (", ..." if len(requests) > 5 else ""))


class WorkerSide:
    """The backend's handlers over :class:`~emq_green.router.routing.Routing`."""

    def __init__(self, *, settings: Settings, routing: Routing, sockets: RouterSockets,
                 relay: ResultRelay, counters: collections.Counter[str],
                 guarantees: Guarantees, limiter: Optional[LogLimiter] = None) -> None:
        self.settings = settings
        self.routing = routing
        self.guarantees = guarantees
        #: every line a worker's message causes goes through it (shared with
        #: the rest of the router)
        self._log = limiter or LogLimiter(logger)
        self._sockets = sockets
        self._relay = relay
        self._pending = relay.pending.ids  # (its truth is C-level: looked at per REPLY)
        self._counters = counters
        self._last_heartbeat = 0.0
        self.judge_after = 0.0  #: none judged silent before then (``broker.AWAY``)
        #: identities removed as dead, told to reconnect if they speak again
        self._taken_for_dead: collections.OrderedDict[bytes, bool] = collections.OrderedDict()
        #: unknown identities already told to reconnect (KBYE)
        self._told_unknown: collections.OrderedDict[bytes, bool] = collections.OrderedDict()
        #: Told of each job (see :class:`RouterObserver`); None: nobody listens.
        self.observer: Optional[RouterObserver] = None
        #: Requests handed out in this turn and not sent yet: (worker,
        #: request, frames), in the order they were handed out.
        self._unsent: list[tuple[Worker, Request, list[bytes]]] = []
        sockets.flushed["backend"] = self._flushed
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
        counts as a heartbeat; others are dropped unless they are an INFORM."""
        worker = self.routing.workers.get(identity)
        if worker is not None:
            now = time.monotonic()
            if worker.fresh_after:  # (see ``freeze``)
                if now < worker.fresh_after:
                    return True
                _thaw(self, worker)
            worker.last_seen = now
            return True
        if message.command is Command.INFORM:
            return True
        leaving = self.routing.leaving.get(identity)
        if leaving is not None:
            if message.command is Command.REPLY:
                self._reply(leaving, message)  # a job that ran on after KBYE
            else:
                _from_a_leaver(self.routing, leaving, message, self.settings.heartbeat_timeout)
            return False
        # a job sent again that ended where it first ran ends here
        settled = message.command is Command.REPLY and self._ran_after_all(message, identity)
        if self.routing.departed(identity):
            if message.command is Command.REPLY and not settled:
                _late(self, message, identity)
            if self._taken_for_dead.pop(identity, False):
                # it was taken for dead and is back (a SIGSTOP, a slow host):
                # KBYE makes an emq-green worker connect again at once, with a
                # new identity (EventMQ's job manager ignores it)
                logger.warning("router: worker %s, removed as dead, is talking again; told "
                               "to connect anew (KBYE)", printable(identity))
                self._sockets.send("backend", identity, Message.new(Command.KBYE))
            logger.debug("router: %s from departed worker %s dropped",
                         message.command.value, printable(identity))
        else:
            told = identity in self._told_unknown
            if not settled:
                self._counters["unknown_worker_messages"] += 1
                # one line per identity (after a router restart, each worker's
                # queued HEARTBEATs made one each), then DEBUG
                text = "router: unknown worker %s sent %s; dropped (it must INFORM first)%s"
                args = (printable(identity), message.command.value,
                        "" if told else "; told to connect anew (KBYE)")
                if told:
                    logger.debug(text, *args)
                else:
                    self._log.warning("unknown_worker", text, *args)
            if not told:
                # a worker of the router before a restart: KBYE makes an
                # emq-green worker INFORM at once, not after its heartbeat
                # timeout (EventMQ's job manager ignores it); once per identity
                remember(self._told_unknown, identity)
                self._sockets.send("backend", identity, Message.new(Command.KBYE))
        return False

    @staticmethod
    def _ignore(identity: bytes, message: Message) -> None:
        """HEARTBEAT: the gate already counted it."""

    def on_inform(self, identity: bytes, message: Message) -> None:
        queues_text = message.body[0] if message.body else ""
        kind = message.body[1] if len(message.body) > 1 else "worker"
        if kind != "worker":
            self._counters["informs_refused"] += 1
            self._log.warning("inform", "router: INFORM of type %s from %s on the worker "
                              "socket ignored", printable(kind, 40), printable(identity))
            return
        try:
            # at most 256 queues of at most 256 bytes; a longer text is not parsed
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
        self._taken_for_dead.pop(identity, None)
        self._log.info("inform", "router: worker %s joined (queues %s)", worker.log_name,
                       printable(json.dumps([list(q) for q in worker.queues]), 400))
        self._sockets.send("backend", identity, Message.new(Command.ACK, message.msgid))

    def on_ready(self, identity: bytes, message: Message) -> None:
        routing = self.routing
        worker = routing.workers[identity]
        if worker.unreplied or worker.replied_unasked:
            routing.retire_oldest_unreplied(worker, message.msgid)
        elif message.msgid in routing.holders:  # a job of its old connection (``_twin``)
            _twin_ready(self, worker, message.msgid)
        if worker is self.guarantees.reserved and lastchance.ready(self, worker):
            return
        if worker.fresh_after:  # frozen (see ``freeze``)
            worker.frozen_slots += 1
            return
        # the oldest request of the first of its queues (in INFORM order)
        # that has one waiting; it leaves the buffer below (``taken``)
        waiting = routing.waiting
        for name in worker.queue_order if waiting else ():
            requests = waiting.get(name)
            if requests:
                break
        else:
            routing.give_slot(worker)
            return
        self.hand_over(worker, requests[0], name)
        if routing.taken(name):
            logger.info("router: the buffer of queue %s is empty again", printable(name))
        if self._sockets.frontend_paused:
            self.resume_clients()

    def resume_clients(self) -> None:
        """Read clients again if reading was paused and every bound (the
        buffer's, the journal's backlog) is back under its low-water mark."""
        routing = self.routing
        if (self._sockets.frontend_paused and routing.may_resume()
                and not self.guarantees.backlogged(routing.resume_length)):
            self._sockets.resume_clients(
                f"{sum(map(len, routing.waiting.values()))} requests, "
                f"{routing.buffered_bytes} bytes buffered")

    def on_reply(self, identity: bytes, message: Message) -> None:
        self._reply(self.routing.workers[identity], message)

    def _reply(self, worker: Worker, message: Message) -> None:
        orig = message.body[1] if len(message.body) > 1 else ""  # [reply_json, orig_msgid]
        sent = self._settle(worker, orig)
        if sent is None and (twin := _twin(self.routing, worker, orig)) is not None:
            worker, sent = twin, self._settle(twin, orig)
        if sent is None:
            if not self._ran_after_all(message, worker.identity):
                _late(self, message, worker.identity)
            return
        if self.observer is not None:
            self.observer.replied(sent.queue, time.monotonic() - sent.sent)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("router: %s job %s done in %.1f ms", printable(sent.queue),
                         printable(orig), (time.monotonic() - sent.sent) * 1000)
        if worker.leaving_until and not worker.in_flight:
            self.routing.leaving.pop(worker.identity, None)
        if sent.request is not None:
            if worker.leaving_until and was_killed(message.body[0]):
                # the worker stopped before the job ended (else: its own exception)
                self.redeliver([sent], f"worker {worker.log_name} killed it while stopping",
                               worker.identity)
                return
            if self.guarantees.finished(sent.request):
                # it ended before its journal commit: safe, never written
                request = sent.request
                self._sockets.send_later("frontend", ack_frames(request.client, request.msgid))
        if self._pending:
            self._relay.forward(message)

    def _settle(self, worker: Worker, msgid: str) -> Optional[Sent]:
        """The one rule for REPLYs: one counts only when ``worker`` (connected,
        or in :attr:`Routing.leaving`) holds ``msgid`` in flight. Returns the
        request it ends, gone from the books (``in_flight``,
        :attr:`Routing.holders`); None: the REPLY is late or forged, dropped."""
        sent = worker.in_flight.pop(msgid, None)
        if sent is None:
            return None
        holders = self.routing.holders
        worker.last_replied = msgid if sent.reply_requested else ""
        if holders.get(msgid) is worker:
            del holders[msgid]
        if not sent.reply_requested:  # replied anyway: its READY retires nothing
            worker.unreplied -= 1
            worker.replied_unasked += 1
        return sent

    def _ran_after_all(self, message: Message, identity: bytes) -> bool:
        """A REPLY (not ``Killed``) for a guaranteed request whose copy waits in
        the buffer, or on its last chance for its turn or its worker: the copy
        leaves unrun, the job ends, its result goes on."""
        body = message.body
        request = (None if len(body) != 2 or was_killed(body[0])
                   else self.routing.withdraw_copy(body[1], identity)
                   or self.guarantees.withdraw_last_chance(body[1], identity))
        if request is None:
            return False
        self._counters["replies_for_buffered_copies"] += 1
        logger.warning("router: REPLY for %s from %s, which ran it after all: its copy in "
                       "the buffer is dropped unrun", printable(body[1], 60), printable(identity))
        if self.guarantees.finished(request):
            self._sockets.send_later("frontend", ack_frames(request.client, request.msgid))
        if self._pending:
            self._relay.forward(message)
        self.resume_clients()
        return True

    def on_kbye(self, identity: bytes, message: Message) -> None:
        """An emq-green worker's KBYE ``leaving`` is answered: no REQUEST follows."""
        self.forget(self.routing.workers[identity], "it said KBYE", dead=False)
        if message.body[:1] == (KBYE_LEAVING,):
            self._sockets.send("backend", identity, Message.new(Command.KBYE))

    def hand_over(self, worker: Worker, request: Request, queue: str) -> None:
        """Give ``request`` to ``worker``: on its books now, on the wire at the turn's end."""
        frames = request_frames(worker.identity, request.msgid, request.body)
        self._unsent.append((worker, request, frames))
        self._sockets.send_later("backend", frames)
        now = time.monotonic()
        self.routing.sent(worker, request, queue, now)
        observer = self.observer
        if observer is not None:
            observer.handed_over(queue, now - request.received)

    def _flushed(self, sent: list[list[bytes]], failed: list[list[bytes]]) -> None:
        """This turn's REQUESTs left (``RouterSockets.flushed``); those that
        ``failed`` go back to their queues, their workers are removed."""
        unsent, self._unsent = self._unsent, []
        if failed:
            _undelivered(self, unsent, failed)

    def _take_back(self, worker: Worker) -> list[Request]:
        """This turn's requests for ``worker`` not sent yet: kept from it, off its books."""
        if not self._unsent:
            return []
        mine = [entry for entry in self._unsent if entry[0] is worker]
        if not mine:
            return []
        self._unsent = [entry for entry in self._unsent if entry[0] is not worker]
        self._sockets.unqueue("backend", [frames for _w, _r, frames in mine])
        for _w, request, _f in mine:
            self.routing.unsent(worker, request)
        return [request for _w, request, _f in mine]

    def forget(self, worker: Worker, reason: str, *, dead: bool) -> None:
        """Remove a worker from every queue. Requests it had in flight are
        logged, as lost when it died, as still running there when it left;
        guaranteed ones of a dead worker are sent again (:meth:`redeliver`).
        Requests handed to it in this turn and not sent yet go elsewhere."""
        unsent = self._take_back(worker)
        if dead:
            self.routing.remove(worker)
            remember(self._taken_for_dead, worker.identity)
        else:
            self.routing.leave(worker, time.monotonic() + self.settings.kill_grace_period
                               + self.settings.heartbeat_timeout)
        if self.observer is not None:
            self.observer.worker_left(worker, dead)
        lost = [s for s in worker.in_flight.values() if s.request is None] if dead else []
        log = logger.error if lost else logger.info
        held = len(worker.in_flight)
        if dead and held:
            log("router: worker %s removed (%s); %d request(s) in flight there: %d "
                "guaranteed, sent again; %d not re-dispatched%s", worker.log_name, reason,
                held, held - len(lost), len(lost), ":" if lost else "")
        elif held:
            log("router: worker %s removed (%s); %d request(s) in flight there",
                worker.log_name, reason, held)
        else:  # nothing lost: a flood of INFORMs must not flood the log
            self._log.info("worker_removed", "router: worker %s removed (%s)",
                           worker.log_name, reason, via=logger)
        if dead:
            self._lost(worker, lost)
        if unsent:
            self._counters["requests_rerouted"] += len(unsent)
            self.route_again(unsent)

    def _lost(self, worker: Worker, lost: list[Sent]) -> None:
        """``worker`` is gone with jobs unanswered: guaranteed ones go again
        (or are given up), the others are logged as possibly lost."""
        _possibly_lost(lost, self._counters, self._relay)
        held = [s for s in worker.in_flight.values() if s.request is not None]
        _copies(held, worker.identity)  # its REPLY, if it was only stopped, ends a copy
        again = _not_given_up(held, worker, self.guarantees, self._relay)
        self.routing.unhold(worker)
        worker.in_flight.clear()
        worker.unreplied = worker.replied_unasked = 0
        if again:
            self.redeliver(again, f"worker {worker.log_name} is gone", worker.identity)

    def redeliver(self, sent: list[Sent], why: str, identity: bytes) -> None:
        """Guaranteed requests the worker ``identity`` did not finish: back to
        the head of their queues (oldest first), then out to free workers."""
        requests = _copies(sent, identity)
        self.guarantees.redelivered += len(requests)
        _log_queued_again(why, requests)
        self.route_again(requests)

    def route_again(self, requests: list[Request]) -> None:
        """``requests`` (oldest first) back at the head of their queues,
        then out to free workers; reading clients pauses if that fills the
        buffer."""
        routing = self.routing
        queues: list[str] = []
        full = False
        for request in reversed(lastchance.sent_again(self, requests)):
            queue = routing.queue_for(request.queue)
            full = routing.buffer(queue, request, head=True) or full
            if queue not in queues:
                queues.append(queue)
        for queue in queues:
            self.dispatch(queue)
        if full and routing.waiting and not routing.may_resume():
            self._sockets.pause_clients("requests queued again fill the buffer")

    def dispatch(self, queue: str) -> None:
        """Send the requests buffered for ``queue`` to workers with free slots."""
        routing = self.routing
        while routing.waiting.get(queue):
            worker = routing.pick(queue)
            if worker is None:
                return
            self.hand_over(worker, routing.waiting[queue][0], queue)
            worker.slots -= 1
            routing.taken(queue)

    def _give_up_on_leavers(self, now: float) -> None:
        """Workers that said KBYE and are past ``kill_grace_period`` with jobs
        unanswered: those jobs are taken as lost (guaranteed ones go again)."""
        for worker in list(self.routing.leaving.values()):
            if now >= worker.leaving_until:
                del self.routing.leaving[worker.identity]
                logger.warning("router: worker %s said KBYE %.0f s ago and %d job(s) there "
                               "are still unanswered", worker.log_name,
                               self.settings.kill_grace_period + self.settings.heartbeat_timeout,
                               len(worker.in_flight))
                self._lost(worker, [s for s in worker.in_flight.values() if s.request is None])

    def say_goodbye(self) -> None:
        """The router stops: the requests handed out are sent, then KBYE to
        every worker, each removed as leaving."""
        self._sockets.flush()
        for worker in list(self.routing.workers.values()):
            self._sockets.send("backend", worker.identity, Message.new(Command.KBYE))
            self.forget(worker, "the router is stopping", dead=False)

    def check(self, now: float) -> None:
        """Heartbeats to every worker each ``heartbeat_interval``; removal of
        workers silent for ``heartbeat_timeout``; leaving workers past their
        grace period; the summary of log lines not logged one by one."""
        self._log.flush(now)
        if self.routing.leaving:
            self._give_up_on_leavers(now)
        s = self.settings
        if s.disable_heartbeats:
            return
        workers = self.routing.workers
        if now - self._last_heartbeat >= s.heartbeat_interval:
            self._last_heartbeat = now
            beat = heartbeat()
            for identity in list(workers):
                self._sockets.send("backend", identity, beat)
        if now < self.judge_after or self._sockets.has_unread("backend"):
            return  # messages not read yet may be the heartbeats we wait for
        for worker in list(workers.values()):
            silence = now - worker.last_seen
            if silence >= s.heartbeat_timeout:
                self.forget(worker, f"nothing received for {silence:.1f} s", dead=True)


def _from_a_leaver(routing: Routing, worker: Worker, message: Message, timeout: float) -> None:
    """A READY or HEARTBEAT from a worker that said KBYE (not a REPLY), sent
    by an emq-green worker once the router has answered its KBYE.

    A READY names a job sent without reply-requested that ended well there:
    that job ends (else it would be logged as possibly lost once
    ``kill_grace_period`` is over), and no slot is offered. A HEARTBEAT says
    the worker still runs jobs that came on that connection (a reload's
    retired one: the worker does not kill them at ``kill_grace_period``):
    they stay on the books ``heartbeat_timeout`` past it at least, so that a
    long job's end still counts and its REPLY is not dropped as late."""
    if message.command is Command.HEARTBEAT:
        worker.leaving_until = max(worker.leaving_until, time.monotonic() + timeout)
        return
    if message.command is not Command.READY:
        return
    if worker.unreplied or worker.replied_unasked:
        routing.retire_oldest_unreplied(worker, message.msgid)
    if not worker.in_flight:
        routing.leaving.pop(worker.identity, None)


__all__ = ["RouterObserver", "WorkerSide"]
