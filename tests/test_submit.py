"""``emq-green-submit`` as a real process: what it says and how it exits
when the router address is bad, when nothing listens there, and when a
router is there but has no worker (its requests buffered, unacknowledged)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import Callable

import pytest
import zmq
from peers import BIN, Peers, clean_env, free_port, recv_from_client, require_eventmq, wait_until

from emq_green.protocol import Command, Message

SUBMIT = str(BIN / "emq-green-submit")


@contextlib.contextmanager
def stand_in_router(answer: Callable[[zmq.Socket, bytes, Message, int], None]):
    """A plain ROUTER in a thread: ``answer(socket, identity, request, n)``
    for each REQUEST (``n`` from 0); yields its port."""
    import threading

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    done = threading.Event()
    count = [0]

    def serve() -> None:
        while not done.is_set():
            if not router.poll(100):
                continue
            ident, *frames = router.recv_multipart()
            message = Message.parse(frames)
            if message.command is Command.REQUEST:
                answer(router, ident, message, count[0])
                count[0] += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        done.set()
        thread.join(5)
        router.close()
        context.term()


def submit(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run emq-green-submit; a hang fails the test after ``timeout`` s."""
    return subprocess.run([SUBMIT, *argv], capture_output=True, text=True, timeout=timeout,
                          env=clean_env())


@pytest.mark.timeout(40)
@pytest.mark.parametrize("addr", ["bogus", "tcp://127.0.0.1"])
def test_an_invalid_address_is_one_line_and_exit_2_at_once(addr):
    started = time.monotonic()
    out = submit("-a", addr, "some.callable")
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"emq-green-submit: invalid router address {addr!r}: " \
                         "Invalid argument\n"
    assert out.stdout == ""
    assert time.monotonic() - started < 10


@pytest.mark.timeout(40)
def test_no_router_listening_exits_1_and_sends_nothing():
    addr = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    out = submit("-a", addr, "some.callable", "--count", "3", "--connect-timeout", "1")
    assert out.returncode == 1, out.stderr
    assert out.stderr == (f"emq-green-submit: no router at {addr}: nothing answered within "
                          "1 s (no router listening there?); nothing sent\n")
    assert time.monotonic() - started < 10


@pytest.mark.timeout(40)
def test_a_failed_handshake_exits_1_naming_it():
    """A CURVE router and a plain client: the router is there but the
    handshake fails; said at once, not after the timeout."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = public, secret
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        started = time.monotonic()
        out = submit("-a", f"tcp://127.0.0.1:{port}", "some.callable",
                     "--connect-timeout", "15")
        assert out.returncode == 1, out.stderr
        assert "the ZeroMQ handshake failed" in out.stderr and "CURVE" in out.stderr
        assert out.stderr.count("\n") == 1
        assert time.monotonic() - started < 10
    finally:
        router.close()
        context.term()


@pytest.mark.timeout(60)
def test_a_router_without_workers_buffers_and_submit_exits_0(tmp_path):
    """EventMQ's router acknowledges only what it hands to a worker at once:
    with no worker nothing is acknowledged, yet the router holds the jobs."""
    require_eventmq()
    peers = Peers(tmp_path)
    try:
        router = peers.router()
        out = submit("-a", router.addrs.frontend, "some.callable", "--count", "3")
        assert out.returncode == 0, out.stderr
        assert "sent 3/3" in out.stderr and "acknowledged 0" in out.stderr
        wait_until(lambda: router.admin("STATUS")["waiting_messages_by_queue"] == {
            "default": 3}, 10, "the three jobs buffered by the router", details=router.tail)
    finally:
        peers.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("green", [False, True])
def test_the_client_api_raises_value_error_for_an_invalid_address_and_closes(green):
    """The socket ZeroMQ refused to connect was left open: ``close()``
    (``Context.term``) then waited for ever."""
    from emq_green.client import Client

    client = Client("tcp://127.0.0.1", green=green)
    with pytest.raises(ValueError, match="invalid router address 'tcp://127.0.0.1'"):
        client.defer_job("some.callable")
    with pytest.raises(ValueError, match="invalid router address"):
        client.defer_job("some.callable", result=True)
    with pytest.raises(ValueError, match="invalid router address"):
        client.wait_for_router(1)
    client.close()
    assert client.sent == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("green", [False, True])
def test_wait_for_router_returns_once_a_router_answers(green):
    from emq_green.client import Client, RouterUnreachable

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client(f"tcp://127.0.0.1:{port}", green=green) as client:
            client.wait_for_router(10)
            client.defer_job("some.callable")
            assert router.poll(10_000)
            assert recv_from_client(router)[3] == b"REQUEST"
        with Client(f"tcp://127.0.0.1:{free_port()}", green=green) as client:
            with pytest.raises(RouterUnreachable, match="nothing answered within 0.2 s"):
                client.wait_for_router(0.2)
    finally:
        router.close()
        context.term()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["--delay", "inf"], "argument --delay: 'inf' is not a finite number of seconds >= 0"),
    (["--delay", "-1"], "argument --delay: '-1' is not a finite number of seconds >= 0"),
    (["--delay", "5", "--wait"], "--wait needs jobs sent now: a delayed or scheduled job"),
    (["--every", "5", "--wait"], "--wait needs jobs sent now: a delayed or scheduled job"),
    (["--run-count", "3"], "--run-count and --nohaste go with --every or --cron"),
    (["--nohaste"], "--run-count and --nohaste go with --every or --cron"),
    (["--guarantee", "--confirm-timeout", "0"],
     "argument --confirm-timeout: '0': a number of seconds, more than 0"),
    (["--wait", "--wait-timeout", "-1"],
     "argument --wait-timeout: '-1': a number of seconds, more than 0"),
    (["--timeout", "-1"], "argument --timeout: '-1' is not a finite number of seconds >= 0"),
    (["--admin-addr", "bogus"],
     "--admin-addr: invalid router address 'bogus': Invalid argument"),
    # a probe's finds: the first sent a plain job, run once, and exited 0;
    # the second scheduled once and ignored --count
    (["--cron", ""], "--cron needs a cron text"),
    (["--every", "5", "--count", "3"], "--count goes with jobs sent now"),
    # a probe's: the router's bound in its text (0.01 s), and a "sent 0/1"
    # summary under the error
    (["--every", "1e12"], "argument --every: '1e12': a whole number of seconds, 1 to "
                          "315360000"),
    (["--delay", "1e10"], "argument --delay: '1e10': a delayed job runs at most ten years"),
])
def test_bad_options_are_refused_before_anything(args, message):
    """--delay inf was a traceback (OverflowError), and so was
    --confirm-timeout 0; --wait with a delay or a
    schedule was silently ignored, and so were --run-count and --nohaste
    without a schedule (one job sent). Nothing listens at the address: the
    refusal comes before any wait for a router."""
    started = time.monotonic()
    out = submit("-a", f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "30",
                 "some.callable", *args, timeout=40)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - started < 20  # not after the 30 s wait for a router


@pytest.mark.timeout(60)
def test_a_callable_name_no_worker_can_import_is_refused_before_connecting():
    """It was checked after the wait for a router (no router: "no router"
    after 5 s), and then printed a "sent 0/1" summary under its error."""
    started = time.monotonic()
    out = submit("-a", f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "30", "nodots",
                 timeout=40)
    assert out.returncode == 2, out.stderr
    assert out.stderr == ("emq-green-submit: callable 'nodots' needs an absolute dotted path, "
                          "like 'myapp.jobs.send_mail'\n")
    assert time.monotonic() - started < 20  # not after the 30 s wait for a router


@pytest.mark.timeout(60)
def test_a_guaranteed_job_not_confirmed_stops_the_sending_and_the_rest_is_reported():
    """A stand-in router confirms and answers the first two guaranteed jobs
    and never confirms the third (a router killed while it was on the
    wire): the two results are printed, the third gets a ConfirmTimeout
    line, the fourth is not sent, exit 1 (it was exit 2 with no result
    printed for the jobs that ran)."""
    import json

    requests: list[Message] = []

    def answer(router: zmq.Socket, ident: bytes, message: Message, n: int) -> None:
        requests.append(message)
        if n < 2:
            router.send_multipart([ident, *Message.new(Command.REPLY, message.msgid).frames()])
            reply = json.dumps({"value": n + 1})
            router.send_multipart([ident, *Message.new(Command.REPLY, reply,
                                                       message.msgid).frames()])

    with stand_in_router(answer) as port:
        out = submit("-a", f"tcp://127.0.0.1:{port}", "some.callable", "-n", "4",
                     "--guarantee", "--wait", "--confirm-timeout", "1", timeout=40)
    assert out.returncode == 1, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line.get("value") for line in lines[:2]] == [1, 2]
    assert lines[2]["job"] == 2 and lines[2]["error"]["type"] == "ConfirmTimeout"
    assert lines[2]["msgid"] == requests[2].msgid and len(lines) == 3
    assert len(requests) == 3  # the fourth never sent
    assert "the 1 job(s) after it not sent" in out.stderr and "Traceback" not in out.stderr


class _StoppingRouter:
    """A plain ROUTER in a thread that answers flush probes and stops
    reading after its first REQUEST (a router whose buffer filled, or that
    was stopped with SIGSTOP)."""

    def __init__(self) -> None:
        import threading

        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 10)
        self.addr = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.done = threading.Event()
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            if self.requests or not self.sock.poll(20):
                self.done.wait(0.02)
                continue
            ident, *frames = self.sock.recv_multipart()
            if len(frames) == 6 and frames[2] == b"HEARTBEAT" and frames[5] == b"flush":
                self.sock.send_multipart([ident, b"", b"eMQP/1.0", b"HEARTBEAT", b"a",
                                          frames[4], b"flush", frames[3]])
            elif len(frames) > 2 and frames[2] == b"REQUEST":
                self.requests += 1

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()
        self.context.term()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("count, said", [
    (20, "did not say within 1 s that it had read every request"),  # all queued, unread
    (200_000, "not sent within 1 s"),  # the queues full: it blocked for ever
])
def test_submit_exits_1_when_the_router_stops_reading(monkeypatch, count, said):
    """A router that answers flush probes and then reads nothing: submit
    printed 'sent N/N' and exited 0 with requests never read (2,221 of
    20,000 lost, a probe), and once the queues were full it blocked for
    ever. Now either is one clear line and exit 1, in bounded time."""
    import io

    from emq_green.client import submit as submit_module

    monkeypatch.setattr(submit_module, "FLUSH_TIMEOUT", 1.0)
    monkeypatch.setattr(submit_module, "SEND_TIMEOUT", 1.0)
    router = _StoppingRouter()
    try:
        out = io.StringIO()
        started = time.monotonic()
        rc = submit_module.main(["os.getpid", "-n", str(count), "-a", router.addr], out)
        text = out.getvalue()
        assert rc == 1 and said in text, text
        assert time.monotonic() - started < 20
        assert router.requests == 1
    finally:
        router.close()


@pytest.mark.timeout(60)
def test_guaranteed_jobs_sent_in_a_batch_and_not_confirmed_are_named_by_number():
    """A probe's find: after a router's death, ``--guarantee`` without
    ``--wait`` said only how many jobs were not confirmed, not which; the
    jobs to send again are now named by number (the number --tag-arg adds)."""
    def answer(router: zmq.Socket, ident: bytes, message: Message, n: int) -> None:
        if n not in (2, 3, 5):  # every job confirmed but the third, fourth and sixth
            router.send_multipart([ident, *Message.new(Command.REPLY, message.msgid).frames()])

    with stand_in_router(answer) as port:
        out = submit("-a", f"tcp://127.0.0.1:{port}", "some.callable", "-n", "8", "--tag-arg",
                     "--guarantee", "--confirm-timeout", "1", timeout=40)
    assert out.returncode == 1, out.stderr
    assert "sent 8/8" in out.stderr, out.stderr
    assert "not confirmed (they may or may not run): job(s) 2-3, 5; not sent: none" \
        in out.stderr, out.stderr
