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


def send_probe(sock: Any, zmq_module: Any) -> Optional[str]:
    """Send a flush probe on ``sock`` without waiting; its msgid, or None
    when the socket's queue is full."""
    probe = Message.new(Command.HEARTBEAT, f"{time.time():.6f}", CLIENT_FLUSH)
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


def flush_socket(sock: Any, zmq_module: Any, deadline: float, known: bool,
                 other: Callable[[list[bytes]], None]) -> tuple[bool, bool]:
    """Probe ``sock`` and read until the router answers or ``deadline``
    (monotonic; :data:`PROBE_GRACE` from now unless the router is ``known``
    to answer or shows it meanwhile). ``other`` gets every other message
    (acknowledgements). Returns ``(read, known)``: whether the router read
    everything sent before, and whether it answers probes."""
    probe = send_probe(sock, zmq_module)
    if probe is None:
        return False, known
    start = time.monotonic()
    wait_until = deadline if known else min(deadline, start + PROBE_GRACE)
    while True:
        left = wait_until - time.monotonic()
        if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq_module.POLLIN):
            return False, known
        frames = sock.recv_multipart()
        got = answered(frames)
        if got == probe:
            return True, True
        if got is not None:  # an earlier probe's answer: this router answers
            known, wait_until = True, deadline
        else:
            other(frames)


__all__ = ["PROBE_GRACE", "answered", "flush_socket", "send_probe"]
