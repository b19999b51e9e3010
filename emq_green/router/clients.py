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
guaranteed request is accepted once it is safe, journaled when there is a
journal, and confirmed then, buffered or not (:mod:`emq_green.router.guarantee`);
and a DISCONNECT from a client is ignored (EventMQ stops on it: any client
could then stop the service).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Optional

from ..protocol import (
    Command,
    Message,
    guarantee_in,
    printable,
    result_requested_in,
    with_reply_requested,
)
from ..settings import Settings
from .guarantee import Guarantees, refusal_body
from .results import ResultRelay
from .routing import Request, Routing
from .sockets import RouterSockets
from .workers import WorkerSide

logger = logging.getLogger(__name__)


class ClientSide:
    """The frontend's handlers over the router's books."""

    def __init__(self, *, settings: Settings, routing: Routing, sockets: RouterSockets,
                 relay: ResultRelay, guarantees: Guarantees, worker_side: WorkerSide,
                 counters: collections.Counter[str],
                 dropped_by_reason: collections.Counter[str]) -> None:
        self.settings = settings
        self.routing = routing
        self.sockets = sockets
        self.relay = relay
        self.guarantees = guarantees
        self.worker_side = worker_side
        self.counters = counters
        self.dropped_by_reason = dropped_by_reason

    def restore(self) -> None:
        """Queue again what the journal holds (accepted by an earlier router,
        not seen to finish), before any socket is read."""
        for request in self.guarantees.restore():
            if result_requested_in(request.body[1]):
                # its client may still be there (same identity): it gets the result
                self.relay.remember(request.msgid, request.client, request.received)
            if self.routing.buffer(self.routing.queue_for(request.queue), request):
                self.sockets.pause_clients("guaranteed requests from the journal fill "
                                           "the buffer")
        if self.guarantees.restored:
            logger.warning("router: %d guaranteed request(s) from the journal %s queued "
                           "again (at least once: some may have run already)",
                           self.guarantees.restored, self.settings.journal_file)

    def on_request(self, client: bytes, message: Message) -> None:
        if len(message.body) != 3:
            self.dropped_by_reason["malformed"] += 1
            logger.error("router: REQUEST %s from %s has %d body frames, expected 3; dropped",
                         printable(message.msgid), printable(client), len(message.body))
            return
        headers = message.body[1]
        wants_result = result_requested_in(headers)
        if "guarantee" in headers and guarantee_in(headers):
            self._on_guaranteed(client, message, wants_result)
            return
        request = Request(message.msgid, client, message.body[0], message.body,
                          time.monotonic())
        if wants_result:
            self.relay.remember(request.msgid, client, request.received)
        # EventMQ acknowledges a request when it hands it out (not when it
        # buffers it); a request that asked for its result gets the result
        if self._route(request) and not wants_result:
            self.sockets.send("frontend", client, Message.new(Command.REPLY, request.msgid))

    def _on_guaranteed(self, client: bytes, message: Message, wants_result: bool) -> None:
        """A guaranteed request: accepted once safe (journal or memory), then
        acknowledged, whether it leaves at once or waits; refused with an
        error reply when it cannot be kept."""
        msgid = message.msgid
        why = self.guarantees.refusal()
        if why is not None:
            self._refuse(client, msgid, why)
            return
        queue, headers, payload = message.body

        def accepted(request: Optional[Request], why: Optional[str]) -> None:
            if request is None:
                self._refuse(client, msgid, why or "not accepted")
                return
            if wants_result:
                self.relay.remember(msgid, client, request.received)
            self.sockets.send("frontend", client, Message.new(Command.REPLY, msgid))
            self._route(request)
            self.worker_side.resume_clients()

        self.guarantees.accept(msgid, client, (queue, with_reply_requested(headers), payload),
                               accepted)
        if self.guarantees.backlogged(self.settings.hwm):
            self.sockets.pause_clients(f"{self.guarantees.journal.backlog} guaranteed "
                                       "requests wait for the journal")

    def _refuse(self, client: bytes, msgid: str, why: str) -> None:
        logger.error("router: guaranteed REQUEST %s from %s refused: %s", printable(msgid),
                     printable(client), why)
        self.sockets.send("frontend", client,
                          Message.new(Command.REPLY, refusal_body(why), msgid))

    def _route(self, request: Request) -> bool:
        """Hand ``request`` to a worker, else buffer it; True when it left."""
        routing = self.routing
        queue = routing.queue_for(request.queue)
        if queue != request.queue:
            logger.warning("router: no worker serves queue %s; REQUEST %s goes to %s",
                           printable(request.queue), printable(request.msgid), queue)
        while True:
            worker = routing.pick(queue)
            if worker is None:
                self._buffer(queue, request)
                return False
            if self.worker_side.hand_over(worker, request, queue):
                worker.slots -= 1
                return True

    def _buffer(self, queue: str, request: Request) -> None:
        """Keep ``request`` until a worker has a slot; at a bound (``hwm``
        requests in this queue, ``max_buffer_bytes`` in all), stop reading
        the client socket. Nothing accepted is ever dropped here."""
        if queue not in self.routing.waiting:
            logger.info("router: no free slot for queue %s; buffering requests",
                        printable(queue))
        routing = self.routing
        if routing.buffer(queue, request):
            self.sockets.pause_clients(
                f"buffer full (queue {printable(queue)}: {len(routing.waiting.get(queue, ()))} "
                f"of hwm {self.settings.hwm} requests; {routing.buffered_bytes} of "
                f"{self.settings.max_buffer_bytes} bytes in all)")

    def on_disconnect(self, client: bytes, message: Message) -> None:
        # EventMQ's router stops here; any client could then stop the service
        self.counters["client_disconnects_ignored"] += 1
        logger.warning("router: DISCONNECT %s from client %s ignored: only the "
                       "administrative socket stops the router", printable(message.msgid),
                       printable(client))


__all__ = ["ClientSide"]
