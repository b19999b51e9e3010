"""Connecting a client socket to the router: a bad address is a
``ValueError`` at once, and a caller that wants to know that a router is
there can wait for the ZeroMQ handshake.

ZeroMQ connects in the background and queues what is sent until a peer
answers, so a send to a port where nothing listens "succeeds"; and the
router acknowledges only the requests it hands to a worker at once (a
request it buffers gets no ``REPLY``, with EventMQ's router as with
emq-green's), so the absence of acknowledgements says nothing either. A
completed handshake does: a ZeroMQ peer listens at the address and took this
client's security mechanism (plain, or CURVE with its keys).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

#: the monitor events of a failed handshake, and what ZeroMQ says of each
_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
}
_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED
for _event in _HANDSHAKE_FAILED:
    _EVENTS |= _event


class RouterUnreachable(ConnectionError):
    """No router completed a handshake at ``addr`` within the time allowed,
    or the handshake failed (``reason`` says which)."""

    def __init__(self, addr: str, reason: str) -> None:
        super().__init__(f"no router at {addr}: {reason}")
        self.addr = addr
        self.reason = reason


def connect(sock: Any, addr: str) -> None:
    """``sock.connect(addr)``; an address ZeroMQ refuses closes the socket
    (left open, it would make ``Context.term`` wait for ever) and raises
    ``ValueError``."""
    try:
        sock.connect(addr)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ValueError(f"invalid router address {addr!r}: {zmq.strerror(exc.errno)}") from None


def check_address(addr: str) -> None:
    """``ValueError`` when ZeroMQ refuses ``addr`` (nothing is sent)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    connect(sock, addr)  # closes it and raises on a bad address
    sock.close(linger=0)


def new_dealer(context: Any, zmq_module: Any, addr: str, identity: str, *, hwm: int,
               linger: float, prepare: Optional[Callable[[Any], None]] = None,
               wait: Optional[float] = None) -> Any:
    """A DEALER of ``context`` (``zmq_module``: :mod:`zmq` or
    :mod:`zmq.green`) with its identity, high-water marks and linger,
    ``prepare`` called on it (CURVE keys), connected to ``addr``; with
    ``wait``, once its handshake with the router is done
    (:func:`connect_and_wait`). Raises as :func:`connect` and
    :func:`connect_and_wait` do, the socket closed."""
    sock = context.socket(zmq_module.DEALER)
    sock.setsockopt(zmq_module.IDENTITY, identity.encode())
    sock.setsockopt(zmq_module.SNDHWM, hwm)
    sock.setsockopt(zmq_module.RCVHWM, hwm)
    sock.setsockopt(zmq_module.LINGER, int(linger * 1000))
    if prepare is not None:
        prepare(sock)  # before connecting
    if wait is None:
        connect(sock, addr)
    else:
        connect_and_wait(sock, addr, wait)
    return sock


def connect_and_wait(sock: Any, addr: str, timeout: float) -> None:
    """Connect ``sock`` (a plain or ``zmq.green`` socket, not connected yet)
    to ``addr`` and wait until the handshake with a peer there succeeds.

    Raises:
        ValueError: ZeroMQ refuses the address.
        RouterUnreachable: no handshake within ``timeout`` seconds (nothing
            listens), or a failed one (a CURVE mismatch, a refused key).

    Either way the socket is closed (nothing was sent on it).
    """
    # the monitor is attached before connecting: a handshake done first
    # would not be reported
    monitor = sock.get_monitor_socket(_EVENTS)
    try:
        connect(sock, addr)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not monitor.poll(max(1, int(left * 1000))):
                raise RouterUnreachable(addr, f"nothing answered within {timeout:g} s "
                                              "(no router listening there?)")
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            raise RouterUnreachable(addr, f"the ZeroMQ handshake failed "
                                    f"({_HANDSHAKE_FAILED.get(event, event)}): CURVE keys or "
                                    "settings that do not match the router's?")
    except RouterUnreachable:
        sock.close(linger=0)
        raise
    finally:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close(linger=0)


__all__ = ["RouterUnreachable", "connect", "connect_and_wait", "new_dealer"]
