"""The ZAP handler: which CURVE client keys the router lets in, on the hub.

libzmq asks a ZAP handler (RFC 27) about every CURVE handshake on a socket
with ``CURVE_SERVER`` set: it sends a request to ``inproc://zeromq.zap.01``
on the socket's context and waits for the answer before the peer may send
anything. pyzmq ships thread and asyncio authenticators, not a gevent one, so
this is one greenlet with a ``zmq.green`` REP socket: it runs on the router's
hub, shares nothing with other threads, and answers between the router's
own reads. A handshake only waits while the hub is busy, as every message
does.

The handler must be bound before the CURVE sockets accept connections:
libzmq lets every key in when no handler is bound on the context. And only
one handler can be bound per context, so each CURVE router needs a context
of its own (or the only one in its process).

Refusals are logged with the key (:func:`~emq_green.curve.fingerprint`) and
the peer's address, which the ZAP request carries, and counted. Peers that
do not speak CURVE at all never reach ZAP: libzmq ends their handshake on a
mechanism mismatch. :meth:`ZapHandler.watch` puts a ZeroMQ socket monitor on
each router socket to log and count those too; libzmq's monitor events name
the router's own endpoint, not the peer's address.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
from typing import Optional

import gevent
import zmq
import zmq.green
import zmq.utils.z85

from ..curve import CurveError, fingerprint
from ..limits import LogLimiter
from ..protocol import printable

logger = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_VERSION = b"1.0"


def read_authorized_keys(directory: str) -> frozenset[bytes]:
    """The 32-byte public keys of the ``*.key`` certificates in ``directory``.

    Files that are not certificates are logged and skipped (one bad file
    must not lock every peer out); a directory that cannot be read raises
    :class:`~emq_green.curve.CurveError`."""
    import zmq.auth

    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise CurveError(f"cannot read curve_authorized_keys {directory}: {exc}") from None
    keys = set()
    for name in names:
        if not name.endswith(".key"):
            continue
        path = os.path.join(directory, name)
        try:
            public, secret = zmq.auth.load_certificate(path)
            key = zmq.utils.z85.decode(public)
            if len(key) != 32:
                raise ValueError("not a 32-byte key")
        except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
            # (struct.error: 40 Z85 characters past 2**32 per group, a probe)
            logger.warning("zap: %s skipped: not a CURVE public certificate (%s)", path,
                           printable(exc, 200))
            continue
        if secret:  # its public key still counts: refusing it would lock that peer out
            logger.warning("zap: %s holds a secret key too: only public certificates belong "
                           "in curve_authorized_keys (the peer's secret is exposed on this "
                           "host: make it a new pair)", path)
        keys.add(key)
    return frozenset(keys)


class ZapHandler:
    """Answers ZAP requests for CURVE: allowed when the client's public key
    is one of the ``*.key`` certificates in ``authorized_keys``.

    :meth:`reload` re-reads the directory (the router calls it on SIGHUP);
    a removed key cannot start a new connection afterwards. Connections
    already made are not cut: CURVE checks a key only at the handshake.
    """

    def __init__(self, *, context: zmq.green.Context, authorized_keys: str) -> None:
        self.directory = authorized_keys
        self._context = context
        self.keys: frozenset[bytes] = read_authorized_keys(authorized_keys)
        #: ``allowed`` and ``refused`` handshakes, ``reloads``
        self.counters: collections.Counter[str] = collections.Counter()
        #: a peer can fail handshakes as fast as it likes: a line each filled the disk
        self._log = LogLimiter(logger, summary="zap: %d more failed or refused CURVE "
                               "handshake(s) not logged one by one: %s")
        self._socket: Optional[zmq.green.Socket] = None
        self._greenlet: Optional[gevent.Greenlet] = None
        self._monitors: list[tuple[gevent.Greenlet, zmq.green.Socket]] = []
        self._keep: list[zmq.Socket] = []

    def start(self) -> None:
        """Bind the ZAP endpoint and start answering."""
        sock = self._context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close()
            raise CurveError(f"cannot bind the ZAP handler ({ZAP_ENDPOINT}): {exc}; another "
                             "CURVE router on the same ZeroMQ context?") from None
        self._socket = sock
        self._greenlet = gevent.spawn(self._serve)
        if not self.keys:
            logger.warning("zap: no public keys in %s: every CURVE peer will be refused",
                           self.directory)
        logger.info("zap: %d authorized key(s) from %s", len(self.keys), self.directory)

    def reload(self) -> int:
        """Re-read the authorized keys; returns how many there are. On an
        unreadable directory the old set is kept (and the error logged)."""
        try:
            keys = read_authorized_keys(self.directory)
        except CurveError as exc:
            logger.error("zap: reload failed, keeping the %d key(s) known: %s",
                         len(self.keys), exc)
            return len(self.keys)
        added, removed = keys - self.keys, self.keys - keys
        self.keys = keys
        self.counters["reloads"] += 1
        logger.info("zap: reloaded %s: %d key(s), %d added, %d removed%s", self.directory,
                    len(keys), len(added), len(removed),
                    "".join([*(f"; added {fingerprint(k)}" for k in sorted(added)[:20]),
                             *(f"; removed {fingerprint(k)}" for k in sorted(removed)[:20])]))
        return len(keys)

    def watch(self, name: str, socket: zmq.Socket) -> None:
        """Log and count the handshakes on ``socket`` (the router's ``name``
        socket) that fail before ZAP is asked: a peer without CURVE, or one
        with the wrong server key. Call before ``bind``."""
        events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        plain = socket.get_monitor_socket(events)
        # read by a greenlet: a zmq.green view of it (the router's sockets are plain)
        monitor = zmq.green.Socket.shadow(plain.underlying)
        self._keep.append(plain)  # it owns the ZeroMQ socket: closed with the router's
        self._monitors.append((gevent.spawn(self._watch, name, monitor), monitor))

    def _watch(self, name: str, monitor: zmq.green.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(monitor)
            except zmq.ZMQError:
                return
            if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                return
            self.counters["failed"] += 1
            # the value is a ZMTP protocol error code, or an errno: not an event
            value = event["value"]
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                reason = f"protocol error 0x{value:x}"
            else:
                reason = zmq.strerror(value)
            self._log.warning("failed", "zap: a handshake on the %s socket (%s) failed "
                              "before the key check: %s (a peer without CURVE, or with the "
                              "wrong server key)", name, printable(event["endpoint"]), reason)

    def stop(self) -> None:
        for greenlet, monitor in self._monitors:
            greenlet.kill()
            monitor.close(linger=0)
        self._monitors.clear()
        for plain in self._keep:
            plain.close(linger=0)  # already closed through its shadow: a no-op
        self._keep.clear()
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def status(self) -> dict[str, int]:
        """The router's STATUS keys of this handler."""
        return {"curve_handshakes_allowed": self.counters["allowed"],
                "curve_handshakes_refused": self.counters["refused"],
                "curve_handshakes_failed": self.counters["failed"],
                "curve_authorized_keys": len(self.keys)}

    def _serve(self) -> None:
        sock = self._socket
        assert sock is not None
        while True:
            try:
                if not sock.poll(int(self._log.window * 1000)):
                    self._log.flush()  # the summary of a burst that has ended
                    continue
                request = sock.recv_multipart()
            except zmq.ZMQError as exc:
                logger.error("zap: reading requests failed: %s", exc)
                return
            sock.send_multipart(self.answer(request))

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request (RFC 27 frames)."""
        # version, request id, domain, address, identity, mechanism, credentials...
        if len(request) < 6 or request[0] != _VERSION:
            logger.error("zap: malformed request (%d frames) refused", len(request))
            request_id = request[1] if len(request) > 1 else b""
            return [_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""]
        request_id, domain, address, _identity, mechanism = request[1:6]
        credentials = request[6:]
        if mechanism == b"CURVE" and len(credentials) == 1 and credentials[0] in self.keys:
            self.counters["allowed"] += 1
            user = zmq.utils.z85.encode(credentials[0])
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("zap: key %s from %s allowed", fingerprint(user),
                             printable(address))
            return [_VERSION, request_id, b"200", b"OK", user, b""]
        self.counters["refused"] += 1
        key = fingerprint(credentials[0]) if credentials and len(credentials[0]) == 32 \
            else "(none)"
        self._log.warning("refused", "zap: %s handshake from %s refused: key %s is not in %s "
                          "(domain %s)", printable(mechanism, 20), printable(address), key,
                          self.directory, printable(domain, 40))
        return [_VERSION, request_id, b"400", b"key not authorized", b"", b""]


__all__ = ["ZAP_ENDPOINT", "ZapHandler", "read_authorized_keys"]
