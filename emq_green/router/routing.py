"""The router's books and its routing policy, apart from its sockets.

:class:`Routing` knows the connected workers, which queues each serves at
which weight, their free slots, the requests each has in flight, and the
requests waiting for a slot. It decides, as EventMQ 0.3.13 does, who gets a
request: the worker with a free slot that has the highest weight for the
queue, the least recently used among equal weights; a queue no worker
has announced goes to the default queue, while the requests of one whose
workers all left wait for a worker of that queue. It also keeps the
buffer's bounds (``hwm`` requests per queue, ``max_buffer_bytes`` in all)
and says when the router must stop reading clients and when it may read
again. It sends nothing and
logs nothing: :class:`~emq_green.router.Router` does.
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

from ..protocol import Queues, printable, reply_requested_in, same_worker

# Identities of workers that left or were removed, remembered so that their
# late messages are logged quietly instead of as "unknown worker".
DEPARTED_MEMORY = 1000
#: Names of queues whose last worker left, remembered (the newest this many)
#: so that their requests wait for a worker of theirs, as EventMQ 0.3.13's
#: router does, instead of going to the default queue.
SERVED_MEMORY = 1000
#: names a per-name counter (``processed_by_queue``, ``processed_by_worker``)
#: keeps; past it, names of queues and workers that are gone are dropped
#: first, then new names are counted under OTHER
MAX_NAMES = 1024
#: the name everything past :data:`MAX_NAMES` is counted under
OTHER = "(other)"
#: a size limit of -1 (unlimited), as a number every size is below
UNLIMITED = sys.maxsize
_new_tuple = tuple.__new__


#: Bytes a buffered request costs the router beyond its text: the Request,
#: its strings' headers, the buffer's deque slot and the indexes by msgid
#: (measured by a probe: ~405 bytes for a tiny request, ~630 with a result
#: requested). Counted so that ``max_buffer_bytes`` bounds the memory of many
#: small requests too, not only of large ones (it counted 6.5 bytes for each).
REQUEST_OVERHEAD = 400


#: how many identities a guaranteed request remembers it was handed to and
#: lost (:attr:`Request.ran_on`)
RAN_ON_KEPT = 4


def ran_there(request: Request, identity: bytes) -> bool:
    """Whether ``request`` was handed to the worker ``identity`` and lost
    there (:attr:`Request.ran_on`), under that identity or another of the
    same emq-green worker process (it reconnected while it ran the job)."""
    return identity in request.ran_on or any(same_worker(identity, r) for r in request.ran_on)


class Request:
    """A client's REQUEST as the router holds it (read-only by convention: a
    slotted class, as one is built per job). A guaranteed one (the
    ``guarantee`` header) carries ``reply-requested`` in its body (the
    router learns of its end from the REPLY) and its journal row (``seq``,
    0 without a journal)."""

    __slots__ = ("msgid", "client", "queue", "body", "received", "guaranteed", "seq",
                 "reply_requested", "size", "ran_on", "losses")

    def __init__(self, msgid: str, client: bytes, queue: str, body: tuple[str, ...],
                 received: float, guaranteed: bool = False, seq: int = 0) -> None:
        self.msgid = msgid
        self.client = client
        self.queue = queue
        self.body = body
        self.received = received
        self.guaranteed = guaranteed
        self.seq = seq
        #: whether its headers ask the worker for a REPLY
        self.reply_requested = (len(body) > 1 and "reply-requested" in body[1]
                                and reply_requested_in(body[1]))
        #: What it counts against ``max_buffer_bytes``: the length of its
        #: msgid and body (characters; bytes for ASCII, as JSON mostly is)
        #: and what holding any request costs the router besides
        #: (``REQUEST_OVERHEAD``).
        self.size = len(msgid) + sum(map(len, body)) + REQUEST_OVERHEAD
        #: the identities of the workers it was handed to and lost (at most
        #: ``RAN_ON_KEPT``, newest last): a copy waiting in the buffer is
        #: ended by a REPLY from one of them only (``withdraw_copy``); empty
        #: for a copy restored from the journal (who ran it is not known, so
        #: nobody can end it: it runs again, at least once)
        self.ran_on: tuple[bytes, ...] = ()
        #: How many workers died while running it. A guaranteed request is
        #: given up past ``max_redeliveries`` + 1. Not kept in the journal,
        #: so a router restart counts from 0 again.
        self.losses = 0

    def __repr__(self) -> str:
        return f"<Request {self.msgid} queue={self.queue!r} guaranteed={self.guaranteed}>"


class Sent(NamedTuple):
    """A REQUEST handed to a worker and not known to be finished; for a
    guaranteed one, the request itself, to send again if the worker dies.
    (A named tuple: one is built per job.)"""

    msgid: str
    queue: str
    sent: float
    reply_requested: bool
    request: Optional[Request] = None


@dataclass
class Worker:
    """What the router knows of one connected worker."""

    identity: bytes
    queues: Queues
    last_seen: float
    slots: int = 0
    in_flight: collections.OrderedDict[str, Sent] = field(
        default_factory=collections.OrderedDict)
    #: requests in :attr:`in_flight` sent without ``reply-requested``
    unreplied: int = 0
    #: Such requests ended by a REPLY anyway (their READYs retire nothing).
    replied_unasked: int = 0
    #: The msgid of the last request with reply-requested a REPLY ended
    #: here: an emq-green worker's READY after that REPLY names it (and
    #: retires nothing).
    last_replied: str = ""
    #: Free slots withheld while it is reserved for a last-chance request
    #: (:mod:`emq_green.router.lastchance`): it gets nothing else meanwhile.
    held_slots: int = 0
    #: back from a gap, the router gives it no request before it hears from
    #: it after this time (monotonic; 0: not frozen), its free slots held
    #: in ``frozen_slots`` meanwhile (``workers.freeze``)
    fresh_after: float = 0.0
    frozen_slots: int = 0
    #: The monotonic time, set at its KBYE, when its unfinished guaranteed
    #: jobs go elsewhere (until then they may still end there, with a REPLY).
    leaving_until: float = 0.0
    #: the identity as text (STATUS, the dashboard), decoded once
    name: str = field(init=False)
    #: The queue names in the order the INFORM listed them, each once. A
    #: READY takes a buffered request from the first that has one, as
    #: EventMQ's router does (whatever the weights, which choose between
    #: workers, not between a worker's queues).
    queue_order: tuple[str, ...] = field(init=False)
    #: the free lists of the queues' books it is on, one per queue, set
    #: when it joins (a READY that gives it its first slot puts it back on
    #: them)
    free_lists: tuple[collections.OrderedDict[bytes, Worker], ...] = field(
        default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.name = self.identity.decode("utf-8", "replace")
        self.queue_order = tuple(dict.fromkeys(name for _w, name in self.queues))

    @property
    def log_name(self) -> str:
        """The identity, escaped for a log line."""
        return printable(self.identity)


class QueueBook:
    """The workers of one queue: each with its weight and, per weight,
    those that may have a free slot.

    A pick looks only at workers put on a free list, never at every member:
    with many workers that hold no slot (busy, or hostile ones that never
    say READY) a pick stays one dictionary operation or two, and a worker
    leaves in constant time per queue (a list walked and searched grew with
    every member: 0.13 ms per request past 1,000 busy workers, 0.8 ms per
    worker leaving 256 shared queues; docs/security.md has the figures).
    """

    __slots__ = ("members", "weights", "free", "_sizes")

    def __init__(self) -> None:
        #: identity -> weight, in the order the workers joined
        self.members: dict[bytes, int] = {}
        #: the members' weights, each once, heaviest first
        self.weights: list[int] = []
        #: Weight -> the workers of that weight given a slot since they were
        #: last seen without one, least recently picked first. A worker whose
        #: slots ran out stays listed until a pick meets it and drops it.
        self.free: dict[int, collections.OrderedDict[bytes, Worker]] = {}
        self._sizes: collections.Counter[int] = collections.Counter()

    def __len__(self) -> int:
        return len(self.members)

    def join(self, identity: bytes, weight: int) -> collections.OrderedDict[bytes, Worker]:
        """``identity`` serves this queue at ``weight``; its free list."""
        self.members[identity] = weight
        self._sizes[weight] += 1
        free = self.free.get(weight)
        if free is None:
            free = self.free[weight] = collections.OrderedDict()
            self.weights.append(weight)
            self.weights.sort(reverse=True)
        return free

    def leave(self, identity: bytes) -> None:
        weight = self.members.pop(identity)
        self.free[weight].pop(identity, None)
        self._sizes[weight] -= 1
        if not self._sizes[weight]:
            del self._sizes[weight], self.free[weight]
            self.weights.remove(weight)

    def pick(self) -> Optional[Worker]:
        """The heaviest worker with a free slot, least recently picked among
        equals; it moves behind the others of its weight."""
        for weight in self.weights:
            free = self.free[weight]
            while free:
                identity, worker = free.popitem(last=False)
                if worker.slots > 0:
                    free[identity] = worker
                    return worker
        return None

    def entries(self) -> list[tuple[int, bytes]]:
        """``[(weight, identity), ...]``, heaviest first (ROUTER_SHOW_WORKERS)."""
        return sorted(((w, i) for i, w in self.members.items()), key=lambda e: -e[0])


class Routing:
    """Workers, queues, slots and the buffer of one router."""

    def __init__(self, *, default_queue: str, hwm: int, max_buffer_bytes: int) -> None:
        self.default_queue = default_queue
        self.hwm = hwm
        self.max_bytes = max_buffer_bytes if max_buffer_bytes >= 0 else UNLIMITED
        # Low-water marks: once paused, reading resumes below these, so that a
        # burst does not pause and resume the client socket on every READY.
        #: requests per queue (and in the journal's backlog) to resume below
        self.resume_length = hwm - max(1, hwm // 4)
        self._resume_bytes = self.max_bytes - self.max_bytes // 4
        #: Connected workers by identity.
        self.workers: dict[bytes, Worker] = {}
        #: Queue name -> its workers (only queues some worker serves).
        self.queues: dict[str, QueueBook] = {}
        #: Queue name -> requests waiting for a free slot, oldest first.
        self.waiting: dict[str, collections.deque[Request]] = {}
        #: Bytes of the requests in :attr:`waiting` (see :attr:`Request.size`).
        self.buffered_bytes = 0
        self.processed_by_queue: collections.Counter[str] = collections.Counter()
        self.processed_by_worker: collections.Counter[str] = collections.Counter()
        #: msgid -> who holds that request: the worker it was handed to (also
        #: one that said KBYE and still runs it, in :attr:`leaving`), or None
        #: while it waits in the buffer. A msgid found here is taken: a second
        #: REQUEST with it is refused (one dict lookup per REQUEST). Kept
        #: here, and by :meth:`~emq_green.router.workers.WorkerSide._settle`
        #: when a REPLY ends a request (inlined there: it runs once per job).
        self.holders: dict[str, Optional[Worker]] = {}
        self._full_queues: set[str] = set()
        # id(counter) -> new names still counted under OTHER before the next prune
        self._prune_skip: dict[int, int] = {}
        self._departed: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        #: queues that had a worker and have none now (see :data:`SERVED_MEMORY`)
        self._served_before: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Just started (see :func:`settled`): a request for a queue no worker
        #: has announced yet waits in that queue's buffer, not the default's
        self.settling = False
        #: Workers that said KBYE with jobs still in flight there, by identity:
        #: their REPLYs still count until :attr:`Worker.leaving_until`.
        self.leaving: dict[bytes, Worker] = {}

    # -- workers ----------------------------------------------------------------
    def add(self, identity: bytes, queues: Queues, now: float) -> Worker:
        """A worker that INFORMed (with no slot until its first READY)."""
        worker = Worker(identity, tuple(queues), now)
        self.workers[identity] = worker
        self._departed.pop(identity, None)
        served_before = self._served_before
        heaviest: dict[str, int] = {}  # a name listed twice: its heavier weight
        for weight, name in worker.queues:
            if heaviest.get(name, weight) <= weight:
                heaviest[name] = weight
        free_lists = []
        for name, weight in heaviest.items():
            if served_before:
                served_before.pop(name, None)
            book = self.queues.get(name)
            if book is None:
                book = self.queues[name] = QueueBook()
            free_lists.append(book.join(identity, weight))
        worker.free_lists = tuple(free_lists)
        return worker

    def remove(self, worker: Worker) -> None:
        """Take a worker out of every queue; its identity is remembered."""
        identity = worker.identity
        current = self.workers.get(identity)
        if current is worker:
            del self.workers[identity]
        elif current is not None:
            return  # an older record of a worker that informed again: long off the books
        for name in {name for _weight, name in worker.queues}:
            book = self.queues.get(name)
            if book is None or identity not in book.members:
                continue
            book.leave(identity)
            if not book.members:
                del self.queues[name]
                self._served_before[name] = None
                self._served_before.move_to_end(name)
        while len(self._served_before) > SERVED_MEMORY:
            self._served_before.popitem(last=False)
        self._departed[worker.identity] = None
        while len(self._departed) > DEPARTED_MEMORY:
            self._departed.popitem(last=False)

    def departed(self, identity: bytes) -> bool:
        return identity in self._departed

    def unhold(self, worker: Worker) -> None:
        """``worker`` is gone with requests in flight: they leave the index
        (call it before its ``in_flight`` is cleared)."""
        holders = self.holders
        for msgid in worker.in_flight:
            if holders.get(msgid) is worker:
                del holders[msgid]

    def retire_oldest_unreplied(self, worker: Worker, named: str = "") -> None:
        """A READY of ``worker`` (call it when ``worker.unreplied`` or
        ``worker.replied_unasked`` is not 0). An emq-green worker names the
        job sent without ``reply-requested`` whose end it offers (the
        READY's msgid): that one is done. Else (EventMQ's job manager, whose
        READY says nothing of a job) its oldest such request is taken as
        done, a best estimate, unless the READY is that of one a REPLY
        ended already."""
        in_flight = worker.in_flight
        sent = in_flight.get(named) if named else None
        if sent is not None and not sent.reply_requested:
            del in_flight[named]
            worker.unreplied -= 1
            if self.holders.get(named) is worker:
                del self.holders[named]
            return
        if named and named == worker.last_replied:
            return  # an emq-green worker's READY after a REPLY asked for, naming that job
        if worker.replied_unasked:
            worker.replied_unasked -= 1
            return
        for msgid, sent in in_flight.items():
            if not sent.reply_requested:
                del in_flight[msgid]
                worker.unreplied -= 1
                if self.holders.get(msgid) is worker:
                    del self.holders[msgid]
                return

    def taken_msgid(self, msgid: str) -> bool:
        """Whether a request with ``msgid`` is buffered or in flight (also on
        a worker that said KBYE and may still run it)."""
        return msgid in self.holders

    def leave(self, worker: Worker, until: float) -> None:
        """``worker`` said KBYE: removed, but kept while jobs are in flight there."""
        self.remove(worker)
        if worker.in_flight:
            worker.leaving_until = until
            self.leaving[worker.identity] = worker

    # -- routing ------------------------------------------------------------------
    def queue_for(self, queue: str) -> str:
        """``queue`` if a worker serves it, served it (see
        :data:`SERVED_MEMORY`) or requests wait in its buffer (they wait for
        a worker of that queue, as in EventMQ 0.3.13), or while the router
        is :attr:`settling` (see :func:`settled`); else the default queue (a name no worker ever
        announced)."""
        if (queue in self.queues or queue in self.waiting or queue in self._served_before
                or self.settling):
            return queue
        return self.default_queue

    def served(self, queue: str) -> bool:
        """Whether a connected worker serves ``queue``."""
        return queue in self.queues

    def pick(self, queue: str) -> Optional[Worker]:
        """The heaviest worker of ``queue`` with a free slot, least recently
        picked among equals (:meth:`QueueBook.pick`)."""
        book = self.queues.get(queue)
        return book.pick() if book is not None else None

    @staticmethod
    def give_slot(worker: Worker) -> None:
        """A READY no buffered request took: one more free slot."""
        if not worker.slots:
            identity = worker.identity
            for free in worker.free_lists:
                if identity not in free:
                    free[identity] = worker
        worker.slots += 1

    def sent(self, worker: Worker, request: Request, queue: str, now: float) -> None:
        """``request`` left for ``worker``."""
        msgid, reply_requested = request.msgid, request.reply_requested
        # the tuple built directly, not through Sent's __new__ (per job)
        worker.in_flight[msgid] = _new_tuple(Sent, (
            msgid, queue, now, reply_requested, request if request.guaranteed else None))
        self.holders[msgid] = worker
        if not reply_requested:
            worker.unreplied += 1
        by_queue, by_worker, name = self.processed_by_queue, self.processed_by_worker, worker.name
        if queue in by_queue:
            by_queue[queue] += 1
        else:
            self._count_new(by_queue, queue, self._live_queues)
        if name in by_worker:
            by_worker[name] += 1
        else:
            self._count_new(by_worker, name, self._live_workers)

    def unsent(self, worker: Worker, request: Request) -> None:
        """``request``, given to ``worker`` by :meth:`sent`, never left: off
        the worker's books and its counts (it is routed again)."""
        msgid = request.msgid
        sent = worker.in_flight.pop(msgid, None)
        if sent is not None:
            if not sent.reply_requested:
                worker.unreplied -= 1
            for counter, name in ((self.processed_by_queue, sent.queue),
                                  (self.processed_by_worker, worker.name)):
                count = counter.get(name, 0)
                if count > 1:
                    counter[name] = count - 1
                elif count:
                    del counter[name]
        if self.holders.get(msgid) is worker:
            del self.holders[msgid]

    def _live_queues(self) -> set[str]:
        return set(self.queues) | set(self.waiting)

    def _live_workers(self) -> set[str]:
        return {w.name for w in self.workers.values()}

    def _count_new(self, counter: collections.Counter[str], name: str,
                   live: Callable[[], set[str]]) -> None:
        """The first count of ``name``. At :data:`MAX_NAMES` names, those of
        queues or workers that are gone are dropped; when that frees less
        than a quarter, the next ``MAX_NAMES // 4`` new names are counted
        under :data:`OTHER` without looking again (O(1) per job, amortised)."""
        if len(counter) >= MAX_NAMES:
            skip = self._prune_skip.get(id(counter), 0)
            if skip:
                self._prune_skip[id(counter)] = skip - 1
                name = OTHER
            else:
                alive = live()
                for stale in [n for n in counter if n not in alive and n != OTHER]:
                    del counter[stale]
                if len(counter) >= MAX_NAMES * 3 // 4:
                    self._prune_skip[id(counter)] = MAX_NAMES // 4
                if len(counter) >= MAX_NAMES:
                    name = OTHER
        counter[name] += 1

    # -- the buffer ---------------------------------------------------------------
    def buffer(self, queue: str, request: Request, *, head: bool = False) -> bool:
        """Keep ``request`` until a worker has a slot (at the ``head`` of its
        queue: a request whose worker died); True when the buffer is at a
        bound (the router must stop reading clients)."""
        waiting = self.waiting.get(queue)
        if waiting is None:
            waiting = self.waiting[queue] = collections.deque()
        if head:
            waiting.appendleft(request)
        else:
            waiting.append(request)
        self.holders[request.msgid] = None
        self.buffered_bytes += request.size
        if len(waiting) >= self.hwm:
            self._full_queues.add(queue)
        return bool(self._full_queues) or self.buffered_bytes >= self.max_bytes

    def taken(self, queue: str) -> bool:
        """The oldest request of ``queue`` left the buffer; True when the
        queue's buffer is empty now."""
        # _left and _shrunk written out: this runs per job
        waiting = self.waiting[queue]
        self.buffered_bytes -= waiting.popleft().size
        if self._full_queues and len(waiting) <= self.resume_length:
            self._full_queues.discard(queue)
        if not waiting:
            del self.waiting[queue]
            return True
        return False

    def _left(self, queue: str, waiting: collections.deque[Request], request: Request) -> bool:
        """``request`` is out of ``queue``'s buffer ``waiting``: the bytes and
        the bound brought up to date; True when the buffer is empty now (and
        gone from :attr:`waiting`)."""
        self.buffered_bytes -= request.size
        return self._shrunk(queue, waiting)

    def _shrunk(self, queue: str, waiting: collections.deque[Request]) -> bool:
        """``queue``'s buffer ``waiting`` lost requests: its bound brought up
        to date; True when it is empty now (and gone from :attr:`waiting`)."""
        if len(waiting) <= self.resume_length:
            self._full_queues.discard(queue)
        if not waiting:
            del self.waiting[queue]
            return True
        return False

    def withdraw_copy(self, msgid: str, identity: bytes) -> Optional[Request]:
        """The guaranteed request ``msgid``, taken out of the buffer where it
        waits to be sent again, when ``identity`` is a worker it was handed
        to (:attr:`Request.ran_on`); None otherwise: a REPLY from anyone
        else is a forgery (or a guess) and must not end it. O(buffer): rare
        (a REPLY for a request that was sent again)."""
        if self.holders.get(msgid, False) is not None:
            return None
        for waiting in self.waiting.values():
            for request in waiting:
                if request.msgid == msgid and request.guaranteed and ran_there(request, identity):
                    self.withdraw(request)
                    return request
        return None

    def withdraw(self, request: Request) -> bool:
        """Take ``request`` out of the buffer (a guaranteed one whose journal
        write failed); False when it is not there. O(buffer): rare."""
        for queue, waiting in self.waiting.items():
            for i, buffered in enumerate(waiting):
                if buffered is request:
                    del waiting[i]
                    if self.holders.get(request.msgid, False) is None:
                        del self.holders[request.msgid]
                    self._left(queue, waiting, request)
                    return True
        return False

    def drop_unstarted(self, msgids: set[str]) -> set[str]:
        """The plain requests of ``msgids`` still in the buffer (no worker took
        them), taken out: their results expired, and run now they would
        answer a client told its result will not come. Guaranteed ones stay
        (they must run). Returns the msgids dropped; one pass over the
        buffer, only when some expired."""
        dropped: set[str] = set()
        for queue, waiting in list(self.waiting.items()):
            gone = [r for r in waiting if r.msgid in msgids and not r.guaranteed]
            if not gone:
                continue
            kept = [r for r in waiting if r.msgid not in msgids or r.guaranteed]
            waiting.clear()
            waiting.extend(kept)
            for request in gone:
                dropped.add(request.msgid)
                if self.holders.get(request.msgid, False) is None:
                    del self.holders[request.msgid]
                self.buffered_bytes -= request.size
            self._shrunk(queue, waiting)
        return dropped

    def may_resume(self) -> bool:
        """Whether every queue and the bytes are below the low-water marks
        (three quarters of each bound)."""
        return not self._full_queues and self.buffered_bytes <= self._resume_bytes

    def clear_buffer(self) -> list[tuple[str, Request]]:
        """Empty the buffer; what it held, by queue."""
        held = [(queue, r) for queue, requests in self.waiting.items() for r in requests]
        for _queue, request in held:
            if self.holders.get(request.msgid, False) is None:
                del self.holders[request.msgid]
        self.waiting.clear()
        self.buffered_bytes = 0
        self._full_queues.clear()
        return held

    # -- what the admin socket shows ---------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        """STATUS's EventMQ keys (latencies: ages in ms of requests in flight)."""
        ages: dict[str, list[float]] = collections.defaultdict(list)
        for worker in self.workers.values():
            for sent in worker.in_flight.values():
                ages[sent.queue].append(now - sent.sent)
        return {
            "inflight_messages_by_queue": {q: len(a) for q, a in ages.items()},
            "latency_messages_by_queue": {q: int(sum(a) / len(a) * 1000)
                                          for q, a in ages.items()},
            "max_latency_messages_by_queue": {q: int(max(a) * 1000) for q, a in ages.items()},
            "waiting_messages_by_queue": {q: len(w) for q, w in self.waiting.items()},
            "processed_messages_by_queue": dict(self.processed_by_queue),
            "processed_messages_by_worker": dict(self.processed_by_worker),
        }

    def show_workers(self) -> dict[str, Any]:
        """ROUTER_SHOW_WORKERS, in EventMQ's shape."""
        return {
            "connected_workers": {
                w.name: {"queues": [list(q) for q in w.queues], "hb": w.last_seen,
                         "available_slots": w.slots}
                for w in self.workers.values()
            },
            "connected_queues": {
                name: [[weight, identity.decode("utf-8", "replace")]
                       for weight, identity in book.entries()]
                for name, book in self.queues.items()
            },
        }


def settled(routing: Routing) -> dict[str, int]:
    """The router's first moments are over: the workers that were alive
    when it started have connected again (a restarted router knows no
    queue, and sent a scheduler's first firings and the clients' first
    requests to the default queue, which workers often do not serve: a
    probe, jobs waiting for ever). Requests still waiting for a queue no
    worker has announced go to the default queue now, after its own, as
    they would have at once; how many, by queue."""
    routing.settling = False
    default, moved = routing.default_queue, {}
    waiting, full = routing.waiting, routing._full_queues
    for name in [q for q in waiting if q != default and q not in routing.queues
                 and q not in routing._served_before]:
        requests = waiting.pop(name)
        full.discard(name)
        target = waiting.setdefault(default, collections.deque())
        target.extend(requests)
        if len(target) >= routing.hwm:
            full.add(default)
        moved[name] = len(requests)
    return moved


def remember(book: collections.OrderedDict[bytes, Any], identity: bytes) -> None:
    """Note ``identity`` in a book of at most :data:`DEPARTED_MEMORY`, the
    oldest forgotten first (identities told KBYE, taken for dead...)."""
    book[identity] = True
    while len(book) > DEPARTED_MEMORY:
        book.popitem(last=False)


__all__ = ["MAX_NAMES", "OTHER", "QueueBook", "Request", "Routing", "Sent", "Worker", "remember"]
