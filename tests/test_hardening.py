"""A worker tried as a stranger or a careless client would: what may run,
what no input may wedge, what is never lost. Real sockets on loopback: the
fake router for the worker's own behaviour, the real router for reloads."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import gevent
import jobs_for_tests as J
import pytest
from conftest import stop_for_good
from test_client import BIN, lines, stack, wait_until
from test_metrics import Endpoint, http_get, sample

from emq_green.client import Client
from emq_green.jobmanager import JobManager, State
from emq_green.protocol import Command, RunRequest
from emq_green.router import Router
from emq_green.settings import Settings
from emq_green.worker import child as child_main
from emq_green.worker.metrics import MAX_SERIES
from emq_green.worker.subprocess_pool import SubprocessExtension

JOBS = "jobs_for_tests"
REPLY = "reply-requested"
ANY_PORT = "tcp://127.0.0.1:*"

__all__ = ["stack"]  # the fixture, shared with test_client


def raw_request(router, ident, msgid: bytes, *body: bytes) -> None:
    router.send_raw(ident, [b"", b"eMQP/1.0", b"REQUEST", msgid, *body])


def payload(path: str, name: str, *args, **options) -> str:
    return RunRequest(path=path, callable=name, args=tuple(args), **options).payload()


class Credit:
    """Sends as a real router does: one REQUEST per READY counted."""

    def __init__(self, router, ident: bytes) -> None:
        self.router, self.ident, self.sent = router, ident, 0

    def wait(self) -> None:
        self.router.wait_until(lambda: self.router.count(Command.READY) > self.sent)
        self.sent += 1

    def send(self, *body: str) -> str:
        self.wait()
        return self.router.send(self.ident, Command.REQUEST, *body)

    def request(self, *args, **kwargs) -> str:
        self.wait()
        return self.router.request(self.ident, *args, **kwargs)

    def raw(self, msgid: bytes, *body: bytes) -> None:
        self.wait()
        raw_request(self.router, self.ident, msgid, *body)


def settled(router, manager, readies: int) -> None:
    """Wait for exactly ``readies`` READYs in all, and no job in flight: a
    job run after everything else proves no READY is still on its way."""
    router.wait_count(Command.READY, readies - 1)
    ident = router.identities[-1]
    probe = router.request(ident, JOBS, "add", args=[20, 22], headers=REPLY)
    assert router.wait_reply(probe) == {"value": 42}
    router.wait_count(Command.READY, readies + 1)
    router.wait_until(lambda: not manager.jobs_in_flight)
    assert router.count(Command.READY) == readies + 1
    assert manager.free_slots == manager.concurrent_jobs


# ---------------------------------------------------------------------------
# what may run

def test_allowed_callables_refuse_before_anything_is_imported(
        router, make_manager, tmp_path, monkeypatch, caplog):
    marker = tmp_path / "imported"
    monkeypatch.setenv("EMQ_SIDE_EFFECT_FILE", str(marker))
    manager = make_manager(concurrent_jobs=2, allowed_callables=(f"{JOBS}.*",))
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    assert "allowed_callables is not set" not in caplog.text
    cases = [("os", "system", ["true"], {}), ("subprocess", "check_call", [["true"]], {}),
             ("builtins", "eval", ["1 + 1"], {}), ("side_effect_jobs", "run", [], {}),
             ("side_effect_jobs", "run", [], {"subprocess": True}),
             ("os", "system", ["true"], {"subprocess": True})]
    credit = Credit(router, ident)
    msgids = [credit.request(path, name, args=args, headers=REPLY, **opts)
              for path, name, args, opts in cases]
    for msgid, (path, name, _a, _o) in zip(msgids, cases):
        reply = router.wait_reply(msgid)
        assert reply["error"]["type"] == "CallableNotAllowed", reply
        assert f"{path}.{name} is not in allowed_callables" in reply["value"]
    assert not marker.exists() and "side_effect_jobs" not in sys.modules
    assert manager.counters["refused"] == len(cases)
    assert manager.status()["counters"]["refused"] == len(cases)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert all(any(m in w and "refused" in w for w in warnings) for m in msgids)
    settled(router, manager, 2 + len(cases))
    allowed = router.request(ident, JOBS, "add", args=[1, 2], headers=REPLY)
    assert router.wait_reply(allowed) == {"value": 3}


@pytest.mark.parametrize("path, name", [
    ("os", "_exit"), ("builtins", "__import__"), (f"{JOBS}:Greeter", "__init__"),
    (f"{JOBS}:_Hidden", "run"), ("__main__", "run"), ("os.path;rm -rf", "join"),
    ("os", "system\n"),
])
def test_private_and_dunder_names_are_always_refused(router, make_manager, caplog,
                                                     path, name):
    manager = make_manager(concurrent_jobs=1)  # allowed_callables unset: all else runs
    assert "allowed_callables is not set" in caplog.text
    ident = router.wait_inform()
    msgid = router.request(ident, path, name, headers=REPLY)
    reply = router.wait_reply(msgid)
    assert reply["error"]["type"] == "CallableNotAllowed", reply
    assert manager.counters["refused"] == 1
    settled(router, manager, 2)


def test_a_child_refuses_on_its_own(tmp_path):
    """The second lock: a subprocess child checks allowed_callables itself."""
    env = dict(os.environ, **{child_main.ENV_ALLOWED: json.dumps(["jobs_for_tests.*"]),
                              "EMQ_SIDE_EFFECT_FILE": str(tmp_path / "imported"),
                              "PYTHONPATH": os.pathsep.join(sys.path)})
    jobs = [payload("side_effect_jobs", "run"), payload(JOBS, "add", 2, 3)]
    lines = "".join(json.dumps({"payload": p, "retry_count": 0}) + "\n" for p in jobs)
    done = subprocess.run([sys.executable, "-m", "emq_green.worker.child"], input=lines,
                          capture_output=True, text=True, timeout=30, env=env)
    out = [json.loads(line) for line in done.stdout.splitlines()]
    results = [m for m in out if "status" in m]
    assert results[0]["error_type"] == "CallableNotAllowed"
    assert results[1]["status"] == "succeeded" and results[1]["value"] == 5
    assert not (tmp_path / "imported").exists()


# ---------------------------------------------------------------------------
# no input wedges a slot

def test_deeply_nested_payloads_lose_no_slot(router, make_manager):
    manager = make_manager(concurrent_jobs=4)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    credit = Credit(router, ident)
    deep = ('["run", {"path": "jobs_for_tests", "callable": "echo", "args": '
            + "[" * 100_000 + "]" * 100_000 + "}]")
    nested = [credit.send("default", REPLY, deep) for _ in range(8)]
    for msgid in nested:
        reply = router.wait_reply(msgid)
        assert reply["error"]["type"] == "InvalidRequest"
        assert "nested too deeply" in reply["value"]
    # nested as deep as the parser takes: it runs, and its reply says what went wrong
    ok_deep = credit.send("default", REPLY,
                          payload(JOBS, "echo", json.loads("[" * 500 + "]" * 500)))
    assert "value" in router.wait_reply(ok_deep)
    later = [credit.request(JOBS, "add", args=[i, 1], headers=REPLY) for i in range(20)]
    assert [router.wait_reply(m)["value"] for m in later] == [i + 1 for i in range(20)]
    settled(router, manager, 4 + 8 + 1 + 20)


@pytest.mark.parametrize("headers", [
    "reply-requested,timeout:nan", "reply-requested,timeout:inf",
    "reply-requested,timeout:-inf", "reply-requested,timeout:1e999",
    "reply-requested,timeout:-1", "reply-requested,retry-count:101",
    "reply-requested,retry-count:-1", "reply-requested,retry-count:" + "9" * 5000,
    "reply-requested" + ",timeout:1" * 7000,  # over 64 KiB: refused before it is split
])
def test_bad_timeouts_and_retry_counts_are_invalid_requests(router, make_manager, headers):
    manager = make_manager(concurrent_jobs=1, global_timeout=2)
    ident = router.wait_inform()
    msgid = router.request(ident, JOBS, "nap", args=[30], headers=headers)
    reply = router.wait_reply(msgid, timeout=5)
    assert reply["error"]["type"] == "InvalidRequest" and "bad header" in reply["value"]
    assert J.calls == {} and manager.counters["invalid_requests"] == 1
    settled(router, manager, 2)


def test_retry_count_at_the_cap_is_accepted(router, make_manager):
    manager = make_manager(concurrent_jobs=1)
    ident = router.wait_inform()
    msgid = router.request(ident, JOBS, "flaky", args=["cap", 100],
                           headers=f"{REPLY},retry-count:100")
    assert router.wait_reply(msgid) == {"value": 101}
    settled(router, manager, 2)


def test_a_msgid_already_in_flight_is_refused_and_the_first_job_finishes(
        router, make_manager):
    manager = make_manager(concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    body = [b"default", REPLY.encode(), payload(JOBS, "wait_gate", "dup").encode()]
    raw_request(router, ident, b"same-id", *body)
    router.wait_until(lambda: J.calls["wait_gate"] == 1)
    raw_request(router, ident, b"same-id", b"default", REPLY.encode(),
                payload(JOBS, "add", 1, 1).encode())
    router.wait_until(lambda: manager.counters["invalid_requests"] == 1)
    first = router.wait_until(lambda: [r for r in router.messages(Command.REPLY)])
    assert json.loads(first[0].message.body[0])["error"]["type"] == "InvalidRequest"
    assert list(manager.jobs_in_flight) == ["same-id"]
    J.gates["dup"].set()
    router.wait_until(lambda: router.count(Command.REPLY) == 2)
    assert json.loads(router.messages(Command.REPLY)[1].message.body[0]) == {"value": "dup"}
    assert J.calls["wait_gate"] == 1
    settled(router, manager, 2 + 2)


def test_non_utf8_in_any_frame_and_wrong_frame_counts_give_the_slot_back(
        router, make_manager, caplog):
    manager = make_manager(concurrent_jobs=3)
    ident = router.wait_inform()
    credit = Credit(router, ident)
    good = [b"default", REPLY.encode(), payload(JOBS, "add", 1, 1).encode()]
    for i in range(4):  # the msgid, queue, headers and payload frames in turn
        frames = [b"m%d" % i, *good]
        frames[i] = frames[i] + b"\xff\xfe"
        credit.raw(*frames)
    for count in (0, 1, 2, 4, 5):  # body frames: 3 are expected
        credit.raw(b"c%d" % count, *([REPLY.encode()] * count))
    evil = b"evil\n\x1b[2Jid"
    credit.raw(evil, b"default", REPLY.encode(), b"{nope")
    settled(router, manager, 3 + 4 + 5 + 1)
    assert manager.counters["invalid_requests"] == 4 + 5 + 1
    # replies where the headers could be read: every one an InvalidRequest
    replies = {r.message.body[1]: json.loads(r.message.body[0])
               for r in router.messages(Command.REPLY)}
    assert {"m1", "m3"} <= set(replies) and replies["m1"]["error"]["type"] == "InvalidRequest"
    assert replies["m0\\xff\\xfe"]["error"]["type"] == "InvalidRequest"
    # no control character from a peer reaches the log
    assert "evil\\n\\x1b[2Jid" in caplog.text and "\x1b" not in caplog.text


def test_messages_over_max_message_size_are_invalid_requests(router, make_manager):
    manager = make_manager(concurrent_jobs=1, max_message_size=1000)
    ident = router.wait_inform()
    # each frame under the limit (libzmq checks frames), the whole over it
    big = router.send(ident, Command.REQUEST, "default", REPLY + ",x-pad:" + "p" * 600,
                      payload(JOBS, "echo", "a" * 500))
    reply = router.wait_reply(big)
    assert reply["error"]["type"] == "InvalidRequest"
    assert "larger than max_message_size (1000 bytes)" in reply["value"]
    assert J.calls == {}
    settled(router, manager, 2)


def test_a_reply_over_max_message_size_becomes_an_error_reply(router, make_manager, caplog):
    # The router's MAXMSGSIZE would drop the connection for it: the reply and
    # the slot were lost, with no log line.
    manager = make_manager(concurrent_jobs=1, max_message_size=1000)
    ident = router.wait_inform()
    big = router.request(ident, JOBS, "repeat", args=["x", 2000], headers=REPLY)
    reply = router.wait_reply(big)
    assert reply["error"]["type"] == "ReplyTooLarge"
    assert "larger than max_message_size (1000 bytes)" in reply["value"]
    assert manager.counters["replies_too_large"] == 1
    assert "sent an error reply instead" in caplog.text
    fits = router.request(ident, JOBS, "repeat", args=["x", 500], headers=REPLY)
    assert router.wait_reply(fits) == {"value": "x" * 500}
    settled(router, manager, 3)


# ---------------------------------------------------------------------------
# bounded metrics

def _run_in_batches(router, ident, requests: list[tuple[str, str]], batch: int) -> None:
    for start in range(0, len(requests), batch):
        msgids = [router.request(ident, path, name, headers=REPLY)
                  for path, name in requests[start:start + batch]]
        router.wait_until(lambda: set(msgids) <= set(router.replies()),  # noqa: B023
                          timeout=30)


@pytest.mark.timeout(120)
def test_metrics_stay_small_whatever_names_clients_send(router, make_manager):
    manager = make_manager(concurrent_jobs=200, metrics_addr="127.0.0.1:0")
    endpoint = Endpoint(manager)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 200)
    unknown = [(f"no_such_module_{i}", "job") for i in range(3000)]
    _run_in_batches(router, ident, unknown, 200)
    text = http_get(endpoint.base + "/metrics").text
    assert len(text) < 20_000 and "no_such_module" not in text
    metrics = endpoint.metrics()
    assert sample(metrics, "emq_green_jobs_finished_total", callable="other",
                  queue="default", status="failed") == 3000
    # 3,000 callables that exist, some with long names: 64 series, the rest "other"
    real = [("many_callables", f"job_{i}_{'x' * (i % 120)}") for i in range(3000)]
    _run_in_batches(router, ident, real, 200)
    size = len(http_get(endpoint.base + "/metrics").content)
    assert size < 256 * 1024, size
    metrics = endpoint.metrics()
    named = {dict(labels)["callable"] for (name, labels) in metrics
             if name == "emq_green_jobs_started_total"}
    assert len(named) == MAX_SERIES and "other" in named  # "other" is one of them
    assert sum(v for (name, _l), v in metrics.items()
               if name == "emq_green_jobs_started_total") == 6000
    assert len(json.dumps(manager.status())) < 256 * 1024


# ---------------------------------------------------------------------------
# a child that cannot start

@pytest.fixture
def manager_with(router):
    made: list[JobManager] = []

    def make(extension: SubprocessExtension, **overrides) -> JobManager:
        settings = Settings(name="spawn-test", worker_addr=router.addr,
                            worker_addr_default=router.addr, worker_addr_failover=router.addr,
                            concurrent_jobs=2, kill_grace_period=5.0, heartbeat_interval=0.2,
                            heartbeat_timeout=0.5, **overrides)
        manager = JobManager(settings=settings, skip_signal=True, extensions=[extension])
        made.append(manager)
        manager.start()
        assert manager.wait_for_state(State.RUNNING, timeout=10)
        return manager

    yield make
    # conftest's pattern: every manager is stopped (or killed) before any
    # failure is reported, so none outlives the test
    stuck = [m.name for m in made if not stop_for_good(m)]
    if stuck:
        pytest.fail(f"manager(s) {stuck} did not stop within their deadline")


def test_a_child_that_cannot_be_spawned_fails_its_job_at_once(router, manager_with, tmp_path):
    manager = manager_with(SubprocessExtension(executable=str(tmp_path / "no-python")))
    ident = router.wait_inform()
    started = time.monotonic()
    credit = Credit(router, ident)
    msgids = [credit.request(JOBS, "add", args=[1, 2], headers=REPLY, subprocess=True)
              for _ in range(3)]
    for msgid in msgids:
        reply = router.wait_reply(msgid)
        assert reply["error"]["type"] == "ChildProcessError"
        assert "could not run in a subprocess child" in reply["value"]
    assert time.monotonic() - started < 5
    ok = router.request(ident, JOBS, "add", args=[2, 2], headers=REPLY)
    assert router.wait_reply(ok) == {"value": 4}
    settled(router, manager, 2 + 4)


def test_a_child_that_never_becomes_ready_fails_within_the_job_timeout(
        router, manager_with, tmp_path):
    hang = tmp_path / "hanging-python"
    hang.write_text("#!/bin/sh\nexec sleep 600\n")
    hang.chmod(0o755)
    manager = manager_with(SubprocessExtension(executable=str(hang)))
    ident = router.wait_inform()
    started = time.monotonic()
    msgid = router.request(ident, JOBS, "add", args=[1, 2], headers=f"{REPLY},timeout:1",
                           subprocess=True)
    reply = router.wait_reply(msgid, timeout=10)
    assert reply["error"]["type"] == "ChildProcessError"
    assert "ready within the job's timeout of 1 s" in reply["value"]
    assert time.monotonic() - started < 4
    settled(router, manager, 2 + 1)


# ---------------------------------------------------------------------------
# reloads lose nothing

@pytest.mark.timeout(120)
def test_jobs_streamed_through_three_reloads_all_run_once():
    """The real router: after the KBYE of a reload it forgets the worker, and
    REQUESTs it had already sent arrive on the old connection, which the
    worker keeps reading until the router is quiet."""
    J.reset()
    router = Router(settings=Settings(frontend_addr=ANY_PORT, backend_addr=ANY_PORT,
                                      administrative_addr=ANY_PORT, heartbeat_interval=0.2,
                                      heartbeat_timeout=1.0))
    router.start()
    backend = router.endpoints["backend"]
    manager = JobManager(settings=Settings(
        name="reloaded", worker_addr=backend, worker_addr_default=backend,
        worker_addr_failover=backend, concurrent_jobs=20, heartbeat_interval=0.2,
        heartbeat_timeout=1.0, reconnect_timeout=1.0), skip_signal=True)
    client = Client(router.endpoints["frontend"], green=True)
    try:
        manager.start()
        assert manager.wait_for_state(State.RUNNING, timeout=10)
        total = 4000
        for i in range(total):
            client.defer_job(f"{JOBS}.tag", [str(i)])
            if i % 1000 == 999 and i < total - 1:
                connections = manager.counters["connections"]
                manager.reload()
                deadline = time.monotonic() + 10
                while manager.counters["connections"] == connections:
                    assert time.monotonic() < deadline, "no reconnect after reload()"
                    gevent.sleep(0.01)  # poll interval
            elif i % 50 == 0:
                gevent.sleep(0)  # stream: let the router and the worker run
        deadline = time.monotonic() + 60
        while len(J.tags) < total and time.monotonic() < deadline:
            gevent.sleep(0.05)  # poll interval
        assert len(J.tags) == total, f"{total - len(J.tags)} jobs never ran"
        assert all(n == 1 for n in J.tags.values())
        assert manager.counters["reloads"] == 3 and manager.counters["replies_dropped"] == 0
    finally:
        # the router and the client go whatever the manager does
        try:
            stopped = manager.stop(timeout=15) or stop_for_good(manager)
        finally:
            client.close()
            router.stop()
    assert stopped, "the manager did not stop within its deadline"


@pytest.mark.timeout(180)
def test_sighup_while_jobs_stream_in_loses_none(stack, tmp_path):
    """The issue's own case, as processes: ``emq-green-router``, one
    ``emq-green`` worker, 4,000 jobs streamed while the worker gets three
    SIGHUPs. Every job runs, exactly once."""
    stack.spawn("router", [str(BIN / "emq-green-router"), "--frontend-addr", stack.front,
                           "--backend-addr", stack.back, "--administrative-addr", stack.admin])
    worker = stack.spawn("worker", [str(BIN / "emq-green"), "-B", stack.back, "-J", "20",
                                    "-n", "hup", "--heartbeat-timeout", "2"])
    stack.wait_for_worker(slots=20)
    marks = tmp_path / "marks"
    total = 4000
    with Client(stack.front, green=False) as client:
        for i in range(total):
            client.defer_job("examples.jobs.mark", [str(marks), str(i)])
            if i in (1000, 2000, 3000):
                done = (tmp_path / "worker.log").read_text().count("SIGHUP: ")
                worker.send_signal(signal.SIGHUP)
            elif i in (1500, 2500, 3500):  # streaming on meanwhile; one reload each
                log = tmp_path / "worker.log"
                before = done
                wait_until(lambda: log.read_text().count("SIGHUP: ") > before,  # noqa: B023
                           20, "the reload")
        wait_until(lambda: len(lines(marks)) >= total, 90, f"{total} jobs")
    tags = collections.Counter(line.split()[0] for line in lines(marks))
    assert len(tags) == total and set(tags.values()) == {1}
    log = (tmp_path / "worker.log").read_text()
    assert log.count("SIGHUP: ") >= 3 and "Traceback" not in log


def test_a_reply_that_fits_only_without_the_identity_is_too_large():
    # the router's whole-message check counts the identity frame it prepends:
    # a REPLY within that many bytes of the limit was dropped there, silently
    import collections

    from emq_green.protocol import reply_frames
    from emq_green.worker.session import fit_reply

    text = json.dumps({"value": "x" * 900})
    size = sum(map(len, reply_frames(text, "m1")))
    counters: collections.Counter[str] = collections.Counter()
    assert fit_reply(text, "m1", size, counters) == text
    assert fit_reply(text, "m1", size + 20, counters, identity=20) == text
    refused = json.loads(fit_reply(text, "m1", size + 19, counters, identity=20))
    assert refused["error"]["type"] == "ReplyTooLarge" and counters["replies_too_large"] == 1


def test_a_child_answers_a_too_deeply_nested_value_with_an_error():
    from emq_green.jobs import JobOutcome, Status

    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    line = json.loads(child_main._outcome_line(JobOutcome(Status.SUCCEEDED, deep)))
    assert line["status"] != "succeeded" and line["error_type"] == "RecursionError"
