"""Delayed and periodic jobs from emq-green's client and emq-green-submit,
with real processes: emq-green's router, emq-green's or EventMQ's
scheduler, emq-green workers, ``emq-green --standalone``. Every count is of
jobs that ran (``interop_jobs.record``)."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from peers import BIN, Peers, RouterAddrs, free_port, recv_from_client, wait_until
from test_schedule_interop import (
    BEATS,
    GreenRouter,
    eventmq_scheduler,
    green_scheduler,
    runs_stop,
    wait_runs,
)

from emq_green.client import Client, unschedule
from emq_green.protocol import Command


def _done_times(peers: Peers, tag: str) -> list[float]:
    return [t for e, tg, _p, t in peers.record.lines() if e == "done" and tg == tag]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("which", ["green", "eventmq"])
def test_delayed_jobs_run_once_after_their_delay(peers, which):
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    if which == "green":
        green_scheduler(peers, addrs)
    else:
        eventmq_scheduler(peers, addrs)
    wait_until(lambda: router.schedulers(), 20, "the scheduler registered")
    with Client(addrs.frontend, green=False) as client:
        sent_at = time.time()
        client.defer_job("interop_jobs.record", ["d1"], delay=2)
        client.defer_job("interop_jobs.record", ["d2"], eta=sent_at + 1)
        wait_runs(peers, "d1", 1)
        wait_runs(peers, "d2", 1)
    (d1,), (d2,) = _done_times(peers, "d1"), _done_times(peers, "d2")
    assert d1 - sent_at >= 1.9
    if which == "green":  # the eta is kept to the millisecond; EventMQ's rounds to seconds
        assert 0.95 <= d2 - sent_at < 1.5
    assert runs_stop(peers, "d1", quiet=2) == 1 and runs_stop(peers, "d2", quiet=0.5) == 1


@pytest.mark.timeout(90)
def test_guaranteed_delayed_job_survives_a_scheduler_kill_9(peers, tmp_path):
    """The scheduler holds a guaranteed delayed job on disk: killed with -9
    before the job is due and started again, it still fires it, once."""
    addrs = RouterAddrs.fresh()
    GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    db = tmp_path / "s.db"
    scheduler = green_scheduler(peers, addrs, "--scheduler-file", str(db))
    with Client(addrs.frontend, green=False) as client:
        client.defer_job("interop_jobs.record", ["later"], delay=4, guarantee=True)
        scheduler.wait_for(r"scheduler: new .*interop_jobs\.record once at")
    scheduler.kill()
    assert peers.record.tags()["later"] == 0
    scheduler = green_scheduler(peers, addrs, "--scheduler-file", str(db))
    assert "1 schedule(s) restored" in scheduler.text()
    wait_runs(peers, "later", 1)
    assert runs_stop(peers, "later", quiet=1.5) == 1


@pytest.mark.timeout(120)
def test_submit_every_cron_unschedule_on_a_standalone_box(peers):
    """``emq-green --standalone`` runs a scheduler: emq-green-submit
    schedules with --every and --cron, STATUS lists them, --unschedule
    stops them, --delay runs a job once later."""
    addrs = RouterAddrs.fresh()
    dash = free_port()
    box = peers.green(["--standalone", "--frontend-addr", addrs.frontend, "--backend-addr",
                       addrs.backend, "--administrative-addr", addrs.admin, "-J", "10",
                       "--dashboard-addr", str(dash), *BEATS], wait_ack=False)
    box.wait_for(r"scheduler: connected", timeout=20)

    def submit(*argv: str) -> str:
        out = subprocess.run([str(BIN / "emq-green-submit"), "interop_jobs.record", "-a",
                              addrs.frontend, *argv], capture_output=True, text=True,
                             env=peers.env(), timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "scheduled interop_jobs.record every 1 s" in submit("--args", '["ev"]',
                                                                "--every", "1")
    submit("--args", '["cr"]', "--cron", "* * * * * *", "--queue", "default", "--nohaste")
    assert "each to run once in 1 s (a delayed job" in submit("--args", '["dl"]',
                                                               "--delay", "1")
    submit("--args", '["bad"]', "--every", "1", "--run-count", "2")
    wait_runs(peers, "ev", 3)
    wait_runs(peers, "cr", 3)
    wait_runs(peers, "dl", 1)
    import requests

    from emq_green.client.submit import admin_request

    rows = admin_request(addrs.admin, Command.STATUS, timeout=5)["schedules"]
    assert {r["schedule"] for r in rows} >= {"every 1s", "cron * * * * * *"}
    page = requests.get(f"http://127.0.0.1:{dash}/dashboard.json", timeout=5)
    assert page.status_code == 200 and page.json()["schedulers"] == 1
    assert {r["schedule"] for r in page.json()["schedules"]} >= {"every 1s"}
    assert "unscheduled" in submit("--args", '["ev"]', "--unschedule")
    submit("--args", '["cr"]', "--unschedule")
    counts = {tag: runs_stop(peers, tag) for tag in ("ev", "cr", "bad")}
    assert counts["bad"] == 2 and counts["ev"] >= 3
    assert runs_stop(peers, "dl", quiet=0.5) == 1
    # unscheduled, run out (--run-count) or fired (--delay): none is listed
    wait_until(lambda: not admin_request(addrs.admin, Command.STATUS, timeout=5)["schedules"],
               10, "ended schedules gone from STATUS")
    box.signal(signal.SIGTERM)
    box.wait_exit(30)


@pytest.mark.timeout(90)
def test_a_standalone_box_stops_its_scheduler_before_draining(peers):
    """What the scheduler fired while the manager drained was dropped with
    the router, and counted as run in the scheduler's file."""
    addrs = RouterAddrs.fresh()
    box = peers.green(["--standalone", "--frontend-addr", addrs.frontend, "--backend-addr",
                       addrs.backend, "--administrative-addr", addrs.admin, "-J", "4",
                       "--kill-grace-period", "30", *BEATS], wait_ack=False)
    box.wait_for(r"scheduler: connected", timeout=20)
    for argv in (["interop_jobs.sleep_record", "--args", '["long", 3]'],
                 ["interop_jobs.record", "--args", '["ev"]', "--every", "1"]):
        out = subprocess.run([str(BIN / "emq-green-submit"), *argv, "-a", addrs.frontend],
                             capture_output=True, text=True, env=peers.env(), timeout=30)
        assert out.returncode == 0, out.stderr
    wait_runs(peers, "ev", 2)
    wait_until(lambda: any(e == "start" and tag == "long"
                           for e, tag, _p, _t in peers.record.lines()), 10, "the long job")
    box.signal(signal.SIGTERM)
    box.wait_exit(30)
    log = box.text()
    scheduler_stops = re.search(r"scheduler \S+: running -> stopping", log).start()
    manager_drains = log.index("running -> draining")
    manager_stops = log.index("draining -> stopped")
    assert manager_drains < scheduler_stops < manager_stops, log[manager_drains - 200:]
    assert _done_times(peers, "long")  # the drain let the running job finish


def test_unschedule_needs_the_same_call(peers):
    """The key is the call: unschedule() of other arguments names another key."""
    from emq_green.schedules import schedule_body, unschedule_key

    a = unschedule_key(schedule_body(queue="q", headers=[], payload={
        "path": "m", "callable": "f", "args": [1], "kwargs": {}, "class_args": [],
        "class_kwargs": {}}))
    b = unschedule_key(schedule_body(queue="other", headers=[], payload={
        "path": "m", "callable": "f", "args": [2], "kwargs": {}, "class_args": [],
        "class_kwargs": {}}))
    assert a != b and callable(unschedule)


@pytest.mark.timeout(60)
def test_router_with_its_own_scheduler(peers):
    """``emq-green-router --scheduler``: EventMQ's client schedules, the
    in-process scheduler fires, ROUTER_SHOW_SCHEDULERS lists it."""
    from test_schedule_interop import EventMQClient

    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs, "--scheduler")
    router.wait_for(r"scheduler: connected")
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    assert len(router.schedulers()) == 1
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("own", interval=1)
        wait_runs(peers, "own", 3)
        client.schedule("own", interval=1, unschedule=True)
        runs_stop(peers, "own")
    finally:
        client.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("when", [
    {"delay": float("inf")}, {"delay": float("-inf")}, {"delay": float("nan")},
    {"delay": -1}, {"delay": "soon"}, {"delay": True}, {"delay": "5"}, {"delay": b"5"},
    {"eta": float("inf")}, {"eta": float("nan")}, {"eta": -5}, {"eta": "2000000000"},
])
def test_a_delay_or_eta_that_is_not_a_time_is_a_value_error(when):
    """inf raised OverflowError from deep inside, -1 was taken as now; a
    string of digits was taken as a number."""
    with Client(f"tcp://127.0.0.1:{free_port()}", green=False) as client:
        with pytest.raises(ValueError, match=r"must be a finite number of seconds >= 0, not "):
            client.defer_job("interop_jobs.record", ["x"], **when)
    assert client.sent == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("when", [{"delay": 1e10}, {"eta": time.time() + 4e8}])
def test_a_delay_over_ten_years_is_a_value_error_naming_the_bound(when):
    """It was refused by the router as an interval out of range."""
    with Client(f"tcp://127.0.0.1:{free_port()}", green=False) as client:
        with pytest.raises(ValueError, match="at most ten years"):
            client.defer_job("interop_jobs.record", ["x"], **when)
    assert client.sent == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("when", [{"delay": 5}, {"eta": time.time() + 5}])
def test_a_delayed_job_cannot_ask_for_its_result(when):
    """result=True was silently ignored: the caller got a msgid, no handle."""
    with Client(f"tcp://127.0.0.1:{free_port()}", green=False) as client:
        with pytest.raises(ValueError, match="a delayed job .* cannot return a result"):
            client.defer_job("interop_jobs.record", ["x"], result=True, **when)
    assert client.sent == 0


@pytest.mark.timeout(20)
def test_delay_for_of_a_result_job_sends_its_schedule():
    """``@job(result=True)``: the result is ``.delay``'s; ``.delay_for``
    still sends the one-shot SCHEDULE, with no result asked."""
    import zmq

    from emq_green.client import get_client, job
    from emq_green.schedules import parse_schedule

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    addr = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        decorated = job(result=True, broker_addr=addr)(_later)
        msgid = decorated.delay_for(30, "x")
        assert router.poll(10_000)
        frames = recv_from_client(router)
        assert frames[3:5] == [b"SCHEDULE", msgid.encode()]
        schedule = parse_schedule([f.decode() for f in frames[5:]])
        assert schedule.eta is not None and schedule.eta > time.time() + 25
    finally:
        get_client(addr).close()
        router.close()
        context.term()


def _later(tag: str) -> str:
    return tag
