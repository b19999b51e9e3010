"""Results back to the caller: the router's side of the ``result-requested`` extension.

A client that wants a job's result sends its REQUEST with the headers
``reply-requested`` (so the worker sends REPLY) and ``result-requested``
(so emq-green's router remembers the client). When the worker's
``REPLY [reply_json, orig_msgid]`` arrives, the router sends the client
``REPLY [reply_json, orig_msgid]`` on the client socket: the worker's two
body frames, unchanged. The router's acknowledgement of a REQUEST is
``REPLY [msgid]`` (one body frame), so the two are told apart by their
length; EventMQ's client never reads its socket, and a client that does not
ask never gets one.

When a result cannot be delivered the client is told, best effort, with
``REPLY [{"lost": reason}, orig_msgid]``: the job may have run, its result
is gone. A REQUEST the router refuses (its msgid taken, too long, or no room
for its result) is answered ``REPLY [refusal_json, msgid]`` with an
``error`` the client's result handle raises as a ``JobError``
(:func:`refusal_body`). :class:`PendingResults` is the bounded map behind this;
:class:`ResultRelay` forwards and reports through a send function the router
gives it (the client socket's), so neither knows a socket.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterator, Mapping, Optional

from ..limits import LogLimiter
from ..protocol import Command, Message, printable, relayed_reply_frames

logger = logging.getLogger(__name__)

#: why a pending result was dropped (STATUS ``results_dropped_by_reason``)
EXPIRED = "expired"          # no REPLY within result_ttl
#: the texts of an expiry whose job was still in the buffer: dropped, or
#: (guaranteed) left there to run
EXPIRED_UNRUN = "expired (unrun)"
EXPIRED_WAITING = "expired (waiting)"
CLIENT_GONE = "client_gone"  # the send to the client failed (gone, or not reading)
WORKER_LOST = "worker_lost"  # the worker running the job was removed as dead
GIVEN_UP = "given_up"        # a guaranteed job whose workers kept dying running it
CLIENT_SLOW = "client_slow"  # its client read none of its big results for ROOM_WAIT
STOPPING = "stopping"        # the router stopped

_REASON_TEXT = {
    EXPIRED: "no result within the router's result_ttl (the job was out at a worker: it "
             "may have run, or still run)",
    EXPIRED_UNRUN: "no result within the router's result_ttl: no worker had taken the job, "
                   "and it was dropped unrun",
    EXPIRED_WAITING: "no result within the router's result_ttl: no worker has taken the job "
                     "yet; it is guaranteed, and runs when one does (its result is not sent)",
    WORKER_LOST: "the worker running the job was removed as dead; the job may have run "
                 "(or still run) there, but its result cannot come back",
    GIVEN_UP: "the workers running this guaranteed job died more often than the router's "
              "max_redeliveries allows; it is not sent again",
    STOPPING: "the router stopped before the result arrived",
    CLIENT_SLOW: "the client read none of its results for a while: the router keeps at "
                 "most max_pending_result_bytes of them on their way to one client, and "
                 "holds the next ones for a minute (4 x max_pending_result_bytes in all)",
}


def lost_body(reason: str) -> str:
    """The ``reply_json`` frame telling a client its result will not come."""
    return json.dumps({"lost": _REASON_TEXT.get(reason, reason), "reason": reason})


#: why a REQUEST asking for its result was refused (STATUS
#: ``results_refused_by_reason``); the request does not run
FULL = "full"                  # max_pending_results held already
BYTES = "bytes"                # max_pending_result_bytes held already
CLIENT_SHARE = "client_share"  # this client holds max_pending_results_per_client

#: what one pending entry costs besides its msgid and client identity, in
#: bytes (the map's slot, the tuple, the deadline; measured with tracemalloc)
ENTRY_OVERHEAD = 200


def refusal_body(error_type: str, message: str, reason: str) -> str:
    """The ``reply_json`` of ``REPLY [reply_json, msgid]`` refusing a REQUEST:
    the worker's error shape (a result handle raises ``JobError(error_type)``),
    plus ``refused``: the reason's short name."""
    return json.dumps({"value": message, "error": {"type": error_type, "message": message},
                       "refused": reason})


@dataclass
class PendingResults:
    """msgid -> (client identity, deadline), oldest first, bounded in count,
    bytes and per client, and in age.

    At a bound the newcomer is refused (:meth:`add` says why, counted in
    :attr:`refused`); nobody already waiting is pushed out, so no client can
    evict another's results. Entries older than ``ttl`` seconds leave on
    :meth:`expire`. Every entry that leaves without its result is counted in
    :attr:`dropped` by reason. An entry costs its msgid, its client identity
    and :data:`ENTRY_OVERHEAD` bytes.
    """

    max_pending: int
    ttl: float
    #: bytes of all entries at most (see the class text)
    max_bytes: int = 32 * 1024 * 1024
    #: entries one client identity may hold at most
    per_client: int = 25_000
    _pending: collections.OrderedDict[str, tuple[bytes, float]] = field(
        default_factory=collections.OrderedDict)
    _by_client: dict[bytes, int] = field(default_factory=dict)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    forwarded: int = 0
    #: bytes held now (see the class text)
    bytes: int = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, msgid: str) -> bool:
        return msgid in self._pending

    @property
    def ids(self) -> Mapping[str, object]:
        """The msgids waiting (read-only use: ``msgid in ids`` without a call)."""
        return self._pending

    def add(self, msgid: str, client: bytes, now: float) -> Optional[str]:
        """Remember ``client`` for ``msgid``; None when done, else the reason
        it was refused (:data:`FULL`, :data:`BYTES`, :data:`CLIENT_SHARE`;
        counted). A msgid already waiting is kept as it is (the router
        refuses such a REQUEST before it gets here)."""
        if msgid in self._pending:
            return None
        size = len(msgid) + len(client) + ENTRY_OVERHEAD
        held = self._by_client.get(client, 0)
        if len(self._pending) >= self.max_pending:
            reason = FULL
        elif self.bytes + size > self.max_bytes:
            reason = BYTES
        elif held >= self.per_client:
            reason = CLIENT_SHARE
        else:
            self._pending[msgid] = (client, now + self.ttl)
            self._by_client[client] = held + 1
            self.bytes += size
            return None
        self.refused[reason] += 1
        return reason

    def _forget(self, msgid: str, client: bytes) -> None:
        """Book-keeping of an entry that left the map."""
        self.bytes -= len(msgid) + len(client) + ENTRY_OVERHEAD
        left = self._by_client[client] - 1
        if left:
            self._by_client[client] = left
        else:
            del self._by_client[client]

    def pop(self, msgid: str) -> Optional[bytes]:
        """The client waiting for ``msgid``'s result, forgotten; None if none is."""
        entry = self._pending.pop(msgid, None)
        if entry is None:
            return None
        self._forget(msgid, entry[0])
        return entry[0]

    def drop(self, msgid: str, reason: str) -> Optional[bytes]:
        """Forget ``msgid`` without a result, counted under ``reason``."""
        client = self.pop(msgid)
        if client is not None:
            self.dropped[reason] += 1
        return client

    def expire(self, now: float) -> list[tuple[str, bytes]]:
        """Forget the entries past their deadline (counted); returns them."""
        gone: list[tuple[str, bytes]] = []
        pending = self._pending
        while pending:
            msgid, (client, deadline) = next(iter(pending.items()))
            if deadline > now:
                break  # oldest first, and every entry has the same ttl
            del pending[msgid]
            self._forget(msgid, client)
            gone.append((msgid, client))
        if gone:
            self.dropped[EXPIRED] += len(gone)
        return gone

    def clear(self, reason: str) -> list[tuple[str, bytes]]:
        """Forget every entry (counted under ``reason``); returns them."""
        gone = [(msgid, client) for msgid, (client, _d) in self._pending.items()]
        self._pending.clear()
        self._by_client.clear()
        self.bytes = 0
        if gone:
            self.dropped[reason] += len(gone)
        return gone

    def status(self) -> dict[str, object]:
        """emq-green's STATUS keys for results."""
        return {
            "pending_results": len(self._pending),
            "max_pending_results": self.max_pending,
            "pending_result_bytes": self.bytes,
            "max_pending_result_bytes": self.max_bytes,
            "max_pending_results_per_client": self.per_client,
            "result_ttl": self.ttl,
            "results_forwarded": self.forwarded,
            "results_dropped_by_reason": dict(self.dropped),
            "results_refused_by_reason": dict(self.refused),
        }


#: how long a result whose client cannot be reached is kept and tried again
#: (seconds, at most ``result_ttl``): a client's socket connects again within
#: about 100 ms of a router's restart, and the results of the jobs restored
#: from the journal may come before it has
HOLD_FOR_RECONNECT = 10.0

#: a result whose reply is this many bytes or more leaves at once, without a
#: copy and tracked (:class:`OnTheWay`)
TRACKED_RESULT = 64 * 1024
#: the reply's frame in :func:`~emq_green.protocol.relayed_reply_frames`
_BODY = 5
#: how long a big result waits for room in its client's share (its client
#: reads nothing) before it is dropped as ``client_slow``
ROOM_WAIT = 60.0
#: results waiting for room are held up to this many times
#: ``max_pending_result_bytes`` in all (a burst of big results for a client
#: that reads them fits), and tried again after :data:`ROOM_RETRY` seconds,
#: twice as long each time none could leave, up to :data:`ROOM_RETRY_MAX`
ROOM_FACTOR = 4
ROOM_RETRY = 0.01
ROOM_RETRY_MAX = 0.5


class OnTheWay:
    """Big results handed to ZeroMQ and not written out to their clients
    yet, by client: what a client that stops reading makes the router hold
    in ZeroMQ's queue (up to ``hwm`` messages of up to ``max_message_size``
    each, a probe: 1.2 GB) is at most ``limit`` bytes (and one result,
    whatever its size). ZeroMQ releases a message once it has written it to
    the connection, or dropped it with a client that left (its tracker is
    then done)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._trackers: dict[bytes, collections.deque[tuple[Any, int]]] = {}
        self._used: dict[bytes, int] = {}
        #: bytes on the way, all clients
        self.bytes = 0

    def room(self, client: bytes, size: int) -> bool:
        """Whether ``client``'s share has room for ``size`` bytes more."""
        used = self._release(client)
        return used == 0 or used + size <= self.limit

    def add(self, client: bytes, tracker: Any, size: int) -> None:
        self._trackers.setdefault(client, collections.deque()).append((tracker, size))
        self._used[client] = self._used.get(client, 0) + size
        self.bytes += size

    def _release(self, client: bytes) -> int:
        """Forget what ZeroMQ is done with (in order: one pipe per client);
        the bytes ``client`` still has on the way."""
        trackers = self._trackers.get(client)
        if not trackers:
            return 0
        used = self._used[client]
        while trackers and trackers[0][0].done:
            size = trackers.popleft()[1]
            used -= size
            self.bytes -= size
        if trackers:
            self._used[client] = used
        else:
            del self._trackers[client], self._used[client]
        return used

    def release_all(self) -> None:
        for client in list(self._trackers):
            self._release(client)

#: results dropped that are logged one by one in each window; the rest of
#: the window's are counted and summed up in one line when it ends
LOST_LOG_BURST = 100
LOST_LOG_WINDOW = 10.0


class ResultRelay:
    """Results to the clients that asked for them, through ``send`` (the
    router's send on the client socket: ``(identity, message) -> delivered``).

    :attr:`pending` is the bounded map; every result that cannot come is
    reported to its client, best effort, and logged with its msgid through a
    :class:`~emq_green.limits.LogLimiter` of its own (one by one up to
    :data:`LOST_LOG_BURST` every :attr:`log_window` seconds, then counted and
    summed up when the window ends): a flood of other warnings cannot hide
    lost results, and lost results do not flood the log. STATUS counts
    every one.

    With ``send_later`` (the router's
    :meth:`~emq_green.router.sockets.RouterSockets.send_later`), results
    leave in a batch once the router's current turn (a batch of worker
    messages) is done, not one by one as they come: ZeroMQ's I/O threads
    (the router's and the client's) then wake once per batch and move it in
    one system call, instead of once per result (measured: about 20 us of
    CPU per result less, client and router together). The router then calls
    :meth:`flushed` with what was sent and what failed.
    """

    def __init__(self, pending: PendingResults,
                 send: Callable[[bytes, Message], bool],
                 send_frames: Optional[Callable[[list[bytes]], bool]] = None,
                 send_later: Optional[Callable[[list[bytes]], None]] = None,
                 send_tracked: Optional[Callable[[list[bytes], int], Any]] = None,
                 call_later: Optional[Callable[[float, Callable[[], None]], Any]] = None,
                 ) -> None:
        self.pending = pending
        self._send = send
        #: sends a big result at once, tracked (:class:`OnTheWay`); returns
        #: its tracker, None when it could not leave. None: not tracked
        self._send_tracked = send_tracked
        self.on_the_way = OnTheWay(pending.max_bytes)
        #: runs a function after a delay (the router's event loop): results
        #: waiting for room are tried again soon, not at the next check
        self._call_later = call_later
        self._retry_due = False
        self._retry_after = ROOM_RETRY
        #: queues a message for the end of the turn; None: results are sent at once
        self._send_later = send_later
        #: the results queued by ``send_later`` and not reported in :meth:`flushed` yet
        self._batch: list[list[bytes]] = []
        #: the same send for a message already in frames, identity first
        #: (one result per job goes this way); default: through ``send``
        self._send_frames = send_frames or (
            lambda frames: send(frames[0], Message.parse(frames[1:])))
        #: msgid -> (frames, deadline, bytes) of results waiting for their
        #: client to connect again, oldest first
        self._held: collections.OrderedDict[str, tuple[list[bytes], float, int]] = (
            collections.OrderedDict())
        #: bytes of :attr:`_held` (frames only), in all and by client
        self.held_bytes = 0
        self._held_by: dict[bytes, int] = {}
        #: seconds a result is kept for its client (:data:`HOLD_FOR_RECONNECT`;
        #: 0: dropped at once)
        self.hold_for_reconnect = HOLD_FOR_RECONNECT
        self._log = LogLimiter(
            logger, burst=LOST_LOG_BURST, window=LOST_LOG_WINDOW,
            summary="router: %d more result(s) dropped, not logged one by one: %s")

    @property
    def log_window(self) -> float:
        return self._log.window

    @log_window.setter
    def log_window(self, seconds: float) -> None:
        self._log.window = seconds

    def _log_dropped(self, msgid: str, client: bytes, reason: str) -> None:
        self._log.warning(reason, "router: the result of %s for client %s was dropped (%s)",
                          printable(msgid), printable(client), reason)

    def remember(self, msgid: str, client: bytes, now: float) -> Optional[str]:
        """``client`` waits for ``msgid``'s result; None when remembered, else
        why not (the map is at a bound: the caller refuses the request)."""
        return self.pending.add(msgid, client, now)

    def forward(self, message: Message) -> None:
        """The worker's REPLY body, unchanged, to the client that asked for it."""
        if len(message.body) != 2:
            return
        client = self.pending.pop(message.body[1])
        if client is None:
            return
        # the worker's REPLY keeps its own msgid: a fresh random one already
        frames = relayed_reply_frames(client, message.body[0], message.body[1],
                                      message.msgid)
        if self._send_tracked is not None and len(frames[_BODY]) >= TRACKED_RESULT:
            why = self._send_big(frames)
            if why is not None:
                wait = ROOM_WAIT if why == CLIENT_SLOW else min(self.hold_for_reconnect,
                                                                 self.pending.ttl)
                self._hold(frames, time.monotonic() + wait if wait > 0 else 0.0, why)
            return
        if self._send_later is None:
            self._delivered([frames], [] if self._send_frames(frames) else [frames])
            return
        self._batch.append(frames)
        self._send_later(frames)

    def flushed(self, sent: list[list[bytes]], failed: list[list[bytes]]) -> None:
        """The client socket's batch left: ``sent`` (results and other
        messages), of which ``failed`` could not be delivered."""
        batch, self._batch = self._batch, []
        if batch:
            if failed:
                gone = {id(frames) for frames in failed}
                failed = [frames for frames in batch if id(frames) in gone]
            self._delivered(batch, failed)

    def _delivered(self, sent: list[list[bytes]], failed: list[list[bytes]]) -> None:
        """Count ``sent`` results as forwarded, but for those that ``failed``:
        those are kept to be sent again (or dropped if there is no room)."""
        self.pending.forwarded += len(sent) - len(failed)
        if not failed:
            return
        hold = min(self.hold_for_reconnect, self.pending.ttl)
        deadline = time.monotonic() + hold
        for frames in failed:
            self._hold(frames, deadline if hold > 0 else 0.0)

    def _hold(self, frames: list[bytes], deadline: float, why: str = CLIENT_GONE) -> None:
        """Keep a result that could not leave, to try again until ``deadline``
        (0: dropped at once, as when there is no room, for ``why``)."""
        size = sum(len(frame) for frame in frames)
        msgid = frames[-1].decode("utf-8", "replace")
        room = self.pending.max_bytes * (ROOM_FACTOR if why == CLIENT_SLOW else 1)
        client = frames[0]
        mine = self._held_by.get(client, 0)
        # one client holds at most half the room: one that reads nothing
        # does not take the others' (a probe: 38 of 150 lost); a full room
        # gives way to a client holding less than the one holding most (two
        # that read nothing filled it, and a third's were dropped: a probe);
        # and one result waits whatever its size when its client has none
        # waiting (a probe: the third of three 10 MB results for a client
        # reading them, at a 3 MB bound, was dropped at once, client_slow)
        if (not deadline or msgid in self._held or (mine and mine + size > room // 2)
                or (self.held_bytes + size > room
                    and not self._make_room(client, mine, room - size))):
            self._gone(msgid, client, why)
            return
        self._held[msgid] = (frames, deadline, size)
        self.held_bytes += size
        self._held_by[client] = mine + size
        if why == CLIENT_SLOW and self._call_later is not None and not self._retry_due:
            self._retry_due, self._retry_after = True, ROOM_RETRY
            self._call_later(ROOM_RETRY, self._retry)

    def _make_room(self, client: bytes, holds: int, limit: int) -> bool:
        """Drop the oldest waiting results of the client holding most, while
        it holds more than ``client`` (``holds`` bytes before its new one),
        until at most ``limit`` bytes wait; whether that made the room.
        Nothing is dropped when it would not (a review: another's result
        went, and the new one too). (Against what ``client`` would hold with
        its new one, two clients with as many results each refused a third
        its last: results carry a few bytes of frames more than the room's
        round share, a flaky test.)"""
        held_by = dict(self._held_by)
        excess = self.held_bytes - limit
        victims: list[str] = []
        oldest: dict[bytes, Iterator[tuple[str, int]]] = {}
        while excess > 0:
            hog = max((c for c in held_by if c != client), key=held_by.__getitem__,
                      default=None)
            if hog is None or held_by[hog] <= holds:
                return False
            if hog not in oldest:
                oldest[hog] = ((m, size) for m, (frames, _d, size) in self._held.items()
                               if frames[0] == hog)
            msgid, size = next(oldest[hog])
            victims.append(msgid)
            held_by[hog] -= size
            excess -= size
        for msgid in victims:
            frames, _deadline, size = self._held.pop(msgid)
            hog = frames[0]
            self.held_bytes -= size
            left = self._held_by.pop(hog) - size
            if left > 0:
                self._held_by[hog] = left
            self._gone(msgid, hog, CLIENT_SLOW if len(frames[_BODY]) >= TRACKED_RESULT
                       else CLIENT_GONE)
        return True

    def _retry(self) -> None:
        """Results waiting for room, tried again while any wait: soon again
        when some could leave (a client that reads), less and less often
        when none could (one that does not)."""
        self._retry_due = False
        before = self.pending.forwarded
        if self._held:
            self._send_held(time.monotonic())
        if self._call_later is not None and not self._retry_due and any(
                len(frames[_BODY]) >= TRACKED_RESULT for frames, _d, _s in self._held.values()):
            self._retry_after = (ROOM_RETRY if self.pending.forwarded > before
                                 else min(2 * self._retry_after, ROOM_RETRY_MAX))
            self._retry_due = True
            self._call_later(self._retry_after, self._retry)

    def _send_big(self, frames: list[bytes]) -> Optional[str]:
        """A big result to its client, tracked, if its share has room: None
        when sent, else why not (:data:`CLIENT_SLOW`: no room;
        :data:`CLIENT_GONE`: it could not leave)."""
        size = len(frames[_BODY])
        if not self.on_the_way.room(frames[0], size):
            return CLIENT_SLOW
        tracker = self._send_tracked(frames, _BODY)  # type: ignore[misc]
        if tracker is None:
            return CLIENT_GONE
        self.on_the_way.add(frames[0], tracker, size)
        self.pending.forwarded += 1
        return None

    def _gone(self, msgid: str, client: bytes, why: str = CLIENT_GONE) -> None:
        self.pending.dropped[why] += 1
        if why == CLIENT_SLOW:  # still there: told, in a few bytes
            self.lost(msgid, client, why)
        else:
            self._log_dropped(msgid, client, why)

    def _send_held(self, now: float, last: bool = False) -> None:
        """Send the kept results again; drop those past their deadline (all
        that fail when ``last``)."""
        for msgid, (frames, deadline, size) in list(self._held.items()):
            if self._send_tracked is not None and len(frames[_BODY]) >= TRACKED_RESULT:
                why = self._send_big(frames)
                if why is None:
                    pass
                elif deadline > now and not last:
                    continue
                else:
                    self._gone(msgid, frames[0], why)
            elif self._send_frames(frames):
                self.pending.forwarded += 1
            elif deadline > now and not last:
                continue
            else:
                self._gone(msgid, frames[0])
            del self._held[msgid]
            self.held_bytes -= size
            left = self._held_by.pop(frames[0], 0) - size
            if left > 0:
                self._held_by[frames[0]] = left

    @property
    def held(self) -> int:
        """Results kept for a client to connect again (:data:`HOLD_FOR_RECONNECT`)."""
        return len(self._held)

    def lost(self, msgid: str, client: bytes, reason: str) -> None:
        """Tell ``client`` that the result of ``msgid`` will not come."""
        self._log_dropped(msgid, client, reason)
        self._send(client, Message.new(Command.REPLY, lost_body(reason), msgid))

    def worker_lost(self, msgid: str, reason: str = WORKER_LOST) -> None:
        """The worker running ``msgid`` was removed as dead (``reason``:
        :data:`WORKER_LOST`, or :data:`GIVEN_UP` for a guaranteed job that
        is not sent again)."""
        client = self.pending.drop(msgid, reason)
        if client is not None:
            self.lost(msgid, client, reason)

    def expire(self, now: float, drop_unstarted: Callable[[set[str]], Mapping[str, str]]
               = lambda msgids: {}) -> None:
        """Report the results past ``result_ttl`` (and the count of drops
        not logged one by one, once their window has ended).
        ``drop_unstarted(msgids)``: what became of their jobs that no worker
        took (``unrun``: taken out of the buffer, they will not run;
        ``waiting``: guaranteed, left to run); their clients are told which,
        with ``"unrun": true`` when sending the job again is safe."""
        self._log.flush(now)
        self.on_the_way.release_all()
        if self._held:
            self._send_held(now)
        if self.pending:
            gone = self.pending.expire(now)
            fate = drop_unstarted({msgid for msgid, _client in gone}) if gone else {}
            for msgid, client in gone:
                self._log_dropped(msgid, client, EXPIRED)
                state = fate.get(msgid)
                body = {"lost": _REASON_TEXT[EXPIRED_UNRUN if state == "unrun" else
                                             EXPIRED_WAITING if state == "waiting" else EXPIRED],
                        "reason": EXPIRED}
                if state == "unrun":
                    body["unrun"] = True
                self._send(client, Message.new(Command.REPLY, json.dumps(body), msgid))

    def stop(self, kept: Container[str] = ()) -> None:
        """The router stops: every pending result is reported lost, except
        those of the jobs in ``kept``, which stay in the journal: the next
        router on it runs them, and sends each result to its client if that
        client is still connected. Results kept for their client are tried
        once more."""
        if self._held:
            self._send_held(time.monotonic(), last=True)
        for msgid, client in self.pending.clear(STOPPING):
            if msgid not in kept:
                self.lost(msgid, client, STOPPING)


__all__ = ["OnTheWay", "PendingResults", "ResultRelay", "lost_body", "refusal_body"]
