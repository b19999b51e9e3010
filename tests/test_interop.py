"""emq-green against the real EventMQ 0.3.13: its router, its client API, its
job manager's command line and config file. Every peer is a real process on
free loopback ports; jobs record themselves in a file (``interop_jobs``), so
each assertion is about jobs that really ran.
"""

from __future__ import annotations

import ast
import json
import re
import signal
import time

import interop_jobs
import pytest
from peers import (
    EVENTMQ_IDENTITY,
    Client,
    RouterAddrs,
    green_argv,
    wait_until,
)

ROUTER_REMOVED = r"No messages from worker .* Removing from the queue"
UNKNOWN_WORKER = r"Unknown worker"



@pytest.fixture
def client_factory():
    clients: list[Client] = []

    def make(frontend: str) -> Client:
        clients.append(Client(frontend))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def _delay_task(func, broker_addr: str, queue: str | None = None):
    """Apply EventMQ's ``@job`` decorator at run time (the broker address is
    known only now) and return the decorated function."""
    from eventmq.client.jobs import job

    return job(func, broker_addr=broker_addr, queue=queue)


# ---------------------------------------------------------------------------
# jobs run, exactly once


def test_every_job_runs_once_whatever_the_client_api(peers, client_factory):
    router = peers.router()
    green = peers.green(green_argv(router.addrs, 50, "once"))
    router.wait_for_worker("once:", 50)
    client = client_factory(router.addrs.frontend)

    from eventmq.client.messages import send_request

    deferred = [f"defer-{i}" for i in range(300)]
    for tag in deferred:
        client.defer("interop_jobs.record", tag)
    requested = [f"request-{i}" for i in range(100)]
    for tag in requested:
        send_request(client.sender, ["run", {"path": "interop_jobs", "callable": "record",
                                             "args": [tag]}])
    task = _delay_task(interop_jobs.delayed_record, router.addrs.frontend)
    delayed = [f"delay-{i}" for i in range(20)]
    for tag in delayed:
        assert task.delay(tag), "the @job decorator's .delay() sent nothing"

    everything = deferred + requested + delayed
    peers.record.wait_for_tags(everything, 30, details=peers.logs)
    # every slot back in the router's books: nothing is still running
    router.wait_for_worker("once:", 50)
    done = peers.record.tags()
    assert {t: n for t, n in done.items() if n != 1} == {}, "a job ran twice"
    assert set(done) == set(everything)
    assert set(peers.record.pids().values()) == {green.pid}
    assert router.count(UNKNOWN_WORKER) == 0


def test_a_green_client_does_not_wait_out_its_linger_behind_eventmq_s_router(peers):
    """close() waits for emq-green's router to say it read everything (a
    flush probe); EventMQ's router never answers, and the client learns it
    from the probe each new socket sends first: no wait of ``linger``."""
    from emq_green.client import Client as GreenClient

    router = peers.router()
    peers.green(green_argv(router.addrs, 5, "flush"))
    router.wait_for_worker("flush:", 5)
    client = GreenClient(router.addrs.frontend, linger=20)
    tags = [f"flush-{i}" for i in range(20)]
    for tag in tags:
        client.defer_job("interop_jobs.record", [tag])
    peers.record.wait_for_tags(tags, 30, details=peers.logs)
    started = time.monotonic()
    assert client.flush(10) is False  # EventMQ's router said nothing
    client.close()
    assert time.monotonic() - started < 3
    assert not client._router_answers


# ---------------------------------------------------------------------------
# queues and weights


def test_queue_weights_route_and_unknown_queue_lands_on_default(peers, client_factory):
    router = peers.router()
    fast = peers.green(green_argv(router.addrs, 100, "fastw",
                                  queues_json='[[30, "fast"], [10, "default"]]'))
    other = peers.green(green_argv(router.addrs, 100, "defw",
                                   queues_json='[[10, "fast"], [30, "default"]]'))
    _, entry = router.wait_for_worker("fastw:", 100)
    assert entry["queues"] == [[30, "fast"], [10, "default"]]
    router.wait_for_worker("defw:", 100)
    client = client_factory(router.addrs.frontend)

    # Both workers serve both queues; the router prefers the higher weight
    # while that worker has free slots (50 jobs < 100 slots).
    for i in range(50):
        client.defer("interop_jobs.record", f"fast-{i}", queue="fast")
        client.defer("interop_jobs.record", f"default-{i}", queue="default")
        client.defer("interop_jobs.record", f"unknown-{i}", queue="no-such-queue")
    fast_task = _delay_task(interop_jobs.delayed_record, router.addrs.frontend, queue="fast")
    for i in range(10):
        fast_task.delay(f"delayfast-{i}")

    tags = ([f"{k}-{i}" for k in ("fast", "default", "unknown") for i in range(50)]
            + [f"delayfast-{i}" for i in range(10)])
    peers.record.wait_for_tags(tags, 30, details=peers.logs)
    pids = peers.record.pids()
    by_worker = {tag: "fastw" if pid == fast.pid else "defw" if pid == other.pid else pid
                 for tag, pid in pids.items()}
    wrong = {t: w for t, w in by_worker.items()
             if w != ("fastw" if t.startswith(("fast", "delayfast")) else "defw")}
    assert wrong == {}, "jobs ran on the wrong worker"
    assert router.count(r"queue I don't recognize: no-such-queue") == 50


# ---------------------------------------------------------------------------
# liveness under load


@pytest.mark.timeout(180)
def test_router_keeps_the_worker_through_20s_of_1000_concurrent_jobs(peers, client_factory):
    router = peers.router()
    green = peers.green(green_argv(router.addrs, 1000, "soak"))
    ident, _ = router.wait_for_worker("soak:", 1000)
    client = client_factory(router.addrs.frontend)

    job_seconds, duration, overfill, turns = 2.0, 20.0, 150, 3000
    submitted = 0
    t0 = time.time()
    # Closed loop: keep ~1000 + overfill jobs outstanding so that every slot
    # stays busy and the router always holds a few in its buffer; for 20 s
    # (four times the router's heartbeat_timeout) and until three full turns
    # of the slots are done, however long a busy box takes for them.
    while time.time() - t0 < duration or peers.record.count("done") < turns:
        assert time.time() - t0 < 120, f"{peers.record.count('done')} done in 120 s"
        outstanding = submitted - peers.record.count("done")
        for _ in range(1000 + overfill - outstanding):
            client.defer("interop_jobs.sleep_record", f"s{submitted}", job_seconds)
            submitted += 1
        time.sleep(0.1)  # the load generator's tick, not a synchronisation
        assert green.alive, green.tail()
    tags = [f"s{i}" for i in range(submitted)]
    peers.record.wait_for_tags(tags, 60, details=peers.logs)

    lines = peers.record.lines()
    done = peers.record.tags("done")
    assert max(done.values()) == 1, "a job ran twice"
    # concurrency, from the jobs' own start/done times
    events = sorted((when, 1 if ev == "start" else -1) for ev, _, _, when in lines)
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak >= 950, f"only {peak} jobs ran at once"
    # (how many jobs a second the pair manages is bench_side_by_side's)
    # the router never dropped the worker and still has it, same identity
    assert router.count(ROUTER_REMOVED) == 0, router.tail()
    assert router.count(UNKNOWN_WORKER) == 0, router.tail()
    assert ident in router.workers()
    assert green.count(r"reconnecting|no ACK") == 0, green.tail()


# ---------------------------------------------------------------------------
# replies


def _router_received(router, command: str) -> list[list[str]]:
    """Messages of ``command`` the router logged as received (frames as text)."""
    out = []
    for m in re.finditer(r"Received message: (\[.*\])$", router.text(), re.MULTILINE):
        frames = ast.literal_eval(m.group(1))
        if len(frames) > 3 and frames[3] == command:
            out.append(frames)
    return out


def test_reply_requested_replies_reach_the_router_in_its_form(peers, client_factory):
    router = peers.router()
    peers.green(green_argv(router.addrs, 20, "reply"))
    router.wait_for_worker("reply:", 20)
    client = client_factory(router.addrs.frontend)

    msgids = {client.defer("interop_jobs.record", f"r{i}", reply_requested=True): f"r{i}"
              for i in range(100)}
    for msgid in msgids:
        router.wait_for(rf"Completed default job with msgid: {msgid} in [0-9.]+ms", 30)
    assert router.count(r"Completed default job with msgid") == 100
    # the frames themselves: [identity, '', 'eMQP/1.0', 'REPLY', msgid, reply_json, orig_msgid]
    replies = {f[6]: json.loads(f[5]) for f in _router_received(router, "REPLY")}
    assert replies == {msgid: {"value": tag} for msgid, tag in msgids.items()}
    # jobs without the header get no REPLY
    client.defer("interop_jobs.record", "quiet")
    peers.record.wait_for_tags(["quiet"], 10)
    router.wait_for_worker("reply:", 20)  # its READY came after any REPLY
    assert len(_router_received(router, "REPLY")) == 100


# ---------------------------------------------------------------------------
# graceful stop


@pytest.mark.timeout(90)
def test_sigterm_finishes_running_jobs_and_kbye_hands_over(peers, client_factory):
    router = peers.router()
    first = peers.green(green_argv(router.addrs, 300, "first"))
    first_ident, _ = router.wait_for_worker("first:", 300)
    client = client_factory(router.addrs.frontend)

    gate = peers.tmp / "gate-running"
    running = [f"run-{i}" for i in range(200)]
    for tag in running:  # they run until the test opens the gate
        client.defer("interop_jobs.gated_record", tag, str(gate))
    peers.record.wait_for_tags(running, 20, event="start", details=peers.logs)
    first.signal(signal.SIGTERM)
    # KBYE: the router forgets the worker at once, though 100 of its slots
    # were free and its jobs still run.
    router.wait_for(rf"Removed worker - {re.escape(first_ident)} from default", 10)
    assert first_ident not in router.workers()
    assert first.alive and not set(peers.record.tags()) & set(running)

    # Sent while the first worker drains: the router buffers them.
    waiting = [f"wait-{i}" for i in range(20)]
    for tag in waiting:
        client.defer("interop_jobs.record", tag)
    # the router holds them while the first worker drains: not one reached it
    first.wait_for(r"draining: 200 job\(s\) running", 10)
    assert first.alive and not set(peers.record.tags()) & set(running + waiting)
    gate.touch()
    assert first.wait_exit(30) == 0, first.tail()
    peers.record.wait_for_tags(running, 1, details=peers.logs)
    assert not set(peers.record.tags()) & set(waiting)

    second = peers.green(green_argv(router.addrs, 10, "second"))
    later = [f"later-{i}" for i in range(20)]
    for tag in later:
        client.defer("interop_jobs.record", tag)
    peers.record.wait_for_tags(waiting + later, 20, details=peers.logs)

    done, pids = peers.record.tags(), peers.record.pids()
    assert max(done.values()) == 1, "a job ran twice"
    assert {pids[t] for t in running} == {first.pid}
    assert {pids[t] for t in waiting + later} == {second.pid}
    assert first.count(r"killing \d+ job") == 0, first.tail()
    # the drained jobs' ends were not sent as READYs: EventMQ's router,
    # which never answered the KBYE, would log each from an unknown worker
    assert router.count(UNKNOWN_WORKER) == 0, router.tail()


def test_sighup_reload_takes_jobs_at_once_behind_eventmq_router(peers, client_factory):
    """SIGHUP: KBYE, a new identity, and every slot offered at once on it.
    EventMQ's router forgets the old identity's READYs with its KBYE; a
    worker that waited heartbeat_timeout (60 s here) for its old socket to
    be quiet would leave these jobs in the router's buffer for a minute."""
    router = peers.router()
    green = peers.green(green_argv(router.addrs, 4, "hup"),
                        env=peers.env(EVENTMQ_HEARTBEAT_TIMEOUT="60"))
    first, _ = router.wait_for_worker("hup:", 4)
    mark = green.mark()
    green.signal(signal.SIGHUP)
    green.wait_for(r"ACK from ", timeout=20, since=mark)
    router.wait_for(rf"Removed worker - {re.escape(first)} from default", 10)
    second, _ = router.wait_for_worker("hup:", 4, timeout=15)
    assert second != first
    client = client_factory(router.addrs.frontend)
    tags = [f"after-hup-{i}" for i in range(8)]
    for tag in tags:
        client.defer("interop_jobs.record", tag)
    peers.record.wait_for_tags(tags, 15, details=peers.logs)
    assert max(peers.record.tags().values()) == 1, "a job ran twice"
    assert set(peers.record.pids().values()) == {green.pid}
    router.wait_for_worker("hup:", 4)
    assert router.count(UNKNOWN_WORKER) == 0


# ---------------------------------------------------------------------------
# router restart


@pytest.mark.timeout(90)
def test_router_restart_worker_reconnects_and_running_jobs_finish_once(
        peers, client_factory):
    addrs = RouterAddrs.fresh()
    # The router's heartbeat settings are integers; it must beat faster than
    # the worker's dead-router threshold (1.5 s x 2).
    config = peers.router_config(addrs, heartbeat_interval=1, heartbeat_timeout=5)
    router = peers.router(addrs, config)
    green = peers.green(green_argv(addrs, 100, "phoenix", "--heartbeat-interval", "0.5",
                                   "--heartbeat-timeout", "1.5", "--heartbeat-liveness", "2",
                                   "--reconnect-timeout", "1"))
    router.wait_for_worker("phoenix:", 100)
    client = client_factory(addrs.frontend)

    gate = peers.tmp / "gate-before"
    before = [f"before-{i}" for i in range(100)]
    for tag in before:  # they run until the test opens the gate
        client.defer("interop_jobs.gated_record", tag, str(gate))
    peers.record.wait_for_tags(before, 20, event="start", details=peers.logs)
    mark = green.mark()
    router.kill()

    router = peers.router(addrs, config)
    green.wait_for(r"ACK from ", 20, since=mark)
    # the worker is back under a new identity with no free slot yet: its
    # 100 jobs from before the restart still hold them
    ident, entry = router.wait_for_worker("phoenix:", 0)
    assert entry["queues"] == [[10, "default"]]
    assert not set(peers.record.tags()) & set(before), "jobs should still be running"

    client2 = client_factory(addrs.frontend)
    after = [f"after-{i}" for i in range(50)]
    for tag in after:
        client2.defer("interop_jobs.record", tag)
    # all 50 reached the router, which keeps them: the worker has no slot
    wait_until(lambda: router.admin("STATUS")["waiting_messages_by_queue"].get("default") == 50,
               20, "the 50 jobs waiting in the router", interval=0.1)
    assert router.wait_for_worker(re.escape(ident), 0)[0] == ident
    assert not set(peers.record.tags("start")) & set(after)  # none handed out, none ran
    gate.touch()
    peers.record.wait_for_tags(before + after, 30, details=peers.logs)
    router.wait_for_worker(re.escape(ident), 100, timeout=10)

    starts, done = peers.record.tags("start"), peers.record.tags("done")
    assert max(starts.values()) == 1 and max(done.values()) == 1, "a job ran twice"
    assert set(peers.record.pids().values()) == {green.pid}
    assert green.alive and green.count(r"reconnecting") >= 1, green.tail()


# ---------------------------------------------------------------------------
# settings: the same file, variables and command line as emq-jobmanager


def _router_view(entry: dict) -> tuple:
    return entry["queues"], entry["available_slots"]


def test_same_eventmq_conf_configures_both_job_managers(peers, tmp_path):
    addrs = RouterAddrs.fresh()
    conf = peers.write_config("eventmq.conf", {
        "global": {"frontend_addr": addrs.frontend, "backend_addr": addrs.backend,
                   "administrative_addr": addrs.admin, "worker_addr": addrs.backend,
                   "queues": '[[10, "globalq"]]', "concurrent_jobs": 2,
                   "wal_enabled": "false"},
        "jobmanager": {"queues": '[[20, "jmq"], [5, "default"]]', "concurrent_jobs": 3},
        "scheduler": {"unrelated_key": "ignored"},
    })
    router = peers.router(addrs, conf)

    # -C: [global] then [jobmanager], the latter winning
    peers.jobmanager(["-C", str(conf)])
    peers.green(["-C", str(conf), "-n", "viaflag"])
    _, jm = router.wait_for_worker(EVENTMQ_IDENTITY, 3)
    _, gr = router.wait_for_worker("viaflag:", 3)
    assert _router_view(gr) == _router_view(jm) == ([[20, "jmq"], [5, "default"]], 3)

    # $EVENTMQ_CONFIG_FILE and EVENTMQ_* variables, which win over the file
    env = peers.env(EVENTMQ_CONFIG_FILE=str(conf), EVENTMQ_CONCURRENT_JOBS="2",
                    EVENTMQ_QUEUES='[[7, "envq"]]')
    peers.jobmanager([], env=env)
    peers.green(["-n", "viaenv"], env=env)
    _, gr_env = router.wait_for_worker("viaenv:", 2)
    _, jm_env = wait_until(
        lambda: next(((i, e) for i, e in router.workers().items()
                      if re.match(EVENTMQ_IDENTITY, i) and e["queues"] == [[7, "envq"]]
                      and e["available_slots"] == 2), None),
        30, "emq-jobmanager configured by EVENTMQ_* variables",
        details=lambda: str(router.workers()))
    assert _router_view(gr_env) == _router_view(jm_env) == ([[7, "envq"]], 2)


@pytest.mark.parametrize("form", ["short", "long"])
def test_emq_jobmanager_command_line_unchanged(peers, client_factory, form):
    router = peers.router()
    conf = peers.write_config("eventmq.conf", {"global": {"hide_heartbeat_logs": "true"}})
    if form == "short":
        argv = ["-B", router.addrs.backend, "-Q", "alpha", "beta", "-J", "3",
                "-C", str(conf), "-n"]
    else:
        argv = ["--broker-addr", router.addrs.backend, "--queues", "alpha", "beta",
                "--jobs", "3", "--config", str(conf), "--name"]
    jobmanager = peers.jobmanager(argv + [f"jm-{form}"])
    green = peers.green(argv + [f"green-{form}"])

    _, jm = router.wait_for_worker(EVENTMQ_IDENTITY, 3)
    _, gr = router.wait_for_worker(f"green-{form}:", 3)
    assert gr["available_slots"] == jm["available_slots"] == 3
    # -Q: emq-green listens on the named queues at the default weight.
    # EventMQ 0.3.13 itself joins them into a string that its INFORM then
    # drops, so its worker lands on the router's default queues instead.
    assert gr["queues"] == [[10, "alpha"], [10, "beta"]]
    assert jm["queues"] == [[10, "default"]]
    assert green.count(rf"green-{form}: stopped -> connecting") == 1

    client = client_factory(router.addrs.frontend)
    client.defer("interop_jobs.record", "on-alpha", queue="alpha")
    client.defer("interop_jobs.record", "on-beta", queue="beta")
    client.defer("interop_jobs.record", "on-default")
    peers.record.wait_for_tags(["on-alpha", "on-beta", "on-default"], 20,
                               details=peers.logs)
    pids = peers.record.pids()
    assert pids["on-alpha"] == pids["on-beta"] == green.pid
    assert pids["on-default"] != green.pid and jobmanager.alive
