"""The router's client side: what clients send on the frontend socket.

:class:`ClientSide` takes each REQUEST as EventMQ 0.3.13's router does: to
the worker with a free slot that has the highest weight for its queue, the
least recently used among equal weights (:meth:`Routing.pick
<emq_green.router.routing.Routing.pick>`), acknowledged with ``REPLY
[msgid]`` when it leaves at once; else into the queue's buffer, where a
READY will find it. A queue no worker serves goes to the default queue.

Where emq-green differs: a full buffer stops the reading of clients
(backpressure, never loss); a request with ``result-requested`` gets its
result instead of an acknowledgement (:mod:`emq_green.router.results`); a
guaranteed request is routed at once and confirmed once it is safe (its
journal commit done when there is a journal), buffered or not
(:mod:`emq_green.router.guarantee`);
and a DISCONNECT from a client is ignored (EventMQ stops on it: any client
could then stop the service).

Refused before anything is held (O(1) checks, docs/security.md): a msgid
over :data:`~emq_green.limits.MAX_MSGID_BYTES`; a msgid already buffered, in
flight or waiting for its result (it never takes the other's place); a
result request the pending map has no room for. Each gets ``REPLY
[refusal_json, msgid]`` (:func:`~emq_green.router.results.refusal_body`),
counted in :attr:`ClientSide.refused_by_reason` and logged through the
router's rate limiter.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Mapping, Optional

from ..limits import MAX_MSGID_BYTES, LogLimiter, msgid_too_long
from ..protocol import (
    RESULT_HEADER,
    Command,
    Message,
    ack_frames,
    guarantee_in,
    printable,
    reply_requested_in,
    result_requested_in,
    with_reply_requested,
)
from ..settings import Settings
from .guarantee import Guarantees, refusal_body
from .results import BYTES, CLIENT_SHARE, FULL, ResultRelay
from .results import refusal_body as request_refusal
from .routing import Request, Routing
from .sockets import RouterSockets
from .workers import WorkerSide

logger = logging.getLogger(__name__)
#: queues that began to wait for a worker: one line each, rate-limited on
#: their own (in the router's first moments any name waits: a probe's
#: 20,000 lines), not taking the room of the lines about refused messages
_waits_log = LogLimiter(logger, summary="router: %d more queue(s) with no worker began to "
                                        "wait, not logged one by one: %s")

#: msgids of at most this many characters are never over MAX_MSGID_BYTES
#: (4 bytes per character at most in UTF-8)
_ASCII_SAFE = MAX_MSGID_BYTES // 4
#: a result request refused by the pending map: (reason, text)
_RESULTS_REFUSED = {
    FULL: ("results_full", "the router holds max_pending_results results already"),
    BYTES: ("results_bytes", "the router holds max_pending_result_bytes of results already"),
    CLIENT_SHARE: ("results_client_share",
                   "this client holds max_pending_results_per_client results already"),
}


def _held_guaranteed(routing: Routing, msgid: str) -> bool:
    """Whether the request holding ``msgid`` (in flight, or in the buffer)
    is a guaranteed one: a plain one under that msgid makes no repeat (the
    guaranteed REQUEST was confirmed, and held nowhere). O(buffer) for a
    buffered one: rare (a msgid sent twice)."""
    holder = routing.holders.get(msgid, False)
    if holder is False:
        return False
    if holder is not None:
        sent = holder.in_flight.get(msgid)  # type: ignore[union-attr]
        return sent is not None and sent.request is not None
    return any(r.msgid == msgid and r.guaranteed
               for waiting in routing.waiting.values() for r in waiting)


def _a_repeat(side: ClientSide, client: bytes, message: Message) -> bool:
    """A guaranteed REQUEST (no result asked) whose msgid is held, or ended
    lately: one sent again by a sender whose confirmation was lost (a
    scheduler that lost a router stopped past its patience fires its
    unconfirmed runs again, under their msgids; they ran twice). Confirmed,
    not run again (True); else False."""
    headers = message.body[1]
    if not guarantee_in(headers) or result_requested_in(headers):
        return False
    side.guarantees.repeats += 1
    side.sockets.send_later("frontend", ack_frames(client, message.msgid))
    return True


class ClientSide:
    """The frontend's handlers over the router's books."""

    def __init__(self, *, settings: Settings, routing: Routing, sockets: RouterSockets,
                 relay: ResultRelay, guarantees: Guarantees, worker_side: WorkerSide,
                 counters: collections.Counter[str],
                 dropped_by_reason: collections.Counter[str],
                 limiter: Optional[LogLimiter] = None) -> None:
        self.settings = settings
        self.routing = routing
        self.sockets = sockets
        self.relay = relay
        self.guarantees = guarantees
        self.worker_side = worker_side
        self.counters = counters
        self.dropped_by_reason = dropped_by_reason
        #: REQUESTs refused (answered with an error, never run), by reason:
        #: ``msgid_too_long``, ``msgid_taken``, ``results_full``,
        #: ``results_bytes``, ``results_client_share`` (STATUS
        #: ``requests_refused_by_reason``)
        self.refused_by_reason: collections.Counter[str] = collections.Counter()
        self._log = limiter or LogLimiter(logger)
        self._holders = routing.holders
        #: identities of schedulers (connected or gone), and the check of
        #: what they fire (:meth:`SchedulerSide.vet_firing`), set by the broker
        self.schedulers: Mapping[bytes, object] = {}
        self.vet_firing: Callable[[bytes, Message], Optional[Message]] = \
            lambda client, message: message
        self._pending_ids = relay.pending.ids
        guarantees.listen(self._journaled)

    def restore(self) -> None:
        """Queue again what the journal holds (accepted by an earlier router,
        not seen to finish), before any socket is read."""
        for request in self.guarantees.restore():
            # it may have run, or be running, on a worker nobody knows now:
            # no REPLY can end this copy (Request.ran_on), it runs again
            if result_requested_in(request.body[1]):
                # its client may still be there (same identity): it gets the result
                self.relay.remember(request.msgid, request.client, request.received)
            # under the queue it was routed to (kept by the journal): which
            # queues are served is not known yet
            if self.routing.buffer(request.queue, request):
                self.sockets.pause_clients("guaranteed requests from the journal fill "
                                           "the buffer")
        if self.guarantees.restored:
            logger.warning("router: %d guaranteed request(s) from the journal %s queued "
                           "again (at least once: some may have run already)",
                           self.guarantees.restored, self.settings.journal_file)

    def on_request(self, client: bytes, message: Message) -> None:
        body = message.body
        if len(body) != 3:
            self.dropped_by_reason["malformed"] += 1
            self._log.error("malformed", "router: REQUEST %s from %s has %d body frames, "
                            "expected 3; dropped", printable(message.msgid), printable(client),
                            len(body))
            return
        if client in self.schedulers:
            message = self.vet_firing(client, message)
            if message is None:
                return
            body = message.body
        msgid = message.msgid
        # O(1) checks, before anything is held: the id's length, whether it is
        # taken (buffered, in flight, or waiting for its result); written out,
        # no calls: this runs per job
        size = len(msgid)
        if size > _ASCII_SAFE and (size > MAX_MSGID_BYTES or not msgid.isascii()) \
                and msgid_too_long(msgid):
            self._refuse_request(client, message, "msgid_too_long", "InvalidRequest",
                                 f"the msgid is longer than {MAX_MSGID_BYTES} bytes")
            return
        if msgid in self._holders or msgid in self._pending_ids:
            if _held_guaranteed(self.routing, msgid) and _a_repeat(self, client, message):
                return
            self._refuse_request(client, message, "msgid_taken", "DuplicateMsgid",
                                 "a request with this msgid is already buffered, running or "
                                 "waiting for its result; send it with a new msgid")
            return
        headers = body[1]
        wants_result = RESULT_HEADER in headers and result_requested_in(headers)
        now = time.monotonic()
        if wants_result:
            full = self.relay.remember(msgid, client, now)
            if full is not None:
                reason, text = _RESULTS_REFUSED[full]
                self._refuse_request(client, message, reason, "TooManyPendingResults", text)
                return
            if not reply_requested_in(headers):  # the result is the worker's REPLY: asked
                headers = with_reply_requested(headers)  # (it waited result_ttl for none)
                body = (body[0], headers, body[2])
                message = message._replace(body=body)
        if "guarantee" in headers and guarantee_in(headers):
            self._on_guaranteed(client, message, wants_result)
            return
        request = Request(msgid, client, body[0], body, now)
        # EventMQ acknowledges a request when it hands it out (not when it
        # buffers it); a request that asked for its result gets the result
        if self._route(request) and not wants_result:
            self.sockets.send_later("frontend", ack_frames(client, msgid))

    def _on_guaranteed(self, client: bytes, message: Message, wants_result: bool) -> None:
        """A guaranteed request: routed at once, acknowledged once safe
        (held in memory, or its journal commit done: :meth:`_journaled`,
        or its job ended first); refused with an error reply when it cannot
        be kept."""
        msgid = message.msgid
        if msgid in self.guarantees.lately and _a_repeat(self, client, message):
            return
        why = self.guarantees.refusal()
        if why is not None:
            self._refuse(client, msgid, why, wants_result)
            return
        queue, headers, payload = message.body
        request = Request(msgid, client, queue, (queue, with_reply_requested(headers), payload),
                          time.monotonic(), guaranteed=True)
        if self.guarantees.hold(request, self.routing.queue_for(queue)):
            self.sockets.send_later("frontend", ack_frames(client, msgid))
        self._route(request)
        if self.guarantees.backlogged(self.settings.hwm):
            self.sockets.pause_clients(f"{self.guarantees.journal.backlog} guaranteed "
                                       "requests wait for the journal")

    def _journaled(self, requests: list[Request], why: Optional[str]) -> None:
        """The journal wrote ``requests`` (``why`` None: acknowledged) or
        failed to: one still buffered is taken back and refused (it never
        runs); one out at a worker is written again (its client waits)."""
        send_later = self.sockets.send_later
        if why is None:
            for request in requests:
                send_later("frontend", ack_frames(request.client, request.msgid))
        else:
            for request in requests:
                self._not_journaled(request, why)
        self.worker_side.resume_clients()

    def _not_journaled(self, request: Request, why: str) -> None:
        msgid = request.msgid
        holder = self._holders.get(msgid, False)
        if holder is None and self.routing.withdraw(request):
            self.guarantees.drop(request)
            self._refuse(request.client, msgid, f"the router's journal cannot be written "
                         f"({why})", msgid in self._pending_ids)
        elif holder and (sent := holder.in_flight.get(msgid)) is not None \
                and sent.request is request:
            self.guarantees.write_again(request, self.routing.queue_for(request.queue))
        else:  # it ended during the commit: nothing to keep, and it ran
            self.sockets.send_later("frontend", ack_frames(request.client, msgid))

    def _refuse(self, client: bytes, msgid: str, why: str, wants_result: bool) -> None:
        if wants_result:
            self.relay.pending.pop(msgid)  # remembered before: it will not run
        self._log.error("guarantee_refused", "router: guaranteed REQUEST %s from %s refused: "
                        "%s", printable(msgid), printable(client), why)
        self.sockets.send("frontend", client,
                          Message.new(Command.REPLY, refusal_body(why), msgid))

    def _refuse_request(self, client: bytes, message: Message, reason: str,
                        error_type: str, text: str) -> None:
        """Answer a REQUEST that will not run: ``REPLY [refusal_json, msgid]``
        (a result handle raises it as ``JobError(error_type)``), counted and
        logged (rate-limited)."""
        self.refused_by_reason[reason] += 1
        self._log.warning(reason, "router: REQUEST %s from %s refused: %s",
                          printable(message.msgid, 60), printable(client), text)
        self.sockets.send("frontend", client, Message.new(
            Command.REPLY, request_refusal(error_type, text, reason), message.msgid))

    def _route(self, request: Request) -> bool:
        """Hand ``request`` to a worker, else buffer it; True when it left."""
        routing = self.routing
        queue = request.queue
        # Routing.queue_for and Routing.pick, written out for a served queue:
        # this runs per job
        book = routing.queues.get(queue)
        if book is None:
            queue = routing.queue_for(queue)
            if queue != request.queue:
                self._log.warning("unserved_queue", "router: no worker serves queue %s; "
                                  "REQUEST %s goes to %s", printable(request.queue),
                                  printable(request.msgid), queue)
            book = routing.queues.get(queue)
        worker = book.pick() if book is not None else None
        if worker is None:
            if queue in routing.waiting:  # (nothing to log: written out, per job)
                if routing.buffer(queue, request):
                    self._buffer_full(queue)
            else:
                self._buffer(queue, request)
            return False
        self.worker_side.hand_over(worker, request, queue)
        worker.slots -= 1
        return True

    def _buffer(self, queue: str, request: Request) -> None:
        """Keep ``request`` until a worker has a slot; at a bound (``hwm``
        requests in this queue, ``max_buffer_bytes`` in all), stop reading
        the client socket. Nothing accepted is ever dropped here."""
        routing = self.routing
        if queue not in routing.waiting:
            if routing.served(queue):
                logger.info("router: no free slot for queue %s; buffering requests",
                            printable(queue))
            else:
                _waits_log.warning("queue_waits", "router: no worker serves queue %s now; its "
                                   "requests wait in the buffer for one", printable(queue))
        if routing.buffer(queue, request):
            self._buffer_full(queue)

    def _buffer_full(self, queue: str) -> None:
        routing = self.routing
        self.sockets.pause_clients(
            f"buffer full (queue {printable(queue)}: {len(routing.waiting.get(queue, ()))} "
            f"of hwm {self.settings.hwm} requests; {routing.buffered_bytes} of "
            f"{self.settings.max_buffer_bytes} bytes in all)")

    def on_disconnect(self, client: bytes, message: Message) -> None:
        # EventMQ's router stops here; any client could then stop the service
        self.counters["client_disconnects_ignored"] += 1
        self._log.warning("client_disconnect", "router: DISCONNECT %s from client %s ignored: "
                          "only the administrative socket stops the router",
                          printable(message.msgid), printable(client))


__all__ = ["ClientSide"]
