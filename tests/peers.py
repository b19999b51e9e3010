"""Real peers for the interop tests: EventMQ 0.3.13's router and job manager,
and emq-green, each a subprocess on free loopback ports.

Everything here waits for an observable event (a log line, a line in the job
record file, the router's own view of its workers) with a deadline; nothing
sleeps as synchronisation. Every process is started in its own session and
its whole process group is killed in teardown, so a failing test leaves no
router or job manager behind.

Jobs record themselves in a file named by ``$EMQ_INTEROP_RECORD`` (see
``interop_jobs.py``); :class:`JobRecord` reads it.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import pytest
import zmq

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
RECORD_ENV = "EMQ_INTEROP_RECORD"


def require_eventmq() -> None:
    """The EventMQ 0.3.13 peer is part of the suite: missing, it is an error
    (scripts/test.sh installs it), never a silent skip."""
    try:
        import eventmq  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"EventMQ 0.3.13 (the interop test peer) is not installed: {exc}; "
                    "run bash scripts/test.sh, which installs it", pytrace=False)


# Ports are picked below Linux's ephemeral range (32768-60999 by default):
# a port the kernel hands out with bind(0) can be taken by any process's
# outgoing connection between the pick and the peer's bind ("Address already
# in use" in a busy suite); these are never handed out that way.
_PORT_RANGE = (20000, 32000)
_rng = random.Random()


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together, so none
    is handed out twice), outside the ephemeral range."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", _rng.randrange(*_PORT_RANGE)))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    [port] = free_ports(1)
    return port


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.05,
    details: Optional[Callable[[], str]] = None,
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without EventMQ settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EVENTMQ_", "EMQ_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A subprocess whose stdout and stderr go to one log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str],
                 cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self._logf = open(log, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=self._logf, stderr=subprocess.STDOUT,
                                      env=env, cwd=str(cwd), start_new_session=True)
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"<{self.name} pid {self.pid}>"

    # -- the log
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def mark(self) -> int:
        """A position in the log: later waits can look only after it."""
        return self.log.stat().st_size

    def tail(self, lines: int = 40) -> str:
        return f"--- last lines of {self.name} ({self.log}):\n" + "\n".join(
            self.text().splitlines()[-lines:])

    def count(self, pattern: str, since: int = 0) -> int:
        return len(re.findall(pattern, self.text()[since:]))

    def wait_for(self, pattern: str, timeout: float = 15, since: int = 0,
                 count: int = 1) -> str:
        """Wait until ``pattern`` (a regex) occurs ``count`` times after ``since``."""
        def found() -> Optional[str]:
            matches = re.findall(pattern, self.text()[since:])
            if len(matches) >= count:
                return matches[count - 1] or "<match>"
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited (rc {self.popen.returncode}) while waiting for "
                    f"{pattern!r}\n{self.tail()}")
            return None

        return wait_until(found, timeout, f"{pattern!r} x{count} in the log of {self.name}",
                          details=self.tail)

    # -- the process
    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:g} s\n"
                                 f"{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL the whole process group (EventMQ's job manager has children)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._logf.close()


@dataclass
class RouterAddrs:
    frontend: str
    backend: str
    admin: str

    @classmethod
    def fresh(cls) -> RouterAddrs:
        return cls(*(f"tcp://127.0.0.1:{free_port()}" for _ in range(3)))


class Router(Proc):
    """EventMQ's own ``emq-router``, configured by a file written by the test."""

    def __init__(self, addrs: RouterAddrs, config: Path, log: Path, env: dict[str, str],
                 cwd: Path) -> None:
        self.addrs = addrs
        self.config = config
        super().__init__("emq-router", [str(BIN / "emq-router"), "-C", str(config)],
                         log, env, cwd)
        self.wait_for(r"Listening for administrative commands on", timeout=20)

    def admin(self, command: str, timeout: float = 5) -> dict:
        """Ask the administrative socket; the answer is the router's JSON."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # The router decodes every frame as UTF-8, the peer identity too.
        sock.setsockopt(zmq.IDENTITY, f"admin-{uuid.uuid4()}".encode())
        try:
            sock.connect(self.addrs.admin)
            sock.send_multipart([b"", b"eMQP/1.0", command.encode(), uuid.uuid4().hex.encode()])
            if not sock.poll(int(timeout * 1000)):
                raise AssertionError(f"no answer to {command} from the router\n{self.tail()}")
            frames = sock.recv_multipart()
            return json.loads(frames[-1])
        finally:
            sock.close()

    def workers(self) -> dict[str, dict]:
        """The router's worker table: identity -> {queues, hb, available_slots}."""
        return self.admin("ROUTER_SHOW_WORKERS")["connected_workers"]

    def wait_for_worker(self, match: str, slots: int, timeout: float = 20) -> tuple[str, dict]:
        """Wait until a worker whose identity matches the regex ``match`` has
        ``slots`` free slots in the router's books; return (identity, entry)."""
        def found() -> Optional[tuple[str, dict]]:
            for ident, entry in self.workers().items():
                if re.match(match, ident) and entry["available_slots"] == slots:
                    return ident, entry
            return None

        return wait_until(found, timeout, f"worker {match!r} with {slots} free slots",
                          interval=0.1,
                          details=lambda: f"router workers: {self.workers()}\n{self.tail()}")


# EventMQ's own job manager ignores -n for its socket identity: a uuid4.
EVENTMQ_IDENTITY = r"^[0-9a-f]{8}-[0-9a-f]{4}-"


class JobRecord:
    """The lines jobs append to ``$EMQ_INTEROP_RECORD``: ``EVENT TAG PID TIME``.

    Read incrementally: each look reads only what was appended since the
    last one (a soak test looks ten times a second at a file of 100,000
    lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        self._offset = 0
        self._lines: list[tuple[str, str, int, float]] = []
        self._tags: dict[str, Counter[str]] = {}
        self._pids: dict[str, dict[str, int]] = {}

    def _refresh(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        # Jobs append while the test reads: a last line without its newline
        # is still being written and is read next time.
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode().splitlines():
            event, tag, pid, when = line.split()
            self._lines.append((event, tag, int(pid), float(when)))
            self._tags.setdefault(event, Counter())[tag] += 1
            self._pids.setdefault(event, {})[tag] = int(pid)

    def lines(self) -> list[tuple[str, str, int, float]]:
        self._refresh()
        return list(self._lines)

    def count(self, event: str = "done") -> int:
        """How many ``event`` lines (cheap: no copy)."""
        self._refresh()
        return sum(self._tags.get(event, Counter()).values())

    def tags(self, event: str = "done") -> Counter[str]:
        self._refresh()
        return Counter(self._tags.get(event, Counter()))

    def pids(self, event: str = "done") -> dict[str, int]:
        self._refresh()
        return dict(self._pids.get(event, {}))

    def wait_for_tags(self, tags: Iterable[str], timeout: float, event: str = "done",
                      details: Optional[Callable[[], str]] = None) -> Counter[str]:
        wanted = set(tags)

        def complete() -> Optional[Counter[str]]:
            self._refresh()
            seen = self._tags.get(event, Counter())
            return Counter(seen) if wanted <= seen.keys() else None

        def missing() -> str:
            seen = set(self.tags(event))
            left = sorted(wanted - seen)
            text = f"{len(left)} of {len(wanted)} '{event}' missing, e.g. {left[:5]}"
            return text + ("\n" + details() if details else "")

        return wait_until(complete, timeout, f"{len(wanted)} jobs to record '{event}'",
                          interval=0.1, details=missing)


class Peers:
    """Starts peers for one test and kills them all in :meth:`close`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.record = JobRecord(tmp / "record.txt")
        self._n = 0

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(**{RECORD_ENV: str(self.record.path), **extra})

    def _log(self, name: str) -> Path:
        self._n += 1
        return self.tmp / f"{self._n:02d}-{name}.log"

    def write_config(self, name: str, sections: dict[str, dict[str, object]]) -> Path:
        path = self.tmp / name
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {v}" for k, v in values.items()]
            lines.append("")
        path.write_text("\n".join(lines))
        return path

    def router_config(self, addrs: RouterAddrs, **extra: object) -> Path:
        values: dict[str, object] = {"frontend_addr": addrs.frontend,
                                     "backend_addr": addrs.backend,
                                     "administrative_addr": addrs.admin}
        values.update(extra)
        return self.write_config(f"router-{self._n + 1}.conf", {"global": values})

    def router(self, addrs: Optional[RouterAddrs] = None, config: Optional[Path] = None,
               **settings: object) -> Router:
        addrs = addrs or RouterAddrs.fresh()
        config = config or self.router_config(addrs, **settings)
        router = Router(addrs, config, self._log("router"), self.env(), self.tmp)
        self.procs.append(router)
        return router

    def green(self, argv: Sequence[str], env: Optional[dict[str, str]] = None,
              wait_ack: bool = True) -> Proc:
        """Start ``emq-green argv``; by default wait for its first ACK."""
        proc = Proc("emq-green", [str(BIN / "emq-green"), *argv], self._log("green"),
                    env or self.env(), self.tmp)
        self.procs.append(proc)
        if wait_ack:
            proc.wait_for(r"ACK from ", timeout=20)
        return proc

    def jobmanager(self, argv: Sequence[str], env: Optional[dict[str, str]] = None) -> Proc:
        """Start EventMQ's own ``emq-jobmanager argv``."""
        proc = Proc("emq-jobmanager", [str(BIN / "emq-jobmanager"), *argv],
                    self._log("jobmanager"), env or self.env(), self.tmp)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.tail(25) for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


class Client:
    """EventMQ's own client: a :class:`eventmq.sender.Sender` on the frontend."""

    def __init__(self, frontend: str) -> None:
        from eventmq.sender import Sender

        self.sender = Sender()
        # EventMQ's Sender sends with NOBLOCK and silently drops the message
        # when ZeroMQ's send queue is full (SNDHWM, 1000 by default): a burst
        # of jobs to a busy router loses some. No limit: nothing is dropped.
        self.sender.zsocket.setsockopt(zmq.SNDHWM, 0)
        self.sender.connect(frontend)

    def defer(self, func: object, *args: object, queue: Optional[str] = None,
              reply_requested: bool = False, timeout: int = 0) -> str:
        from eventmq.client.messages import defer_job

        msgid = defer_job(self.sender, func, args=args, queue=queue,
                          reply_requested=reply_requested, timeout=timeout)
        assert msgid, f"defer_job refused {func!r}"
        self.drain()
        return msgid

    def drain(self) -> int:
        """Read the router's acknowledgements. The router's frontend is a
        ROUTER_MANDATORY socket: a client that never reads would fill its
        queue and make the router's send fail."""
        n = 0
        while True:
            try:
                self.sender.zsocket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            n += 1

    def close(self) -> None:
        self.sender.zsocket.close(linger=2000)


def green_argv(addrs: RouterAddrs, jobs: int, name: str, *extra: str,
               queues_json: Optional[str] = None) -> list[str]:
    """emq-green's command line for a worker of ``addrs``' router."""
    argv = ["-B", addrs.backend, "-J", str(jobs), "-n", name]
    if queues_json is not None:
        argv += ["--queues-json", queues_json]
    return argv + list(extra)


def recv_from_client(sock: Any) -> list[bytes]:
    """The next message a client sent to ``sock`` (a ROUTER: identity
    first), skipping the flush probes (``HEARTBEAT [time, "flush"]``) an
    emq-green client sends on each new socket and when it closes."""
    while True:
        frames = sock.recv_multipart()
        if not (len(frames) == 7 and frames[3] == b"HEARTBEAT" and frames[6] == b"flush"):
            return frames


class GreenRouterProc(Proc):
    """``emq-green-router`` on ``addrs`` (``extra`` flags after them), waited
    for until it listens; started again while the kernel still holds a port
    of a router just gone ("Address already in use"), for up to 15 s."""

    def __init__(self, peers: Peers, addrs: RouterAddrs, *extra: str) -> None:
        self.addrs = addrs
        deadline = time.monotonic() + 15
        while True:
            peers._n += 1
            super().__init__("emq-green-router", [
                str(BIN / "emq-green-router"), "--frontend-addr", addrs.frontend,
                "--backend-addr", addrs.backend, "--administrative-addr", addrs.admin,
                *extra], peers.tmp / f"{peers._n:02d}-router.log", peers.env(), peers.tmp)
            peers.procs.append(self)
            try:
                self.wait_for(r"router listening", timeout=20)
                return
            except AssertionError:
                if "Address already in use" not in self.tail() or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # retry interval
