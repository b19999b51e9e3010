"""The job manager's corners on real loopback sockets: reconnects, failover,
retries against timeouts, entry/exit functions, grace periods, reloads."""

from __future__ import annotations

import logging
import os
import re
import time

import gevent
import jobs_for_tests as J
import pytest
from conftest import FAST_HEARTBEATS, stop_for_good
from fakerouter import FakeRouter

from emq_green.jobmanager import JobManager, State
from emq_green.protocol import Command
from emq_green.settings import Settings, load_settings

JOBS = "jobs_for_tests"
REPLY = "reply-requested"


def inform_order(**routers: FakeRouter) -> list[str]:
    """Which router each INFORM went to, in the order they arrived."""
    found = [(r.at, name) for name, router in routers.items()
             for r in router.messages(Command.INFORM)]
    return [name for _, name in sorted(found)]


# ---------------------------------------------------------------------------
# reconnects


def test_replies_of_jobs_finishing_while_reconnecting_go_out_on_the_new_connection(
        make_manager):
    primary = FakeRouter(heartbeat_interval=0.2)
    standby = FakeRouter(heartbeat_interval=0.2, auto_ack=False)
    try:
        manager = make_manager(concurrent_jobs=3, worker_addr=primary.addr,
                               worker_addr_default=standby.addr,
                               worker_addr_failover=standby.addr, reconnect_timeout=30)
        first = primary.wait_inform()
        primary.wait_count(Command.READY, 3)
        running = [primary.request(first, JOBS, "wait_gate", args=["late"], headers=REPLY)
                   for _ in range(2)]
        primary.wait_until(lambda: J.calls["wait_gate"] == 2)
        primary.close()  # the router dies with two jobs running
        second = standby.wait_inform(timeout=15)
        assert manager.state is State.CONNECTING  # INFORMed, no ACK yet
        J.gates["late"].set()  # the jobs finish while the worker reconnects
        standby.wait_until(lambda: not manager.jobs_in_flight)
        assert standby.count(Command.REPLY) == 0  # kept until the connection is up
        acked_at = time.monotonic()
        inform = standby.messages(Command.INFORM, second)[-1]
        standby.send(second, Command.ACK, inform.message.msgid)
        for msgid in running:
            assert standby.wait_reply(msgid) == {"value": "late"}
        replies = standby.messages(Command.REPLY)
        assert len(replies) == 2
        assert all(r.identity == second and r.at >= acked_at for r in replies)
        # every slot is free again, and offered once
        standby.wait_count(Command.READY, 3)
        ok = standby.request(second, JOBS, "add", args=[1, 1], headers=REPLY)
        assert standby.wait_reply(ok) == {"value": 2}
        standby.wait_count(Command.READY, 4)
        assert standby.count(Command.READY) == 4
        assert primary.count(Command.REPLY) == 0
    finally:
        primary.close()
        standby.close()


@pytest.mark.timeout(60)
def test_a_job_running_when_the_router_says_kbye_replies_under_its_own_identity(
        make_manager):
    """A probe's find: SIGSTOPped past the timeout, a worker was told KBYE
    when it came back (the router had taken it for dead and queued its
    guaranteed jobs again) and connected anew; its jobs then ended and their
    REPLYs left under the new identity, which holds no copy of them: the
    router dropped them as late and ran the waiting copies elsewhere. The
    connection a running job came on now stays open for its REPLY; new jobs
    and READYs go to the new one."""
    router = FakeRouter(heartbeat_interval=0.2)
    try:
        manager = make_manager(concurrent_jobs=2, worker_addr=router.addr,
                               worker_addr_default=router.addr,
                               worker_addr_failover=router.addr)
        first = router.wait_inform()
        router.wait_count(Command.READY, 2, identity=first)
        running = router.request(first, JOBS, "wait_gate", args=["stop"], headers=REPLY)
        router.wait_until(lambda: J.calls["wait_gate"] == 1)
        router.send(first, Command.KBYE)  # taken for dead, back: told to connect anew
        router.wait_until(lambda: len(router.messages(Command.INFORM)) == 2)
        second = router.messages(Command.INFORM)[-1].identity
        assert second != first
        router.wait_count(Command.READY, 1, identity=second)  # its one free slot
        J.gates["stop"].set()
        assert router.wait_reply(running) == {"value": "stop"}
        (reply,) = router.messages(Command.REPLY)
        assert reply.identity == first
        ok = router.request(second, JOBS, "add", args=[1, 1], headers=REPLY)
        assert router.wait_reply(ok) == {"value": 2}
        assert router.messages(Command.REPLY)[-1].identity == second
        router.wait_count(Command.READY, 3, identity=second)  # both slots again
        assert manager.state is State.RUNNING
    finally:
        router.close()


@pytest.mark.timeout(90)
def test_failover_order_and_return_to_the_default_address(make_manager):
    a = FakeRouter(heartbeat_interval=0.2)
    b = FakeRouter(heartbeat_interval=0.2)
    try:
        manager = make_manager(concurrent_jobs=2, worker_addr=a.addr,
                               worker_addr_default=a.addr, worker_addr_failover=b.addr,
                               reconnect_timeout=1.0)
        a.wait_inform()
        a.fall_silent()
        # dead after 1.5 s of silence; then the failover (the default is
        # worker_addr, tried once a round: worker_addr, default, failover)
        second = b.wait_inform(timeout=20)
        b.wait_count(Command.READY, 2, identity=second)
        assert inform_order(a=a, b=b) == ["a", "b"]
        assert manager.state is State.RUNNING and manager.outgoing.addr == b.addr
        # the failover dies too: back to worker_addr, which answers again
        a.wake_up()
        b.fall_silent()
        a.wait_until(lambda: len(a.messages(Command.INFORM)) == 2, timeout=20)
        back = a.messages(Command.INFORM)[-1].identity
        a.wait_count(Command.READY, 2, identity=back)
        assert inform_order(a=a, b=b) == ["a", "b", "a"]
        assert manager.outgoing.addr == a.addr and manager.state is State.RUNNING
        assert manager.counters["router_lost"] == 2
        ok = a.request(back, JOBS, "add", args=[2, 3], headers=REPLY)
        assert a.wait_reply(ok) == {"value": 5}
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# retries, timeouts, entry and exit functions (greenlet jobs)


def test_a_timed_out_job_is_not_retried(router, make_manager):
    make_manager(global_timeout=60)
    ident = router.wait_inform()
    timed_out = router.request(ident, JOBS, "counted_nap", args=["slow", 30],
                               headers=f"{REPLY},retry-count:3,timeout:0.5")
    failing = router.request(ident, JOBS, "flaky", args=["f", 1],
                             headers=f"{REPLY},retry-count:3,timeout:5")
    assert router.wait_reply(timed_out)["value"] == "TimeoutError"
    assert J.calls["slow"] == 1
    assert router.wait_reply(failing) == {"value": 2}  # a raising job is retried


def entry_exit(make_manager, router, **settings):
    manager = make_manager(concurrent_jobs=2, job_entry_func=f"{JOBS}.entry",
                           job_exit_func=f"{JOBS}.exit_", **settings)
    return manager, router.wait_inform()


def test_entry_and_exit_run_once_per_job_across_retries(router, make_manager):
    _, ident = entry_exit(make_manager, router)
    msgid = router.request(ident, JOBS, "flaky", args=["k", 2],
                           headers=f"{REPLY},retry-count:2")
    assert router.wait_reply(msgid) == {"value": 3}
    assert J.calls["k"] == 3 and J.events == ["entry", "exit"]


def test_entry_and_exit_run_once_after_a_timeout(router, make_manager):
    _, ident = entry_exit(make_manager, router)
    msgid = router.request(ident, JOBS, "counted_nap", args=["t", 30],
                           headers=f"{REPLY},retry-count:2,timeout:0.5")
    assert router.wait_reply(msgid)["value"] == "TimeoutError"
    assert J.calls["t"] == 1 and J.events == ["entry", "exit"]


def test_entry_and_exit_run_once_when_the_job_is_killed(router, make_manager):
    manager, ident = entry_exit(make_manager, router)
    msgid = router.request(ident, JOBS, "counted_gate", args=["g", "never"], headers=REPLY)
    router.wait_until(lambda: J.calls["g"] == 1)
    assert manager.stop(timeout=10, graceful=False)
    assert router.wait_reply(msgid)["error"]["type"] == "Killed"
    assert J.events == ["entry", "exit"]


def test_a_raising_entry_function_fails_the_job_without_running_it(router, make_manager):
    """The job is not run and its exit function not called (the entry did
    not complete); the reply names the entry's error; the slot comes back."""
    make_manager(concurrent_jobs=1, job_entry_func=f"{JOBS}.entry_boom",
                 job_exit_func=f"{JOBS}.exit_")
    ident = router.wait_inform()
    router.wait_count(Command.READY, 1)
    msgid = router.request(ident, JOBS, "counted_nap", args=["n", 0],
                           headers=f"{REPLY},retry-count:2")
    reply = router.wait_reply(msgid)
    assert reply["value"] == "entry failed" and reply["error"]["type"] == "RuntimeError"
    assert J.calls["n"] == 0 and J.events == ["entry"]
    router.wait_count(Command.READY, 2)


def test_a_job_that_stops_its_manager_does_not_wait_for_itself(router, make_manager):
    # stop() waited for every job to end, the caller's own included: the
    # job was killed at kill_grace_period (300 s by default)
    manager = make_manager(kill_grace_period=60)
    J.manager = manager
    ident = router.wait_inform()
    router.wait_count(Command.READY, 1)
    msgid = router.request(ident, JOBS, "stop_the_manager", headers=REPLY)
    reply = router.wait_reply(msgid, timeout=10)
    assert reply == {"value": False}  # asked for, not yet done when it returned
    assert manager.wait_for_state(State.STOPPED, timeout=10)
    assert router.messages(Command.KBYE)


# ---------------------------------------------------------------------------
# grace period


def test_grace_period_expiry_kills_backlogged_jobs_unstarted(router, make_manager):
    grace = 1.0
    manager = make_manager(concurrent_jobs=1, kill_grace_period=grace)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 1)
    running = router.request(ident, JOBS, "counted_gate", args=["run", "never"],
                             headers=REPLY)
    router.wait_until(lambda: J.calls["run"] == 1)
    # beyond the slots offered: it waits in the worker
    backlogged = router.request(ident, JOBS, "counted_nap", args=["later", 0],
                                headers=REPLY)
    router.wait_until(lambda: manager.counters["backlogged"] == 1)
    started = time.monotonic()
    assert manager.stop(timeout=30)
    took = time.monotonic() - started
    for msgid in (running, backlogged):
        assert router.wait_reply(msgid)["error"]["type"] == "Killed"
    assert "before the job started" in router.replies()[backlogged]["error"]["message"]
    assert J.calls["later"] == 0  # never run
    assert grace <= took < grace + 5, took
    assert manager.state is State.STOPPED and not manager.jobs_in_flight


# ---------------------------------------------------------------------------
# SIGHUP: JobManager.reload()


def test_reload_with_jobs_running_keeps_them_and_offers_only_free_slots(router, make_manager):
    """... and comes back to the same router: a reload is no failure, the
    fallback addresses (nothing listens there) are not tried."""
    from peers import free_ports

    dead = [f"tcp://127.0.0.1:{port}" for port in free_ports(2)]
    made: list[JobManager] = []
    manager = make_manager(concurrent_jobs=4, settings_loader=lambda: made[0].settings.replace(
        concurrent_jobs=6), worker_addr_default=dead[0], worker_addr_failover=dead[1])
    made.append(manager)
    first = router.wait_inform()
    router.wait_count(Command.READY, 4, identity=first)
    running = [router.request(first, JOBS, "wait_gate", args=["r"], headers=REPLY)
               for _ in range(2)]
    router.wait_until(lambda: J.calls["wait_gate"] == 2)
    manager.reload()
    router.wait_count(Command.KBYE, 1, identity=first)
    second = router.wait_inform(index=1)
    # name:pid:n-random: the next identity cannot be taken first by a squatter
    pattern = rf"test-worker:{os.getpid()}:(\d+)-[0-9a-f]{{8}}"
    counts = [re.fullmatch(pattern, i.decode()) for i in (first, second)]
    assert all(counts) and [int(c.group(1)) for c in counts] == [1, 2]
    assert manager.wait_for_state(State.RUNNING, timeout=10)
    assert manager.concurrent_jobs == 6 and manager.counters["reloads"] == 1
    # 6 slots, 2 still running: 4 offered on the new connection
    router.wait_count(Command.READY, 4, identity=second)
    probe = router.request(second, JOBS, "add", args=[1, 2], headers=REPLY)
    assert router.wait_reply(probe) == {"value": 3}
    router.wait_count(Command.READY, 5, identity=second)
    assert router.count(Command.READY, second) == 5
    J.gates["r"].set()
    for msgid in running:
        assert router.wait_reply(msgid) == {"value": "r"}
    # each REPLY leaves on the connection its REQUEST came on: a router takes
    # a REPLY only from the identity it handed the job to (issue 20)
    replied_on = {r.message.body[1]: r.identity for r in router.messages(Command.REPLY)}
    assert replied_on == {**{m: first for m in running}, probe: second}
    router.wait_count(Command.READY, 7, identity=second)
    router.wait_until(lambda: not manager.jobs_in_flight)
    assert router.count(Command.READY, second) == 7  # 6 - 2 + 1 + 2


def test_reload_that_shrinks_the_slots_below_the_jobs_running(router, make_manager, caplog):
    """3 jobs run, the reload sets concurrent_jobs = 1: no slot is free (0,
    not -2, in the status and the ACK's log line) and no READY is offered
    until the jobs running are down to 0 again; then exactly 1."""
    caplog.set_level(logging.INFO, logger="emq_green")
    made: list[JobManager] = []
    manager = make_manager(concurrent_jobs=4, settings_loader=lambda: made[0].settings.replace(
        concurrent_jobs=1))
    made.append(manager)
    first = router.wait_inform()
    router.wait_count(Command.READY, 4, identity=first)
    running = [router.request(first, JOBS, "wait_gate", args=["s"], headers=REPLY)
               for _ in range(3)]
    router.wait_until(lambda: J.calls["wait_gate"] == 3)
    manager.reload()
    second = router.wait_inform(index=1)
    assert manager.wait_for_state(State.RUNNING, timeout=10)
    assert manager.free_slots == 0 and manager.status()["free_slots"] == 0
    assert "3 job(s) still running, 0 slot(s) free" in caplog.text
    J.gates["s"].set()
    for msgid in running:
        assert router.wait_reply(msgid) == {"value": "s"}
    router.wait_until(lambda: not manager.jobs_in_flight)
    router.wait_count(Command.READY, 1, identity=second)
    assert router.count(Command.READY, second) == 1
    assert manager.free_slots == 1


def test_reload_with_a_bad_config_file_keeps_the_settings_and_says_why(
        router, make_manager, tmp_path, caplog):
    conf = tmp_path / "eventmq.conf"

    def write(concurrent_jobs: str) -> None:
        conf.write_text("[jobmanager]\n"
                        f"worker_addr = {router.addr}\n"
                        f"worker_addr_default = {router.addr}\n"
                        f"worker_addr_failover = {router.addr}\n"
                        "heartbeat_interval = 0.2\nheartbeat_timeout = 0.5\n"
                        f'queues = [[10, "default"], [5, "mail"]]\n'
                        f"concurrent_jobs = {concurrent_jobs}\n")

    write("3")
    manager = make_manager(concurrent_jobs=2,
                           settings_loader=lambda: load_settings(["-C", str(conf)], {})[0])
    router.wait_inform()
    # a good file first: its values are taken
    manager.reload()
    second = router.wait_inform(index=1)
    router.wait_count(Command.READY, 3, identity=second)
    assert manager.concurrent_jobs == 3 and manager.queues == ((10, "default"), (5, "mail"))
    # then a bad one: nothing changes, and the log says which setting and why
    write("lots")
    caplog.set_level(logging.INFO, logger="emq_green")
    manager.reload()
    router.wait_until(lambda: "settings not reloaded" in caplog.text)
    [line] = [r.getMessage() for r in caplog.records if "settings not reloaded" in r.getMessage()]
    assert "concurrent_jobs" in line and "lots" in line and str(conf) in line, line
    assert manager.concurrent_jobs == 3 and manager.queues == ((10, "default"), (5, "mail"))
    assert "keeping the current ones and the connection" in line
    assert manager.wait_for_state(State.RUNNING, timeout=10)
    # and the connection stays (a probe: a KBYE and a new identity for nothing)
    ok = router.request(second, JOBS, "add", args=[1, 1], headers=REPLY, queue="mail")
    assert router.wait_reply(ok) == {"value": 2}
    assert router.identities[-1] == second and router.count(Command.KBYE, second) == 0
    assert manager.counters["reloads"] == 1


@pytest.mark.parametrize("broken", ["no section", "gone"])
def test_a_reload_of_a_file_without_its_section_or_gone_keeps_everything(
        router, make_manager, tmp_path, caplog, broken):
    """A SIGHUP after the file lost its [jobmanager] section (or the file
    itself) moved a running worker to the default router and queue: EventMQ
    runs on its defaults at a start, but at a reload it is a mistake (a
    probe). The settings and the connection stay, an ERROR says why."""
    from emq_green.jobmanager import settings_logging_warnings

    conf = tmp_path / "eventmq.conf"
    conf.write_text("[jobmanager]\n"
                    f"worker_addr = {router.addr}\nworker_addr_default = {router.addr}\n"
                    f"worker_addr_failover = {router.addr}\n"
                    'queues = [[10, "mail"]]\nconcurrent_jobs = 3\n')
    manager = make_manager(concurrent_jobs=3, queues=((10, "mail"),),
                           settings_loader=lambda: settings_logging_warnings(
                               lambda: load_settings([], {"EVENTMQ_CONFIG_FILE": str(conf)}),
                               reloading=True))
    first = router.wait_inform()
    caplog.set_level(logging.INFO, logger="emq_green")
    if broken == "gone":
        conf.unlink()
    else:
        conf.write_text("[other]\nconcurrent_jobs = 9\n")
    manager.reload()
    router.wait_until(lambda: "settings not reloaded" in caplog.text)
    [line] = [r.getMessage() for r in caplog.records if "settings not reloaded" in r.getMessage()]
    assert str(conf) in line and ("no [jobmanager] section" in line or "does not exist" in line)
    assert manager.concurrent_jobs == 3 and manager.queues == ((10, "mail"),)
    ok = router.request(first, JOBS, "add", args=[2, 3], headers=REPLY, queue="mail")
    assert router.wait_reply(ok) == {"value": 5}
    assert router.identities == [first] and router.count(Command.KBYE, first) == 0


def test_a_reload_while_connecting_goes_to_the_address_it_read(router, make_manager, caplog):
    """A worker whose router does not answer reloads with a file naming
    another: its next connection goes there, not once more to the old
    address (a probe: the address was picked before the reload was read)."""
    from peers import free_port

    dead = f"tcp://127.0.0.1:{free_port()}"
    caplog.set_level(logging.INFO, logger="emq_green")
    manager = make_manager(wait_running=False, worker_addr=dead, worker_addr_default=dead,
                           worker_addr_failover=dead, reconnect_timeout=1.0,
                           settings_loader=lambda: Settings(
                               name="x", worker_addr=router.addr,
                               worker_addr_default=router.addr,
                               worker_addr_failover=router.addr, reconnect_timeout=1.0,
                               **FAST_HEARTBEATS))
    router.wait_until(lambda: f"connecting to {dead}" in caplog.text)
    manager.reload()
    assert manager.wait_for_state(State.RUNNING, timeout=10)
    lines = [r.getMessage() for r in caplog.records]
    reloaded = next(n for n, line in enumerate(lines) if "settings reloaded" in line)
    connecting = [line for line in lines[reloaded:] if line.startswith("connecting to")]
    assert connecting and all(router.addr in line for line in connecting), connecting


class Audited(JobManager):
    """A subclass as legacy code writes them: EventMQ's on_request and
    send_ready overridden, the base methods called (or not)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []
        self.readies = 0

    def on_request(self, msgid, msg):
        self.seen.append(msgid)
        payload = msg[2]
        if "drop-me" in payload:
            return  # not passed on
        if "raise-first" in payload:
            raise RuntimeError("audit failed")
        super().on_request(msgid, msg)

    def send_ready(self):
        self.readies += 1
        super().send_ready()


def test_a_subclass_on_request_and_send_ready_are_called_as_in_eventmq(router, make_manager):
    manager = make_manager(manager_class=Audited, concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    assert manager.readies == 2
    ran = router.request(ident, JOBS, "add", args=[1, 2], headers=REPLY)
    assert router.wait_reply(ran) == {"value": 3}
    router.wait_count(Command.READY, 3)
    assert manager.readies == 3 and manager.seen == [ran]
    # one that raises before passing it on: an error reply, the slot back
    raised = router.request(ident, JOBS, "echo", args=["raise-first"], headers=REPLY)
    reply = router.wait_reply(raised)
    assert reply["error"]["type"] == "InvalidRequest" and "audit failed" in reply["value"]
    # one it drops: no reply, but its READY comes back
    router.request(ident, JOBS, "echo", args=["drop-me"], headers=REPLY)
    router.wait_until(lambda: len(manager.seen) == 3)
    router.wait_count(Command.READY, 5)
    assert manager.free_slots == 2 and not manager.jobs_in_flight
    after = router.request(ident, JOBS, "add", args=[2, 2], headers=REPLY)
    assert router.wait_reply(after) == {"value": 4}
    assert manager.state is State.RUNNING


@pytest.mark.parametrize("queues, informed", [([(20, "x"), (5, "y")], '[[20, "x"], [5, "y"]]'),
                                              ("x,y:5", '[[10, "x"], [5, "y"]]')])
def test_start_with_eventmqs_address_and_queues_connects_there_and_blocks(
        router, queues, informed):
    manager = JobManager(settings=Settings(concurrent_jobs=1, worker_addr="tcp://127.0.0.1:9"),
                         skip_signal=True)
    serving = gevent.spawn(manager.start, router.addr, queues)
    try:
        router.wait_inform()
        assert router.messages(Command.INFORM)[0].message.body == (informed, "worker")
        assert manager.settings.worker_addr == router.addr
        assert not serving.ready()  # it blocks, as EventMQ's start(addr, queues)
    finally:
        assert stop_for_good(manager)
    serving.join(timeout=10)
    assert serving.ready() and serving.successful()


def test_a_pause_of_the_whole_process_is_not_counted_as_the_routers_silence(
        router, make_manager):
    """The fake router shares this process: while a job holds the loop it
    sends nothing, as a router cannot reach a SIGSTOPped worker. On waking
    the worker took the pause for the router's silence and reconnected,
    closing the socket with what was in it (on SIGCONT, REQUESTs)."""
    manager = make_manager(concurrent_jobs=2)  # dead after 3 x 0.5 s of silence
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    held = router.request(ident, "blocking_jobs", "block_unpatched", args=[2.5],
                          headers=REPLY)
    assert router.wait_reply(held, timeout=15) == {"value": 2.5}
    after = router.request(ident, JOBS, "add", args=[1, 2], headers=REPLY)
    assert router.wait_reply(after) == {"value": 3}
    assert router.count(Command.INFORM) == 1  # never reconnected
    assert manager.counters["resumed_after_a_pause"] >= 1


def test_a_failing_setup_func_is_logged_and_the_worker_serves(router, make_manager, caplog):
    manager = make_manager(subprocess_setup_func=f"{JOBS}.boom")
    ident = router.wait_inform()
    ok = router.request(ident, JOBS, "add", args=[1, 2], headers=REPLY)
    assert router.wait_reply(ok) == {"value": 3}
    assert manager.state is State.RUNNING
    assert any(r.levelname == "ERROR" and f"subprocess_setup_func {JOBS}.boom failed"
               in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_a_job_holding_the_loop_again_and_again_does_not_hide_a_dead_router(
        router, make_manager, caplog):
    """Each late wake-up was excused as a pause: the router's silence never
    added up while the job ran, and its death was seen only after the job."""
    manager = make_manager(concurrent_jobs=2)  # dead after 3 x 0.5 s of silence
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    router.request(ident, "blocking_jobs", "block_in_bursts", args=[9, 1.0])
    router.wait_until(lambda: manager.jobs_in_flight)
    started = time.time()
    router.close()  # dies, and sends nothing more

    def seen() -> list:
        return [r for r in caplog.records if "nothing from the router" in r.getMessage()]

    while not seen():  # (this greenlet runs only between the job's bursts)
        assert time.time() < started + 20
        gevent.sleep(0.1)
    assert seen()[0].created - started < 6  # the job holds the loop for 9 s


def test_a_pause_long_after_the_router_went_quiet_does_not_restart_the_count(
        router, make_manager, caplog):
    """A probe: at the defaults a dead router was seen 30 s late behind a
    job holding the loop in bursts: the first pause after its death was
    excused (the router had been heard since the last one), and the count
    of its silence began again. Only a pause the router was heard just
    before (within heartbeat_timeout) is excused now."""
    manager = make_manager(concurrent_jobs=2)  # dead after 3 x 0.5 s of silence
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    # (the block begins 1.2 s after the death: past heartbeat_timeout, 0.5 s)
    router.request(ident, "blocking_jobs", "nap_then_block", args=[1.2, 3.0])
    router.wait_until(lambda: manager.jobs_in_flight)
    started = time.time()
    router.close()  # dies, and sends nothing more

    def seen() -> list:
        return [r for r in caplog.records if "nothing from the router" in r.getMessage()]

    while not seen():  # (this greenlet runs only once the job's block is over)
        assert time.time() < started + 20
        gevent.sleep(0.1)
    # the block ends 4.2 s after the death, when the silence (1.5 s) is long
    # over: seen then (before: 1.5 s after the block, 5.7 s)
    assert seen()[0].created - started < 5.0


class Deferred(JobManager):
    """Admits each request a moment later, from a greenlet of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def on_request(self, msgid, msg):
        self.calls += 1
        gevent.spawn_later(0.05, super().on_request, msgid, msg)

    def send_ready(self):
        if getattr(self, "fail_readies", False):
            raise RuntimeError("no READY today")
        super().send_ready()


def test_an_override_that_admits_later_or_is_called_directly_runs_each_job_once(
        router, make_manager):
    # the base method called later went back through the override: 594
    # calls and READYs for 2 requests in a probe, no job run
    manager = make_manager(manager_class=Deferred, concurrent_jobs=2)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 2)
    msgids = [router.request(ident, JOBS, "add", args=[n, 1], headers=REPLY) for n in (1, 2)]
    assert [router.wait_reply(m) for m in msgids] == [{"value": 2}, {"value": 3}]
    assert manager.calls == 2
    router.wait_count(Command.READY, 4)
    gevent.sleep(0.3)  # nothing more comes (a loop sent a READY per turn)
    assert router.count(Command.READY) == 4 and manager.calls == 2
    # a send_ready override that raises: logged, the READY sent all the same
    manager.fail_readies = True
    again = router.request(ident, JOBS, "add", args=[5, 5], headers=REPLY)
    assert router.wait_reply(again) == {"value": 10}
    router.wait_count(Command.READY, 5)
    assert manager.state is State.RUNNING


def test_a_setup_func_that_calls_sys_exit_is_logged_and_the_worker_serves(
        router, make_manager, caplog):
    manager = make_manager(subprocess_setup_func="sys.exit")
    ident = router.wait_inform()
    ok = router.request(ident, JOBS, "add", args=[1, 2], headers=REPLY)
    assert router.wait_reply(ok) == {"value": 3}
    assert manager.state is State.RUNNING
    assert any("subprocess_setup_func sys.exit failed" in r.getMessage()
               for r in caplog.records)


def test_a_name_too_long_for_a_zeromq_identity_is_cut(router, make_manager):
    """ZeroMQ refuses identities over 255 bytes: the manager's loop crashed."""
    make_manager(name="\u00e9" * 200)  # 400 bytes of UTF-8
    identity = router.wait_inform()
    assert len(identity) <= 255
    head, pid, _count = identity.decode().rsplit(":", 2)
    assert head == "\u00e9" * len(head) and len(head) > 100 and pid == str(os.getpid())


def test_a_job_manager_made_without_a_name_gets_host_pid_random():
    """EventMQ's JobManager generates a name when none is given; emq-green's
    was '' (socket identities ':pid:1-...') until settings were loaded."""
    manager = JobManager(skip_signal=True)
    assert re.fullmatch(rf"{re.escape(os.uname().nodename)}-{os.getpid()}-[0-9a-f]{{6}}",
                        manager.name)
    assert manager.settings.name == manager.name
    assert JobManager(skip_signal=True, name="box-1").name == "box-1"


class _ExitingHooks:
    """An extension whose job_finished calls sys.exit(); it records the
    reasons it is told of disconnections."""

    def __init__(self) -> None:
        self.disconnected_for: list[str] = []

    def job_finished(self, worker, record, outcome, duration):
        raise SystemExit(4)

    def disconnected(self, worker, reason):
        self.disconnected_for.append(reason)


class _ExitingDone(JobManager):
    """A subclass whose worker_done_with_reply calls sys.exit() first."""

    def worker_done_with_reply(self, reply, msgid, death, pid):
        raise SystemExit(5)


def test_a_system_exit_from_a_hook_or_an_override_goes_no_further(router, caplog):
    """A probe's find: an extension hook or a subclass's override that
    raised SystemExit (or KeyboardInterrupt) reached the embedding
    application's main greenlet and ended it, the manager left with a job in
    flight. Now it is logged; the reply and the slot still go; and a stop
    tells the extensions ``disconnected`` (it never did)."""
    from conftest import FAST_HEARTBEATS

    from emq_green.extensions import Extension

    hooks = type("ExitingHooks", (_ExitingHooks, Extension), {})()
    manager = _ExitingDone(settings=Settings(
        name="hooks", worker_addr=router.addr, worker_addr_default=router.addr,
        worker_addr_failover=router.addr, concurrent_jobs=2, **FAST_HEARTBEATS),
        skip_signal=True, extensions=[hooks])
    manager.start()
    try:
        assert manager.wait_for_state(State.RUNNING, timeout=10)
        ident = router.wait_inform()
        for i in range(4):  # more jobs than slots: each slot comes back
            msgid = router.request(ident, JOBS, "add", args=[i, 1], headers=REPLY)
            assert router.wait_reply(msgid) == {"value": i + 1}
        assert manager.state is State.RUNNING and manager.crashed is None
        assert manager.free_slots == 2 and not manager.jobs_in_flight
        logged = [r.getMessage() for r in caplog.records]
        assert sum("failed in job_finished" in m for m in logged) == 4
        assert sum("worker_done_with_reply of _ExitingDone raised" in m for m in logged) == 4
    finally:
        assert stop_for_good(manager)
    assert hooks.disconnected_for == ["stopping"]


class _KilledAtStart:
    def manager_started(self, manager):
        raise gevent.GreenletExit()


def test_a_start_cut_short_by_a_hook_leaves_a_manager_that_stops(router):
    """A probe's find: a GreenletExit raised in an extension's
    ``manager_started`` (the application's greenlet killed in start())
    left the manager half-started, ``connecting`` for ever, and stop() said
    True without stopping anything. Now the manager runs and stops. And
    after a stop, send_ready() went on a closed connection without a word."""
    from conftest import FAST_HEARTBEATS

    from emq_green.extensions import Extension

    hooks = type("KilledAtStart", (_KilledAtStart, Extension), {})()
    manager = JobManager(settings=Settings(
        name="cut", worker_addr=router.addr, worker_addr_default=router.addr,
        worker_addr_failover=router.addr, concurrent_jobs=2, **FAST_HEARTBEATS),
        skip_signal=True, extensions=[hooks])
    with pytest.raises(gevent.GreenletExit):
        manager.start()
    try:
        assert manager.wait_for_state(State.RUNNING, timeout=10)
        router.wait_inform()
    finally:
        assert stop_for_good(manager)
    assert manager.state is State.STOPPED
    # and a stopped manager is not connected: no READY goes anywhere
    assert manager.outgoing is None
    with pytest.raises(RuntimeError, match="not connected"):
        manager.send_ready()


class _Responding(JobManager):
    """Overrides handle_response: records each response, then passes it on,
    or raises first for a job whose reply is 13."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.responses: list[dict] = []

    def handle_response(self, resp):
        self.responses.append(resp)
        if resp["return"] == {"value": 13}:
            raise RuntimeError("audit failed")
        super().handle_response(resp)


def test_a_subclass_handle_response_sees_every_finished_job_as_in_eventmq(router,
                                                                          make_manager):
    """A probe's find: EventMQ passes every finished job through
    handle_response; a subclass's override was never called for the
    manager's own jobs."""
    manager = make_manager(manager_class=_Responding, concurrent_jobs=2)
    ident = router.wait_inform()
    asked = router.request(ident, JOBS, "add", args=[1, 2], headers=REPLY)
    assert router.wait_reply(asked) == {"value": 3}
    quiet = router.request(ident, JOBS, "add", args=[2, 2])
    router.wait_until(lambda: len(manager.responses) == 2)
    assert [(r["callback"], r["msgid"], r["return"], r["death"]) for r in manager.responses] \
        == [("worker_done_with_reply", asked, {"value": 3}, False),
            ("worker_done", quiet, {"value": 4}, False)]
    # one that raises before passing it on: the job is answered all the same
    raised = router.request(ident, JOBS, "add", args=[6, 7], headers=REPLY)
    assert router.wait_reply(raised) == {"value": 13}
    router.wait_until(lambda: manager.free_slots == 2 and not manager.jobs_in_flight)
    assert manager.state is State.RUNNING
