"""Guaranteed requests sent back to back, their confirmations read as they come.

``Client.defer_job(..., guarantee=True)`` returns once the router holds the
job: one round trip per job (with a journal, a commit too), so a loop of
them runs at a few percent of the plain rate. A :class:`GuaranteedBatch`
keeps the same promise for the whole batch instead of for each call: it
sends without waiting, keeps up to ``window`` requests unconfirmed, reads
the router's confirmations as they arrive, and :meth:`~GuaranteedBatch.wait`
(or the end of a ``with`` block) returns once every request is confirmed::

    with GuaranteedBatch(client) as batch:
        for order in orders:
            batch.defer_job("billing.jobs.charge", [order])
    # here every job is held by the router (journaled, if it has a journal)

A request the router refuses raises :class:`GuaranteeRefused` and one not
confirmed within the client's ``confirm_timeout`` raises
:class:`ConfirmTimeout`, from the call that finds out (a later
``defer_job``, or ``wait``); :attr:`~GuaranteedBatch.outstanding` then lists
what is not confirmed yet.
"""

from __future__ import annotations

import collections
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from .args import check_number
from .flush import answered
from .results import ConfirmTimeout, GuaranteeRefused, SendTimeoutError, confirmation_of

if TYPE_CHECKING:
    from .api import Client

#: unconfirmed requests a batch keeps before it waits for confirmations
DEFAULT_WINDOW = 1000


class GuaranteedBatch:
    """Guaranteed requests of one :class:`~emq_green.client.Client`, on one
    of its sockets, confirmed as a batch (see the module). Not shared
    between threads or greenlets: one sender per batch."""

    def __init__(self, client: Client, window: int = DEFAULT_WINDOW) -> None:
        check_number("window", window, low=1, integer=True)
        self.client = client
        self.window = window
        #: the requests sent and not confirmed yet, oldest first (msgid to
        #: the time it was sent)
        self.outstanding: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: requests the router confirmed
        self.confirmed = 0
        self._sock: Any = None

    def __enter__(self) -> GuaranteedBatch:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self.close()

    def defer_job(self, func: Union[str, Callable[..., Any]], args: Sequence[Any] = (),
                  kwargs: Optional[dict[str, Any]] = None, class_args: Sequence[Any] = (),
                  class_kwargs: Optional[dict[str, Any]] = None, *,
                  queue: Optional[str] = None, reply_requested: bool = False,
                  retry_count: int = 0, timeout: float = 0, subprocess: bool = False) -> str:
        """Send ``func(*args, **kwargs)`` as a guaranteed job (the arguments
        of :meth:`Client.defer_job`); returns its msgid without waiting for
        its confirmation (unless ``window`` requests are unconfirmed)."""
        from .api import run_request

        run = run_request(func, args, kwargs, class_args, class_kwargs, subprocess)
        return self.send_request(run.payload(), queue=queue, reply_requested=reply_requested,
                                 retry_count=retry_count, timeout=timeout)

    def send_request(self, message: Union[str, Sequence[Any]], *, queue: Optional[str] = None,
                     reply_requested: bool = False, retry_count: int = 0,
                     timeout: float = 0) -> str:
        """Send a guaranteed REQUEST whose payload is ``message`` as it is
        (see :meth:`Client.send_request`); returns its msgid."""
        from .api import new_request

        client = self.client
        request = new_request(message, queue=queue, reply_requested=reply_requested,
                              guarantee=True, retry_count=retry_count, timeout=timeout,
                              limit=client.max_message_size)
        if self._sock is None:
            self._sock = client._take()
        try:
            client._send_message(self._sock, request)
        except SendTimeoutError as exc:
            if exc.half_sent:  # mid-message: never reused
                self._sock.close()
                self._sock = None
            raise
        client.sent += 1
        self.outstanding[request.msgid] = time.monotonic()
        self._read(block=False)
        while len(self.outstanding) >= self.window:
            self._read(block=True)
        return request.msgid

    def wait(self) -> None:
        """Return once every request sent is confirmed; raises as the
        module says."""
        while self.outstanding:
            self._read(block=True)

    def close(self) -> None:
        """Give the socket back to the client, whole: closing it would throw
        away what it still holds for a router that does not read (paused);
        a late confirmation is matched by msgid, and confirms no other
        sender's request."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self.client._give_back(sock)

    def _read(self, block: bool) -> None:
        """Read what the router sent; with ``block``, wait for one message
        at least, up to the oldest request's confirmation deadline."""
        sock = self._sock
        limit = self.client.confirm_timeout
        zmq = self.client._zmq
        while self.outstanding:
            if block:
                msgid, sent = next(iter(self.outstanding.items()))
                left = sent + limit - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                    raise ConfirmTimeout(msgid, limit)
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            block = False
            if answered(frames) is not None:  # a flush probe's answer
                self.client._router_answers = True
                continue
            answer = confirmation_of(frames)
            if answer is None or answer[0] not in self.outstanding:
                continue
            msgid, refused = answer
            del self.outstanding[msgid]
            self.client._count_ack()
            if refused:
                raise GuaranteeRefused(msgid, refused)
            self.confirmed += 1
