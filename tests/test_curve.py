"""CURVE on real sockets: who gets in, who does not, and what they get.

Real processes (``emq-green-router``, ``emq-green``) and real clients on
loopback; the router's books (STATUS, ROUTER_SHOW_WORKERS, asked over CURVE
with an authorized key) and a job record file (``examples.jobs.mark``: tag,
pid, time) say what ran where. Refusals are waited for as events: the
router's counters (``curve_handshakes_refused`` from the ZAP handler,
``curve_handshakes_failed`` from its socket monitors) and log lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import zmq
import zmq.auth
from peers import Proc, clean_env, free_port, wait_until

from emq_green.client import Client, schedule
from emq_green.client.results import SendTimeoutError
from emq_green.client.submit import admin_request
from emq_green.curve import ClientCurve, CurveError, create_key_pair, fingerprint
from emq_green.protocol import Command, Message

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARK = "examples.jobs.mark"

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@dataclass
class Keys:
    dir: Path
    authorized: Path

    def secret(self, name: str) -> str:
        return str(self.dir / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def curve(self, name: str) -> ClientCurve:
        return ClientCurve.from_files(self.secret(name), self.public("router"))


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """router, worker, client (authorized), stranger (not authorized)."""
    made = Keys(tmp_path / "keys", tmp_path / "authorized")
    for name in ("router", "worker", "client", "stranger"):
        create_key_pair(str(made.dir), name)
    made.authorized.mkdir()
    for name in ("worker", "client"):
        shutil.copy(made.public(name), made.authorized)
    return made


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def admin(addr: str, command: Command, curve: Optional[ClientCurve],
          timeout: float = 3.0) -> Optional[dict]:
    """One administrative request over CURVE; the JSON answer, or None."""
    return admin_request(addr, command, timeout, curve.apply if curve is not None else None)


class CurveStack:
    """A CURVE router process and its peers on free ports; killed in :meth:`close`."""

    def __init__(self, tmp: Path, keys: Keys) -> None:
        self.tmp, self.keys = tmp, keys
        self.front, self.back, self.admin_addr = (
            f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
        self.marks = tmp / "marks"
        (tmp / "empty.conf").write_text("")
        self.env = clean_env(EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"),
                             PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
        self.procs: list[Proc] = []
        self.admin_curve = keys.curve("client")

    def spawn(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.tmp / f"{len(self.procs):02d}-{name}.log", self.env,
                    self.tmp)
        self.procs.append(proc)
        return proc

    def router(self, *extra: str) -> Proc:
        proc = self.spawn("router", [
            str(BIN / "emq-green-router"), "--frontend-addr", self.front,
            "--backend-addr", self.back, "--administrative-addr", self.admin_addr,
            "--curve-secret-key-file", self.keys.secret("router"),
            "--curve-authorized-keys", str(self.keys.authorized), *extra])
        proc.wait_for("router listening: .*CURVE required", timeout=20)
        return proc

    def standalone(self) -> Proc:
        """``emq-green --standalone -J 4`` with the router's keys, once its
        job manager is up (the in-process link needs no CURVE)."""
        proc = self.spawn("standalone", [
            str(BIN / "emq-green"), "--standalone", "-J", "4", "-n", "alone",
            "--frontend-addr", self.front, "--backend-addr", self.back,
            "--administrative-addr", self.admin_addr,
            "--curve-secret-key-file", self.keys.secret("router"),
            "--curve-authorized-keys", str(self.keys.authorized)])
        proc.wait_for("ACK from inproc://", timeout=20)
        return proc

    def worker(self, name: str, key: Optional[str], *extra: str) -> Proc:
        argv = [str(BIN / "emq-green"), "-B", self.back, "-J", "4", "-n", name,
                "--reconnect-timeout", "1", *extra]
        if key is not None:
            argv += ["--curve-secret-key-file", self.keys.secret(key),
                     "--curve-server-key-file", self.keys.public("router")]
        return self.spawn(name, argv)

    def status(self) -> dict:
        answer = admin(self.admin_addr, Command.STATUS, self.admin_curve)
        assert answer is not None, self.logs()
        return answer

    def workers(self) -> dict:
        answer = admin(self.admin_addr, Command.ROUTER_SHOW_WORKERS, self.admin_curve)
        assert answer is not None, self.logs()
        return answer["connected_workers"]

    def wait_status(self, what: str, predicate, timeout: float = 20) -> dict:
        found: dict = {}

        def check() -> bool:
            found.clear()
            found.update(self.status())
            return bool(predicate(found))

        wait_until(check, timeout, what, interval=0.05, details=self.logs)
        return found

    def logs(self) -> str:
        return "\n".join(p.tail(25) for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def stack(tmp_path: Path, keys: Keys) -> Iterator[CurveStack]:
    s = CurveStack(tmp_path, keys)
    try:
        yield s
    finally:
        s.close()


# ----------------------------------------------------------------------
# keys


@pytest.mark.timeout(30)
def test_keys_script_writes_zmq_auth_certificates(tmp_path: Path):
    out = subprocess.run([str(BIN / "emq-green-keys"), "--dir", str(tmp_path / "k"),
                          "alpha", "beta"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    for name in ("alpha", "beta"):
        public, none = zmq.auth.load_certificate(tmp_path / "k" / f"{name}.key")
        same, secret = zmq.auth.load_certificate(tmp_path / "k" / f"{name}.key_secret")
        assert none is None and secret is not None
        assert public == same and len(public) == 40 and len(secret) == 40
        # the secret key belongs to the public one
        assert zmq.curve_public(secret) == public
        assert fingerprint(public) in out.stdout
        mode = stat.S_IMODE(os.stat(tmp_path / "k" / f"{name}.key_secret").st_mode)
        assert mode == 0o600
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.startswith(".")]
    again = subprocess.run([str(BIN / "emq-green-keys"), "--dir", str(tmp_path / "k"),
                            "alpha"], capture_output=True, text=True, timeout=20)
    assert again.returncode == 1 and "exists" in again.stderr


# ----------------------------------------------------------------------
# who gets in


@pytest.mark.timeout(120)
def test_authorized_peers_get_jobs_through_and_strangers_get_nothing(stack: CurveStack):
    router = stack.router()
    stack.wait_status("STATUS over CURVE", lambda s: s["curve_authorized_keys"] == 2)
    marks = str(stack.marks)

    # clients: a plain one and one with an unlisted key send first; an
    # authorized worker is there to take anything that arrives
    good = stack.worker("good-worker", "worker")
    good.wait_for("ACK from ", timeout=20)
    before = stack.status()
    plain = Client(stack.front, green=False, linger=0, send_timeout=1)
    assert plain.curve is None
    stranger = Client(stack.front, green=False, linger=0, send_timeout=1,
                      curve=stack.keys.curve("stranger"))
    try:
        for i in range(3):
            # once the router has refused the handshake libzmq drops the
            # pipe for good: a send then cannot even be queued
            with contextlib.suppress(SendTimeoutError):
                plain.defer_job(MARK, [marks, f"plain-client-{i}"])
            with contextlib.suppress(SendTimeoutError):
                stranger.defer_job(MARK, [marks, f"stranger-client-{i}"])
        stack.wait_status(
            "the plain and the unlisted client refused at the handshake",
            lambda s: s["curve_handshakes_failed"] > before["curve_handshakes_failed"]
            and s["curve_handshakes_refused"] > before["curve_handshakes_refused"])
        router.wait_for(r"zap: CURVE handshake from 127\.0\.0\.1 refused: key "
                        + _re(fingerprint(stack.keys.curve("stranger").keys.public)))
        with Client(stack.front, green=False, curve_secret_key_file=stack.keys.secret("client"),
                    curve_server_key_file=stack.keys.public("router")) as client:
            for i in range(5):
                client.defer_job(MARK, [marks, f"good-client-{i}"])
            wait_until(lambda: len(lines(stack.marks)) >= 5, 30, "the authorized jobs",
                       details=stack.logs)
    finally:
        plain.close()
        stranger.close()
    assert sorted(tag for tag, *_ in lines(stack.marks)) == [f"good-client-{i}"
                                                              for i in range(5)]
    status = stack.status()
    assert sum(status["processed_messages_by_queue"].values()) == 5
    assert status["waiting_messages_by_queue"] == {}

    # workers: with the good worker gone, a plain worker and one with an
    # unlisted key try to join; jobs wait in the router for the good one
    good.signal(signal.SIGTERM)
    assert good.wait_exit(30) == 0
    wait_until(lambda: not stack.workers(), 20, "the good worker to leave")
    before = stack.status()
    plain_worker = stack.worker("plain-worker", None)
    plain_worker.wait_for("connecting to ")
    metrics = f"127.0.0.1:{free_port()}"
    stranger_worker = stack.worker("stranger-worker", "stranger", "--metrics-addr", metrics)
    stranger_worker.wait_for("CURVE handshake with .* failed .*this key is not authorized")
    wait_until(lambda: _metric(metrics, "emq_green_curve_handshakes_failed_total") >= 1, 20,
               "the refusal in the worker's /metrics", details=stack.logs)
    stack.wait_status(
        "the plain and the unlisted worker refused at the handshake",
        lambda s: s["curve_handshakes_failed"] > before["curve_handshakes_failed"]
        and s["curve_handshakes_refused"] > before["curve_handshakes_refused"])
    # the plain one is dropped without a word: its log says what it may lack
    plain_worker.wait_for(r"no ACK from .*it needs curve_server_key_file here", timeout=30)
    with Client(stack.front, green=False, curve=stack.keys.curve("client")) as client:
        for i in range(4):
            client.defer_job(MARK, [marks, f"later-{i}"])
        stack.wait_status("four jobs buffered, no worker to take them",
                          lambda s: s["waiting_messages_by_queue"].get("default") == 4)
    assert stack.workers() == {}
    assert len(lines(stack.marks)) == 5

    again = stack.worker("good-worker-2", "worker")
    wait_until(lambda: len(lines(stack.marks)) == 9, 30, "the buffered jobs",
               details=stack.logs)
    pids = {pid for tag, pid, _t in lines(stack.marks) if tag.startswith("later-")}
    assert pids == {str(again.pid)}
    status = stack.status()
    assert set(status["processed_messages_by_worker"]) == {
        name for name in status["processed_messages_by_worker"]
        if name.startswith(("good-worker:", "good-worker-2:"))}
    assert list(stack.workers()) and all(name.startswith("good-worker-2:")
                                         for name in stack.workers())
    assert status["curve_handshakes_allowed"] >= 3


@pytest.mark.timeout(60)
def test_removed_key_is_refused_after_sighup(stack: CurveStack):
    router = stack.router()
    as_worker_key = stack.keys.curve("worker")
    assert admin(stack.admin_addr, Command.STATUS, stack.admin_curve) is not None

    os.remove(stack.keys.authorized / "client.key")
    mark = router.mark()
    router.signal(signal.SIGHUP)
    router.wait_for(r"zap: reloaded .*1 key\(s\), 0 added, 1 removed; removed "
                    + _re(fingerprint(stack.admin_curve.keys.public)), since=mark)
    refused = admin(stack.admin_addr, Command.STATUS, as_worker_key)["curve_handshakes_refused"]

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    stack.admin_curve.apply(sock)
    sock.connect(stack.admin_addr)
    try:
        sock.send_multipart(Message.new(Command.STATUS).frames())
        status = stack_status_with(stack, as_worker_key, "the removed key refused",
                                   lambda s: s["curve_handshakes_refused"] > refused)
        assert status["curve_authorized_keys"] == 1
        assert sock.poll(0) == 0  # the refused socket got no answer
    finally:
        sock.close()
    assert router.alive


def stack_status_with(stack: CurveStack, curve: ClientCurve, what: str, predicate) -> dict:
    found: dict = {}

    def check() -> bool:
        found.clear()
        found.update(admin(stack.admin_addr, Command.STATUS, curve) or {})
        return bool(found) and bool(predicate(found))

    wait_until(check, 20, what, details=stack.logs)
    return found


@pytest.mark.timeout(60)
def test_router_with_secret_key_and_no_authorized_dir_refuses_to_start(stack: CurveStack):
    for program, extra in (("emq-green-router", []), ("emq-green", ["--standalone"])):
        out = subprocess.run(
            [str(BIN / program), *extra, "--frontend-addr", stack.front,
             "--backend-addr", stack.back, "--administrative-addr", stack.admin_addr,
             "--curve-secret-key-file", stack.keys.secret("router")],
            capture_output=True, text=True, timeout=30, env=stack.env)
        # a setting to mend: 2, as every program says (it was 1 here, 2 in the worker)
        assert out.returncode == 2, (program, out.stderr)
        assert "curve_authorized_keys is not" in out.stderr, out.stderr
        assert "refusing to start" in out.stderr
    # half a client configuration is refused too, before connecting anywhere
    out = subprocess.run([str(BIN / "emq-green"), "-B", stack.back,
                          "--curve-secret-key-file", stack.keys.secret("worker")],
                         capture_output=True, text=True, timeout=30, env=stack.env)
    assert out.returncode == 2 and "curve_server_key_file" in out.stderr, out.stderr
    # a key file that is not there: the setting and its source are named
    out = subprocess.run([str(BIN / "emq-green-router")], capture_output=True, text=True,
                         timeout=30, env=dict(stack.env, EVENTMQ_CURVE_SECRET_KEY_FILE="/nope"))
    assert out.returncode == 2, out.stderr
    assert "curve_secret_key_file: bad value '/nope' from environment variable " \
           "EVENTMQ_CURVE_SECRET_KEY_FILE: no such file" in out.stderr, out.stderr


@pytest.mark.timeout(90)
def test_standalone_with_curve_runs_jobs_of_authorized_clients(stack: CurveStack):
    proc = stack.standalone()
    with Client(stack.front, green=False, curve=stack.keys.curve("client")) as client:
        for i in range(3):
            client.defer_job(MARK, [str(stack.marks), f"job-{i}"])
        wait_until(lambda: len(lines(stack.marks)) == 3, 30, "three jobs",
                   details=stack.logs)
    # emq-green-submit, keys from the environment, follows STATUS over CURVE
    out = subprocess.run(
        [str(BIN / "emq-green-submit"), MARK, "--args", json.dumps([str(stack.marks)]),
         "--tag-arg", "--count", "5", "--addr", stack.front, "--admin-addr",
         stack.admin_addr], capture_output=True, text=True, timeout=60,
        env=dict(stack.env, EVENTMQ_CURVE_SECRET_KEY_FILE=stack.keys.secret("client"),
                 EVENTMQ_CURVE_SERVER_KEY_FILE=stack.keys.public("router")))
    assert out.returncode == 0 and "every job has reached a worker" in out.stderr, out.stderr
    wait_until(lambda: len(lines(stack.marks)) == 8, 30, "the submitted jobs",
               details=stack.logs)
    assert {pid for _tag, pid, _t in lines(stack.marks)} == {str(proc.pid)}
    plain = subprocess.run(
        [str(BIN / "emq-green-submit"), MARK, "--args", json.dumps([str(stack.marks), "x"]),
         "--addr", stack.front, "--admin-addr", stack.admin_addr, "--wait-timeout", "1"],
        capture_output=True, text=True, timeout=60, env=stack.env)
    # a plain client is told at once that the router refused its handshake
    assert plain.returncode == 1 and "handshake failed" in plain.stderr, plain.stderr
    assert "nothing sent" in plain.stderr
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(30) == 0


# ----------------------------------------------------------------------
# the in-process router, and a pyzmq client configured by hand


@pytest.mark.timeout(30)
def test_hand_configured_pyzmq_client_and_reload_method(keys: Keys):
    import gevent
    import zmq.green as gzmq

    from emq_green.router import Router
    from emq_green.settings import Settings

    settings = Settings(frontend_addr="tcp://127.0.0.1:*", backend_addr="tcp://127.0.0.1:*",
                        administrative_addr="tcp://127.0.0.1:*", disable_heartbeats=True,
                        curve_secret_key_file=keys.secret("router"),
                        curve_authorized_keys=str(keys.authorized))
    router = Router(settings=settings)
    router.start()
    ctx = gzmq.Context()
    try:
        def socket(addr: str, name: str) -> gzmq.Socket:
            # by hand, as the pyzmq documentation shows: no emq_green helper
            public, secret = zmq.auth.load_certificate(keys.secret(name))
            server_public, _ = zmq.auth.load_certificate(keys.public("router"))
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_secretkey, sock.curve_publickey = secret, public
            sock.curve_serverkey = server_public
            sock.connect(addr)
            return sock

        def recv(sock: gzmq.Socket, timeout: float = 5) -> Message:
            with gevent.Timeout(timeout):
                while True:
                    message = Message.parse(sock.recv_multipart())
                    if message.command is not Command.HEARTBEAT:
                        return message

        worker = socket(router.endpoints["backend"], "worker")
        inform = Message.new(Command.INFORM, '[[10, "default"]]', "worker")
        worker.send_multipart(inform.frames())
        assert recv(worker).command is Command.ACK
        worker.send_multipart(Message.new(Command.READY).frames())
        client = socket(router.endpoints["frontend"], "client")
        request = Message.new(Command.REQUEST, "default", "", '["run", {}]')
        client.send_multipart(request.frames())
        got = recv(worker)
        assert (got.command, got.msgid) == (Command.REQUEST, request.msgid)
        ack = recv(client)
        assert (ack.command, ack.body) == (Command.REPLY, (request.msgid,))
        assert router.status()["curve_handshakes_allowed"] == 2

        os.remove(keys.authorized / "client.key")
        assert router.reload_authorized_keys() == 1
        late = socket(router.endpoints["frontend"], "client")
        late.send_multipart(Message.new(Command.REQUEST, "default", "", "[]").frames())
        with gevent.Timeout(5):
            while router.status()["curve_handshakes_refused"] < 1:
                gevent.sleep(0.01)  # poll interval
        assert late.poll(0) == 0 and router.processed_by_queue["default"] == 1
        for sock in (worker, client, late):
            sock.close()
    finally:
        router.stop()
        ctx.term()


@pytest.mark.timeout(30)
def test_plain_settings_stay_plain_and_bad_setups_are_refused(keys: Keys, tmp_path: Path,
                                                               monkeypatch):
    from emq_green.router import Router
    from emq_green.settings import Settings

    router = Router(settings=Settings(frontend_addr="tcp://127.0.0.1:*",
                                      backend_addr="tcp://127.0.0.1:*",
                                      administrative_addr="tcp://127.0.0.1:*"))
    router.start()
    try:
        assert router.zap is None
        assert not [k for k in router.status() if k.startswith("curve")]
        assert router.reload_authorized_keys() == 0
    finally:
        router.stop()
    assert Client("tcp://127.0.0.1:1", green=False).curve is None

    # (load_settings swaps os.environ, which upsets setproctitle later: not here)
    with pytest.raises(CurveError, match="no secret key"):
        ClientCurve.from_files(keys.public("client"), keys.public("router"))
    monkeypatch.setenv("EVENTMQ_CURVE_SECRET_KEY_FILE", keys.secret("client"))
    monkeypatch.setenv("EVENTMQ_CURVE_SERVER_KEY_FILE", keys.public("router"))
    shared = Client("tcp://127.0.0.1:1", green=False)
    assert shared.curve == keys.curve("client")
    shared.close()


def _re(text: str) -> str:
    import re

    return re.escape(text)


def _metric(addr: str, name: str) -> float:
    """One sample of the worker's /metrics; -1 when it cannot be read yet."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return -1


@pytest.mark.timeout(90)
def test_results_come_back_over_curve(stack: CurveStack):
    """The result channel (a socket of its own) speaks CURVE with the
    client's keys: results come back; a plain client's never do."""
    proc = stack.standalone()
    for green in (False, True):
        with Client(stack.front, green=green, curve=stack.keys.curve("client")) as client:
            handles = [client.defer_job("jobs_for_tests.add", [i, 1], result=True)
                       for i in range(5)]
            assert [h.get(timeout=20) for h in handles] == [1, 2, 3, 4, 5]
    # A plain client's REQUEST is queued while the handshake is still under
    # way, or, once the router has refused it, cannot be queued at all
    # (libzmq drops the pipe and does not reconnect): SendTimeoutError then,
    # ResultTimeout otherwise. Both are TimeoutErrors; no result comes.
    with Client(stack.front, green=False, send_timeout=2) as plain:
        with pytest.raises(TimeoutError):
            plain.defer_job("jobs_for_tests.add", [1, 1], result=True).get(timeout=2)
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(30) == 0


def test_emq_green_scheduler_connects_over_curve(stack: CurveStack):
    """emq-green-scheduler takes the client's CURVE settings: a CURVE
    router's periodic jobs need it (it connected in plain text before)."""
    stack.router()
    stack.worker("w", "worker").wait_for("ACK from ", timeout=20)
    keyed = ["--curve-secret-key-file", stack.keys.secret("client"),
             "--curve-server-key-file", stack.keys.public("router")]
    scheduler = stack.spawn("scheduler", [
        str(BIN / "emq-green-scheduler"), "--scheduler-addr", stack.front,
        "--scheduler-file", "", *keyed])
    scheduler.wait_for("scheduler: connected", timeout=20)
    with Client(stack.front, green=False, curve=stack.keys.curve("client")) as client:
        schedule(MARK, [str(stack.marks), "tick"], every=1, client=client)
        wait_until(lambda: len(lines(stack.marks)) >= 2, 30, "two scheduled runs",
                   details=stack.logs)
    assert {tag for tag, *_ in lines(stack.marks)} == {"tick"}
    scheduler.signal(signal.SIGTERM)
    assert scheduler.wait_exit(20) == 0
    # half a configuration is refused at start, not tried in plain text
    half = subprocess.run([str(BIN / "emq-green-scheduler"), "--scheduler-addr", stack.front,
                           "--scheduler-file", "", *keyed[:2]],
                          capture_output=True, text=True, timeout=20, env=stack.env)
    assert half.returncode == 2 and "curve_server_key_file" in half.stderr, half.stderr


@pytest.mark.timeout(20)
def test_a_flood_of_refused_handshakes_is_logged_a_burst_at_a_time(keys: Keys, caplog):
    """Each refusal was one WARNING: a peer could fill the router's disk."""
    import logging

    from emq_green.router.zap import ZapHandler

    zap = ZapHandler(context=zmq.Context.instance(), authorized_keys=str(keys.authorized))
    stranger = os.urandom(32)
    request = [b"1.0", b"1", b"global", b"127.0.0.1", b"", b"CURVE", stranger]
    with caplog.at_level(logging.WARNING, logger="emq_green.router.zap"):
        answers = [zap.answer(request) for _ in range(1000)]
    assert all(a[2] == b"400" for a in answers) and zap.counters["refused"] == 1000
    logged = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(logged) <= 100


@pytest.mark.timeout(20)
def test_the_summary_of_a_burst_of_refusals_comes_once_it_is_quiet(keys: Keys, caplog):
    """It waited for the next refusal, which may never come."""
    import logging

    import gevent
    import zmq.green

    from emq_green.router.zap import ZAP_ENDPOINT, ZapHandler

    context = zmq.green.Context()
    zap = ZapHandler(context=context, authorized_keys=str(keys.authorized))
    zap._log.window = 0.3
    zap.start()
    asker = context.socket(zmq.REQ)
    try:
        asker.connect(ZAP_ENDPOINT)
        with caplog.at_level(logging.WARNING, logger="emq_green.router.zap"):
            for i in range(150):
                asker.send_multipart([b"1.0", str(i).encode(), b"global", b"127.0.0.1",
                                      b"", b"CURVE", os.urandom(32)])
                assert asker.recv_multipart()[2] == b"400"
            deadline = time.monotonic() + 5
            while not any("one by one" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "no summary line"
                gevent.sleep(0.05)  # the handler's greenlet runs meanwhile
        assert zap.counters["refused"] == 150
        summary = [r.getMessage() for r in caplog.records if "one by one" in r.getMessage()]
        assert len(summary) == 1 and "{'refused': 50}" in summary[0]
    finally:
        asker.close(linger=0)
        zap.stop()
        context.term()


@pytest.mark.timeout(60)
def test_a_key_file_with_a_bad_or_mixed_key_is_refused_at_the_start(keys: Keys, tmp_path: Path,
                                                                    caplog):
    """A probe: a certificate with one character of a key cut (or a
    character Z85 has not) passed the start's checks, and ZeroMQ refused it
    later: a traceback in every program, and emq-green-scheduler alive and
    never connected; a secret certificate with another pair's public key
    was refused only at the handshake, its hints pointing elsewhere; a
    secret key readable by all went unsaid."""
    import re

    secret = Path(keys.secret("client")).read_text()
    cut = tmp_path / "cut.key_secret"
    cut.write_text(re.sub(r'(secret-key = ".{39}).', r"\1", secret))
    tilde = tmp_path / "tilde.key_secret"
    tilde.write_text(re.sub(r'(secret-key = ").', r"\1~", secret))
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text(re.sub(r'public-key = ".{40}"', re.search(
        r'public-key = ".{40}"', Path(keys.public("stranger")).read_text()).group(0), secret))
    for bad, says in ((cut, "secret key is not a CURVE key"),
                      (tilde, "secret key is not a CURVE key"),
                      (mixed, "not the one of its secret key")):
        bad.chmod(0o600)
        with pytest.raises(CurveError, match=says):
            ClientCurve.from_files(str(bad), keys.public("router"))
    # 40 Z85 characters whose groups pass 2**32: a struct.error, a traceback (a probe)
    overflow = tmp_path / "overflow.key_secret"
    overflow.write_text(re.sub(r'(secret-key = ").{40}', r"\1" + "#" * 40, secret))
    overflow.chmod(0o600)
    with pytest.raises(CurveError, match="secret key is not a CURVE key"):
        ClientCurve.from_files(str(overflow), keys.public("router"))
    from emq_green.router.zap import read_authorized_keys

    (keys.authorized / "overflow.key").write_text(re.sub(
        r'(public-key = ").{40}', r"\1" + "#" * 40, Path(keys.public("stranger")).read_text()))
    assert len(read_authorized_keys(str(keys.authorized))) == 2  # skipped, the two kept
    assert "overflow.key skipped" in caplog.text
    short_public = tmp_path / "short.key"
    short_public.write_text(re.sub(r'(public-key = ".{39}).', r"\1",
                                   Path(keys.public("router")).read_text()))
    with pytest.raises(CurveError, match="public key is not a CURVE key"):
        ClientCurve.from_files(keys.secret("client"), str(short_public))
    # the scheduler says so and exits, instead of living on unconnected
    out = subprocess.run([str(BIN / "emq-green-scheduler"), "--scheduler-addr",
                          f"tcp://127.0.0.1:{free_port()}", "--scheduler-file", "",
                          "--curve-secret-key-file", str(cut),
                          "--curve-server-key-file", keys.public("router")],
                         capture_output=True, text=True, timeout=30, env=clean_env())
    assert out.returncode != 0 and "is not a CURVE key" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    # a secret key others can read: used, with a warning
    readable = tmp_path / "readable.key_secret"
    readable.write_text(secret)
    readable.chmod(0o644)
    ClientCurve.from_files(str(readable), keys.public("router"))
    assert "readable by other users (mode 644)" in caplog.text


def test_a_key_reload_names_the_keys_added_as_well_as_those_removed(keys: Keys, caplog):
    """A probe's nit: the reload line named removed keys only."""
    import logging

    import zmq.green

    from emq_green.router.zap import ZapHandler

    zap = ZapHandler(context=zmq.green.Context.instance(), authorized_keys=str(keys.authorized))
    os.remove(keys.authorized / "client.key")
    shutil.copy(keys.public("stranger"), keys.authorized)
    caplog.set_level(logging.INFO, logger="emq_green.router.zap")
    assert zap.reload() == 2
    stranger, client = (zmq.auth.load_certificate(keys.public(n))[0] for n in ("stranger",
                                                                              "client"))
    [line] = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
    assert "2 key(s), 1 added, 1 removed" in line
    assert f"added {fingerprint(stranger)}" in line and f"removed {fingerprint(client)}" in line


def test_a_secret_certificate_in_the_authorized_directory_is_warned_about(keys: Keys, caplog):
    """A probe's nit: a peer's secret certificate copied (as ``.key``) into
    the authorized directory counted as its public key without a word."""
    import logging

    from emq_green.router.zap import read_authorized_keys

    shutil.copy(keys.secret("stranger"), keys.authorized / "stranger.key")
    caplog.set_level(logging.WARNING, logger="emq_green.router.zap")
    found = read_authorized_keys(str(keys.authorized))
    assert len(found) == 3  # still counted: the peer is not locked out
    [line] = [r.getMessage() for r in caplog.records if "secret key too" in r.getMessage()]
    assert "stranger.key" in line
    assert not [r for r in caplog.records if "client.key" in r.getMessage()]
