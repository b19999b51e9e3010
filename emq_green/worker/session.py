"""The job manager's link to its router: one connection at a time.

:class:`RouterLink` holds everything the worker says to and hears from the
router: the connection and its identity (``name:pid:n``, fresh each time),
INFORM and the wait for ACK, the one reader greenlet per connection and
the dispatch of what it reads, heartbeats both ways and the router's
liveness, READY credit, and REPLY sending. When to connect, reconnect or
leave is the job manager's decision (its supervisor), not this module's.

READY credit. The router trusts READY counts completely, so the link keeps
one invariant: READYs outstanding on the current connection never exceed
the free slots it is given (``concurrent_jobs`` minus the jobs in flight).

After a KBYE on reload (:meth:`retire`), the new connection offers every
free slot as soon as it is ACKed: a router drops a worker's unused READYs
when it reads its KBYE (EventMQ 0.3.13's does, and emq-green's), so
waiting for them would only keep an idle worker from taking jobs. The old
connection is still read until the router has been quiet for
``heartbeat_timeout`` while its READYs are unused: a REQUEST the router
sent there before it read the KBYE runs like any other (in the backlog
when every slot is taken meanwhile, so nothing is lost). The REPLY of a job
goes out on the connection the router handed it to (the router takes a
REPLY only from the worker identity that holds the request): a retired
connection stays open until the jobs it brought have ended. A graceful stop's
KBYE is followed the same way (:meth:`drain`, which also waits for the
jobs, bounded by ``kill_grace_period``); the manager decides the order.

:meth:`RouterLink.status` gives the connection's part of the manager's
status.
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import gevent
import gevent.event
import gevent.pool
import zmq.green as zmq

from ..curve import client_curve
from ..jobs import encode_reply
from ..limits import worker_log
from ..protocol import (
    Command,
    Message,
    ProtocolError,
    heartbeat,
    printable,
    queues_json,
    ready_frames,
    reply_frames,
    request_parts,
)
from ..settings import Settings
from .connection import Connection

logger = logging.getLogger(__name__)

# Messages the reader takes from the socket before it lets other greenlets run.
READ_CHUNK = 32
#: :attr:`RouterLink.router_gone` when the router said KBYE: an expected
#: turn (a router stopping, or one that took this worker for dead), not a fault
KBYE_FROM_ROUTER = "the router said KBYE (it is stopping, or had taken this worker for dead)"
# How long the last replies may take to leave when a socket closes.
CLOSE_LINGER = 2.0


def quiet_left(conn: Connection, quiet: float, since: float) -> float:
    """Seconds until no more REQUESTs are expected on ``conn`` after a KBYE
    sent at ``since`` (0: none): the router may send one per READY it has
    not used, until it has been quiet for ``quiet`` seconds."""
    if not conn.ready_outstanding:
        return 0.0
    return max(0.0, max(conn.last_request, since) + quiet - time.monotonic())


def job_ended(link: RouterLink, msgid: Optional[str], death: bool,
              offer: Callable[[Optional[bool]], None], replied: bool = False) -> None:
    """A job ended (``death``: killed; ``replied``: its REPLY was sent);
    ``offer`` offers the free slots (given whether the manager runs, when
    this found out: :meth:`RouterLink.offer_slots` then need not ask). On
    the running connection the READY that offers its slot names it
    (:func:`~emq_green.protocol.ready_frames`):
    emq-green's router then ends exactly that job, where it would take the
    oldest job sent without reply-requested as the one ended. On one that
    said KBYE (a stop's drain, one a reload retired) a job sent without
    reply-requested that ended well is reported there
    (:meth:`Connection.job_ended_after_kbye`; a killed one is not: the
    router reports it as possibly lost)."""
    conn = link.origins.conn_of.get(msgid) if link.origins.conn_of and msgid else None
    running = None
    if conn is None:
        running = link._running()
        if not running:
            conn = link.outgoing
    if conn is not None:
        if not (death or replied) and msgid:
            conn.job_ended_after_kbye(msgid)
        offer(running)
        return
    current = link.outgoing
    if current is not None:
        current.ended_job = msgid
    try:
        offer(running)
    finally:
        if current is not None:
            current.ended_job = None


def _linger(link: RouterLink, conn: Connection, reader: gevent.Greenlet,
            since: float) -> None:
    """A retired connection (KBYE sent at ``since``): read until the router
    has been quiet, then kept open until the jobs it brought have ended."""
    try:
        while True:
            left = quiet_left(conn, link._settings().heartbeat_timeout, since)
            if left <= 0:
                break
            gevent.sleep(min(left, 0.25))
        conn.ready_outstanding = 0
        while link.origins.holds(conn):
            # (emq-green's router keeps the jobs on its books while it hears
            # this connection: a long job's REPLY is not dropped as late)
            beat = link._settings().heartbeat_interval
            if conn.kbye_answered and time.monotonic() - conn.last_sent >= beat:
                conn.send(heartbeat())
            gevent.sleep(min(0.25, beat))  # poll: jobs end at their own pace
    finally:
        reader.kill()
        link._close(conn, CLOSE_LINGER)
        link.retiring.remove(conn)
        link.origins.drop(conn)
        link._wake.set()


class ReplyOrigins:
    """msgid -> the retired connection a running job came on: its REPLY
    leaves there, since a router takes a REPLY only from the identity it
    handed the job to. Empty unless a reload happened with jobs running."""

    def __init__(self) -> None:
        #: msgid -> connection (test it for emptiness before any call: per job)
        self.conn_of: dict[str, Connection] = {}

    def keep(self, msgids: Iterable[str], conn: Connection) -> None:
        """``conn`` retires with these jobs running (a job that came on an
        older connection keeps that one)."""
        for msgid in msgids:
            self.conn_of.setdefault(msgid, conn)

    def came_on(self, msgid: str, conn: Connection) -> None:
        self.conn_of[msgid] = conn

    def ended(self, msgid: Optional[str]) -> None:
        """A job ended (its REPLY, if any, sent): its connection need not wait."""
        if self.conn_of and msgid is not None:
            self.conn_of.pop(msgid, None)

    def send(self, msgid: str, reply_json: str) -> bool:
        """Send ``msgid``'s REPLY on the connection its job came on; False
        when that is the current connection (or it is closed)."""
        conn = self.conn_of.pop(msgid, None)
        if conn is None or conn.closed:
            return False
        conn.send_frames(reply_frames(reply_json, msgid))
        return True

    def holds(self, conn: Connection) -> bool:
        """Whether a job that came on ``conn`` is still running."""
        return any(c is conn for c in self.conn_of.values())

    def drop(self, conn: Connection) -> None:
        for msgid in [m for m, c in self.conn_of.items() if c is conn]:
            del self.conn_of[msgid]


def socket_identity(name: str, pid: int, count: int) -> str:
    """``name:pid:count-random``: the count for who reads the logs; the random
    part so that no one can take the identity of the next connection first (a
    squatter that knew it held a reconnecting worker off for as long as it
    liked). ZeroMQ takes at most 255 bytes: a long name is cut."""
    suffix = f":{pid}:{count}-{secrets.token_hex(4)}"
    return name.encode()[:255 - len(suffix)].decode("utf-8", "ignore") + suffix


def inform_queues(queues: Sequence[tuple[int, str]], for_log: bool = False) -> str:
    """The queues text of a worker's INFORM (``for_log``: as logged). No
    queues of its own (the ``queues`` setting ``[]``): an empty text, and
    the router gives the worker its default queues, as EventMQ's job
    manager does (it never sends ``[]``, which a router refuses)."""
    if not queues:
        return "none: the router's default ones" if for_log else ""
    return queues_json(queues)


class RouterLink:
    """The connection to the router and what travels on it.

    Args:
        context: the ZeroMQ context of the sockets.
        settings: returns the current settings (they change on reload).
        counters: the manager's counters (connections, replies, drops...).
        wake: set when the manager's supervisor should look (ACK, router
            gone).
        admit: takes a REQUEST body ``(msgid, [queue, headers, payload])``
            once its READY credit is accounted; True when that job already
            runs here (sent again); ``reject`` one that could not be read,
            with the reason.
        on_heartbeat: called with the router's HEARTBEAT.
        on_disconnect: called on the router's DISCONNECT.
        running: whether the manager is in its running state (READYs and
            heartbeats are sent only then).
    """

    def __init__(self, context: zmq.Context, *, settings: Callable[[], Settings],
                 counters: collections.Counter[str], wake: gevent.event.Event,
                 admit: Callable[[str, Sequence[str]], bool],
                 reject: Callable[[str, Sequence[str], BaseException], None],
                 on_heartbeat: Callable[[str, list[str]], None],
                 on_disconnect: Callable[[], None], running: Callable[[], bool]) -> None:
        self._context = context
        self._settings = settings
        self.counters = counters
        self._wake = wake
        #: take a REQUEST body, send one READY (a subclass's overrides, if any)
        self.admit, self.ready_sender = admit, self.send_ready
        self._reject, self._running = reject, running
        self._on_heartbeat, self._on_disconnect = on_heartbeat, on_disconnect
        #: the current connection (None between connections); every send
        #: goes through it
        self.outgoing: Optional[Connection] = None
        #: connections left after a reload, read until the router is quiet
        self.retiring: list[Connection] = []
        #: where the REPLYs of jobs brought by retired connections leave (the
        #: manager tells it when a job ends: ``origins.ended(msgid)``)
        self.origins = ReplyOrigins()
        self._lingering = gevent.pool.Group()
        self._reader: Optional[gevent.Greenlet] = None
        self._heart: Optional[gevent.Greenlet] = None
        #: why the router is taken for gone (None while it is not)
        self.router_gone: Optional[str] = None
        self.acked = gevent.event.Event()
        self.pending_replies: list[tuple[str, str]] = []
        self.total_requests = 0
        self.total_ready_sent = 0
        self.connections_made = 0
        self._addr_index = 0
        self._max_size = -1
        self._debug_log = False
        self._dispatch: dict[Command, Callable[[Message, Connection], None]] = {
            Command.ACK: self._on_ack,
            Command.REQUEST: lambda m, conn: self.request(conn, m.msgid, m.body),
            Command.HEARTBEAT: lambda m, conn: self._on_heartbeat(m.msgid, list(m.body)),
            Command.DISCONNECT: lambda m, conn: self._on_disconnect(),
            Command.KBYE: self._on_router_kbye,
        }

    def configure(self, settings: Settings) -> None:
        self._max_size = settings.max_message_size
        self._debug_log = settings.super_debug

    def status(self) -> dict[str, Any]:
        """The current connection (router address, identity, READYs
        outstanding), retired connections still read, and the totals."""
        conn = self.outgoing
        return {
            "router": conn.addr if conn else None,
            "identity": conn.identity if conn else None,
            "ready_outstanding": conn.ready_outstanding if conn else 0,
            "retiring_connections": len(self.retiring),
            "total_requests": self.total_requests,
            "total_ready_sent": self.total_ready_sent,
        }

    # ------------------------------------------------------------------
    # connections

    def next_addr(self) -> str:
        """The addresses of ``Settings.worker_addresses()`` round and round
        (a router back at its own address is found again), the next one only
        after a connection that failed (no ACK, or the router fell silent);
        after a reload or the router's KBYE, the same one again."""
        addresses = self._settings().worker_addresses()
        if self.connections_made and (not self.acked.is_set() or self.router_gone not in (
                None, KBYE_FROM_ROUTER)):
            self._addr_index += 1
        return addresses[self._addr_index % len(addresses)]

    def open(self, addr: str, name: str, queues: Sequence[tuple[int, str]],
             pid: int) -> Connection:
        """A new connection to ``addr`` with a fresh identity; INFORM sent,
        reader started."""
        s = self._settings()
        self.connections_made += 1
        identity = socket_identity(name, pid, self.connections_made)
        conn = Connection(self._context, addr, identity, hwm=s.hwm, debug_log=s.super_debug,
                          hide_heartbeats=s.hide_heartbeat_logs,
                          curve=client_curve(s.curve_secret_key_file,
                                                         s.curve_server_key_file, addr,
                                                         who=s.name), counters=self.counters)
        conn.set_max_message_size(s.max_message_size)
        self.outgoing = conn
        self.acked.clear()
        self.router_gone = None
        self._reader = gevent.spawn(self._read_loop, conn)
        logger.info("connecting to %s as %s (queues %s)", addr, identity,
                    inform_queues(queues, for_log=True))
        conn.send(Message.new(Command.INFORM, inform_queues(queues), "worker"))
        return conn

    def wait_for_ack(self, give_up: Callable[[], bool]) -> bool:
        """Wait up to ``reconnect_timeout`` for the ACK; False without one."""
        timeout = self._settings().reconnect_timeout
        deadline = time.monotonic() + timeout
        while not self.acked.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or give_up():
                if not give_up():
                    _no_ack(self.outgoing, timeout, self._settings())
                return False
            # (cleared: a set Event returns at once, and this loop would spin
            # without ever letting the reader take the ACK)
            self._wake.wait(min(left, 0.5))
            self._wake.clear()
        return True

    def up(self) -> None:
        """The router ACKed: replies kept while no connection was up leave."""
        self.counters["connections"] += 1
        pending, self.pending_replies = self.pending_replies, []
        for reply, msgid in pending:
            self.send_reply(reply, msgid)

    def end(self, *, stopping: bool) -> None:
        """The current connection ends (unless it was retired). When the
        manager is stopping, it stays open for the drain."""
        conn = self.outgoing
        if conn is None or conn in self.retiring:
            self.outgoing = None
            return
        if stopping:
            return
        if self._reader is not None:
            self._reader.kill()
        self._close(conn, 0 if self.router_gone else CLOSE_LINGER)
        self.outgoing = None

    def retire(self, running: Iterable[str] = (), say_kbye: bool = True) -> None:
        """KBYE (if ``say_kbye``) on the current connection, read on until
        the router has been quiet for ``heartbeat_timeout`` (REQUESTs it sent
        before it saw the KBYE still arrive, and run), and open until the
        jobs it brought (``running``, and the REQUESTs that still arrive)
        have ended, for their REPLYs; then closed."""
        conn, reader = self.outgoing, self._reader
        if conn is None or reader is None:
            return
        if say_kbye:
            conn.say_leaving()
        self.retiring.append(conn)
        self.origins.keep(running, conn)
        self._lingering.spawn(_linger, self, conn, reader, time.monotonic())

    quiet = staticmethod(quiet_left)

    def drain(self, grace: float, *, requests_may_come: bool, busy: Callable[[], int],
              keep_waiting: Callable[[], bool]) -> None:
        """After a stop's KBYE: wait until no job is ``busy()`` (a count), no
        retired connection is read and, if ``requests_may_come``, the router has
        been quiet here for ``heartbeat_timeout`` (REQUESTs sent before it saw
        the KBYE still come, and run); at most ``grace`` s, while ``keep_waiting()``."""
        logger.info("draining: %d job(s) running, waiting up to %g s", busy(), grace)
        conn = self.outgoing if requests_may_come else None
        deadline = time.monotonic() + grace
        quiet = min(self._settings().heartbeat_timeout, grace)
        since = time.monotonic()
        while time.monotonic() < deadline and keep_waiting():
            if not busy() and not self.retiring and (
                    conn is None or self.quiet(conn, quiet, since) <= 0):
                return
            self._wake.clear()
            self._wake.wait(0.05)

    def say_kbye(self) -> None:
        if self.outgoing is not None:
            self.outgoing.say_leaving()

    def close(self) -> None:
        """Close every connection; replies that never left are counted."""
        if self._heart is not None:
            self._heart.kill(block=False)
        self._lingering.kill(block=False)
        if self._reader is not None:
            self._reader.kill(block=False)
        for conn in [*self.retiring, self.outgoing]:
            if conn is not None:
                self._close(conn, CLOSE_LINGER)
        self.outgoing = None  # send_ready() now raises "not connected"
        for _reply, msgid in self.pending_replies:
            self.counters["replies_dropped"] += 1
            logger.error("REPLY to %s dropped: the worker stopped before a router took it",
                         printable(msgid))
        self.pending_replies.clear()

    def stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.kill()

    def _close(self, conn: Connection, linger: float) -> None:
        conn.close(linger)
        self.counters["replies_dropped"] += conn.dropped
        conn.dropped = 0

    # ------------------------------------------------------------------
    # reading: exactly one greenlet per connection

    def _read_loop(self, conn: Connection) -> None:
        handle = self.handle_frames
        while True:
            try:
                batch = conn.recv_batch(READ_CHUNK)
            except zmq.ZMQError as exc:
                if not conn.closed:
                    logger.error("receiving from %s failed: %s", conn.addr, exc)
                    if conn is self.outgoing:
                        self.router_gone = f"socket error: {exc}"
                        self._wake.set()
                return
            for frames in batch:
                handle(frames, conn)
            if len(batch) == READ_CHUNK:
                # More may be waiting: let the jobs just handed out start
                # first. Reading everything at once started hundreds of jobs
                # in one burst, which came back as one burst of READYs; the
                # bursts kept the loop's turns long and cost the sleep
                # benchmark ~10% of its rate (docs/benchmarks.md).
                gevent.sleep(0)

    def handle_frames(self, frames: list[bytes], conn: Connection) -> None:
        """One message from the router, as received on ``conn``."""
        request = None if self._debug_log else request_parts(frames)
        if request is not None and (
                self._max_size < 0 or sum(map(len, frames)) <= self._max_size):
            try:
                self.request(conn, *request)
            except Exception:
                logger.exception("error handling REQUEST %s", printable(request[0]))
            return
        if len(frames) > 2 and frames[2].upper() == b"REQUEST":
            # The router took a slot for anything it sent as a REQUEST: whatever
            # else is wrong with it, the slot comes back.
            self._on_bad_request(frames, conn)
            return
        try:
            message = Message.parse(frames)
        except ProtocolError as exc:
            self.counters["malformed_messages"] += 1
            worker_log.warning("malformed", "dropped a malformed message from the router: %s",
                               printable(exc, 200), via=logger)
            return
        if self._debug_log and not (
            self._settings().hide_heartbeat_logs and message.command is Command.HEARTBEAT
        ):
            logger.debug("<- %s %s %s", message.command.value, message.msgid, message.body)
        if conn is not self.outgoing:  # one a reload retired: read for its REQUESTs
            return conn.kbye_received() if message.command is Command.KBYE else None
        handler = self._dispatch.get(message.command)
        if handler is None:
            self.counters["unexpected_messages"] += 1
            worker_log.warning("unexpected", "ignored %s from the router: a worker does not "
                               "handle it", message.command.value, via=logger)
            return
        try:
            handler(message, conn)
        except Exception:
            logger.exception("error handling %s %s", message.command.value, message.msgid)

    def request(self, conn: Optional[Connection], msgid: str, body: Sequence[str]) -> None:
        """A REQUEST that came on ``conn``: its READY is used, the body is admitted."""
        self.total_requests += 1
        if conn is not None:
            conn.last_request = time.monotonic()
            if conn.ready_outstanding > 0:
                conn.ready_outstanding -= 1
            if conn is not self.outgoing and conn in self.retiring:
                self.origins.came_on(msgid, conn)
        if self.admit(msgid, body):
            # a job running here, sent again: its REPLY leaves where the copy
            # came (the router holds it there now), and the READY the copy
            # used is offered again (it took no slot)
            if conn is self.outgoing and self.origins.conn_of:
                self.origins.conn_of.pop(msgid, None)
            self._wake.set()

    def _on_bad_request(self, frames: list[bytes], conn: Connection) -> None:
        """A REQUEST that is too large, not UTF-8, of the wrong shape or
        logged in debug mode: parse it the slow way, or answer it invalid."""
        size = sum(map(len, frames))
        error: ProtocolError
        if 0 <= self._max_size < size:
            error = ProtocolError(f"message of {size} bytes is larger than max_message_size "
                                  f"({self._max_size} bytes)")
        else:
            try:
                message = Message.parse(frames)
            except ProtocolError as exc:
                error = exc
            else:
                if self._debug_log:
                    logger.debug("<- REQUEST %s %s", message.msgid, message.body)
                self.request(conn, message.msgid, message.body)
                return
        msgid = frames[3].decode("utf-8", "backslashreplace") if len(frames) > 3 else ""
        body = [f.decode("utf-8", "replace") for f in frames[4:7]]
        self.total_requests += 1
        conn.last_request = time.monotonic()
        if conn.ready_outstanding > 0:
            conn.ready_outstanding -= 1
        self._reject(msgid, body, error)

    def _on_ack(self, message: Message, conn: Connection) -> None:
        self.acked.set()
        self._wake.set()

    def _on_router_kbye(self, message: Message, conn: Connection) -> None:
        # no REQUEST follows it here: the READYs are dropped (a drain ends sooner)
        conn.ready_outstanding = 0
        conn.kbye_received()
        if conn is self.outgoing and self._running():
            self.router_gone = KBYE_FROM_ROUTER
        self._wake.set()

    # ------------------------------------------------------------------
    # heartbeats and liveness

    def start_heartbeats(self) -> None:
        self._heart = gevent.spawn(self._heartbeat_loop)

    def _heartbeat_loop(self) -> None:
        awake_since = time.monotonic()  # (see _beat)
        while True:
            s = self._settings()
            conn = self.outgoing
            wait = s.heartbeat_interval
            worker_log.flush()  # the summary of lines a flood of REQUESTs caused
            if conn is not None and self._running() and not s.disable_heartbeats:
                wait = _beat(self, conn, s, awake_since)
            napped_at = time.monotonic()
            if _nap(max(0.05, min(wait, s.heartbeat_interval)), s.heartbeat_interval) and \
                    _excused(conn, awake_since, napped_at, s):
                awake_since = time.monotonic()
                self.counters["resumed_after_a_pause"] += 1

    # ------------------------------------------------------------------
    # READY credit and replies

    def offer_slots(self, free: int, running: Optional[bool] = None) -> None:
        """READYs until the router's credit on the current connection is ``free``
        slots (a retired connection's unused READYs are not counted: the router
        dropped them with its KBYE), if the manager runs (``running``: known)."""
        conn = self.outgoing
        if conn is None or not (self._running() if running is None else running):
            return
        # (counted first: an override of send_ready may send none)
        for _ in range(free - conn.ready_outstanding):
            self.ready_sender()

    def send_ready(self) -> None:
        """Send one READY: the router may send one more REQUEST."""
        conn = self.outgoing
        if conn is None:
            raise RuntimeError("not connected")
        conn.send_frames(ready_frames(conn.ended_job))  # (Connection.send_ready,
        conn.ended_job = None  # written out: this runs per job)
        self.total_ready_sent += 1
        conn.ready_outstanding += 1

    def send_reply(self, reply: Any, msgid: str) -> None:
        """Send ``REPLY [reply_json, msgid]``; a dict is encoded first. Kept
        until the next ACK when no connection is up."""
        text = reply if isinstance(reply, str) else encode_reply(reply)
        if 0 <= self._max_size < 4 * (len(text) + len(msgid)) + 1100:
            # the router counts the identity frame it prepends too
            conn = self.outgoing
            identity = len(conn.identity.encode()) if conn is not None else 1024
            text = fit_reply(text, msgid, self._max_size, self.counters, identity)
        if self.origins.conn_of and self.origins.send(msgid, text):
            self.counters["replies_sent"] += 1
            return
        if self.outgoing is None or not self.acked.is_set():
            self.pending_replies.append((text, msgid))
            return
        self.outgoing.send_frames(reply_frames(text, msgid))
        self.counters["replies_sent"] += 1


def _beat(link: RouterLink, conn: Connection, s: Settings, awake_since: float) -> float:
    """One turn of the heartbeat loop: a HEARTBEAT when one is due, and the
    router taken for gone after ``heartbeat_timeout x heartbeat_liveness``
    of silence. The silence counts from the router's last message or from
    ``awake_since``, the end of the last time this process was not running
    (SIGSTOP, a suspended VM, a loop held by a job), whichever is later: on
    SIGCONT libzmq's I/O thread may not yet have moved what the router sent
    meanwhile into the socket, and closing it then lost those REQUESTs.
    Returns the seconds until the next turn is due."""
    now = time.monotonic()
    if now - conn.last_sent >= s.heartbeat_interval:
        conn.send(heartbeat())
        link.counters["heartbeats_sent"] += 1
    heard = max(conn.last_received, awake_since)
    dead_after = s.heartbeat_timeout * s.heartbeat_liveness
    if now - heard >= dead_after and link.router_gone is None and not conn.has_input():
        link.router_gone = f"nothing from the router for {now - heard:.1f} s"
        link._wake.set()
    return min(conn.last_sent + s.heartbeat_interval, heard + dead_after) - time.monotonic()


def _excused(conn: Optional[Connection], awake_since: float, napped_at: float,
             s: Settings) -> bool:
    """Whether a pause of this process that began after ``napped_at`` is
    not the router's silence: one pause is excused per time the router is
    heard, and only when it was heard within ``heartbeat_timeout`` before:
    a job that holds the loop again and again does not hide a dead router,
    nor does a pause long after it went quiet (a probe: seen 30 s late at
    the defaults, behind a job in 1 s bursts)."""
    return conn is None or conn.last_received >= max(awake_since,
                                                     napped_at - s.heartbeat_timeout)


def _nap(seconds: float, interval: float) -> bool:
    """``gevent.sleep(seconds)``; True when it ended more than ``interval``
    late: the process was not running, or its loop was held."""
    due = time.monotonic() + seconds
    gevent.sleep(seconds)
    return time.monotonic() - due > interval


def fit_reply(text: str, msgid: str, max_size: int, counters: collections.Counter[str],
              identity: int = 0) -> str:
    """``text`` if its REPLY fits the router's max_message_size (with the
    ``identity`` bytes the router's socket prepends), else an error reply:
    the router would drop it (and libzmq's MAXMSGSIZE the whole connection),
    losing the reply and the worker's slot."""
    size = sum(map(len, reply_frames(text, msgid))) + identity
    if size <= max_size:
        return text
    counters["replies_too_large"] += 1
    message = f"the reply is {size} bytes, larger than max_message_size ({max_size} bytes)"
    worker_log.warning("reply-too-large", "job %s: %s; sent an error reply instead",
                       printable(msgid), message, via=logger)
    return json.dumps({"value": message, "error": {"type": "ReplyTooLarge", "message": message}})


def _no_ack(conn: Optional[Connection], timeout: float, settings: Settings) -> None:
    logger.warning("no ACK from %s in %g s; trying again%s", conn.addr if conn else "?",
                   timeout, "" if settings.curve_server_key_file else
                   " (a router with CURVE drops plain peers without a word: it needs "
                   "curve_server_key_file here)")


__all__ = ["CLOSE_LINGER", "READ_CHUNK", "ReplyOrigins", "RouterLink", "job_ended",
           "socket_identity"]
