"""A real router and worker for the doctests of these pages.

``start_box()`` runs ``emq-green --standalone`` (the router and a job
manager in one process) in a subprocess, on free loopback ports, in
``docs/examples`` (so ``hello.greet`` is importable there), and waits until
the worker has offered its slots to the router. It points the client at it
through ``EMQ_BROKER_ADDR``, as a user's shell would. ``Box.stop()`` sends
SIGTERM and waits; a box that does not stop in time is killed with its
process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from emq_green.client import ENV_BROKER_ADDR
from emq_green.client.submit import admin_request
from emq_green.protocol import Command

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class Box:
    """One ``emq-green --standalone`` process and its addresses."""

    def __init__(self, jobs: int = 20) -> None:
        front, back, admin = free_ports(3)
        self.frontend = f"tcp://127.0.0.1:{front}"
        self.admin = f"tcp://127.0.0.1:{admin}"
        self._config = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
        self._config.write("[global]\n")  # nothing from /etc/eventmq.conf
        self._config.close()
        self._log = tempfile.TemporaryFile()
        self._previous = os.environ.get(ENV_BROKER_ADDR)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "emq_green.cli", "--standalone", "-C", self._config.name,
             "--frontend-addr", self.frontend, "--backend-addr", f"tcp://127.0.0.1:{back}",
             "--administrative-addr", self.admin, "-J", str(jobs), "-n", "docs-box",
             # a stop waits for the router to be quiet this long: short here
             "--heartbeat-interval", "0.5", "--heartbeat-timeout", "1"],
            cwd=EXAMPLES, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the worker has told the router of free slots, or fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"emq-green --standalone exited: {self.output()}")
            shown = admin_request(self.admin, Command.ROUTER_SHOW_WORKERS, timeout=0.5) or {}
            workers = shown.get("connected_workers", {})
            if any(w.get("available_slots", 0) > 0 for w in workers.values()):
                os.environ[ENV_BROKER_ADDR] = self.frontend
                return
        self.stop()
        raise RuntimeError(f"emq-green --standalone not ready in {timeout:g} s: "
                           f"{self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-4000:]

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM, wait; kill -9 the process group past ``timeout``."""
        if self._previous is None:
            os.environ.pop(ENV_BROKER_ADDR, None)
        else:
            os.environ[ENV_BROKER_ADDR] = self._previous
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        os.unlink(self._config.name)
        return self.process.returncode


def start_box(jobs: int = 20) -> Box:
    """A started, ready box; its jobs come from ``docs/examples``."""
    sys.path.insert(0, str(EXAMPLES))
    box = Box(jobs)
    box.wait_ready()
    return box
