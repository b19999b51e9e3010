"""The emq-green console script as a real process: signals, patching, errors."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import gevent
import pytest
from gevent import subprocess

from emq_green.protocol import Command

EMQ_GREEN = str(Path(sys.executable).with_name("emq-green"))

JOBS = '''
import os
import time

import gevent
import gevent.monkey


def patched():
    return [gevent.monkey.is_module_patched(m) for m in ("socket", "ssl", "threading", "time")]


def nap(seconds):
    time.sleep(seconds)  # cooperative only when the process is patched
    return seconds


def marked_nap(seconds):
    with open("started", "a") as f:
        f.write("x")
    time.sleep(seconds)
    return seconds


def kill_every_greenlet():
    """A job that kills every other greenlet of the worker (its loop too)."""
    import gc

    others = [g for g in gc.get_objects()
              if isinstance(g, gevent.Greenlet) and g is not gevent.getcurrent()]
    gevent.killall(others, block=False)
    return len(others)


def start_a_thread(seconds):
    """Start a non-daemon thread that runs ``seconds``, and return. (Not
    daemon=False, a thread started in a job greenlet is a daemon: it takes
    its flag from the greenlet's dummy thread, which is one.)"""
    import threading

    threading.Thread(target=time.sleep, args=(seconds,), name="left-behind",
                     daemon=False).start()
    return "started"


def exit_from_a_spawned_greenlet():
    """sys.exit() in a greenlet the job spawned (gevent raises it in main)."""
    gevent.spawn(lambda: __import__("sys").exit())
    return "spawned"


def exit_from_a_loop_callback():
    gevent.get_hub().loop.run_callback(lambda: __import__("sys").exit(3))
    return "scheduled"


def throw_into_main():
    import greenlet

    main = greenlet.getcurrent()
    while main.parent is not None:
        main = main.parent
    gevent.get_hub().loop.run_callback(main.throw, SystemExit(0))
    return "thrown"


def gated(name, deadline=30):
    """Mark the start, then wait (patched time.sleep) until the file
    "release" exists: the test decides when it ends."""
    with open("started", "a") as f:
        f.write("x")
    end = time.monotonic() + deadline
    while not os.path.exists("release"):
        if time.monotonic() > end:
            raise TimeoutError("never released")
        time.sleep(0.01)
    return name
'''


class Worker:
    """emq-green in a subprocess, its log in a file the test can wait on."""

    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None) -> None:
        self.cwd = tmp_path
        (tmp_path / "clijobs.py").write_text(JOBS)
        self.log_path = tmp_path / "worker.log"
        self.log = open(self.log_path, "w")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTMQ_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen([EMQ_GREEN, *args], cwd=tmp_path, env=full_env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_file(self, name: str, content: str, timeout: float = 10.0) -> None:
        """Wait until the file ``name`` in the worker's directory holds
        ``content`` (jobs mark their start there)."""
        path = self.cwd / name
        deadline = time.monotonic() + timeout
        while not (path.exists() and path.read_text() == content):
            if time.monotonic() > deadline:
                got = path.read_text() if path.exists() else None
                raise AssertionError(f"{name}: {got!r}, not {content!r}; log:\n{self.text()}")
            gevent.sleep(0.02)  # polling a file with a deadline

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged; log:\n{self.text()}")
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.text()}")
            gevent.sleep(0.05)  # polling a file with a deadline
        return self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def worker_factory(tmp_path):
    made: list[Worker] = []

    def make(*args: str, env: dict | None = None) -> Worker:
        w = Worker(tmp_path, *args, env=env)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def fast(router) -> list[str]:
    return ["-B", router.addr, "--heartbeat-interval", "0.2", "--heartbeat-timeout", "1",
            "--reconnect-timeout", "1"]


def test_script_is_patched_and_runs_jobs_from_the_current_directory(router, worker_factory):
    w = worker_factory(*fast(router), "-J", "3", "-n", "cli")
    ident = router.wait_inform(timeout=20)
    assert ident.startswith(b"cli:")
    router.wait_count(Command.READY, 3)
    msgid = router.request(ident, "clijobs", "patched", headers="reply-requested")
    assert router.wait_reply(msgid) == {"value": [True, True, True, True]}
    # patched time.sleep is cooperative: three jobs that sleep until released
    # all start (unpatched, the first would hold the loop until its deadline)
    gated = [router.request(ident, "clijobs", "gated", args=[f"g{i}"],
                            headers="reply-requested") for i in range(3)]
    w.wait_file("started", "xxx")
    assert not set(gated) & set(router.replies())
    (w.cwd / "release").touch()
    assert [router.wait_reply(m) for m in gated] == [{"value": f"g{i}"} for i in range(3)]


def test_no_monkey_patch_opts_out(router, worker_factory):
    w = worker_factory(*fast(router), "--no-monkey-patch")
    ident = router.wait_inform(timeout=20)
    msgid = router.request(ident, "clijobs", "patched", headers="reply-requested")
    assert router.wait_reply(msgid) == {"value": [False, False, False, False]}
    assert "gevent has not patched" in w.text()


def test_sigterm_drains_running_jobs_then_exits(router, worker_factory):
    w = worker_factory(*fast(router), "-J", "5")
    ident = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 5)
    jobs = [router.request(ident, "clijobs", "gated", args=[f"g{i}"],
                           headers="reply-requested") for i in range(5)]
    w.wait_file("started", "x" * 5)  # all five running, none can end yet
    w.proc.send_signal(signal.SIGTERM)
    w.wait_log("running -> draining")
    router.wait_count(Command.KBYE, 1)
    assert w.proc.poll() is None and not set(jobs) & set(router.replies())
    (w.cwd / "release").touch()  # the drain waits for them
    assert w.proc.wait(15) == 0
    replies = router.replies()
    assert all(replies.get(m) == {"value": f"g{i}"} for i, m in enumerate(jobs)), replies
    assert "running -> draining" in w.text() and "draining -> stopped" in w.text()


@pytest.mark.timeout(90)
def test_requests_sent_to_a_sigstopped_worker_run_when_it_resumes(router, worker_factory):
    """On SIGCONT the heartbeat check ran before libzmq's I/O thread had
    moved the waiting REQUESTs into the socket: the whole stop counted as
    the router's silence, the worker reconnected and closed the socket with
    the REQUESTs in it (lost, with a false ERROR naming the router)."""
    w = worker_factory(*fast(router), "-J", "8", "--heartbeat-liveness", "2")
    ident = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 8)
    for _ in range(3):
        w.proc.send_signal(signal.SIGSTOP)
        try:
            msgids = [router.request(ident, "clijobs", "nap", args=[0],
                                     headers="reply-requested") for _ in range(4)]
            gevent.sleep(3)  # the stop itself: longer than liveness x timeout (2 s)
        finally:
            w.proc.send_signal(signal.SIGCONT)
        for msgid in msgids:
            router.wait_reply(msgid, timeout=20)
        assert router.count(Command.INFORM) == 1, w.text()  # no reconnect
    assert "nothing from the router" not in w.text()
    # (the race lost in a probe 5 times in 10 with a 20 s stop; it did not
    # show here without the fix: this is the scenario, the mechanism is
    # test_manager_corners' test of a pause)


def test_second_sigint_stops_at_once(router, worker_factory, tmp_path):
    w = worker_factory(*fast(router), "-J", "2", "--kill-grace-period", "60")
    ident = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 2)
    msgid = router.request(ident, "clijobs", "marked_nap", args=[60],
                           headers="reply-requested")
    router.wait_until(lambda: (tmp_path / "started").exists())
    w.proc.send_signal(signal.SIGINT)
    w.wait_log("draining: 1 job(s) running")
    started = time.monotonic()
    w.proc.send_signal(signal.SIGINT)
    assert w.proc.wait(10) == 0
    assert time.monotonic() - started < 8
    assert router.wait_reply(msgid)["error"]["type"] == "Killed"


def test_sigusr1_logs_a_status_dump(router, worker_factory, tmp_path):
    w = worker_factory(*fast(router), "-J", "2")
    ident = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 2)
    router.request(ident, "clijobs", "marked_nap", args=[30])
    router.wait_until(lambda: (tmp_path / "started").exists())
    w.proc.send_signal(signal.SIGUSR1)
    text = w.wait_log("in flight")
    line = next(x for x in text.splitlines() if "status: {" in x)
    status = json.loads(line.split("status: ", 1)[1])
    assert status["state"] == "running" and status["free_slots"] == 1
    assert "clijobs.marked_nap" in text


def test_dashboard_addr_on_a_plain_worker_is_named_as_ignored(router, worker_factory):
    w = worker_factory(*fast(router), "--dashboard-addr", "127.0.0.1:1")
    router.wait_inform(timeout=20)
    [line] = [x for x in w.wait_log("dashboard_addr").splitlines() if "dashboard_addr" in x]
    assert "WARNING" in line and "is ignored" in line and "--metrics-addr" in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra, why", [
    ([], "has no effect on emq-green-router: it is a worker setting"),
    (["--scheduler"], "is a worker setting: the router passes every REQUEST on"),
])
def test_allowed_callables_on_the_router_is_named_as_a_worker_setting(tmp_path, extra, why):
    """It was accepted and silently ignored: an operator could believe the
    router filters REQUESTs."""
    from peers import Proc, clean_env, free_ports

    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    (tmp_path / "empty.conf").write_text("")
    router = Proc("emq-green-router", [
        str(Path(EMQ_GREEN).with_name("emq-green-router")), "--frontend-addr", front,
        "--backend-addr", back, "--administrative-addr", admin,
        "--allowed-callables", '["myapp.*"]', *extra], tmp_path / "router.log",
        clean_env(EVENTMQ_CONFIG_FILE=str(tmp_path / "empty.conf")), tmp_path)
    try:
        router.wait_for(r"router listening", timeout=20)
        [line] = [x for x in router.text().splitlines() if " WARNING " in x]
        assert f'allowed_callables (["myapp.*"]) {why}' in line
    finally:
        router.kill()


@pytest.mark.timeout(60)
def test_worker_flags_on_the_router_command_line_are_named(tmp_path):
    """--concurrent-jobs on emq-green-router was accepted silently (its -Q is
    used: the queues of a worker that announces none)."""
    from peers import Proc, clean_env, free_ports

    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    (tmp_path / "empty.conf").write_text("")
    router = Proc("emq-green-router", [
        str(Path(EMQ_GREEN).with_name("emq-green-router")), "--frontend-addr", front,
        "--backend-addr", back, "--administrative-addr", admin, "--concurrent-jobs", "5",
        "-Q", "a"], tmp_path / "router.log",
        clean_env(EVENTMQ_CONFIG_FILE=str(tmp_path / "empty.conf")), tmp_path)
    try:
        router.wait_for(r"router listening", timeout=20)
        [line] = [x for x in router.text().splitlines() if " WARNING " in x]
        assert ("emq-green-router does not use concurrent_jobs, given on its command "
                "line: settings of a worker or a scheduler") in line
    finally:
        router.kill()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("program, started, key", [
    ("emq-green-router", "router listening", "waiting_messages_by_queue"),
    ("emq-green-scheduler", "stopped -> running", "schedules"),
])
def test_sigusr1_on_the_router_or_scheduler_logs_its_status_and_it_keeps_running(
        tmp_path, program, started, key):
    """SIGUSR1 ended emq-green-router and emq-green-scheduler (the default
    action), with what they held; it is the workers' status dump signal."""
    from peers import Proc, clean_env, free_ports

    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    (tmp_path / "empty.conf").write_text("")
    args = (["--frontend-addr", front, "--backend-addr", back, "--administrative-addr", admin]
            if program == "emq-green-router" else
            ["--scheduler-addr", front, "--scheduler-file", str(tmp_path / "s.db")])
    what = program.rsplit("-", 1)[1]
    proc = Proc(program, [str(Path(EMQ_GREEN).with_name(program)), *args],
                tmp_path / f"{what}.log",
                clean_env(EVENTMQ_CONFIG_FILE=str(tmp_path / "empty.conf")), tmp_path)
    try:
        proc.wait_for(started, timeout=20)
        proc.signal(signal.SIGUSR1)
        line = proc.wait_for(what + r" status: \{.*", timeout=20)
        status = json.loads(line.split(" status: ", 1)[1])
        assert status["state"] == "running" and key in status
        assert proc.alive
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit(20) == 0
    finally:
        proc.kill()


def test_sighup_reloads_settings_and_reconnects(router, worker_factory, tmp_path):
    conf = tmp_path / "eventmq.conf"
    conf.write_text('[jobmanager]\nqueues = [[10, "default"]]\n')
    w = worker_factory(*fast(router), "-C", str(conf), "-J", "2")
    first = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 2)
    # (a weight cut to a whole number: the reload logs it, as a start does)
    conf.write_text('[jobmanager]\nqueues = [[20.5, "email"], [10, "default"]]\n')
    w.proc.send_signal(signal.SIGHUP)
    second = router.wait_inform(index=1, timeout=10)
    assert second != first
    informs = router.messages(Command.INFORM)
    assert informs[-1].message.body[0] == '[[20, "email"], [10, "default"]]'
    # the KBYE leaves on the old connection, the INFORM on the new one: no
    # order between the two sockets
    router.wait_until(lambda: router.count(Command.KBYE, first) >= 1, timeout=10)
    assert router.count(Command.KBYE, first) == 1
    router.wait_count(Command.READY, 2, identity=second)
    router.wait_until(lambda: "settings: queues: weight 20.5 for email" in w.text(), timeout=10)


def test_bad_setting_stops_at_start_with_a_clear_message(tmp_path, worker_factory):
    w = worker_factory("-J", "many")
    assert w.proc.wait(20) == 2
    assert "concurrent_jobs: bad value 'many' from the command line" in w.text()
    w2 = worker_factory(env={"EVENTMQ_HEARTBEAT_TIMEOUT": "-1"})
    assert w2.proc.wait(20) == 2
    assert "environment variable EVENTMQ_HEARTBEAT_TIMEOUT" in w2.text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, env, message", [
    (["--job-entry-func", "nosuch.module.fn"], {},
     "job_entry_func: cannot import 'nosuch.module.fn': No module named 'nosuch'"),
    (["--job-exit-func", "clijobs.nosuch"], {},
     "job_exit_func: cannot import 'clijobs.nosuch': module 'clijobs' has no function "
     "'nosuch'"),
    (["--job-entry-func", "nodots"], {},
     "job_entry_func: cannot import 'nodots': not a dotted path to a function "
     "(module.function)"),
    ([], {"EVENTMQ_JOB_EXIT_FUNC": "brokenhooks.after"},
     "job_exit_func: cannot import 'brokenhooks.after': RuntimeError: broken on import"),
    (["--standalone", "--job-entry-func", "nosuch.module.fn"], {},
     "job_entry_func: cannot import 'nosuch.module.fn': No module named 'nosuch'"),
])
def test_a_bad_job_entry_or_exit_func_is_one_line_and_exit_2(tmp_path, worker_factory,
                                                             args, env, message):
    """They are imported when the job manager is built: that raised a
    SettingsError through a traceback, exit 1."""
    (tmp_path / "brokenhooks.py").write_text('raise RuntimeError("broken on import")\n')
    where = [] if "--standalone" in args else ["-B", "tcp://127.0.0.1:1"]  # (ignored there)
    w = worker_factory(*where, *args, env=env)
    assert w.proc.wait(30) == 2, w.text()
    assert w.text() == f"emq-green: {message}\n"


def test_help_lists_eventmq_flags(tmp_path):
    out = subprocess.run([EMQ_GREEN, "--help"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    for flag in ("--broker-addr", "--config", "--queues", "--jobs", "--name",
                 "--no-monkey-patch", "--kill-grace-period"):
        assert flag in out.stdout


@pytest.mark.parametrize("script, listed, not_listed", [
    ("emq-green-router", ["--frontend-addr", "--journal-file", "--max-message-size"],
     ["--jobs", "--queues", "--subprocess-pool-size", "--scheduler-addr"]),
    ("emq-green-scheduler", ["--scheduler-addr", "--scheduler-file", "--curve-server-key-file"],
     ["--jobs", "--frontend-addr", "--journal-file", "--metrics-addr"]),
])
def test_router_and_scheduler_help_list_their_own_flags(script, listed, not_listed):
    out = subprocess.run([str(Path(EMQ_GREEN).with_name(script)), "--help"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    assert "job manager" not in out.stdout
    for flag in listed:
        assert flag in out.stdout
    for flag in not_listed:
        assert flag not in out.stdout
    # a job manager's flag is still accepted (one INI file or environment for all)
    bad = subprocess.run([str(Path(EMQ_GREEN).with_name(script)), "--jobs", "x"],
                         capture_output=True, text=True, timeout=20)
    assert bad.returncode == 2 and "concurrent_jobs" in bad.stderr, bad.stderr


def test_an_unreadable_config_file_is_one_line_and_exit_2(tmp_path):
    conf = tmp_path / "eventmq.conf"
    conf.write_bytes(b"[global]\nname=\xff\n")
    for script, argv, env in (("emq-green", ["-C", str(conf)], {}),
                              ("emq-green-router", [], {"EVENTMQ_CONFIG_FILE": str(conf)})):
        out = subprocess.run([str(Path(EMQ_GREEN).with_name(script)), *argv],
                             capture_output=True, text=True, timeout=20,
                             env={**os.environ, **env})
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and "usage:" not in out.stderr
        assert out.stderr.startswith(f"{script}: config: cannot read ")
        assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("argv", [["-J"], ["-B"], ["-C"], ["--jobs", "x", "--nosuch"]])
def test_a_command_line_error_is_a_short_usage_and_the_reason(argv):
    """A probe's find: a bare -J printed argparse's 45-line usage before
    the reason (settings.md: one line)."""
    out = subprocess.run([EMQ_GREEN, *argv], capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: emq-green "), out.stderr
    assert lines[1].startswith("emq-green: error: "), out.stderr


def test_a_missing_config_file_from_env_is_a_warning_log_line(tmp_path):
    """A probe's find: the warning was printed bare, before logging was set
    up; it is a WARNING line like the others now."""
    gone = tmp_path / "gone.conf"
    out = subprocess.run([EMQ_GREEN, "-J", "0"], capture_output=True, text=True, timeout=20,
                         env={**os.environ, "EVENTMQ_CONFIG_FILE": str(gone)})
    assert out.returncode == 2  # (-J 0 stops it at once; the warning comes first)
    assert f"WARNING - EVENTMQ_CONFIG_FILE names {gone}, which does not exist" in out.stderr \
        or out.stderr.startswith("emq-green: concurrent_jobs"), out.stderr


def test_config_file_from_env_configures_the_script(router, worker_factory, tmp_path):
    conf = tmp_path / "env.conf"
    conf.write_text(textwrap.dedent(f"""
        [global]
        worker_addr = {router.addr}
        heartbeat_interval = 0.2
        [jobmanager]
        concurrent_jobs = 6
        queues = [[30, "fast"]]
    """))
    worker_factory(env={"EVENTMQ_CONFIG_FILE": str(conf), "EVENTMQ_NAME": "from-env"})
    ident = router.wait_inform(timeout=20)
    assert ident.startswith(b"from-env:")
    assert router.messages(Command.INFORM)[0].message.body[0] == '[[30, "fast"]]'
    router.wait_count(Command.READY, 6)


def test_the_demo_runs_over_curve_with_keys_in_a_relative_directory(tmp_path):
    keys = subprocess.run([str(Path(EMQ_GREEN).with_name("emq-green-keys")), "--dir", "dk",
                           "router", "client"], cwd=tmp_path, capture_output=True, timeout=30)
    assert keys.returncode == 0, keys.stderr
    demo = subprocess.run([str(Path(EMQ_GREEN).with_name("emq-green-demo")), "--jobs", "20",
                           "--curve-keys", "dk"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=90)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "results: 20/20 jobs done (0 failed)" in demo.stdout
    assert "over CURVE" in demo.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("job, logged", [
    ("kill_every_greenlet", "job manager loop crashed"),
    ("throw_into_main", "reached the worker's main greenlet"),
])
def test_a_crash_of_the_worker_exits_with_status_1(router, worker_factory, job, logged):
    """A supervisor restarts what exits non-zero: a crash must not exit 0."""
    w = worker_factory(*fast(router), "-J", "2", "-n", "crash")
    ident = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 2)
    router.request(ident, "clijobs", job)
    w.wait_log(logged, timeout=20)
    assert w.proc.wait(30) == 1, w.text()


@pytest.mark.timeout(60)
def test_a_stopped_worker_exits_with_status_0(router, worker_factory):
    w = worker_factory(*fast(router), "-J", "2", "-n", "clean")
    router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 2)
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0, w.text()
    assert "crashed" not in w.text()


@pytest.mark.timeout(60)
def test_a_thread_a_job_left_running_is_named_when_the_worker_stops(router, worker_factory):
    """A probe's find: the worker logged "stopped" and stayed (Python waits
    for non-daemon threads; EventMQ's job manager too), with nothing said."""
    w = worker_factory(*fast(router), "-J", "2", "-n", "threads")
    ident = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 2)
    msgid = router.request(ident, "clijobs", "start_a_thread", args=[60],
                           headers="reply-requested")
    assert router.wait_reply(msgid) == {"value": "started"}
    w.proc.send_signal(signal.SIGTERM)
    w.wait_log("non-daemon thread", timeout=20)
    assert "left-behind" in w.text() and w.proc.poll() is None
    w.proc.send_signal(signal.SIGTERM)  # the handler is gone: it ends now
    assert w.proc.wait(10) == -signal.SIGTERM


@pytest.mark.timeout(60)
@pytest.mark.parametrize("job", ["exit_from_a_spawned_greenlet", "exit_from_a_loop_callback"])
def test_sys_exit_outside_a_job_greenlet_does_not_stop_the_worker(router, worker_factory, job):
    """gevent raised it in the main greenlet: the worker ended at once with
    status 0, no log line, its running jobs lost."""
    w = worker_factory(*fast(router), "-J", "2", "-n", "stray")
    ident = router.wait_inform(timeout=20)
    router.wait_count(Command.READY, 2)
    first = router.request(ident, "clijobs", job, headers="reply-requested")
    assert "error" not in router.wait_reply(first)
    # the stray SystemExit ran once the job had replied; the worker serves on
    for _ in range(3):
        after = router.request(ident, "clijobs", "nap", args=[0], headers="reply-requested")
        assert router.wait_reply(after) == {"value": 0}, w.text()
    assert w.proc.poll() is None, w.text()
    # not silent: gevent's report of the failed greenlet or callback
    assert "SystemExit" in w.text(), w.text()
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0, w.text()



def test_the_default_scheduler_file_in_an_unwritable_directory_is_one_line_and_exit_2(
        tmp_path):
    """Not set, scheduler_file is emq-green-schedules.db in the working
    directory; there unwritable, the scheduler said only 'unable to open
    database file' (exit 1)."""
    cwd = tmp_path / "read-only"
    cwd.mkdir()
    cwd.chmod(0o555)
    if os.getuid() == 0:  # root may write anywhere, but not create files in /proc/1
        cwd = Path("/proc/1")
    out = subprocess.run(
        [str(Path(EMQ_GREEN).with_name("emq-green-scheduler")),
         "--scheduler-addr", "tcp://127.0.0.1:36011"],
        cwd=cwd, capture_output=True, text=True, timeout=20,
        env={**os.environ, "EVENTMQ_CONFIG_FILE": str(tmp_path / "none.conf")})
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines(keepends=True)[-1] == (
        f"emq-green-scheduler: scheduler_file: not set, and its default "
        f"{cwd}/emq-green-schedules.db cannot be created (the working directory is not "
        "writable); set scheduler_file to a writable path (--scheduler-file), or to empty "
        "for schedules in memory only\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["cwd", "flag"])
def test_a_scheduler_file_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, where):
    """A probe's find: run as root in /proc (os.access says root may write
    there), or given --scheduler-file /proc/x.db, the scheduler exited 1."""
    if os.getuid() != 0:
        pytest.skip("only root passes os.access where no file can be made")
    flags = [] if where == "cwd" else ["--scheduler-file", "/proc/x.db"]
    out = subprocess.run(
        [str(Path(EMQ_GREEN).with_name("emq-green-scheduler")),
         "--scheduler-addr", "tcp://127.0.0.1:36013", *flags],
        cwd="/proc", capture_output=True, text=True, timeout=20,
        env={**os.environ, "EVENTMQ_CONFIG_FILE": str(tmp_path / "none.conf")})
    assert out.returncode == 2, out.stderr
    last = out.stderr.splitlines()[-1]
    assert last.startswith("emq-green-scheduler: ") and "/proc/" in last, out.stderr
    if where == "cwd":
        assert "cannot be created" in last


@pytest.mark.timeout(60)
def test_the_router_warns_of_its_heartbeat_settings_once(tmp_path):
    """A probe's find: two WARNINGs, the program's and the router's, for one
    heartbeat_timeout no longer than heartbeat_interval."""
    ports = [str(p) for p in range(36021, 36024)]
    proc = subprocess.Popen(
        [str(Path(EMQ_GREEN).with_name("emq-green-router")), "--heartbeat-interval", "3",
         "--heartbeat-timeout", "3", "--frontend-addr", f"tcp://127.0.0.1:{ports[0]}",
         "--backend-addr", f"tcp://127.0.0.1:{ports[1]}",
         "--administrative-addr", f"tcp://127.0.0.1:{ports[2]}"],
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EVENTMQ_CONFIG_FILE": str(tmp_path / "none.conf")})
    try:
        lines: list[str] = []
        with gevent.Timeout(20):
            while not any("router listening" in line for line in lines):
                lines.append(proc.stderr.readline())
            lines.append(proc.stderr.readline())  # (the router's warning follows)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    said = [line for line in lines if "WARNING" in line and "heartbeat" in line]
    assert len(said) == 1, lines


def test_start_warnings_are_logged_and_the_scheduler_runs(tmp_path):
    """A heartbeat_interval too long, a config file without the program's
    section: EventMQ ran (with a warning for the section); emq-green refused
    the first and said nothing of the second."""
    conf = tmp_path / "eventmq.conf"
    conf.write_text("[router]\nhwm = 5\n")
    proc = subprocess.Popen(
        [str(Path(EMQ_GREEN).with_name("emq-green-scheduler")), "-C", str(conf),
         "--heartbeat-interval", "20", "--scheduler-file", "",
         "--scheduler-addr", "tcp://127.0.0.1:36012"],
        stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        with gevent.Timeout(20):
            while not any("running" in line for line in lines):
                lines.append(proc.stderr.readline())
        text = "".join(lines)
        assert f"WARNING - config: {conf} has no [scheduler] section; no setting" in text
        assert "WARNING - heartbeat_interval (20 s) is not shorter than" in text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.timeout(90)
def test_a_second_scheduler_on_the_same_file_is_refused_and_the_first_ones_kill_frees_it(
        tmp_path):
    """A probe's find: two emq-green-schedulers given one scheduler_file took
    the router connection from each other (the same name, derived from the
    file) with no clear error. The second now stops at its start, naming the
    holder; once the first dies by kill -9 the file is free again."""
    from peers import Proc, clean_env, free_ports

    (front,) = (f"tcp://127.0.0.1:{p}" for p in free_ports(1))
    (tmp_path / "empty.conf").write_text("")
    env = clean_env(EVENTMQ_CONFIG_FILE=str(tmp_path / "empty.conf"))
    program = str(Path(EMQ_GREEN).with_name("emq-green-scheduler"))
    args = [program, "--scheduler-addr", front, "--scheduler-file", str(tmp_path / "s.db")]
    first = Proc("first", args, tmp_path / "first.log", env, tmp_path)
    third = None
    try:
        first.wait_for("stopped -> running", timeout=20)
        second = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env,
                                cwd=str(tmp_path))
        assert second.returncode == 2, second.stderr
        last = second.stderr.splitlines()[-1]
        assert "in use by another scheduler" in last, second.stderr
        assert f"pid {first.pid}" in last, second.stderr
        first.signal(signal.SIGKILL)
        first.wait_exit(20)
        third = Proc("third", args, tmp_path / "third.log", env, tmp_path)
        third.wait_for("stopped -> running", timeout=20)
        assert third.alive
    finally:
        first.kill()
        if third is not None:
            third.kill()
