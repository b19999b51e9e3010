"""The client, and the router with real EventMQ 0.3.13 peers.

* EventMQ's client -> ``emq-green-router`` -> EventMQ's ``emq-jobmanager``;
* emq-green's client -> EventMQ's ``emq-router`` -> ``emq-green``;
* emq-green's client from many greenlets at once, against the in-process router.

Peers are real processes on free loopback ports, killed in teardown. Jobs
(``examples.jobs.mark``) append a line to a file; a test waits for the lines,
with a deadline.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import jobs_for_tests as J
import pytest
import zmq
from peers import free_ports, recv_from_client  # noqa: F401 (free_ports: other files too)

import emq_green.client as emq_client
from emq_green.client import Client, ResultHandle, callable_path, job
from emq_green.client.submit import admin_request
from emq_green.protocol import Command, RunRequest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # poll interval


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class Stack:
    """Processes on three free ports; everything is killed in :meth:`close`."""

    def __init__(self, tmp: Path) -> None:
        front, back, admin = free_ports(3)
        self.front = f"tcp://127.0.0.1:{front}"
        self.back = f"tcp://127.0.0.1:{back}"
        self.admin = f"tcp://127.0.0.1:{admin}"
        self.tmp = tmp
        (tmp / "empty.conf").write_text("")
        self.env = dict(os.environ, PYTHONPATH=str(REPO),
                        EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"))
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def spawn(self, name: str, command: list[str], **env: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, env=dict(self.env, **env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _p, log in self.procs)

    def wait_for_worker(self, timeout: float = 20.0, slots: int = 1) -> dict:
        found: dict = {}

        def ready() -> bool:
            shown = admin_request(self.admin, Command.ROUTER_SHOW_WORKERS)
            if shown:
                found.update(shown)
            return bool(shown) and any(
                w["available_slots"] >= slots for w in shown["connected_workers"].values())

        try:
            wait_until(ready, timeout, f"a worker with {slots} free slot(s)")
        except AssertionError:
            raise AssertionError(self.logs()) from None
        return found

    def close(self) -> None:
        for proc, _log in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.timeout(90)
def test_eventmq_client_to_green_router_to_eventmq_jobmanager(stack: Stack, tmp_path: Path):
    from eventmq.client.messages import defer_job
    from eventmq.sender import Sender

    router = stack.spawn("router", [str(BIN / "emq-green-router"),
                                    "--frontend-addr", stack.front,
                                    "--backend-addr", stack.back,
                                    "--administrative-addr", stack.admin])
    stack.spawn("emq-jobmanager", [str(BIN / "emq-jobmanager"), "-B", stack.back, "-J", "2"])
    shown = stack.wait_for_worker()
    assert shown["connected_queues"]["default"][0][0] == 10

    marks = tmp_path / "marks"
    sender = Sender()
    sender.connect(stack.front)
    for i in range(6):
        queue = "nobody-serves-this" if i == 5 else "default"
        assert defer_job(sender, "examples.jobs.mark", args=[str(marks), f"job{i}"],
                         queue=queue)
    wait_until(lambda: len(lines(marks)) == 6, 30, "six jobs run by emq-jobmanager")
    assert {line.split()[0] for line in lines(marks)} == {f"job{i}" for i in range(6)}
    sender.zsocket.close(linger=0)

    status = admin_request(stack.admin, Command.STATUS)
    assert sum(status["processed_messages_by_queue"].values()) == 6
    router.send_signal(signal.SIGTERM)
    assert router.wait(timeout=10) == 0


@pytest.mark.timeout(90)
def test_green_client_to_eventmq_router_to_green_worker(stack: Stack, tmp_path: Path):
    stack.spawn("emq-router", [str(BIN / "emq-router")],
                EVENTMQ_FRONTEND_ADDR=stack.front, EVENTMQ_BACKEND_ADDR=stack.back,
                EVENTMQ_ADMINISTRATIVE_ADDR=stack.admin)
    stack.spawn("emq-green", [str(BIN / "emq-green"), "-B", stack.back, "-J", "8",
                              "-Q", "default", "mail:20"])
    stack.wait_for_worker(slots=8)  # then every job is handed over at once, and acknowledged

    marks = tmp_path / "marks"
    with Client(stack.front, green=False) as client:
        for i in range(4):
            client.defer_job("examples.jobs.mark", [str(marks), f"plain{i}"])
        client.defer_job("examples.jobs.mark", [str(marks), "mail"], queue="mail",
                         reply_requested=True, timeout=30)
        wait_until(lambda: len(lines(marks)) == 5, 30, "five jobs run by emq-green")
        wait_until(lambda: client.poll_acks() == 5, 10, "five acknowledgements")
    assert {line.split()[0] for line in lines(marks)} == {*(f"plain{i}" for i in range(4)),
                                                         "mail"}


@pytest.mark.timeout(90)
def test_sighup_reloaded_worker_takes_jobs_at_once_behind_green_router(stack: Stack,
                                                                       tmp_path: Path):
    """emq-green's router drops a worker's unused READYs with its KBYE, as
    EventMQ's does: after SIGHUP, the new identity is offered every slot at
    once, not after heartbeat_timeout (60 s here) of quiet on the old one."""
    stack.spawn("router", [str(BIN / "emq-green-router"), "--frontend-addr", stack.front,
                           "--backend-addr", stack.back, "--administrative-addr", stack.admin])
    worker = stack.spawn("emq-green", [str(BIN / "emq-green"), "-B", stack.back, "-J", "3"],
                         EVENTMQ_HEARTBEAT_TIMEOUT="60")
    [first] = stack.wait_for_worker(slots=3)["connected_workers"]
    worker.send_signal(signal.SIGHUP)

    def new_identity() -> bool:
        shown = admin_request(stack.admin, Command.ROUTER_SHOW_WORKERS) or {}
        workers = shown.get("connected_workers", {})
        return first not in workers and any(w["available_slots"] == 3
                                            for w in workers.values())

    wait_until(new_identity, 15, "the reloaded worker's new identity with its 3 slots")
    with Client(stack.front, green=False) as client:
        handles = [client.defer_job("examples.jobs.mark", [str(tmp_path / "marks"), f"j{n}"],
                                    result=True) for n in range(6)]
        try:
            assert [h.get(timeout=15) for h in handles] == [f"j{n}" for n in range(6)]
        except Exception:
            raise AssertionError(stack.logs()) from None
    assert sorted(line.split()[0] for line in lines(tmp_path / "marks")) == [
        f"j{n}" for n in range(6)]


@pytest.mark.timeout(60)
def test_client_from_many_greenlets_shares_no_socket_and_opens_few():
    """50 greenlets share one client while the router is not there yet:
    every socket's queue reaches its high-water mark and its sender waits.
    When the router comes up, every request arrives whole and once, and the
    client opened at most one socket per concurrent user."""
    import gevent

    from emq_green.router import Router
    from emq_green.settings import Settings

    users, per_user, hwm = 50, 10, 2
    total = users * per_user
    [port] = free_ports(1)
    frontend = f"tcp://127.0.0.1:{port}"
    client = Client(frontend, green=True, max_idle=4, hwm=hwm)
    sent: list[str] = []

    def user(n: int) -> None:
        for i in range(per_user):
            sent.append(client.defer_job("os.getpid", [], {"n": n, "i": i}))

    greenlets = [gevent.spawn(user, n) for n in range(users)]
    router = None
    try:
        # nobody listens yet: each socket takes about hwm requests, then its
        # sender waits (the count stops moving; deadline bounded)
        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + 20
        while time.monotonic() - stable_since < 0.5:
            assert time.monotonic() < deadline, "the senders never came to rest"
            if client.sent != last:
                last, stable_since = client.sent, time.monotonic()
            gevent.sleep(0.02)  # poll interval
        assert 0 < client.sent < total, client.sent  # HWM reached: users are waiting
        assert not any(g.dead for g in greenlets)

        router = Router(settings=Settings(frontend_addr=frontend, backend_addr="tcp://127.0.0.1:*",
                                          administrative_addr="tcp://127.0.0.1:*",
                                          hwm=total * 2))
        router.start()
        gevent.joinall(greenlets, timeout=30, raise_error=True)
        assert all(g.dead for g in greenlets) and client.sent == total
        deadline = time.monotonic() + 20
        while len(router.waiting.get("default", ())) < total:
            assert time.monotonic() < deadline, len(router.waiting.get("default", ()))
            gevent.sleep(0.01)  # poll interval
        waiting = list(router.waiting["default"])
        assert router.counters["malformed_messages"] == 0  # no interleaved frames
        assert sorted(r.msgid for r in waiting) == sorted(sent)  # each once
        pairs = sorted((RunRequest.parse(r.body[2]).kwargs["n"],
                        RunRequest.parse(r.body[2]).kwargs["i"]) for r in waiting)
        assert pairs == [(n, i) for n in range(users) for i in range(per_user)]
        sockets = {r.client for r in waiting}
        assert len(sockets) <= users, len(sockets)  # one per concurrent user at most
    finally:
        gevent.killall(greenlets, timeout=5)
        client.close()
        if router is not None:
            assert router.stop(timeout=5)


def test_defer_job_payload_matches_eventmq():
    """EventMQ's client and ours send to one bound ROUTER socket; the frames
    it receives are compared."""
    import eventmq.client.messages as emq_messages
    from eventmq.sender import Sender

    context = zmq.Context.instance()
    sink = context.socket(zmq.ROUTER)
    sink.setsockopt(zmq.LINGER, 0)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    addr = f"tcp://127.0.0.1:{port}"

    def receive() -> list[bytes]:
        assert sink.poll(10000), "nothing arrived within 10 s"
        return recv_from_client(sink)[1:]  # without the sender's identity

    sender = Sender()
    client = Client(addr, green=False)
    try:
        sender.connect(addr)
        assert emq_messages.defer_job(sender, "examples.jobs.mark", args=[1, "a"],
                                      kwargs={"k": 2}, reply_requested=True, retry_count=2,
                                      timeout=30, queue="mail")
        theirs = receive()
        msgid = client.defer_job("examples.jobs.mark", [1, "a"], {"k": 2},
                                 reply_requested=True, retry_count=2, timeout=30,
                                 queue="mail")
        ours = receive()
    finally:
        sender.zsocket.close(linger=0)
        client.close()
        sink.close()
    # the raw frames, not what our parser makes of them: an extra frame, an
    # extra header or an extra key anywhere in the JSON would show here
    assert len(ours) == len(theirs) == 7, (ours, theirs)
    empty, protocol, command, msgid_frame, queue, headers, payload = ours
    assert [empty, protocol, command] == theirs[:3] == [b"", b"eMQP/1.0", b"REQUEST"]
    assert msgid_frame == msgid.encode() and theirs[3] != msgid_frame  # differ by design
    assert queue == theirs[4] == b"mail"
    assert sorted(headers.split(b",")) == sorted(theirs[5].split(b",")) == [
        b"reply-requested", b"retry-count:2", b"timeout:30"]
    assert_same_json(json.loads(payload), json.loads(theirs[6]), "payload")
    # and both parse to the same request
    assert RunRequest.parse(payload.decode()) == RunRequest.parse(theirs[6].decode())


def assert_same_json(ours: object, theirs: object, where: str) -> None:
    """Equal JSON values, compared key by key (and item by item) so that a
    difference is named by its path; the same types too (1 is not 1.0)."""
    assert type(ours) is type(theirs), f"{where}: {ours!r} (ours) vs {theirs!r} (EventMQ)"
    if isinstance(ours, dict):
        assert sorted(ours) == sorted(theirs), \
            f"{where}: keys {sorted(ours)} (ours) vs {sorted(theirs)} (EventMQ)"
        for key in ours:
            assert_same_json(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), f"{where}: {ours!r} (ours) vs {theirs!r} (EventMQ)"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_json(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} (ours) vs {theirs!r} (EventMQ)"


def test_defer_job_subprocess_option_and_callable_paths():
    assert callable_path("a.b.c") == ("a.b", "c")
    assert callable_path(os.getpid) == ("posix", "getpid")
    assert callable_path(Client("tcp://127.0.0.1:1", green=False).close) == (
        "emq_green.client.api:Client", "close")
    with pytest.raises(ValueError):
        callable_path("nodots")
    with pytest.raises(ValueError):
        callable_path(lambda: None)
    from jobs_for_tests import module_lambda

    with pytest.raises(ValueError, match="not importable"):
        callable_path(module_lambda)  # it was sent as callable "<lambda>"
    run = RunRequest(path="m", callable="f", subprocess=True)
    assert json.loads(run.payload())[1]["subprocess"] is True


@pytest.mark.parametrize("every", [0.5, 1.5, 0, -3, float("nan"), True])
def test_a_fractional_or_short_interval_is_refused_not_rounded(every):
    from emq_green.client import schedule
    from emq_green.client.submit import main as submit_main

    client = Client("tcp://127.0.0.1:1", green=False)
    try:
        with pytest.raises(ValueError, match="whole number of seconds"):
            schedule("os.getpid", every=every, client=client)
    finally:
        client.close()
    assert client.sent == 0
    with pytest.raises(SystemExit) as exited:
        submit_main(["os.getpid", "--every", str(every), "-a", "tcp://127.0.0.1:1"],
                    out=io.StringIO())
    assert exited.value.code == 2


def test_job_decorator_runs_synchronously_without_broker(monkeypatch):
    monkeypatch.delenv("EMQ_BROKER_ADDR", raising=False)

    @job(queue="mail")
    def add(a, b):
        return a + b

    assert add(1, 2) == 3
    assert add.delay(2, 3) == 5


def module_level_job(path: str, tag: str) -> str:
    return tag


def test_job_decorator_defers_with_broker_addr(monkeypatch):
    import gevent

    from emq_green.router import Router
    from emq_green.settings import Settings

    any_port = "tcp://127.0.0.1:*"
    router = Router(settings=Settings(frontend_addr=any_port, backend_addr=any_port,
                                      administrative_addr=any_port))
    router.start()
    try:
        monkeypatch.setenv("EMQ_BROKER_ADDR", router.endpoints["frontend"])
        decorated = job(module_level_job, queue="files")
        msgid = decorated.delay("/nonexistent", "tag")
        assert isinstance(msgid, str)
        deadline = time.monotonic() + 5
        while not router.waiting and time.monotonic() < deadline:
            gevent.sleep(0.01)  # poll interval
        (request,) = router.waiting["default"]  # no worker serves "files" -> default
        assert request.msgid == msgid and request.queue == "files"
        assert RunRequest.parse(request.body[2]).name == f"{__name__}.module_level_job"
    finally:
        assert router.stop(timeout=5)


@pytest.mark.parametrize("options, error, says", [
    ({"timeout": -1}, ValueError, "timeout must be a finite"),
    ({"timeout": float("inf")}, ValueError, "timeout must be a finite"),
    ({"timeout": float("nan")}, ValueError, "timeout must be a finite"),
    ({"timeout": "5"}, TypeError, "timeout must be a number"),
    ({"retry_count": 101}, ValueError, "retry_count must be 0 to 100"),
    ({"retry_count": 1.5}, TypeError, "retry_count must be an int"),
    ({"queue": 5}, TypeError, "queue must be a non-empty str"),
    ({"args": 5}, TypeError, "args must be a list or tuple"),
    ({"kwargs": "x"}, TypeError, "kwargs must be a dict"),
    ({"args": ["y" * (17 * 1024 * 1024)]}, ValueError, "max_message_size"),
])
def test_options_a_worker_or_router_would_drop_are_refused_at_the_call(options, error, says):
    """A probe's find: a job with timeout=-1 or retry_count=101, sent
    without a reply asked, was dropped by the worker and the caller never
    knew; a request over the router's max_message_size vanished with the
    connection; bad types failed deep inside. Refused at the call now, the
    argument named; nothing is sent (the address has no router)."""
    with Client("tcp://127.0.0.1:1") as client:
        with pytest.raises(error, match=says):
            client.defer_job("jobs_for_tests.add", **{"args": [1, 2], **options})
        assert client.sent == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call, error, says", [
    (lambda: Client("tcp://127.0.0.1:1", hwm="x"), TypeError, "hwm must be an int"),
    (lambda: Client("tcp://127.0.0.1:1", max_idle=1.5), TypeError, "max_idle must be an int"),
    (lambda: Client("tcp://127.0.0.1:1", linger="x"), TypeError, "linger must be a number"),
    (lambda: Client("tcp://127.0.0.1:1", linger=-1), ValueError, "linger must be a finite"),
    (lambda: Client("tcp://127.0.0.1:1", send_timeout=float("nan")), ValueError,
     "send_timeout must be a finite"),
    (lambda: Client("tcp://127.0.0.1:1", confirm_timeout="5"), TypeError,
     "confirm_timeout must be a number or None"),
    (lambda: ResultHandle.completed("m", 1).get(timeout="1"), TypeError,
     "timeout must be a number or None"),
    (lambda: ResultHandle.completed("m", 1).get(timeout=-1), ValueError,
     "timeout must be a finite number from 0 to 2,147,483"),
    (lambda: emq_client.schedule("jobs_for_tests.add", every="5", addr="tcp://127.0.0.1:1"),
     TypeError, "every must be a number of seconds"),
    # too large for ZeroMQ's and gevent's millisecond C ints (a second probe:
    # confirm_timeout=1e12 sent the guaranteed job, then raised OverflowError;
    # hwm=2**31 made a Client no call could use)
    (lambda: Client("tcp://127.0.0.1:1", confirm_timeout=1e12), ValueError,
     "confirm_timeout must be a finite number from 0 to 2,147,483"),
    (lambda: Client("tcp://127.0.0.1:1", send_timeout=2**40), ValueError, "send_timeout"),
    (lambda: Client("tcp://127.0.0.1:1", hwm=2**31), ValueError, "hwm must be"),
    (lambda: Client("tcp://127.0.0.1:1", linger=1e12), ValueError, "linger must be"),
    (lambda: ResultHandle.completed("m", 1).get(timeout=1e12), ValueError, "timeout must be"),
    (lambda: emq_client.schedule("jobs_for_tests.add", cron=5, addr="tcp://127.0.0.1:1"),
     TypeError, "cron must be a str"),
    (lambda: emq_client.schedule("jobs_for_tests.add", every=60, queue=5,
                                 addr="tcp://127.0.0.1:1"), TypeError, "queue must be"),
    (lambda: emq_client.unschedule("jobs_for_tests.add", queue=5, addr="tcp://127.0.0.1:1"),
     TypeError, "queue must be"),
    (lambda: emq_client.schedule("jobs_for_tests.add", every=60, run_count="5",
                                 addr="tcp://127.0.0.1:1"), ValueError, "run_count must be"),
    (lambda: emq_client.schedule("jobs_for_tests.add", every=60, run_count=10**30,
                                 addr="tcp://127.0.0.1:1"), ValueError, "run_count must be"),
    (lambda: job(queue="q")(J.add).delay_for(None, 1, 2), ValueError, "delay_for needs"),
])
def test_the_clients_numbers_are_checked_at_the_call(call, error, says):
    """A probe's list: Client(hwm="x"), linger="x", get(timeout="1") failed
    with a TypeError deep in ZeroMQ or gevent, not naming the argument;
    get(timeout=-1) waited no time and said the result had not come
    (ResultTimeout). Each now raises at the call, the argument named."""
    with pytest.raises(error, match=says):
        call()
    assert emq_client.get_client("tcp://127.0.0.1:1").sent == 0  # nothing sent


def test_a_guaranteed_batch_window_is_checked():
    from emq_green.client.batch import GuaranteedBatch

    with Client("tcp://127.0.0.1:1", linger=0) as client:
        with pytest.raises(TypeError, match="window must be an int"):
            GuaranteedBatch(client, window="5")
        with pytest.raises(ValueError, match="window must be a finite number from 1 to"):
            GuaranteedBatch(client, window=0)
        assert client.sent == 0


@pytest.mark.timeout(60)
def test_a_client_used_after_a_fork_says_so_instead_of_hanging():
    """A probe's find: a Client made before os.fork() hung for ever in the
    child's first send, get(timeout=5) or not."""
    import os

    client = Client("tcp://127.0.0.1:1", linger=0)
    client.defer_job("jobs_for_tests.add", [1, 2])  # its sockets made, in this process
    pid = os.fork()
    if pid == 0:  # the child: exits 0 only on the plain refusal
        try:
            client.defer_job("jobs_for_tests.add", [1, 2])
        except RuntimeError as exc:
            os._exit(0 if "before a fork" in str(exc) else 2)
        except BaseException:
            os._exit(3)
        os._exit(4)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)  # (polling the child's exit, with the deadline above)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the child hung")
    client.close()
    assert os.waitstatus_to_exitcode(status) == 0

