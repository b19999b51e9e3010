"""Knowing that the router has read what a client sent, before it goes.

ZeroMQ's linger only hands queued requests to the kernel. A process that
exits while the router has not read them yet loses them: the closed
connection is reset (acknowledgements arrive after the close), and a reset
throws away what the router's kernel still held. A burst of 20,000 requests
from ``emq-green-submit`` lost its last 8,000 that way, and nothing said so.

emq-green's router answers ``HEARTBEAT [time, "flush"]`` (``CLIENT_FLUSH``
in :mod:`emq_green.protocol`) from a client with ``HEARTBEAT [time,
"flush", probe msgid]`` when it reads it: ZeroMQ keeps a socket's messages
in order, so every request sent before the probe on that socket has been
read by then. EventMQ's router ignores the probe. Each new socket of a
``Client`` sends one first, so the client learns early whether its router
answers, and waits for the answer in ``Client.flush()`` (and ``close()``)
only behind one that does (else ``PROBE_GRACE``, a quarter second, at most).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ..protocol import CLIENT_FLUSH, Command, Message, ProtocolError

#: how long to wait for an answer from a router not known to answer probes
PROBE_GRACE = 0.25


def probe_message() -> Message:
    """A new flush probe, ``HEARTBEAT [time, "flush"]``."""
    return Message.new(Command.HEARTBEAT, f"{time.time():.6f}", CLIENT_FLUSH)


def send_probe(sock: Any, zmq_module: Any, probe: Optional[Message] = None) -> Optional[str]:
    """Send a flush probe (``probe``, else a new one) on ``sock`` without
    waiting; its msgid, or None when the socket's queue is full."""
    probe = probe or probe_message()
    try:
        sock.send_multipart(probe.frames(), zmq_module.NOBLOCK)
    except zmq_module.Again:
        return None
    return probe.msgid


def answered(frames: list[bytes]) -> Optional[str]:
    """The probe msgid a router's flush answer names, else None."""
    if len(frames) != 7 or frames[2] != b"HEARTBEAT" or frames[5] != CLIENT_FLUSH.encode():
        return None
    try:
        return Message.parse(frames).body[2]
    except (ProtocolError, IndexError):
        return None


def flush_sockets(socks: list[Any], zmq_module: Any, deadline: float, known: bool,
                  other: Callable[[list[bytes]], None]) -> tuple[bool, bool]:
    """Probe every socket of ``socks`` at once and read them until the router
    has answered each, or ``deadline`` (monotonic; :data:`PROBE_GRACE` from
    now unless the router is ``known`` to answer or shows it meanwhile).
    ``other`` gets every other message (acknowledgements). Returns ``(read,
    known)``: whether the router read everything sent before on every
    socket, and whether it answers probes."""
    waiting: dict[Any, Optional[str]] = {sock: send_probe(sock, zmq_module) for sock in socks}
    if None in waiting.values():  # a queue full: the router is not reading that one
        return False, known
    start = time.monotonic()
    wait_until = deadline if known else min(deadline, start + PROBE_GRACE)
    poller = zmq_module.Poller()
    for sock in socks:
        poller.register(sock, zmq_module.POLLIN)
    while waiting:
        left = wait_until - time.monotonic()
        ready = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
        if not ready:
            return False, known
        for sock in ready:
            while True:
                try:
                    frames = sock.recv_multipart(zmq_module.NOBLOCK)
                except zmq_module.Again:
                    break
                got = answered(frames)
                if got is None:
                    other(frames)
                    continue
                known, wait_until = True, deadline  # this router answers
                if got == waiting.get(sock):
                    del waiting[sock]
                    poller.unregister(sock)
                    break
    return True, known


__all__ = ["PROBE_GRACE", "answered", "flush_sockets", "probe_message", "send_probe"]
