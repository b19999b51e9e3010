"""Small helpers the benchmark scripts share (run from ``scripts/``).

The scripts that import this put the repository on ``sys.path`` first, so
``emq_green`` below is the tree's own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import zmq

from emq_green.client.submit import admin_request  # noqa: F401 (the scripts use it from here)
from emq_green.protocol import Command, Message


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback (held open together, so
    none is handed out twice)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def count_lines(path: Path) -> int:
    """How many lines ``path`` holds (0 while it does not exist): the jobs
    that appended one line each so far."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


class LineCounter:
    """Lines appended to a file so far, read incrementally: a harness that
    polls a file of 20,000 lines a hundred times a second by reading it
    whole spends a core's worth of the machine the routers are measured on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._offset = 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running in ``procs``, then wait for each
    in turn, killing one that has not exited after 15 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def admin_socket(addr: str,
                 prepare: Optional[Callable[[zmq.Socket], None]] = None) -> zmq.Socket:
    """A DEALER connected to a router's administrative socket at ``addr``,
    with an ``admin:<uuid>`` identity; ``prepare`` (e.g. ``ClientCurve.apply``
    for a CURVE router) is called on it before it connects. Close it after use."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # EventMQ's router decodes identities as UTF-8: never leave ZeroMQ's binary one
    sock.setsockopt(zmq.IDENTITY, f"admin:{uuid.uuid4()}".encode())
    if prepare is not None:
        prepare(sock)
    sock.connect(addr)
    return sock


def wait_for_slots(addr: str, slots: int, deadline: float,
                   prepare: Optional[Callable[[zmq.Socket], None]] = None) -> bool:
    """Ask the router at the administrative address ``addr`` for its workers
    (``ROUTER_SHOW_WORKERS``) until they show ``slots`` free slots in all:
    True then, False when ``deadline`` (``time.monotonic()``) passes first.
    ``prepare`` as for :func:`admin_socket`."""
    sock = admin_socket(addr, prepare)
    try:
        while time.monotonic() < deadline:
            sock.send_multipart(Message.new(Command.ROUTER_SHOW_WORKERS).frames())
            if sock.poll(500):
                body = Message.parse(sock.recv_multipart()).body[0]
                workers = json.loads(body).get("connected_workers", {})
                if sum(w["available_slots"] for w in workers.values()) >= slots:
                    return True
                time.sleep(0.05)  # polling interval
        return False
    finally:
        sock.close()


def frames(command: str, *body: str) -> list[bytes]:
    """An eMQP/1.0 message as a stand-in router sends it: empty frame,
    protocol, ``command``, a fresh message id, then ``body``."""
    return [b"", b"eMQP/1.0", command.encode(), str(uuid.uuid4()).encode(),
            *(b.encode() for b in body)]


def standin_router_socket() -> tuple[zmq.Socket, str]:
    """A ROUTER without high-water marks bound to a free loopback port, for a
    stand-in router in the harness process, and the address it listens on."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def poll_worker(poller: zmq.Poller, worker: subprocess.Popen, deadline: float,
                overdue: Callable[[], str], prefix: str = "") -> bool:
    """Wait up to a second for the stand-in router's socket in ``poller``:
    True when a message is there, False when not. Raises RuntimeError with
    ``overdue()`` once ``deadline`` (``time.monotonic()``) has passed, and
    ``<prefix>worker exited with <code>`` when the worker process is gone."""
    if time.monotonic() > deadline:
        raise RuntimeError(overdue())
    if poller.poll(1000):
        return True
    if worker.poll() is not None:
        raise RuntimeError(f"{prefix}worker exited with {worker.returncode}")
    return False
