"""Scheduled jobs through emq-green's router, with real processes: EventMQ
0.3.13's client ``schedule()`` / ``unschedule()``, EventMQ's ``emq-scheduler``
or emq-green's ``emq-green-scheduler``, emq-green workers. Every count is of
jobs that really ran (``interop_jobs.record`` lines). Cron schedules use
croniter's seconds field (``* * * * * *``: every second) so a test needs no
minute-long wait.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Optional

import pytest
from peers import BIN, GreenRouterProc, Peers, Proc, RouterAddrs, wait_until

from emq_green.client.submit import admin_request
from emq_green.protocol import Command

BEATS = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"]
EVENTMQ_BEATS = {"EVENTMQ_HEARTBEAT_INTERVAL": "1", "EVENTMQ_HEARTBEAT_TIMEOUT": "5",
                 "EVENTMQ_RECONNECT_TIMEOUT": "1"}



class GreenRouter(GreenRouterProc):
    """``emq-green-router`` with this file's heartbeats."""

    def __init__(self, peers: Peers, addrs: RouterAddrs, *extra: str) -> None:
        super().__init__(peers, addrs, *BEATS, *extra)

    def admin(self, command: Command) -> dict:
        answer = admin_request(self.addrs.admin, command, timeout=5)
        assert answer is not None, f"no answer to {command.value}\n{self.tail()}"
        return answer

    def schedulers(self) -> dict:
        return self.admin(Command.ROUTER_SHOW_SCHEDULERS)["connected_schedulers"]

    def wait_schedulers(self, count: int, timeout: float = 20) -> dict:
        def found() -> Optional[tuple[dict]]:
            shown = self.schedulers()
            return (shown,) if len(shown) == count else None

        return wait_until(found, timeout, f"{count} scheduler(s) in the router",
                          details=self.tail)[0]


def eventmq_scheduler(peers: Peers, addrs: RouterAddrs) -> Proc:
    proc = Proc("emq-scheduler", [str(BIN / "python"), str(BIN / "emq-scheduler")],
                peers._log("emq-scheduler"),
                peers.env(EVENTMQ_SCHEDULER_ADDR=addrs.frontend,
                          EVENTMQ_CONFIG_FILE=str(peers.tmp / "none.conf"), **EVENTMQ_BEATS),
                peers.tmp)
    peers.procs.append(proc)
    return proc


def green_scheduler(peers: Peers, addrs: RouterAddrs, *extra: str) -> Proc:
    proc = Proc("emq-green-scheduler", [str(BIN / "emq-green-scheduler"),
                                        "--scheduler-addr", addrs.frontend, *BEATS, *extra],
                peers._log("green-scheduler"), peers.env(), peers.tmp)
    peers.procs.append(proc)
    proc.wait_for(r"scheduler: connected", timeout=20)
    return proc


class EventMQClient:
    """EventMQ 0.3.13's own client API on a Sender."""

    def __init__(self, frontend: str) -> None:
        import zmq
        from eventmq.sender import Sender

        self.sender = Sender()
        self.sender.zsocket.setsockopt(zmq.LINGER, 2000)
        self.sender.connect(frontend)

    def schedule(self, tag: str, interval: Optional[int] = None, cron: Optional[str] = None,
                 unschedule: bool = False, queue: str = "default",
                 headers: tuple[str, ...] = ("guarantee",)) -> str:
        from eventmq.client.messages import schedule

        msgid = schedule(self.sender, "interop_jobs.record", interval_secs=interval,
                         args=(tag,), cron=cron, unschedule=unschedule, queue=queue,
                         headers=headers)
        assert msgid
        return msgid

    def close(self) -> None:
        self.sender.zsocket.close(linger=2000)


def wait_runs(peers: Peers, tag: str, count: int, timeout: float = 30) -> int:
    return wait_until(lambda: peers.record.tags()[tag] >= count and peers.record.tags()[tag],
                      timeout, f"{count} runs of {tag}", details=peers.logs)


def runs_stop(peers: Peers, tag: str, quiet: float = 2.5, timeout: float = 20) -> int:
    """Wait until ``tag`` has not run for ``quiet`` seconds (its schedule is
    gone); the count then."""
    def settled() -> Optional[int]:
        lines = [t for e, tg, _p, t in peers.record.lines() if e == "done" and tg == tag]
        import time

        if lines and time.time() - lines[-1] >= quiet:
            return len(lines)
        return None

    return wait_until(settled, timeout, f"{tag} to stop running", interval=0.2,
                      details=peers.logs)


@pytest.mark.timeout(90)
def test_eventmq_scheduler_through_our_router(peers):
    """EventMQ's own scheduler registers with emq-green's router, gets
    SCHEDULE and UNSCHEDULE, and its jobs run on an emq-green worker; a
    SCHEDULE sent before it connected is held, then delivered."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("early", interval=1)  # no scheduler yet: held
        wait_until(lambda: router.admin(Command.STATUS)["schedule_messages_held"] == 1, 10,
                   "the SCHEDULE held")
        eventmq_scheduler(peers, addrs)
        (ident, entry), = router.wait_schedulers(1).items()
        assert isinstance(entry["hb"], float)
        wait_runs(peers, "early", 3)
        client.schedule("every", interval=1)
        client.schedule("cron", cron="* * * * * *", queue="default")
        wait_runs(peers, "every", 3)
        wait_runs(peers, "cron", 3)
        status = router.admin(Command.STATUS)
        assert status["schedulers"] == 1
        assert status["schedule_messages"]["forwarded"] == 3
        assert {r["callable"] for r in status["schedules"]} == {"interop_jobs.record"}
        for tag, kind in (("early", "interval"), ("every", "interval"), ("cron", "cron")):
            if kind == "interval":
                client.schedule(tag, interval=1, unschedule=True)
        done = {tag: runs_stop(peers, tag) for tag in ("early", "every")}
        # EventMQ's scheduler keeps firing an unscheduled cron job (its
        # defect): the router drops those firings, so the job stops too
        client.schedule("cron", cron="* * * * * *", unschedule=True)
        done["cron"] = runs_stop(peers, "cron")
        assert all(n >= 3 for n in done.values()), done
        wait_until(lambda: router.admin(Command.STATUS)["schedule_messages"].get(
            "firing_dropped", 0) >= 1, 10, "a firing of the unscheduled cron job dropped")
        # the scheduler stays registered: the router's heartbeats reach it
        assert len(router.schedulers()) == 1
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_eventmq_scheduler_killed_and_restarted_gets_its_schedules_back(peers):
    """EventMQ's scheduler keeps its schedules in memory only (without
    Redis, and it never reads them back even with it). Through emq-green's
    router a restarted one gets them again: after ``kill -9`` and a new
    ``emq-scheduler``, the interval and cron jobs run on, on their queue
    (EventMQ's scheduler fires cron jobs on the default queue: the router
    puts them back on theirs, where the only worker listens)."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", "--queues-json",
                 '[[10, "other"]]', *BEATS])
    first = eventmq_scheduler(peers, addrs)
    router.wait_schedulers(1)
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("every", interval=1, queue="other")
        client.schedule("cron", cron="* * * * * *", queue="other")
        wait_runs(peers, "every", 3)
        wait_runs(peers, "cron", 3)  # on "other": only after the router's correction
        # the first (haste) run goes out on its queue; the later ones are mended
        assert router.admin(Command.STATUS)["schedule_messages"]["firing_requeued"] >= 2
        os.killpg(first.pid, signal.SIGKILL)
        first.wait_exit(10)
        before = peers.record.tags()
        eventmq_scheduler(peers, addrs)
        wait_until(lambda: router.admin(Command.STATUS)["schedule_messages"].get(
            "handed_over", 0) >= 2, 30, "the two schedules handed to the new scheduler",
            details=router.tail)
        wait_runs(peers, "every", before["every"] + 3)
        wait_runs(peers, "cron", before["cron"] + 3)
        assert len(router.wait_schedulers(1)) == 1
        client.schedule("every", interval=1, unschedule=True, queue="other")
        client.schedule("cron", cron="* * * * * *", unschedule=True, queue="other")
        assert runs_stop(peers, "every") >= before["every"] + 3
        assert runs_stop(peers, "cron") >= before["cron"] + 3
    finally:
        client.close()


@pytest.mark.timeout(90)
def test_malformed_schedules_are_refused_and_nothing_stops(peers):
    """A bad cron text (which kills EventMQ's scheduler), a negative
    interval, a payload that is no call, an oversized SCHEDULE: each is
    refused by the router, counted, and the scheduler and router carry on."""
    import zmq

    from emq_green.protocol import Message

    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    scheduler = eventmq_scheduler(peers, addrs)
    router.wait_schedulers(1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addrs.frontend)
    try:
        payload = ('["run", {"path": "interop_jobs", "callable": "record", "args": ["ok"], '
                   '"kwargs": {}, "class_args": [], "class_kwargs": {}}]')
        bad = [("default", "", "-1", payload, "not a cron"),
               ("default", "", "-5", payload, ""),
               ("default", "", "1", '["run", {}]', ""),
               ("default", "", "1", payload, "x" * 70_000),
               ("default", "", "1", payload),
               ("default", "", "1", '["run", {"path": "interop_jobs", "callable": "record"}]',
                ""),
               # what EventMQ's scheduler reads with int() and dies on
               ("default", "", "0.5", payload, ""),
               ("default", "", "5.0", payload, ""),
               # -1 is cron to it: a one-shot at its eta alone kills it too
               ("default", f"eta:{time.time() + 60:.3f},run_count:1", "-1", payload, "")]
        for body in bad:
            sock.send_multipart(Message.new(Command.SCHEDULE, *body).frames())
        answers = []
        while len(answers) < len(bad):
            assert sock.poll(5000), f"{len(answers)} refusals only\n{router.tail()}"
            answers.append(Message.parse(sock.recv_multipart()))
        assert all('"refused": "refused_malformed"' in a.body[0] for a in answers)
        assert router.admin(Command.STATUS)["schedule_messages"]["refused_malformed"] == 9
        # the good one after them still runs
        sock.send_multipart(Message.new(Command.SCHEDULE, "default", "", "1", payload,
                                        "").frames())
        wait_runs(peers, "ok", 2)
        # a cron schedule with run_count and no nohaste: its first run at once
        # killed EventMQ's scheduler (KeyError); forwarded with nohaste, it runs
        sock.send_multipart(Message.new(Command.SCHEDULE, "default", "run_count:2", "-1",
                                        payload.replace('["ok"]', '["cron-rc"]'),
                                        "* * * * * *").frames())
        wait_runs(peers, "cron-rc", 2)
        assert scheduler.alive and router.alive, scheduler.tail()
    finally:
        sock.close()


def _stop(proc: Proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait_exit(15)


def _tag_times(peers: Peers, tag: str) -> list[float]:
    return [t for e, tg, _p, t in peers.record.lines() if e == "done" and tg == tag]


@pytest.mark.timeout(120)
def test_green_scheduler_interval_cron_unschedule_and_restart(peers, tmp_path):
    """EventMQ's client schedules an interval and a cron job through
    emq-green's router to emq-green's scheduler: both run, on their queue;
    UNSCHEDULE stops both (cron included); a restarted scheduler restores
    from its file what was not unscheduled and fires it again."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", "-Q", "default", "crons",
                 *BEATS])
    db = tmp_path / "schedules.db"
    scheduler = green_scheduler(peers, addrs, "--scheduler-file", str(db))
    router.wait_schedulers(1)
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("iv", interval=1)
        client.schedule("cr", cron="* * * * * *", queue="crons")
        client.schedule("keep", interval=1, headers=("nohaste",))
        wait_runs(peers, "iv", 3)
        wait_runs(peers, "cr", 3)
        wait_runs(peers, "keep", 2)
        # listed in STATUS with next run, last run and runs (from the scheduler)
        rows = wait_until(lambda: [r for r in router.admin(Command.STATUS)["schedules"]
                                   if r.get("runs", 0) >= 1 and r.get("last_run")], 10,
                          "schedules listed with their runs")
        assert {r["queue"] for r in rows} == {"default", "crons"}
        assert all(r["next_run"] > r["last_run"] for r in rows)
        client.schedule("iv", interval=1, unschedule=True)
        client.schedule("cr", cron="* * * * * *", queue="crons", unschedule=True)
        stopped = {tag: runs_stop(peers, tag) for tag in ("iv", "cr")}
        # the cron job ran on the worker of its queue: seen in the worker's log
        before = peers.record.tags()["keep"]
        _stop(scheduler)
        router.wait_schedulers(0)
        scheduler = green_scheduler(peers, addrs, "--scheduler-file", str(db))
        assert "1 schedule(s) restored" in scheduler.text()
        wait_runs(peers, "keep", before + 2)
        assert {tag: peers.record.tags()[tag] for tag in ("iv", "cr")} == stopped
    finally:
        client.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("program", ["green", "eventmq"])
def test_a_run_count_is_kept_across_a_scheduler_kill_9(peers, tmp_path, program):
    """run_count 4 every second; the scheduler is killed with -9 after two
    runs and another one starts (its own file: it restores nothing). The
    router hands the schedule over with the two runs it has not seen:
    four runs in all, not two plus four (a probe saw 5 of 4 with two
    emq-green schedulers and 5 of 3 with EventMQ's)."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])

    def scheduler(n: int) -> Proc:
        if program == "eventmq":
            return eventmq_scheduler(peers, addrs)
        return green_scheduler(peers, addrs, "-n", f"s{n}",
                               "--scheduler-file", str(tmp_path / f"s{n}.db"))

    first = scheduler(1)
    router.wait_schedulers(1)
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("counted", interval=1, headers=("guarantee", "run_count:4"))
        wait_runs(peers, "counted", 2)
        first.kill()
        wait_until(lambda: not router.schedulers(), 20, "the killed scheduler removed",
                   details=router.tail)
        seen = peers.record.tags()["counted"]
        assert seen < 4, seen
        scheduler(2)
        wait_runs(peers, "counted", 4)
        assert runs_stop(peers, "counted", quiet=3, timeout=30) == 4
        assert router.admin(Command.STATUS)["schedule_messages"]["handed_over"] == 1
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_two_green_schedulers_fire_each_schedule_once(peers):
    """Two schedulers connected: the router gives each SCHEDULE to one of
    them (and UNSCHEDULEs it at the other), so every tick runs once; the
    same schedule sent again goes to the same scheduler."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    green_scheduler(peers, addrs, "-n", "s1", "--scheduler-file", str(peers.tmp / "s1.db"))
    green_scheduler(peers, addrs, "-n", "s2", "--scheduler-file", str(peers.tmp / "s2.db"))
    router.wait_schedulers(2)
    client = EventMQClient(addrs.frontend)
    try:
        tags = [f"t{i}" for i in range(6)]
        for tag in tags:
            client.schedule(tag, interval=1, headers=("nohaste",))
        for tag in tags:  # sent again: replaces itself, no second copy anywhere
            client.schedule(tag, interval=1, headers=("nohaste",))
        for tag in tags:
            wait_runs(peers, tag, 5)
        for tag in tags:
            client.schedule(tag, interval=1, unschedule=True)
        counts = {tag: runs_stop(peers, tag) for tag in tags}
        for tag in tags:
            times = _tag_times(peers, tag)
            gaps = [b - a for a, b in zip(times, times[1:])]
            # one scheduler fires it: runs 1 s apart, never two in the same tick
            assert min(gaps) > 0.5, (tag, gaps)
        owners = {r["scheduler"] for r in router.admin(Command.STATUS)["schedules"]}
        assert counts and len(owners) <= 2
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_a_scheduler_killed_9_loses_nothing_sent_after(peers, tmp_path):
    """kill -9 of the scheduler: a SCHEDULE sent before the router noticed is
    not sent into the void (the send fails, the scheduler is taken for
    gone, the SCHEDULE is held); the next scheduler gets it, and restores
    the rest from the default file in its working directory."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs, "--heartbeat-timeout", "60",
                         "--heartbeat-interval", "1")
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    first = green_scheduler(peers, addrs)
    assert "schedules kept in " + str(tmp_path / "emq-green-schedules.db") in first.text()
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("before", interval=1)
        wait_runs(peers, "before", 2)
        first.kill()
        client.schedule("after", interval=1)
        wait_until(lambda: router.admin(Command.STATUS)["schedule_messages_held"] == 1, 10,
                   "the SCHEDULE held", details=router.tail)
        second = green_scheduler(peers, addrs)
        assert "1 schedule(s) restored" in second.text()
        wait_runs(peers, "after", 2)
        base = peers.record.tags()["before"]
        wait_runs(peers, "before", base + 2)
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_a_scheduler_restarted_on_its_file_keeps_its_grid_under_its_default_name(peers,
                                                                                 tmp_path):
    """No ``-n``: a scheduler's default name comes from its host and its
    file, not its pid, so one restarted after ``kill -9`` on the same file is
    the same scheduler to the router: its restored schedule is its own (not
    a stale copy told to go), the missed tick runs once, and the schedule
    goes on on its grid."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    db = tmp_path / "grid.db"
    first = green_scheduler(peers, addrs, "--scheduler-file", str(db))
    [name] = router.wait_schedulers(1)
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("grid", interval=2)
        wait_runs(peers, "grid", 2)
        first.kill()
        second = green_scheduler(peers, addrs, "--scheduler-file", str(db))
        assert "1 schedule(s) restored" in second.text()
        assert list(router.wait_schedulers(1)) == [name]
        base = peers.record.tags()["grid"]
        wait_runs(peers, "grid", base + 3)
    finally:
        client.close()
    times = _tag_times(peers, "grid")
    # after the missed tick's one run, back on the grid of the first runs
    off = [round((t - times[0]) % 2.0, 2) for t in times[base + 1:]]
    assert all(o < 0.3 or o > 1.7 for o in off), (times, off)
    assert "dropped" not in router.text(), router.tail()


@pytest.mark.timeout(150)
def test_a_scheduler_stopped_and_resumed_does_not_fire_twice(peers):
    """SIGSTOP of the scheduler holding a schedule, past the router's
    heartbeat_timeout: the router hands the schedule to the other one, so
    it runs on; after SIGCONT the stopped one fires its stale copy at first
    (the router drops those firings) and, once it has connected again, is
    told to drop it: from then on every tick runs once."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    first = green_scheduler(peers, addrs, "-n", "s1", "--scheduler-file",
                            str(peers.tmp / "s1.db"))
    router.wait_schedulers(1)
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("held", interval=1, headers=("nohaste",))
        wait_runs(peers, "held", 2)
        second = green_scheduler(peers, addrs, "-n", "s2", "--scheduler-file",
                                 str(peers.tmp / "s2.db"))
        router.wait_schedulers(2)
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: router.admin(Command.STATUS)["schedule_messages"].get(
                "handed_over", 0) >= 1, 30, "the schedule handed to s2", details=router.tail)
            handed = peers.record.tags()["held"]
            wait_runs(peers, "held", handed + 2)  # s2 fires it
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        # s1 comes back: it connects again (it heard nothing while stopped)
        wait_until(lambda: first.text().count("scheduler: connected") >= 2, 40,
                   "s1 connected again", details=first.tail)
        router.wait_schedulers(2)
        wait_until(lambda: "unscheduled" in first.text(), 10, "s1 dropping its copy",
                   details=first.tail)
        since = len(_tag_times(peers, "held"))
        wait_runs(peers, "held", since + 4)
        times = _tag_times(peers, "held")[since:]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert min(gaps) > 0.5, gaps  # one holder, one grid: never two runs in a tick
        assert second.alive
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_schedulers_register_again_after_the_router_is_killed_and_restarted(peers):
    """A router killed -9 and restarted does not know the schedulers; they
    hear the REPLYs to what they fire and would never INFORM again. Told
    KBYE on their first HEARTBEAT, emq-green's scheduler connects again;
    EventMQ's (which ignores KBYE) is taken as connected; both then get an
    UNSCHEDULE."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    green = green_scheduler(peers, addrs, "--reconnect-timeout", "1")
    linked = time.monotonic()
    eventmq_scheduler(peers, addrs)
    router.wait_schedulers(2)
    # its link older than reconnect_timeout: a KBYE once made it connect
    # twice at once (two sockets under one name: the router heard neither)
    wait_until(lambda: time.monotonic() - linked > 1.5, 5, "the link older than 1 s")
    router.kill()
    mark = green.mark()
    router = GreenRouter(peers, addrs)
    green.wait_for(r"router said KBYE", timeout=20, since=mark)
    green.wait_for(r"scheduler: connected", timeout=10, since=mark)
    assert "no ACK" not in green.text()[mark:], green.tail()
    router.wait_schedulers(2, timeout=20)
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("again", interval=1)
        wait_runs(peers, "again", 2)
        client.schedule("again", interval=1, unschedule=True)
        assert runs_stop(peers, "again") >= 2
        status = router.admin(Command.STATUS)
        assert status["schedulers"] == 2 and status["schedule_messages_held"] == 0
    finally:
        client.close()


def submit_delayed(peers: Peers, addrs: RouterAddrs, tag: str, delay: float, count: int,
                   *extra: str) -> float:
    """``count`` delayed runs of ``record(tag)``; when they fall due."""
    due = time.time() + delay
    out = subprocess.run([str(BIN / "emq-green-submit"), "interop_jobs.record", "--args",
                          f'["{tag}"]', "--count", str(count), "--delay", str(delay),
                          "--addr", addrs.frontend, *extra],
                         capture_output=True, text=True, env=peers.env(), timeout=30)
    assert out.returncode == 0, out.stderr
    # a SCHEDULE is not acknowledged: no "acknowledged 0" (a probe)
    assert "each to run once" in out.stderr and "acknowledged" not in out.stderr, out.stderr
    return due


@pytest.mark.timeout(120)
def test_delayed_jobs_restored_after_a_kill_9_run_once(peers, tmp_path):
    """A scheduler killed -9 and restarted on its file after its delayed
    jobs fell due fires them from its file when its INFORM is acknowledged;
    the router's hand-over of the same jobs, sent on that INFORM, arrives
    after: each job runs once, not twice."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    db = tmp_path / "delayed.db"
    first = green_scheduler(peers, addrs, "--scheduler-file", str(db))
    router.wait_schedulers(1)
    due = submit_delayed(peers, addrs, "later", 2, 5)
    wait_until(lambda: router.admin(Command.STATUS)["schedule_messages"].get(
        "forwarded", 0) == 5, 10, "the delayed jobs at the scheduler")
    first.kill()
    wait_until(lambda: time.time() > due + 0.5, 10, "the delayed jobs due")
    second = green_scheduler(peers, addrs, "--scheduler-file", str(db))
    assert "5 schedule(s) restored" in second.text()
    assert wait_runs(peers, "later", 5) >= 5
    assert runs_stop(peers, "later") == 5


@pytest.mark.timeout(150)
def test_green_scheduler_registers_again_with_a_restarted_eventmq_router(peers):
    """EventMQ's router killed -9 and restarted knows no scheduler, sends it
    no HEARTBEAT, ACK or KBYE, only REPLYs to what it fires: the scheduler
    used to take those for a live link and never INFORM again, so its
    UNSCHEDULE was dropped (the schedule ran on) and a new SCHEDULE was
    discarded ("no schedulers")."""
    router = peers.router()
    addrs = router.addrs
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", "--heartbeat-interval", "0.2",
                 "--heartbeat-timeout", "1", "--reconnect-timeout", "0.5"])
    # silent for 3 x 5 s before it takes the router for gone: the worker is
    # back long before, and the firings are acknowledged again meanwhile
    green = green_scheduler(peers, addrs, "--reconnect-timeout", "1",
                            "--heartbeat-timeout", "5", "--heartbeat-liveness", "3")
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("before", interval=1)
        wait_runs(peers, "before", 2)
        router.kill()
        mark = green.mark()
        router = peers.router(addrs, config=router.config)
        # the worker comes back first and the firings are acknowledged again
        green.wait_for(r"nothing from the router", timeout=40, since=mark)
        green.wait_for(r"scheduler: connected", timeout=20, since=mark)
        client.schedule("before", interval=1, unschedule=True)
        client.schedule("after", interval=1)
        wait_runs(peers, "after", 2)
        stopped_at = runs_stop(peers, "before")
        assert runs_stop(peers, "before") == stopped_at
    finally:
        client.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outage", ["kill-9", "sigstop"])
def test_an_unschedule_sent_while_the_only_scheduler_is_down_is_not_lost(peers, outage):
    """The UNSCHEDULE went out just after the only scheduler was killed (the
    send failed: dropped) or while it was stopped (lost with the connection
    it closed on waking): the scheduler, back on its file, fired the
    schedule for ever (a probe). Its table must end up empty."""
    addrs = RouterAddrs.fresh()
    router = GreenRouter(peers, addrs)
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", *BEATS])
    db = str(peers.tmp / "s1.db")
    # silent for one heartbeat_timeout (3 s), the scheduler connects again:
    # a stop that lasts until the router removes it lasts that long
    first = green_scheduler(peers, addrs, "-n", "s1", "--scheduler-file", db,
                            "--heartbeat-liveness", "1")
    router.wait_schedulers(1)
    client = EventMQClient(addrs.frontend)
    try:
        client.schedule("doomed", interval=1)
        wait_runs(peers, "doomed", 2)
        if outage == "kill-9":
            first.kill()
            client.schedule("doomed", interval=1, unschedule=True)
            first = green_scheduler(peers, addrs, "-n", "s1", "--scheduler-file", db)
            assert "1 schedule(s) restored" in first.text()
        else:
            os.killpg(first.pid, signal.SIGSTOP)
            try:
                client.schedule("doomed", interval=1, unschedule=True)
                # stopped past the scheduler's own silence limit
                wait_until(lambda: not router.schedulers(), 30, "the scheduler removed",
                           details=router.tail)
            finally:
                os.killpg(first.pid, signal.SIGCONT)
        wait_until(lambda: "unscheduled" in first.text(), 30, "the schedule dropped",
                   details=first.tail)
        router.wait_schedulers(1)
        wait_until(lambda: not router.admin(Command.STATUS)["schedules"], 30,
                   "no schedule listed", details=router.tail)
        assert first.alive
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_a_quick_restart_of_the_green_scheduler_does_not_crash_eventmq_s_router(peers):
    """emq-green's scheduler keeps its name across restarts: restarted
    within EventMQ's heartbeat timeout, it was listed twice there, and
    EventMQ's router died of KeyError when it removed the silent name (a
    probe). A KBYE before each INFORM clears the name there first."""
    router = peers.router()
    addrs = router.addrs
    first = green_scheduler(peers, addrs, "-n", "quick")
    first.wait_for(r"scheduler: connected", timeout=20)
    first.kill()
    second = green_scheduler(peers, addrs, "-n", "quick")
    second.wait_for(r"scheduler: connected", timeout=20)
    mark = router.mark()
    second.kill()
    router.wait_for(r"No HEARTBEAT from scheduler", timeout=60, since=mark)
    third = green_scheduler(peers, addrs, "-n", "quick")
    third.wait_for(r"scheduler: connected", timeout=20)  # the router still answers
    assert router.alive, router.tail()
    assert "KeyError" not in router.text()


@pytest.mark.timeout(120)
def test_delayed_jobs_of_a_queue_reach_its_workers_after_the_router_is_killed_9(peers,
                                                                               tmp_path):
    """A router with its scheduler inside, killed -9 and restarted on the
    scheduler's file: the scheduler fires what fell due at once, before the
    workers have connected again, and the restarted router, knowing no
    queue yet, sent those jobs to the default queue, which these workers do
    not serve: they waited there for ever (a probe, every time). Now they
    wait for the workers of their queue to come back, and run once."""
    addrs = RouterAddrs.fresh()
    db = tmp_path / "schedules.db"
    router = GreenRouter(peers, addrs, "--scheduler", "--scheduler-file", str(db))
    peers.green(["-B", addrs.backend, "-J", "10", "-n", "w1", "-Q", "probe", *BEATS])
    router.wait_schedulers(1)
    due = submit_delayed(peers, addrs, "after-restart", 3, 5, "--queue", "probe")
    wait_until(lambda: router.admin(Command.STATUS)["schedule_messages"].get(
        "forwarded", 0) == 5, 10, "the delayed jobs at the scheduler")
    router.kill()
    wait_until(lambda: time.time() > due + 0.5, 10, "the delayed jobs due")
    router = GreenRouter(peers, addrs, "--scheduler", "--scheduler-file", str(db))
    assert wait_runs(peers, "after-restart", 5, timeout=30) >= 5
    assert runs_stop(peers, "after-restart") == 5
    assert router.admin(Command.STATUS)["waiting_messages_by_queue"] == {}
