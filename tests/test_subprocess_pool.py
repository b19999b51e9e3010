"""CPU-bound jobs in the subprocess pool: real children, a fake router, real sockets."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import cpu_jobs
import gevent
import psutil
import pytest
from gevent import subprocess

from emq_green.jobmanager import JobManager, State
from emq_green.protocol import Command, RunRequest
from emq_green.worker.subprocess_pool import SubprocessExtension, runs_in_subprocess

CPU = "cpu_jobs"
JOBS = "jobs_for_tests"
REPLY = "reply-requested"
# Heartbeats must come from the event loop itself here: the native heartbeat
# thread (emq_green.worker.lifeline) would hide a loop that is blocked.
LOOP_ONLY = dict(thread_heartbeats=False)


def pool_of(manager: JobManager):
    ext = next(e for e in manager.extensions if isinstance(e, SubprocessExtension))
    return ext.pool


def children(recursive: bool = True) -> list[psutil.Process]:
    """Processes started from here; not recursive: the pool's children
    alone, not their sentinels (child.py) nor what their jobs started."""
    return psutil.Process().children(recursive=recursive)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_and_check(router, manager: JobManager, graceful: bool = True) -> None:
    assert manager.stop(timeout=20, graceful=graceful)
    assert manager.state is State.STOPPED
    assert children() == []


def gaps(router, ident, since, until):
    """The three longest silences as (start offset, length), for messages."""
    times = [since] + [r.at for r in router.received
                       if r.identity == ident and since <= r.at <= until] + [until]
    found = sorted(((b - a, a - since) for a, b in zip(times, times[1:])), reverse=True)
    return [f"{length:.2f} s at +{at:.2f} s" for length, at in found[:3]]


@pytest.fixture(autouse=True)
def _no_children_left():
    assert children() == []
    yield
    # a manager the test did not stop is stopped by make_manager's teardown,
    # which runs after this; the tests stop theirs and check themselves.


@pytest.fixture
def cpu_log(tmp_path, monkeypatch):
    path = tmp_path / "cpu.log"
    monkeypatch.setenv(cpu_jobs.LOG_ENV, str(path))

    def read() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    return read


def test_routing_by_flag_name_and_module_prefix():
    def req(path, name, flag=False):
        return RunRequest(path=path, callable=name, subprocess=flag)

    patterns = ("reports.build", "imaging.*", "app.jobs:Mailer.send")
    assert runs_in_subprocess(req("anything", "f", flag=True), ())
    assert runs_in_subprocess(req("reports", "build"), patterns)
    assert not runs_in_subprocess(req("reports", "build_all"), patterns)
    assert not runs_in_subprocess(req("reports.build", "x"), patterns)
    assert runs_in_subprocess(req("imaging", "resize"), patterns)
    assert runs_in_subprocess(req("imaging.fx", "blur"), patterns)
    assert runs_in_subprocess(req("imaging.fx:Filter", "apply"), patterns)
    assert not runs_in_subprocess(req("imagingx", "resize"), patterns)
    assert runs_in_subprocess(req("app.jobs:Mailer", "send"), patterns)
    assert not runs_in_subprocess(req("app.jobs", "send"), patterns)


@pytest.mark.timeout(90)
def test_flagged_cpu_job_leaves_io_jobs_and_heartbeats_alone(router, make_manager, tmp_path):
    manager = make_manager(concurrent_jobs=510, subprocess_pool_size=2, **LOOP_ONLY)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 510)
    release = tmp_path / "release"
    # computes until the test releases it: it spans every IO job below
    cpu = router.request(ident, CPU, "spin_until", args=[str(release), 80], headers=REPLY,
                         subprocess=True)
    router.wait_until(lambda: pool_of(manager) and pool_of(manager).status()["busy"] == 1)
    start = time.monotonic()
    sent: dict[str, float] = {}
    for i in range(500):
        if i and i % 50 == 0:
            gevent.sleep(0.2)  # requests arrive in waves, not all in one loop turn
        nap = 0.5 + (i % 10) * 0.5  # 0.5 .. 5 s
        msgid = router.request(ident, JOBS, "nap", args=[nap], headers=REPLY)
        sent[msgid] = nap
    router.wait_count(Command.REPLY, 500, timeout=40)
    # every IO job answered while the CPU job still computes: in-process, it
    # would hold them all until the test releases it
    assert cpu not in router.replies() and pool_of(manager).status()["busy"] == 1
    released = time.monotonic()
    release.touch()
    reply = router.wait_reply(cpu, timeout=20)["value"]
    assert reply["pid"] != os.getpid() and reply["pid"] in manager.pid_distribution
    replies = router.replies()
    assert all(replies[m] == {"value": nap} for m, nap in sent.items())
    # and the loop (no heartbeat thread here) was never silent while it
    # computed: a HEARTBEAT fills every 0.2 s without a REPLY or a READY
    # (heartbeats are sent only then, so their number depends on the traffic)
    assert router.longest_silence(ident, start, released) < 1.0, \
        gaps(router, ident, start, released)
    router.wait_count(Command.READY, 510 + 501)
    assert manager.pid_distribution[os.getpid()] == 500
    stop_and_check(router, manager)


def test_the_same_job_unflagged_stalls_the_loop(router, make_manager):
    manager = make_manager(concurrent_jobs=4, subprocess_pool_size=2, **LOOP_ONLY)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    start = time.monotonic()
    msgid = router.request(ident, CPU, "spin", args=[1.5], headers=REPLY)
    reply = router.wait_reply(msgid, timeout=10)["value"]
    end = time.monotonic()
    assert reply["pid"] == os.getpid()
    assert pool_of(manager) is None  # no pool was even started
    assert router.longest_silence(ident, start, end) > 1.0
    stop_and_check(router, manager)


def test_subprocess_callables_setting_and_json_round_trip(router, make_manager):
    manager = make_manager(concurrent_jobs=9, subprocess_pool_size=2,
                           subprocess_callables=(f"{CPU}.pid", f"{JOBS}.*"))
    ident = router.wait_inform()
    listed = router.request(ident, CPU, "pid", headers=REPLY)
    unlisted = router.request(ident, CPU, "other_pid", headers=REPLY)
    echo = router.request(ident, JOBS, "echo", args=[1, "two", [3.5, None]],
                          kwargs={"k": {"x": True}}, headers=REPLY)
    greet = router.request(ident, f"{JOBS}:Greeter", "greet", args=["Ada"],
                           class_args=["Hello"], headers=REPLY)
    boom = router.request(ident, JOBS, "boom", args=["kaput"], headers=REPLY)
    unserialisable = router.request(ident, JOBS, "unserialisable", headers=REPLY)
    missing = router.request(ident, JOBS, "missing_function", headers=REPLY)
    noisy = router.request(ident, CPU, "noisy", args=["hi"], headers=REPLY, subprocess=True)
    flaky = router.request(ident, JOBS, "flaky", args=["k", 1], headers=f"{REPLY},retry-count:1")
    child_pid = router.wait_reply(listed)["value"]
    assert child_pid != os.getpid() and child_pid in pool_of(manager).pids()
    assert router.wait_reply(unlisted)["value"] == os.getpid()
    assert router.wait_reply(echo) == {
        "value": {"args": [1, "two", [3.5, None]], "kwargs": {"k": {"x": True}}}}
    assert router.wait_reply(greet) == {"value": "Hello, Ada!"}
    reply = router.wait_reply(boom)
    assert reply["value"] == "kaput" and reply["error"]["type"] == "ValueError"
    reply = router.wait_reply(unserialisable)
    assert "not JSON serializable" in reply["value"]
    assert reply["error"]["type"] == "TypeError"
    assert router.wait_reply(missing)["error"]["type"] == "AttributeError"
    assert router.wait_reply(noisy) == {"value": ["hi", ""]}
    assert router.wait_reply(flaky) == {"value": 2}  # retried in the same child
    router.wait_count(Command.READY, 8 + 9)
    assert sum(manager.pid_distribution.values()) == 9
    assert set(manager.pid_distribution) - {os.getpid()} <= set(pool_of(manager).pids())
    stop_and_check(router, manager)


def test_busy_children_make_subprocess_jobs_wait_but_not_io_jobs(router, make_manager,
                                                                  tmp_path):
    manager = make_manager(concurrent_jobs=4, subprocess_pool_size=1)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    release = tmp_path / "release"
    first = router.request(ident, CPU, "spin_until", args=[str(release)], headers=REPLY,
                           subprocess=True)
    second = router.request(ident, CPU, "spin_until", args=[str(release)], headers=REPLY,
                            subprocess=True)
    router.wait_until(lambda: pool_of(manager) and pool_of(manager).status()["waiting"] == 1)
    io = router.request(ident, JOBS, "add", args=[1, 2], headers=REPLY)
    assert router.wait_reply(io) == {"value": 3}
    # the IO job did not wait for either: both are still held
    assert first not in router.replies() and second not in router.replies()
    assert pool_of(manager).status()["busy"] == 1
    release.touch()
    a, b = router.wait_reply(first)["value"], router.wait_reply(second, timeout=20)["value"]
    assert a["pid"] == b["pid"]  # one child, one job after the other
    earlier, later = sorted((a, b), key=lambda r: r["started"])
    assert later["started"] >= earlier["ended"]
    router.wait_count(Command.READY, 4 + 3)
    stop_and_check(router, manager)


def test_timeout_kills_the_process_group_and_a_fresh_child_follows(
        router, make_manager, tmp_path):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1, global_timeout=60)
    ident = router.wait_inform()
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    msgid = router.request(ident, CPU, "spawn_and_spin", args=[str(pid_file), 30],
                           headers=f"{REPLY},timeout:1", subprocess=True)
    reply = router.wait_reply(msgid, timeout=10)
    assert reply["value"] == "TimeoutError" and reply["error"]["type"] == "TimeoutError"
    assert 0.9 <= time.monotonic() - started < 10
    router.wait_until(lambda: gone(int(pid_file.read_text())), timeout=10)
    pool = pool_of(manager)
    assert pool.counters["timed_out"] == 1
    after = router.request(ident, CPU, "pid", headers=REPLY, subprocess=True)
    new_pid = router.wait_reply(after)["value"]
    assert new_pid != os.getpid() and pool.pids() == [new_pid]
    router.wait_count(Command.READY, 2 + 2)
    assert manager.counters["timed_out"] == 1
    stop_and_check(router, manager)


@pytest.mark.parametrize("job, args, reason", [
    ("exit_hard", [3], "exited with code 3"),
    ("kill_self", [], "killed by SIGKILL"),
    ("segfault", [], "killed by SIGSEGV"),
])
def test_a_crashing_child_fails_only_its_own_job(router, make_manager, job, args, reason,
                                                 tmp_path):
    manager = make_manager(concurrent_jobs=4, subprocess_pool_size=2)
    ident = router.wait_inform()
    release = tmp_path / "release"
    # the other job computes in one child until the crash is over
    other = router.request(ident, CPU, "spin_until", args=[str(release), 60], headers=REPLY,
                           subprocess=True)
    router.wait_until(lambda: pool_of(manager) and pool_of(manager).status()["busy"] == 1)
    crash = router.request(ident, CPU, job, args=args, headers=REPLY, subprocess=True)
    reply = router.wait_reply(crash)
    assert reply["error"]["type"] == "ChildProcessError"
    assert reason in reply["value"], reply
    assert other not in router.replies() and pool_of(manager).status()["busy"] == 1
    release.touch()
    survived = router.wait_reply(other)["value"]
    assert survived["pid"] != os.getpid() and survived["ended"] > survived["started"]
    after = router.request(ident, CPU, "pid", headers=REPLY, subprocess=True)
    assert router.wait_reply(after)["value"] != os.getpid()
    router.wait_until(lambda: len(pool_of(manager).pids()) == 2)
    assert pool_of(manager).counters["children_died"] == 1
    router.wait_count(Command.READY, 4 + 3)
    stop_and_check(router, manager)


def test_a_child_that_dies_while_a_process_it_forked_holds_its_pipe(router, make_manager,
                                                                      tmp_path):
    """The job forks (the fork inherits the pool's pipe) and the child is
    killed: the death is seen at once, not when the pipe closes two minutes
    later; the fork dies with its process group."""
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1)
    ident = router.wait_inform()
    pid_file = tmp_path / "grandchild"
    crash = router.request(ident, CPU, "fork_then_die", args=[str(pid_file)],
                           headers=REPLY, subprocess=True)
    reply = router.wait_reply(crash, timeout=20)
    assert reply["error"]["type"] == "ChildProcessError"
    assert "killed by SIGKILL" in reply["value"], reply
    router.wait_until(lambda: gone(int(pid_file.read_text())), timeout=10)
    after = router.request(ident, CPU, "pid", headers=REPLY, subprocess=True)
    assert router.wait_reply(after)["value"] != os.getpid()
    assert pool_of(manager).counters["children_died"] == 1
    stop_and_check(router, manager)


def test_a_child_that_died_while_idle_fails_no_job(router, make_manager):
    # the next job took the dead child and failed with BrokenPipeError
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1)
    ident = router.wait_inform()
    first = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True))["value"]
    router.wait_until(lambda: pool_of(manager).status()["busy"] == 0)
    os.kill(first, signal.SIGKILL)
    router.wait_until(lambda: gone(first))
    # seen before any job comes: counted, no longer listed, replaced (it ran a job)
    router.wait_until(lambda: pool_of(manager).counters["children_died"] == 1)
    router.wait_until(lambda: len(pool_of(manager).pids()) == 1
                      and first not in pool_of(manager).pids())
    replacement = pool_of(manager).pids()[0]
    reply = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True))
    assert "error" not in reply, reply
    assert reply["value"] == replacement
    assert pool_of(manager).pids() == [replacement]
    assert pool_of(manager).counters["children_died"] == 1


def test_a_child_that_dies_idle_before_its_first_job_is_forgotten_not_restarted(
        router, make_manager):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=2)
    ident = router.wait_inform()
    router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY, subprocess=True))
    router.wait_until(lambda: pool_of(manager).status()["busy"] == 0)
    pool = pool_of(manager)
    fresh = [c.pid for c in pool._children.values() if c.jobs == 0]
    assert len(fresh) == 1
    os.kill(fresh[0], signal.SIGKILL)
    router.wait_until(lambda: pool.counters["children_died"] == 1
                      and fresh[0] not in pool.pids())
    assert len(pool.pids()) == 1 and pool.counters["children_started"] == 2
    # the next jobs start it again on demand
    msgids = [router.request(ident, JOBS, "nap", args=[0.3], headers=REPLY, subprocess=True)
              for _ in range(2)]
    assert all("error" not in router.wait_reply(m) for m in msgids)
    assert len(pool.pids()) == 2 and pool.counters["children_started"] == 3
    stop_and_check(router, manager)
    stop_and_check(router, manager)


def test_a_pool_of_one_whose_replacement_died_before_its_first_job_runs_the_next(
        router, make_manager):
    """A probe's find: a pool of one; its child killed while idle, the
    replacement killed too before its first job. The dead replacement stayed
    in the idle queue, so the next job started no child, skipped the dead
    one and waited for ever (62 jobs piled up, the worker's slots leaking).
    Now a job that finds no live idle child starts one."""
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1)
    ident = router.wait_inform()
    first = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True))["value"]
    pool = pool_of(manager)
    router.wait_until(lambda: pool.status()["busy"] == 0)
    os.kill(first, signal.SIGKILL)  # it ran a job: replaced at once
    router.wait_until(lambda: len(pool.pids()) == 1 and first not in pool.pids())
    replacement = pool.pids()[0]
    os.kill(replacement, signal.SIGKILL)  # before its first job: not replaced
    router.wait_until(lambda: pool.counters["children_died"] == 2 and not pool.pids())
    msgids = [router.request(ident, CPU, "pid", headers=REPLY, subprocess=True)
              for _ in range(2)]
    values = [router.wait_reply(m, timeout=20) for m in msgids]
    assert all("error" not in v for v in values), values
    assert {v["value"] for v in values} == set(pool.pids()) and len(pool.pids()) == 1
    assert pool.status()["busy"] == 0 and manager.free_slots == 2
    stop_and_check(router, manager)


def test_a_child_slower_to_start_than_the_job_s_timeout_is_not_killed_for_it(
        router, make_manager, monkeypatch):
    """A probe's find: a subprocess_setup_func slower than the jobs' timeout
    (django.setup() and timeout:5) had each child killed mid-setup by the
    job waiting for it, and a fresh one started from zero: no job ever ran
    while jobs kept coming. A job still gives up at its timeout, but the
    child goes on starting (until STARTUP_TIMEOUT) and serves the next."""
    monkeypatch.setenv("EMQ_TEST_SETUP_SECONDS", "3")
    manager = make_manager(concurrent_jobs=3, subprocess_pool_size=1,
                           subprocess_setup_func=f"{CPU}.slow_setup")
    ident = router.wait_inform()
    early = router.wait_reply(router.request(ident, CPU, "pid", headers=f"{REPLY},timeout:1",
                                             subprocess=True), timeout=20)
    assert early["error"]["type"] == "ChildProcessError", early
    assert "still starting" in early["value"] and "subprocess_setup_func" in early["value"]
    # the child it left starting serves the next jobs (once its setup is done)
    msgids = [router.request(ident, CPU, "pid", headers=f"{REPLY},timeout:20",
                             subprocess=True) for _ in range(2)]
    replies = [router.wait_reply(m, timeout=30) for m in msgids]
    assert [r.get("value") for r in replies] == pool_of(manager).pids() * 2, replies
    assert pool_of(manager).counters["children_started"] == 1  # never killed for it
    stop_and_check(router, manager)


def test_a_child_that_dies_in_its_setup_says_the_job_did_not_start(router, make_manager):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1,
                           subprocess_setup_func=f"{CPU}.dying_setup")
    ident = router.wait_inform()
    reply = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True), timeout=20)
    assert reply["error"]["type"] == "ChildProcessError"
    assert "exited with code 4 before it was ready" in reply["value"], reply
    assert "subprocess_setup_func" in reply["value"] and "did not start" in reply["value"]
    stop_and_check(router, manager)


def test_a_job_that_writes_on_the_pool_s_pipe_fails_alone_and_plainly(router, make_manager):
    """A probe's find: a line that is JSON but no outcome crashed the job
    runner (TypeError in the worker's log and the reply)."""
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1)
    ident = router.wait_inform()
    reply = router.wait_reply(router.request(ident, CPU, "scribble", headers=REPLY,
                                             subprocess=True), timeout=20)
    assert reply["error"]["type"] == "ChildProcessError", reply
    assert "instead of an outcome" in reply["value"]
    after = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True), timeout=20)
    assert "error" not in after and pool_of(manager).counters["children_died"] == 1
    stop_and_check(router, manager)


def test_a_kill_9_of_the_worker_takes_what_a_subprocess_job_forked_with_it(router, tmp_path):
    """The child dies with the worker (its PDEATHSIG); its sentinel takes
    the rest of its process group: the grandchild a job started, itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTMQ_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                      env.get("PYTHONPATH")]))
    worker = subprocess.Popen([str(Path(sys.executable).with_name("emq-green")),
                               "-B", router.addr, "-J", "2"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ident = router.wait_inform(timeout=30)
        pid_file = tmp_path / "grandchild.pid"
        router.request(ident, CPU, "spawn_and_spin", args=[str(pid_file), 60],
                       headers=REPLY, subprocess=True)
        router.wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=30)
        grandchild = psutil.Process(int(pid_file.read_text()))
        child = grandchild.ppid()
        group = [p.pid for p in psutil.Process(child).children()]
        assert grandchild.pid in group and len(group) == 2  # the grandchild, the sentinel
    finally:
        worker.kill()
        worker.wait(10)
    router.wait_until(lambda: all(gone(pid) for pid in [child, *group]), timeout=10)


def test_a_sentinel_killed_from_outside_is_reaped_and_replaced_before_the_next_job(
        router, make_manager):
    """Without this the killed sentinel stayed a zombie, and what later jobs
    forked would have outlived a killed worker."""
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1)
    ident = router.wait_inform()
    child = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True))["value"]
    [sentinel] = psutil.Process(child).children()
    sentinel.kill()
    router.wait_until(lambda: gone(sentinel.pid), timeout=10)
    assert router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                            subprocess=True))["value"] == child
    with pytest.raises(psutil.NoSuchProcess):  # reaped, not a zombie
        psutil.Process(sentinel.pid).status()
    [replacement] = psutil.Process(child).children()
    assert replacement.pid != sentinel.pid
    assert replacement.status() != psutil.STATUS_ZOMBIE
    # stdin, stdout (/dev/null), stderr: no pipe held, once the new sentinel
    # has closed what it inherited (it runs beside the job: read at once, it
    # could still hold them: one failure in a loaded run)
    router.wait_until(lambda: replacement.num_fds() == 3, timeout=10)
    stop_and_check(router, manager)
    router.wait_until(lambda: gone(replacement.pid), timeout=10)  # it ended the group


def test_children_are_recycled_after_max_job_count(router, make_manager):
    manager = make_manager(concurrent_jobs=8, subprocess_pool_size=1, max_job_count=3)
    ident = router.wait_inform()
    msgids = [router.request(ident, CPU, "pid", headers=REPLY, subprocess=True)
              for _ in range(7)]
    pids = [router.wait_reply(m)["value"] for m in msgids]
    assert sorted(pids.count(p) for p in set(pids)) == [1, 3, 3]
    assert os.getpid() not in pids
    assert sorted(manager.pid_distribution.values()) == [1, 3, 3]
    router.wait_until(lambda: all(gone(p) for p in set(pids) - set(pool_of(manager).pids())))
    assert len(pool_of(manager).pids()) == 1
    assert pool_of(manager).counters["children_recycled"] == 2
    stop_and_check(router, manager)


def test_setup_runs_once_in_the_worker_and_per_child_and_entry_exit_around_each_job(
        router, make_manager, cpu_log):
    # in the worker too: EventMQ runs it in its worker processes, where its
    # jobs run, and a migrated worker failed every job that needed it
    manager = make_manager(concurrent_jobs=4, subprocess_pool_size=2,
                           subprocess_setup_func=f"{CPU}.setup",
                           job_entry_func=f"{CPU}.entry", job_exit_func=f"{CPU}.exit_")
    ident = router.wait_inform()
    here = router.wait_reply(router.request(ident, CPU, "setup_state", headers=REPLY))
    assert here["value"] == {"setup_pid": os.getpid(), "pid": os.getpid()}
    msgids = [router.request(ident, CPU, "setup_state", headers=REPLY, subprocess=True)
              for _ in range(6)]
    states = [router.wait_reply(m)["value"] for m in msgids]
    assert all(s["setup_pid"] == s["pid"] for s in states)
    child_pids = {s["pid"] for s in states}
    stop_and_check(router, manager)
    log = [line.split() for line in cpu_log()]
    setups = [int(pid) for event, pid in log if event == "setup"]
    assert setups.count(os.getpid()) == 1
    in_children = [pid for pid in setups if pid != os.getpid()]
    assert sorted(in_children) == sorted(set(in_children)) and child_pids <= set(in_children)
    assert len(in_children) == 2
    assert sum(1 for event, _ in log if event == "entry") == 7
    assert sum(1 for event, _ in log if event == "exit") == 7


def test_graceful_stop_waits_for_subprocess_jobs_and_leaves_no_child(router, make_manager,
                                                                     tmp_path):
    manager = make_manager(concurrent_jobs=4, subprocess_pool_size=2)
    ident = router.wait_inform()
    release = tmp_path / "release"
    msgid = router.request(ident, CPU, "spin_until", args=[str(release), 60], headers=REPLY,
                           subprocess=True)
    router.wait_until(lambda: pool_of(manager) and pool_of(manager).status()["busy"] == 1)
    assert len(children(recursive=False)) == 2
    stopping = gevent.spawn(stop_and_check, router, manager)
    assert manager.wait_for_state(State.DRAINING, timeout=10)
    router.wait_count(Command.KBYE, 1)
    # draining, and still waiting for the job: released only now
    assert msgid not in router.replies() and not stopping.ready()
    assert len(children(recursive=False)) == 2
    release.touch()
    stopping.get(timeout=30)
    assert router.wait_reply(msgid)["value"]["pid"] != os.getpid()


def test_hard_stop_kills_the_children(router, make_manager):
    manager = make_manager(concurrent_jobs=4, subprocess_pool_size=2, kill_grace_period=0.5)
    ident = router.wait_inform()
    msgids = [router.request(ident, CPU, "spin", args=[60], headers=REPLY, subprocess=True)
              for _ in range(3)]
    router.wait_until(lambda: pool_of(manager) and pool_of(manager).status()["busy"] == 2)
    started = time.monotonic()
    stop_and_check(router, manager, graceful=False)
    assert time.monotonic() - started < 30  # killed, not waited for (the jobs spin 60 s)
    for msgid in msgids:
        assert router.wait_reply(msgid)["error"]["type"] == "Killed"


def test_reload_with_a_new_pool_size_replaces_the_pool(router, make_manager):
    made: list[JobManager] = []
    manager = make_manager(concurrent_jobs=4, subprocess_pool_size=2,
                           settings_loader=lambda: made[0].settings.replace(
                               subprocess_pool_size=1))
    made.append(manager)
    ident = router.wait_inform()
    first = router.request(ident, CPU, "pid", headers=REPLY, subprocess=True)
    router.wait_reply(first)
    old_pids = pool_of(manager).pids()
    assert len(old_pids) == 2
    manager.reload()  # what SIGHUP does (the fixture's manager has no signal handlers)
    router.wait_inform(index=1)
    assert pool_of(manager) is None
    router.wait_until(lambda: all(gone(p) for p in old_pids))
    ident = router.identities[1]
    after = router.request(ident, CPU, "pid", headers=REPLY, subprocess=True)
    new_pid = router.wait_reply(after)["value"]
    assert new_pid not in old_pids and pool_of(manager).pids() == [new_pid]
    stop_and_check(router, manager)


# ---------------------------------------------------------------------------
# corners: timeouts and retries, entry/exit functions, recycling, grace period


def log_counts(cpu_log) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in cpu_log():
        event = line.split()[0]
        counts[event] = counts.get(event, 0) + 1
    return counts


def entry_exit_manager(make_manager, **settings):
    return make_manager(concurrent_jobs=2, subprocess_pool_size=1,
                        job_entry_func=f"{CPU}.entry", job_exit_func=f"{CPU}.exit_",
                        **settings)


def test_a_timed_out_subprocess_job_is_not_retried(router, make_manager, cpu_log, tmp_path):
    """Also: job_exit_func does not run for a job whose child was killed (the
    gap the pool's docstring names: the child dies with the job)."""
    manager = entry_exit_manager(make_manager, global_timeout=60)
    ident = router.wait_inform()
    msgid = router.request(ident, CPU, "logged_spin_until", args=[str(tmp_path / "never")],
                           headers=f"{REPLY},retry-count:2,timeout:1", subprocess=True)
    assert router.wait_reply(msgid, timeout=20)["value"] == "TimeoutError"
    # a job after it runs in the fresh child: anything the old one did is logged by then
    after = router.request(ident, CPU, "pid", headers=REPLY, subprocess=True)
    assert router.wait_reply(after, timeout=20)["value"] in pool_of(manager).pids()
    counts = log_counts(cpu_log)
    assert counts.get("run") == 1  # one attempt, no retry
    assert counts.get("entry") == 2  # the timed-out job and the one after
    assert counts.get("exit") == 1  # only the one after: the killed child ran none
    stop_and_check(router, manager)


def test_subprocess_entry_and_exit_run_once_per_job_across_retries(router, make_manager,
                                                                   cpu_log):
    manager = entry_exit_manager(make_manager)
    ident = router.wait_inform()
    msgid = router.request(ident, CPU, "logged_flaky", args=["x", 2],
                           headers=f"{REPLY},retry-count:2", subprocess=True)
    assert router.wait_reply(msgid, timeout=20) == {"value": 3}
    assert log_counts(cpu_log) == {"entry": 1, "run": 3, "exit": 1}
    stop_and_check(router, manager)


def test_a_raising_entry_function_in_a_child_fails_the_job_unrun(router, make_manager,
                                                                 cpu_log, tmp_path):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1,
                           job_entry_func=f"{CPU}.entry_boom", job_exit_func=f"{CPU}.exit_")
    ident = router.wait_inform()
    msgid = router.request(ident, CPU, "logged_spin_until", args=[str(tmp_path / "x"), 1],
                           headers=f"{REPLY},retry-count:2", subprocess=True)
    reply = router.wait_reply(msgid, timeout=20)
    assert reply["value"] == "entry failed" and reply["error"]["type"] == "RuntimeError"
    assert log_counts(cpu_log) == {"entry": 1}  # not run, no exit
    stop_and_check(router, manager)


def test_a_killed_subprocess_job_gets_no_exit_function(router, make_manager, cpu_log,
                                                       tmp_path):
    """What is true today (docs: "job_exit_func does not run for a job whose
    child was killed"): a hard stop kills the child mid-job, and the exit
    function, which would run in that child, never does."""
    manager = entry_exit_manager(make_manager)
    ident = router.wait_inform()
    msgid = router.request(ident, CPU, "logged_spin_until", args=[str(tmp_path / "never")],
                           headers=REPLY, subprocess=True)
    router.wait_until(lambda: log_counts(cpu_log).get("run") == 1, timeout=20)
    stop_and_check(router, manager, graceful=False)
    assert router.wait_reply(msgid)["error"]["type"] == "Killed"
    assert log_counts(cpu_log) == {"entry": 1, "run": 1}


@pytest.mark.parametrize("last", ["timeout", "crash"])
def test_recycling_after_max_job_count_when_the_last_job_fails(router, make_manager,
                                                               tmp_path, last):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1, max_job_count=2,
                           global_timeout=60)
    ident = router.wait_inform()
    first = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True))["value"]
    if last == "timeout":
        msgid = router.request(ident, CPU, "spin_until", args=[str(tmp_path / "never")],
                               headers=f"{REPLY},timeout:1", subprocess=True)
        assert router.wait_reply(msgid, timeout=20)["value"] == "TimeoutError"
    else:
        msgid = router.request(ident, CPU, "exit_hard", args=[3], headers=REPLY,
                               subprocess=True)
        assert router.wait_reply(msgid, timeout=20)["error"]["type"] == "ChildProcessError"
    router.wait_until(lambda: gone(first), timeout=10)
    # exactly one child replaces it (recycling and the failure do not both
    # start one), and it starts its own count of max_job_count jobs
    pids = [router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True), timeout=20)["value"]
            for _ in range(3)]
    assert first not in pids
    assert pids[0] == pids[1] != pids[2]
    router.wait_until(lambda: gone(pids[0]), timeout=10)
    assert pool_of(manager).pids() == [pids[2]]
    assert len(children(recursive=False)) == 1
    assert pool_of(manager).counters["children_recycled"] == 2
    stop_and_check(router, manager)


def test_grace_period_expiry_kills_a_subprocess_job(router, make_manager, tmp_path):
    grace = 1.0
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1, kill_grace_period=grace)
    ident = router.wait_inform()
    msgid = router.request(ident, CPU, "spin_until", args=[str(tmp_path / "never")],
                           headers=REPLY, subprocess=True)
    router.wait_until(lambda: pool_of(manager) and pool_of(manager).status()["busy"] == 1,
                      timeout=20)
    [pid] = pool_of(manager).pids()
    started = time.monotonic()
    stop_and_check(router, manager)  # graceful: the grace period, then the kill
    took = time.monotonic() - started
    assert router.wait_reply(msgid)["error"]["type"] == "Killed"
    assert grace <= took < grace + 10, took
    assert gone(pid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("job, value", [("fork_and_return", None), ("fork_and_exit", 0)])
def test_a_job_that_forks_without_exec_answers_once_and_later_jobs_keep_their_own_results(
        router, make_manager, job, value):
    """The forked copy returned from the job too: serving on, it answered in
    the child's place (every later reply was the one before it)."""
    manager = make_manager(concurrent_jobs=1, subprocess_pool_size=1)
    ident = router.wait_inform()
    reply = router.wait_reply(router.request(ident, CPU, job, headers=REPLY, subprocess=True))
    assert "error" not in reply, reply
    if value is None:
        assert reply["value"] > 0  # the child's own return: the forked copy's pid
    else:
        assert reply["value"] == value
    pids = set()
    for i in range(6):
        got = router.wait_reply(router.request(ident, CPU, "tag", args=[i], headers=REPLY,
                                               subprocess=True))
        assert got["value"]["tag"] == i, got
        pids.add(got["value"]["pid"])
    assert pids == set(pool_of(manager).pids())
    assert pool_of(manager).counters["children_died"] == 0
    stop_and_check(router, manager)


@pytest.mark.timeout(60)
def test_a_result_over_max_message_size_is_refused_in_the_child(router, make_manager):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1,
                           max_message_size=1024 * 1024)
    ident = router.wait_inform()
    first = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True))["value"]
    reply = router.wait_reply(router.request(ident, CPU, "big_result", args=[3],
                                             headers=REPLY, subprocess=True))
    assert reply["error"]["type"] == "ReplyTooLarge", reply
    assert "larger than max_message_size (1048576 bytes)" in reply["value"]
    assert manager.counters["replies_too_large"] == 0  # not the worker's own check
    # the child stays: its outcome was never sent whole
    after = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True))
    assert after["value"] == first
    assert pool_of(manager).counters["children_died"] == 0
    stop_and_check(router, manager)


@pytest.mark.timeout(60)
def test_a_line_over_the_limit_from_a_child_is_not_read_whole(router, make_manager,
                                                              monkeypatch):
    """A child that sends more than the pool reads (one not checking its
    own outcome) is replaced; the line is not held in the worker."""
    from emq_green.worker import child as child_main

    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1,
                           max_message_size=1024 * 1024)
    monkeypatch.setenv(child_main.ENV_MAX_LINE, "-1")  # the child's check off
    monkeypatch.setattr(child_main, "ENV_MAX_LINE", "EMQ_GREEN_TEST_NO_SUCH_VARIABLE")
    ident = router.wait_inform()
    reply = router.wait_reply(router.request(ident, CPU, "big_result", args=[3],
                                             headers=REPLY, subprocess=True), timeout=30)
    assert reply["error"]["type"] == "ChildProcessError", reply
    assert "sent a line longer than" in reply["value"]
    after = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                             subprocess=True))
    assert "error" not in after and after["value"] != os.getpid()
    stop_and_check(router, manager)


@pytest.mark.timeout(60)
def test_a_resource_limit_a_job_lowers_is_set_back_for_the_next_job(router, make_manager):
    manager = make_manager(concurrent_jobs=1, subprocess_pool_size=1)
    ident = router.wait_inform()
    before = router.wait_reply(router.request(ident, CPU, "nofile_limit", headers=REPLY,
                                              subprocess=True))["value"]
    soft, hard = before["limit"]
    lowered = router.wait_reply(router.request(ident, CPU, "lower_soft_limit", args=[64],
                                               headers=REPLY, subprocess=True))
    assert lowered["value"] == [64, hard]
    after = router.wait_reply(router.request(ident, CPU, "nofile_limit", headers=REPLY,
                                             subprocess=True))["value"]
    assert after == before  # the same child, its limit set back
    # a hard limit cannot be raised again: that child makes way for a fresh one
    router.wait_reply(router.request(ident, CPU, "lower_hard_limit", args=[64],
                                     headers=REPLY, subprocess=True))
    fresh = router.wait_reply(router.request(ident, CPU, "nofile_limit", headers=REPLY,
                                             subprocess=True))["value"]
    assert fresh["limit"] == [soft, hard] and fresh["pid"] != before["pid"]
    assert pool_of(manager).counters["children_died"] == 0
    assert pool_of(manager).counters["children_recycled"] == 1
    stop_and_check(router, manager)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("subprocess_job", [True, False])
def test_keyboard_interrupt_and_a_bare_exception_in_a_job_are_its_errors(
        router, make_manager, subprocess_job):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1)
    ident = router.wait_inform()
    interrupted = router.wait_reply(router.request(ident, CPU, "interrupt", headers=REPLY,
                                                   subprocess=subprocess_job))
    assert interrupted["error"] == {"type": "KeyboardInterrupt", "message": "stop"}
    bare = router.wait_reply(router.request(ident, CPU, "no_message", headers=REPLY,
                                            subprocess=subprocess_job))
    assert bare["error"] == {"type": "MemoryError", "message": "MemoryError"}
    assert bare["value"] == "MemoryError"
    if subprocess_job:
        assert pool_of(manager).counters["children_died"] == 0
    assert manager.state is State.RUNNING
    stop_and_check(router, manager)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("subprocess_job", [True, False])
def test_sys_exit_in_a_job_ends_its_attempts_and_its_exit_function_runs(
        router, make_manager, cpu_log, subprocess_job):
    manager = entry_exit_manager(make_manager)
    ident = router.wait_inform()
    reply = router.wait_reply(router.request(ident, CPU, "logged_exit",
                                             headers=f"{REPLY},retry-count:2",
                                             subprocess=subprocess_job), timeout=20)
    assert reply["error"] == {"type": "SystemExit", "message": "4"}
    assert log_counts(cpu_log) == {"entry": 1, "run": 1, "exit": 1}
    if subprocess_job:
        assert pool_of(manager).counters["children_died"] == 0
    stop_and_check(router, manager)


def test_a_stopped_manager_says_it_runs_once(router, make_manager):
    manager = make_manager()
    with pytest.raises(RuntimeError, match="already started"):
        manager.start()
    stop_and_check(router, manager)
    assert manager.crashed is None
    with pytest.raises(RuntimeError, match="has stopped; a JobManager runs once"):
        manager.start()


@pytest.mark.timeout(60)
def test_sys_exit_from_a_childs_entry_function_is_the_jobs_error(router, make_manager):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1,
                           job_entry_func=f"{CPU}.entry_sys_exit")
    ident = router.wait_inform()
    for _ in range(2):
        reply = router.wait_reply(router.request(ident, CPU, "pid", headers=REPLY,
                                                 subprocess=True), timeout=20)
        assert reply["error"] == {"type": "SystemExit", "message": "5"}, reply
    assert pool_of(manager).counters["children_died"] == 0
    stop_and_check(router, manager)


@pytest.mark.timeout(60)
def test_a_tiny_max_message_size_still_gets_a_reply_too_large(router, make_manager):
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1, max_message_size=250)
    ident = router.wait_inform()
    reply = router.wait_reply(router.request(ident, CPU, "text", args=[300],
                                             headers=REPLY, subprocess=True), timeout=20)
    assert reply["error"]["type"] == "ReplyTooLarge", reply
    assert pool_of(manager).counters["children_died"] == 0
    stop_and_check(router, manager)


def test_a_child_says_when_a_value_cannot_be_carried_as_json(router, make_manager, capfd,
                                                             tmp_path):
    """A probe's find: a subprocess job returning a set was answered and
    counted as failed, but logged nowhere (the same job in the loop is): the
    child, which turns it into the failure, now says so on its stderr (the
    worker's log), naming the callable."""
    manager = make_manager(concurrent_jobs=2, subprocess_pool_size=1)
    ident = router.wait_inform()
    marks = tmp_path / "marks"
    msgid = router.request(ident, CPU, "set_with_mark", args=[str(marks)],
                           headers=f"{REPLY},retry-count:2", subprocess=True)
    reply = router.wait_reply(msgid)
    assert reply["error"]["type"] == "TypeError" and "not JSON serializable" in reply["value"]
    assert manager.counters["failed"] == 1
    # it ran once: a value that cannot be sent is not an error to retry (a
    # review's find: turned into the failure in the child, it ran 3 times)
    assert marks.read_text() == "ran\n"
    said = capfd.readouterr().err
    assert f"job {CPU}.set_with_mark returned a value JSON cannot carry: Object of " \
           "type set is not JSON serializable" in said, said[-2000:]
    stop_and_check(router, manager)
