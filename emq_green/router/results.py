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
is gone. :class:`PendingResults` is the bounded map behind this;
:class:`ResultRelay` forwards and reports through a send function the router
gives it (the client socket's), so neither knows a socket.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..protocol import Command, Message, printable

logger = logging.getLogger(__name__)

#: why a pending result was dropped (STATUS ``results_dropped_by_reason``)
EVICTED = "evicted"          # more than max_pending_results were pending
EXPIRED = "expired"          # no REPLY within result_ttl
CLIENT_GONE = "client_gone"  # the send to the client failed (gone, or not reading)
WORKER_LOST = "worker_lost"  # the worker running the job was removed as dead
STOPPING = "stopping"        # the router stopped

_REASON_TEXT = {
    EVICTED: "the router held max_pending_results results; the oldest was dropped",
    EXPIRED: "no result within the router's result_ttl",
    WORKER_LOST: "the worker running the job was removed as dead",
    STOPPING: "the router stopped before the result arrived",
}


def lost_body(reason: str) -> str:
    """The ``reply_json`` frame telling a client its result will not come."""
    return json.dumps({"lost": _REASON_TEXT.get(reason, reason), "reason": reason})


@dataclass
class PendingResults:
    """msgid -> (client identity, deadline), oldest first, bounded in size and age.

    ``max_pending`` entries at most: adding one more evicts the oldest.
    Entries older than ``ttl`` seconds leave on :meth:`expire`. Every entry
    that leaves without its result is counted in :attr:`dropped` by reason.
    """

    max_pending: int
    ttl: float
    _pending: collections.OrderedDict[str, tuple[bytes, float]] = field(
        default_factory=collections.OrderedDict)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    forwarded: int = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, msgid: str) -> bool:
        return msgid in self._pending

    def add(self, msgid: str, client: bytes, now: float) -> Optional[tuple[str, bytes]]:
        """Remember ``client`` for ``msgid``; returns the evicted ``(msgid,
        client)`` when the map was full (already counted), else None."""
        evicted = None
        if msgid not in self._pending and len(self._pending) >= self.max_pending:
            old, (old_client, _deadline) = self._pending.popitem(last=False)
            self.dropped[EVICTED] += 1
            evicted = (old, old_client)
        self._pending[msgid] = (client, now + self.ttl)
        return evicted

    def pop(self, msgid: str) -> Optional[bytes]:
        """The client waiting for ``msgid``'s result, forgotten; None if none is."""
        entry = self._pending.pop(msgid, None)
        return entry[0] if entry is not None else None

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
            gone.append((msgid, client))
        if gone:
            self.dropped[EXPIRED] += len(gone)
        return gone

    def clear(self, reason: str) -> list[tuple[str, bytes]]:
        """Forget every entry (counted under ``reason``); returns them."""
        gone = [(msgid, client) for msgid, (client, _d) in self._pending.items()]
        self._pending.clear()
        if gone:
            self.dropped[reason] += len(gone)
        return gone

    def status(self) -> dict[str, object]:
        """emq-green's STATUS keys for results."""
        return {
            "pending_results": len(self._pending),
            "max_pending_results": self.max_pending,
            "result_ttl": self.ttl,
            "results_forwarded": self.forwarded,
            "results_dropped_by_reason": dict(self.dropped),
        }


#: results dropped that are logged one by one in each window; the rest of
#: the window's are counted and summed up in one line when it ends
LOST_LOG_BURST = 100
LOST_LOG_WINDOW = 10.0


class ResultRelay:
    """Results to the clients that asked for them, through ``send`` (the
    router's send on the client socket: ``(identity, message) -> delivered``).

    :attr:`pending` is the bounded map; every result that cannot come is
    reported to its client, best effort, and logged with its msgid: one by
    one up to :data:`LOST_LOG_BURST` every :attr:`log_window` seconds, then
    counted, and the count logged when the window ends (a mass eviction
    does not flood the log; STATUS counts every one).
    """

    def __init__(self, pending: PendingResults,
                 send: Callable[[bytes, Message], bool]) -> None:
        self.pending = pending
        self._send = send
        self.log_window = LOST_LOG_WINDOW
        self._window_start = 0.0
        self._logged = 0
        self._unlogged: collections.Counter[str] = collections.Counter()

    def _log_dropped(self, msgid: str, client: bytes, reason: str) -> None:
        self._end_log_window(time.monotonic())
        if self._logged < LOST_LOG_BURST:
            self._logged += 1
            logger.warning("router: the result of %s for client %s was dropped (%s)",
                           printable(msgid), printable(client), reason)
        else:
            self._unlogged[reason] += 1

    def _end_log_window(self, now: float) -> None:
        """Past the window: log what was not logged one by one, start anew."""
        if now - self._window_start < self.log_window:
            return
        if self._unlogged:
            logger.warning("router: %d more result(s) dropped, not logged one by one: %s",
                           sum(self._unlogged.values()), dict(self._unlogged))
            self._unlogged.clear()
        self._window_start = now
        self._logged = 0

    def remember(self, msgid: str, client: bytes, now: float) -> None:
        """``client`` waits for ``msgid``'s result; a full map evicts the oldest."""
        evicted = self.pending.add(msgid, client, now)
        if evicted is not None:
            self.lost(*evicted, EVICTED)

    def forward(self, message: Message) -> None:
        """The worker's REPLY body, unchanged, to the client that asked for it."""
        if len(message.body) != 2:
            return
        client = self.pending.pop(message.body[1])
        if client is None:
            return
        if self._send(client, Message.new(Command.REPLY, *message.body)):
            self.pending.forwarded += 1
        else:
            self.pending.dropped[CLIENT_GONE] += 1
            self._log_dropped(message.body[1], client, CLIENT_GONE)

    def lost(self, msgid: str, client: bytes, reason: str) -> None:
        """Tell ``client`` that the result of ``msgid`` will not come."""
        self._log_dropped(msgid, client, reason)
        self._send(client, Message.new(Command.REPLY, lost_body(reason), msgid))

    def worker_lost(self, msgid: str) -> None:
        """The worker running ``msgid`` was removed as dead."""
        client = self.pending.drop(msgid, WORKER_LOST)
        if client is not None:
            self.lost(msgid, client, WORKER_LOST)

    def expire(self, now: float) -> None:
        """Report the results past ``result_ttl`` (and the count of drops
        not logged one by one, once their window has ended)."""
        if self._unlogged:
            self._end_log_window(now)
        if self.pending:
            for msgid, client in self.pending.expire(now):
                self.lost(msgid, client, EXPIRED)

    def stop(self) -> None:
        """The router stops: every pending result is reported lost."""
        for msgid, client in self.pending.clear(STOPPING):
            self.lost(msgid, client, STOPPING)


__all__ = ["PendingResults", "ResultRelay", "lost_body"]
