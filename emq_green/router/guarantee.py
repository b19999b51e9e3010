"""Guaranteed requests: the router's side of the ``guarantee`` header.

EventMQ's client sends ``guarantee`` ("give your best effort to guarantee
that func is run") and nothing in EventMQ 0.3.13 reads it. emq-green's
router runs such a request **at least once**:

* it is acknowledged to its client (``REPLY [msgid]``) only once it is
  safe: written to the journal when the router has one
  (:mod:`emq_green.router.journal`; the group commit that holds it has
  completed, or the job ended before that commit and nothing needed
  writing), held in the router's memory otherwise;
* it is routed at once, as a plain request is, while the journal writes
  it; when that write fails, a request still buffered is taken back and
  refused (it never runs), one already out at a worker is written again
  (its client waits for the confirmation);
* it goes to a worker with ``reply-requested`` added, so the worker's REPLY
  says when it finished (that REPLY reaches the client only if the client
  asked for its result); until then the router keeps it;
* when that worker is taken for dead (heartbeats lost, unreachable, or a
  KBYE after which it neither finished the job within ``kill_grace_period``
  nor said it was killed), the request goes back to the head of its queue
  and runs elsewhere;
* a router that starts on a journal queues again everything the journal
  holds, including requests that were out at workers when it died.

A job may therefore run twice (its worker died after running it, before
its REPLY arrived): jobs that must run should be idempotent. A REPLY for a
job already sent elsewhere, or already finished, is dropped and counted
(``late_replies``); it is never forwarded twice.

:class:`Guarantees` is the bookkeeping the router's parts share: what is
held, the journal's writes, the counters STATUS shows.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, Callable, Optional

from ..protocol import printable, result_requested_in
from .journal import Journal
from .routing import Request, Worker, ran_there

logger = logging.getLogger(__name__)

#: what a client is told when its guaranteed request is not taken
REFUSED_TYPE = "GuaranteeRefused"
#: how long a last-chance request waits at most for its reserved worker to
#: be free of other jobs, and how long it runs there alone at most (seconds)
RESERVE_WAIT = 10.0
RESERVE_PATIENCE = 30.0


def refusal_body(why: str) -> str:
    """The ``reply_json`` frame refusing a guaranteed request (EventMQ's
    ``value`` and emq-green's ``error``, as a job's error reply)."""
    return json.dumps({"value": why, "error": {"type": REFUSED_TYPE, "message": why}})


def was_killed(reply_json: str) -> bool:
    """Whether a worker's REPLY says the job was killed because the worker
    stopped (emq-green's ``Killed``): the job did not finish."""
    if "Killed" not in reply_json:
        return False
    try:
        reply = json.loads(reply_json)
    except (ValueError, RecursionError):
        return False
    error = reply.get("error") if isinstance(reply, dict) else None
    return isinstance(error, dict) and error.get("type") == "Killed"


#: told of guaranteed requests whose journal write completed (``None``) or
#: failed (the reason)
Journaled = Callable[[list[Request], Optional[str]], None]


#: guaranteed msgids remembered once their job ended (:attr:`Guarantees.lately`)
FINISHED_MEMORY = 20_000

#: what :meth:`Guarantees.count_loss` decides
AGAIN, LAST_CHANCE, GIVEN_UP = "again", "last chance", "given up"


def _unsent(request: Request) -> None:
    """The default sender: nobody routes requests."""


def _nothing() -> None:
    """The default: nobody reserved a worker."""


def _unheard(requests: list[Request], error: Optional[str]) -> None:
    """The default listener: nobody routes requests."""


class Guarantees:
    """Guaranteed requests held by one router, with or without a journal.
    The client side listens (:meth:`listen`) for journal writes that ended."""

    def __init__(self, journal: Optional[Journal] = None, max_redeliveries: int = 0) -> None:
        self.journal = journal
        #: msgids of the guaranteed requests that ended lately (the
        #: :data:`FINISHED_MEMORY` newest): the same msgid sent again (a
        #: sender whose confirmation was lost) is confirmed, not run again
        self.lately: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: such repeats confirmed (held or ended already), not run
        self.repeats = 0
        #: sends after a worker died running a request, before it is given up
        #: (0: no limit)
        self.max_redeliveries = max_redeliveries
        #: requests given up (:meth:`count_loss`)
        self.given_up = 0
        #: Requests on their last chance (one more death of their worker
        #: gives them up), waiting their turn: one of them is out at a time
        #: (:attr:`alone`), alone on a worker, so that jobs which only shared
        #: workers with one that kills them are not given up with it.
        self._last_chance: collections.deque[Request] = collections.deque()
        #: the last-chance request out (or being placed)
        self.alone: Optional[Request] = None
        #: it, while it waits for its worker to be free of other jobs
        self.unplaced: Optional[Request] = None
        #: the worker reserved for it (:mod:`emq_green.router.lastchance`);
        #: since when the request waits for it, or runs there (monotonic);
        #: how long each may last (seconds)
        self.reserved: Optional[Worker] = None
        self.alone_since = 0.0
        self.reserve_wait = RESERVE_WAIT
        self.reserve_patience = RESERVE_PATIENCE
        #: last-chance requests whose turn ended on its patience
        self.placed_beside = 0
        #: sends a last-chance request out, alone on a worker; told when it
        #: ends (both set by the router)
        self.send_alone: Callable[[Request], None] = _unsent
        self.alone_ended: Callable[[], None] = _nothing
        #: accepted and not seen to finish (buffered, or out at a worker)
        self.held = 0
        self.accepted = 0
        self.refused = 0
        self.redelivered = 0
        self.late_replies = 0
        self.restored = 0
        self._journaled: Journaled = _unheard
        if journal is not None:
            journal.committed = self._committed

    def listen(self, journaled: Journaled) -> None:
        """``journaled(requests, None)`` once their journal commit completed;
        ``journaled(requests, why)`` when it failed (see :meth:`write_again`)."""
        self._journaled = journaled

    def restore(self) -> list[Request]:
        """What the journal held at start, as requests, oldest first."""
        if self.journal is None:
            return []
        now = time.monotonic()
        requests = [Request(e.msgid, e.client, e.queue, (e.queue, e.headers, e.payload), now,
                            guaranteed=True, seq=e.seq) for e in self.journal.open()]
        self.held = self.restored = len(requests)
        return requests

    def refusal(self) -> Optional[str]:
        """Why a guaranteed request cannot be accepted now (counted as
        refused), or None."""
        journal = self.journal
        if journal is not None and not journal.accepting():
            self.refused += 1
            return f"the router's journal cannot be written ({journal.failure})"
        return None

    def backlogged(self, limit: int) -> bool:
        """Whether ``limit`` or more requests wait for a journal commit."""
        return self.journal is not None and self.journal.backlog >= limit

    def hold(self, request: Request, routed: str) -> bool:
        """Take a guaranteed request (its body already asks for a reply),
        routed to the queue ``routed``: True when it is safe at once (no
        journal: held in memory), False when the journal writes it (the
        listener hears when it is done)."""
        self.held += 1
        journal = self.journal
        if journal is None:
            self.accepted += 1
            return True
        request.seq = journal.add(request.msgid, request.client,
                                  *_journaled_body(request, routed), request)
        return False

    def write_again(self, request: Request, routed: str) -> None:
        """Its journal write failed while it was out at a worker: written
        with the next commit (or never, if it ends first)."""
        assert self.journal is not None
        request.seq = self.journal.add(request.msgid, request.client,
                                       *_journaled_body(request, routed), request)

    def drop(self, request: Request) -> None:
        """Its journal write failed and it was taken back: refused."""
        self.held -= 1
        self.refused += 1

    def _committed(self, requests: list[Request], error: Optional[str]) -> None:
        if error is None:
            self.accepted += len(requests)
        self._journaled(requests, error)

    def finished(self, request: Request, result: bool = True) -> bool:
        """The job of ``request`` ended (its REPLY came; ``result`` False:
        it was given up, no result of it goes out): forget it. True when
        its journal write was still waiting (nothing was written): the
        request is accepted now (its client may be told). A row whose result
        goes to a client lingers a moment (RESULT_LINGER) for that result
        to leave."""
        self.held -= 1
        lately = self.lately
        lately[request.msgid] = None
        if len(lately) > FINISHED_MEMORY:
            lately.popitem(last=False)
        if request is self.alone:
            self.alone = None
            self.alone_ended()
            self._release()
        if request.seq and self.journal is not None and self.journal.delete(
                request.seq, linger=result and result_requested_in(request.body[1])):
            self.accepted += 1
            return True
        return False

    def count_loss(self, request: Request) -> str:
        """The worker running ``request`` died: :data:`AGAIN` (send it
        again), :data:`LAST_CHANCE` (held, to go out alone: :meth:`_release`)
        or :data:`GIVEN_UP` (once more than :attr:`max_redeliveries`
        allows: forgotten here and in the journal; a job that kills every
        worker it runs on would otherwise kill them all, for ever)."""
        request.losses += 1
        limit = self.max_redeliveries
        if not limit or request.losses < limit:
            return AGAIN
        if request.losses == limit:
            self._last_chance.append(request)
            self._release()
            return LAST_CHANCE
        self.given_up += 1
        self.finished(request, result=False)
        return GIVEN_UP

    def turn_over(self) -> None:
        """The request out alone is not alone any more (its patience ran
        out): the next last-chance request goes out."""
        self.alone = None
        self._release()

    def _release(self) -> None:
        """Send the next last-chance request if none is out."""
        if self.alone is None and self._last_chance:
            self.alone = self._last_chance.popleft()
            self.redelivered += 1
            self.send_alone(self.alone)

    def withdraw_last_chance(self, msgid: str, identity: bytes) -> Optional[Request]:
        """The last-chance request ``msgid``, not out yet (waiting its turn,
        or its reserved worker), when ``identity`` is a worker it ran on: a
        REPLY from that worker (stopped, taken for dead, resumed) ends it.
        Out of the queue of turns here; :meth:`finished` does the rest."""
        for request in self._last_chance:
            if request.msgid == msgid and ran_there(request, identity):
                self._last_chance.remove(request)
                return request
        request = self.unplaced
        if request is not None and request.msgid == msgid and ran_there(request, identity):
            return request
        return None

    def late_reply(self, msgid: str, worker: str) -> None:
        """A REPLY for a job already sent elsewhere or finished: dropped."""
        self.late_replies += 1
        logger.debug("router: late REPLY for %s from %s dropped (the job was sent again, "
                     "or had ended)", printable(msgid), printable(worker))

    def close(self) -> None:
        """The router stops: what is held stays in the journal for the next one."""
        if self.journal is not None:
            if self.held:
                logger.warning("router stopping: %d guaranteed request(s) stay in the journal "
                               "%s and run when a router starts on it", self.held,
                               self.journal.path)
            self.journal.close()
        elif self.held:
            logger.error("router stopping: %d guaranteed request(s) held in memory are lost "
                         "(no journal_file)", self.held)

    def status(self) -> dict[str, Any]:
        """STATUS keys of guaranteed requests (and of the journal, if any)."""
        return {
            "guaranteed_held": self.held,
            "guaranteed_accepted": self.accepted,
            "guaranteed_refused": self.refused,
            "guaranteed_restored": self.restored,
            "redelivered": self.redelivered,
            "guaranteed_given_up": self.given_up,
            "guaranteed_last_chance": len(self._last_chance) + (self.alone is not None),
            "guaranteed_placed_beside": self.placed_beside,
            "guaranteed_repeats": self.repeats,
            "late_replies": self.late_replies,
            **(self.journal.status() if self.journal is not None else {"journal_file": None}),
        }


def _journaled_body(request: Request, routed: str) -> tuple[str, str, str]:
    """The queue, headers and payload the journal keeps: the queue is the
    one the request was routed to. It differs from the request's own only
    for a queue no worker had announced (routed to the default queue); a
    router restarted on the journal, which knows no queue at start, then
    queues it where it ran before (its queue frame then names that queue)."""
    _queue, headers, payload = request.body
    return routed, headers, payload


__all__ = ["Guarantees", "REFUSED_TYPE", "RESERVE_PATIENCE", "RESERVE_WAIT", "refusal_body",
           "was_killed"]
