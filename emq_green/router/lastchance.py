"""A guaranteed request on its last chance runs alone on a worker.

Every job on a worker that dies counts that death (the router cannot tell
which one killed it). A request that reached ``max_redeliveries`` deaths is
on its last chance (:meth:`~emq_green.router.guarantee.Guarantees.count_loss`):
one death more gives it up. Those requests go out one at a time across the
router, and each on a worker that runs nothing else meanwhile, so that the
death that gives one up is its own doing, not that of a job beside it (a
probe lost two innocent jobs of 400 to three killers before this).

How a worker is made to run it alone: an idle worker of its queue, else the
least busy one, is **reserved**. Its free slots are withheld (moved to ``Worker.held_slots``:
the free lists drop a worker with no slot), and so are the slots its READYs
give back, until it has no job in flight; then the request goes to it. When
the request ends (its REPLY, or it is given up) the withheld slots come back
and the worker's queues are served again. Until the request is out, the
housekeeping tick (:func:`keep_placing`, a few times a second) moves the
reservation to a worker of its queue that is idle now (one that came back,
or finished its jobs) and replaces a reserved worker that left or died, so
that a long job on the reserved worker does not hold the request (a probe:
12 s and more, with another worker idle); the request itself, lost with a
worker, is counted like any other.

A request waits at most
:attr:`~emq_green.router.guarantee.Guarantees.reserve_wait` (10 s) for its
worker to be free of other jobs, and runs alone there at most
:attr:`~emq_green.router.guarantee.Guarantees.reserve_patience` (30 s)
(:func:`_turn_over`; STATUS ``guaranteed_placed_beside``): then it goes on
like any other request. The turns come one after another: N requests on
their last chance together (a worker of ``-J N`` killed from outside) may
hold a lone worker's queue back for up to 30 + (N - 1) x 10 s.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Protocol

from ..protocol import printable
from .guarantee import Guarantees
from .routing import Request, Routing, Worker

logger = logging.getLogger(__name__)


class Side(Protocol):
    """What of the router's worker side this module uses."""

    guarantees: Guarantees
    routing: Routing

    def hand_over(self, worker: Worker, request: Request, queue: str) -> None: ...

    def dispatch(self, queue: str) -> None: ...

    def route_again(self, requests: list[Request]) -> None: ...


def _usable(routing: Routing, worker: Optional[Worker]) -> bool:
    return (worker is not None and routing.workers.get(worker.identity) is worker
            and not worker.leaving_until)


def _least_busy(routing: Routing, queue: str) -> Optional[Worker]:
    """The connected worker of ``queue`` with the fewest jobs in flight."""
    book = routing.queues.get(queue)
    if book is None:
        return None
    workers = [routing.workers[i] for i in book.members if i in routing.workers]
    workers = [w for w in workers if not w.leaving_until]
    return min(workers, key=lambda w: len(w.in_flight), default=None)


def _idle(routing: Routing, queue: str, other_than: Optional[Worker]) -> Optional[Worker]:
    """A connected worker of ``queue`` with no job in flight and a free slot."""
    book = routing.queues.get(queue)
    for identity in book.members if book is not None else ():
        worker = routing.workers.get(identity)
        if (worker is not None and worker is not other_than and not worker.in_flight
                and worker.slots > 0 and not worker.leaving_until):
            return worker
    return None


def _withhold(worker: Worker) -> None:
    """Its free slots held back: off the free lists (a pick drops a worker
    with no slot)."""
    worker.held_slots += worker.slots
    worker.slots = 0


def _give_back(side: Side, worker: Optional[Worker]) -> None:
    """``worker``, if still connected, gets its withheld slots back and
    serves its queues again."""
    routing = side.routing
    if worker is None or routing.workers.get(worker.identity) is not worker:
        return
    held, worker.held_slots = worker.held_slots, 0
    for _ in range(held):
        routing.give_slot(worker)
    for queue in worker.queue_order:
        side.dispatch(queue)


def place(side: Side, request: Request) -> None:
    """Send the last-chance ``request`` to a worker of its own, as soon as
    one is free of other jobs."""
    side.guarantees.unplaced = request
    side.guarantees.alone_since = time.monotonic()
    keep_placing(side)


def keep_placing(side: Side) -> None:
    """Reserve a worker for the request not placed yet (again, when the one
    reserved left), and hand the request over once that worker is idle;
    past its patience, end its turn (:func:`_turn_over`)."""
    guarantees, routing = side.guarantees, side.routing
    request = guarantees.unplaced
    if guarantees.alone is not None and time.monotonic() - guarantees.alone_since >= (
            guarantees.reserve_wait if request is not None else guarantees.reserve_patience):
        _turn_over(side)
        return
    if request is None:
        return
    worker = guarantees.reserved
    queue = routing.queue_for(request.queue)
    if worker is None or not _usable(routing, worker) or worker.in_flight:
        # another worker idle now (come back, or done with its jobs): that
        # one, at once, rather than waiting for the reserved one's jobs to end
        idle = _idle(routing, queue, worker)
        if idle is not None:
            _withhold(idle)
            guarantees.reserved = idle
            _give_back(side, worker)
            worker = idle
        elif not _usable(routing, worker):
            worker = guarantees.reserved = _least_busy(routing, queue)
            if worker is None:
                return  # no worker of its queue now: the housekeeping tries again
            _withhold(worker)
    assert worker is not None
    if worker.in_flight or not worker.held_slots:
        return  # its READYs come back here (:func:`ready`)
    worker.held_slots -= 1
    guarantees.unplaced = None
    guarantees.alone_since = time.monotonic()  # its time alone starts
    side.hand_over(worker, request, queue)


def _turn_over(side: Side) -> None:
    """The last-chance request has waited for its worker for
    ``reserve_wait``, or run alone there for ``reserve_patience``: it goes
    on like any other request (out at its worker, or back at the head of
    its queue), the reserved worker gets its slots back, and the next
    last-chance request's turn begins.
    EventMQ's job manager never answers for a job whose process was killed:
    a worker that runs one is never idle again, and a last-chance request
    that is such a job never ends; either stalled the queue behind the
    worker's withheld slots, and every later last-chance request, for ever."""
    guarantees = side.guarantees
    request, unplaced = guarantees.alone, guarantees.unplaced
    assert request is not None
    logger.warning("router: last-chance REQUEST %s %s alone for %.0f s; it goes on like any "
                   "other request", printable(request.msgid),
                   "waited to run" if unplaced is not None else "has run",
                   time.monotonic() - guarantees.alone_since)
    guarantees.placed_beside += 1
    guarantees.unplaced = guarantees.alone = None
    if unplaced is not None:
        side.route_again([unplaced])  # at the head of its queue
    _unreserve(side)  # the slots back: that head goes first
    guarantees.turn_over()


def ready(side: Side, worker: Worker) -> bool:
    """A READY from ``worker``: True when it is the reserved worker (the
    slot is withheld; the request goes to it once it is idle)."""
    if worker is not side.guarantees.reserved:
        return False
    worker.held_slots += 1
    keep_placing(side)
    return True


def _unreserve(side: Side) -> None:
    """The reserved worker, if any, is reserved no more."""
    worker, side.guarantees.reserved = side.guarantees.reserved, None
    _give_back(side, worker)


def ended(side: Side) -> None:
    """The last-chance request out ended (its REPLY, or given up)."""
    side.guarantees.unplaced = None
    _unreserve(side)


def sent_again(side: Side, requests: list[Request]) -> list[Request]:
    """``requests`` to route as usual, without the last-chance one (a
    worker killed it while stopping, or it was not sent this turn): that
    one is placed anew, alone."""
    alone = side.guarantees.alone
    if alone is None or alone not in requests:
        return requests
    _unreserve(side)
    place(side, alone)
    return [r for r in requests if r is not alone]


__all__ = ["ended", "keep_placing", "place", "ready", "sent_again"]
