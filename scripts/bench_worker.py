#!/usr/bin/env python3
"""Benchmark one emq-green worker against a stand-in router.

The harness process is the router: a plain pyzmq ROUTER that ACKs the
worker's INFORM, sends a REQUEST for each READY it counts (never more) and
waits for every job's REPLY, so completion is observed, not inferred. The
worker is the real ``emq-green`` console script in its own process.

Only jobs that finished well count: jobs/s and the latencies are of
successful REPLYs (no ``error`` key); error replies are counted and printed
separately. Printed per workload: jobs/s, latency p50/p99 (REQUEST sent ->
REPLY received), the worker's peak RSS (sampled every 20 ms), the longest
silence from the worker (the longest gap between any two of its messages)
and, separately, the longest gap between two of its HEARTBEATs. The worker
sends HEARTBEAT only after heartbeat_interval without sending anything else,
so while it is busy the heartbeat gap is long by design: the silence is what
a router's liveness check sees.

With the C stand-in router (the default) every REPLY ends a job on the
router's side; the worker's own outcome counters, read from its SIGUSR1
status dump after the run, say how many succeeded, and only those count.
That router does not tell HEARTBEATs apart: the heartbeat gap needs
``--python-router``.

STEADY: a run starts with every slot offered at once (the worker takes its
-J REQUESTs in one burst, so the first ones wait for the last to start) and
ends with slots left idle while the last jobs finish. Both are printed apart
as the steady state: the rate between the -J-th and the (jobs - J)-th REPLY,
and the latencies of every job but the first and the last -J sent. The
whole-run figures stay the headline columns; with the default 20,000 jobs
at -J 1000 the two edges are a tenth of the run.

    .venv/bin/python scripts/bench_worker.py                 # both workloads
    .venv/bin/python scripts/bench_worker.py --only sleep --jobs 5000
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pstats
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import zmq
from benchlib import frames, poll_worker, standin_router_socket, stop
from zmq.backend import Socket as _Backend

# The stand-in router calls libzmq through pyzmq's C backend with plain int
# flags: pyzmq's Python layer (enum flags, per-frame checks) costs more per
# message than the worker under test spends, and would cap the benchmark.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE)


def recv_now(sock: zmq.Socket) -> list[bytes] | None:
    # zmq.Frame's ``more`` flag, not get(RCVMORE): pyzmq looks socket
    # options up in a Python enum, about 2.5 us per call here.
    try:
        frame = _Backend.recv(sock, _NOBLOCK, False)
    except zmq.Again:
        return None
    parts = [frame.bytes]
    while frame.more:
        frame = _Backend.recv(sock, 0, False)
        parts.append(frame.bytes)
    return parts


def send_all(sock: zmq.Socket, parts: list[bytes]) -> None:
    last = len(parts) - 1
    for i, part in enumerate(parts):
        _Backend.send(sock, part, _MORE if i < last else 0)

JOB_MODULE = '''
import time

def noop():
    return None

def sleep(seconds):
    time.sleep(seconds)
    return seconds
'''

# The baseline measured in the same run: the least a Python worker can do per
# job on this machine. Plain pyzmq (no gevent), C-backend calls, no job
# machinery: REPLY and READY for each REQUEST, straight away.
BARE_WORKER = '''
import sys, uuid, zmq
from zmq.backend import Socket as B
addr, slots = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.connect(addr)
V, MORE = b"eMQP/1.0", int(zmq.SNDMORE)
def send(*parts):
    for p in parts[:-1]:
        B.send(s, p, MORE)
    B.send(s, parts[-1], 0)
def msgid():
    return str(uuid.uuid4()).encode()
def recv():
    f = s.recv(copy=False)
    parts = [f.bytes]
    while f.more:
        f = s.recv(copy=False)
        parts.append(f.bytes)
    return parts
send(b"", V, b"INFORM", msgid(), b\'[[10, "default"]]\', b"worker")
while recv()[2] != b"ACK":
    pass
for _ in range(slots):
    send(b"", V, b"READY", msgid())
reply = b\'{"value": null}\'
while True:
    parts = recv()
    if parts[2] == b"REQUEST":
        send(b"", V, b"REPLY", msgid(), reply, parts[3])
        send(b"", V, b"READY", msgid())
    elif parts[2] == b"HEARTBEAT":
        send(b"", V, b"HEARTBEAT", msgid(), parts[4])
'''


# The same-run reference for the sleep workload: the least a gevent worker
# can do. One greenlet per REQUEST sleeps 0.1 s, then REPLY and READY are
# queued and leave together at the end of the loop's turn (as emq-green's
# outbox sends them); REQUESTs are read in C calls until none is waiting. No
# job machinery, no msgid check, no accounting.
BARE_GREEN_WORKER = '''
import sys, uuid
from gevent import monkey
monkey.patch_all()
import gevent, zmq.green as zmq
from zmq.backend import Socket as B
addr, slots = sys.argv[1], int(sys.argv[2])
s = zmq.Context().socket(zmq.DEALER)
# emq-green's link has the same high-water marks: at libzmq's default of
# 1,000 the burst of READYs can meet a full pipe, and a NOBLOCK send that
# fails would lose the message and hang the run.
s.setsockopt(zmq.SNDHWM, 10000)
s.setsockopt(zmq.RCVHWM, 10000)
s.connect(addr)
V, NB = b"eMQP/1.0", int(zmq.NOBLOCK)
MNB = int(zmq.SNDMORE) | NB
loop = gevent.get_hub().loop
out = []
def flush():
    global out
    batch, out = out, []
    for parts in batch:
        for p in parts[:-1]:
            B.send(s, p, MNB)
        B.send(s, parts[-1], NB)
    s._Socket__state_changed()
def send(*parts):
    out.append(parts)
    if len(out) == 1:
        loop.run_callback(flush)
def msgid():
    return str(uuid.uuid4()).encode()
def recv():
    while True:
        try:
            f = B.recv(s, NB, False)
        except zmq.Again:
            s._wait_read()
            continue
        parts = [f.bytes]
        while f.more:
            f = B.recv(s, NB, False)
            parts.append(f.bytes)
        return parts
def job(parts):
    gevent.sleep(0.1)
    send(b"", V, b"REPLY", msgid(), b\'{"value": 0.1}\', parts[3])
    send(b"", V, b"READY", msgid())
# (waits for the connection: the outbox sends without waiting)
s.send_multipart([b"", V, b"INFORM", msgid(), b\'[[10, "default"]]\', b"worker"])
while recv()[2] != b"ACK":
    pass
for _ in range(slots):
    send(b"", V, b"READY", msgid())
while True:
    parts = recv()
    if parts[2] == b"REQUEST":
        gevent.spawn(job, parts)
    elif parts[2] == b"HEARTBEAT":
        send(b"", V, b"HEARTBEAT", msgid(), parts[4])
'''

BARE_WORKERS = {"bare": BARE_WORKER, "bare-sleep": BARE_GREEN_WORKER}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self.stop.wait(0.02)


def main_thread_cpu(proc: psutil.Process) -> float:
    """CPU seconds of the worker's main thread (the event loop), without
    libzmq's IO thread and the heartbeat thread."""
    return sum(t.user_time + t.system_time for t in proc.threads() if t.id == proc.pid)


class CpuMark:
    """The worker's CPU seconds (whole process, and its main thread) at a moment."""

    def __init__(self, pid: int) -> None:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        self.total = t.user + t.system
        self.main = main_thread_cpu(proc)


def build_standin(workdir: str) -> str | None:
    """Compile scripts/standin_router.c against the libzmq bundled with
    pyzmq; None (with the reason printed) when that is not possible."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin_router.c")
    libs = glob.glob(os.path.join(os.path.dirname(zmq.__file__), os.pardir, "pyzmq.libs",
                                  "libzmq*.so*"))
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not libs or not compiler:
        print("note: no C compiler or no bundled libzmq; using the Python stand-in router")
        return None
    exe = os.path.join(workdir, "standin_router")
    lib = os.path.realpath(libs[0])
    result = subprocess.run([compiler, "-O2", "-o", exe, source, lib,
                             f"-Wl,-rpath,{os.path.dirname(lib)}"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        print(f"note: the C stand-in router did not build ({result.stderr.strip()[:300]}); "
              "using the Python one")
        return None
    return exe


def start_worker(label: str, addr: str, concurrency: int, extra_flags: list[str],
                 workdir: str, profile: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (workdir, os.environ.get("PYTHONPATH")) if p))
    if label in BARE_WORKERS:
        cmd = [sys.executable, "-c", BARE_WORKERS[label], addr, str(concurrency)]
    else:
        cmd = [shutil.which("emq-green") or os.path.join(os.path.dirname(sys.executable),
                                                         "emq-green"),
               "-B", addr, "-J", str(concurrency), "-n", f"bench-{label}", *extra_flags]
        if profile:
            cmd = [sys.executable, "-m", "cProfile", "-o", profile, *cmd]
    log = open(os.path.join(workdir, f"worker-{label}.log"), "w")
    try:
        return subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def outcome_counts(worker: subprocess.Popen, log_path: str,
                   timeout: float = 15.0) -> tuple[int, int]:
    """(succeeded, other outcomes) from the worker's SIGUSR1 status dump."""
    with open(log_path, "rb") as f:
        mark = len(f.read())
    worker.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            text = f.read()[mark:].decode(errors="replace")
        found = re.search(r"status: (\{.*\})\s*$", text, re.MULTILINE)
        if found:
            counters = json.loads(found.group(1))["counters"]
            ok = counters.get("succeeded", 0)
            errors = sum(counters.get(k, 0) for k in ("failed", "timed_out", "killed"))
            return ok, errors
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError(f"no status dump from the worker in {log_path}")
        time.sleep(0.05)  # polling a log file, with a deadline


def run_workload(label: str, callable_name: str, args: list, jobs: int, concurrency: int,
                 extra_flags: list[str], workdir: str, standin: str | None,
                 profile: str | None = None) -> dict:
    payload = json.dumps(["run", {"path": "benchjobs", "callable": callable_name,
                                  "args": args, "kwargs": {}}])
    run = run_with_c_router if standin else run_with_python_router
    result = run(label, payload, jobs, concurrency, extra_flags, workdir, standin,
                 profile if label not in BARE_WORKERS else None)
    return {"workload": label, "jobs": jobs, "J": concurrency,
            "harness": "C" if standin else "Python", **result}


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary(ok: int, errors: int, elapsed: float, p50: float, p99: float, mean: float,
            silence: float, peak: int, start: CpuMark, end: CpuMark, harness_cpu: float,
            heartbeat_gap: float | None = None, heartbeats: int | None = None,
            steady: tuple[int, float, float, float] | None = None) -> dict:
    """``ok``: jobs that succeeded, the only ones the rate counts; CPU per
    job is over every job the worker ran. ``steady``: (jobs, seconds, p50,
    p99) of the run without its first and last -J jobs (see STEADY)."""
    jobs = ok + errors
    return {
        "jobs_per_s": ok / elapsed,
        "steady_jobs_per_s": steady[0] / steady[1] if steady else None,
        "steady_p50_ms": steady[2] * 1000 if steady else None,
        "steady_p99_ms": steady[3] * 1000 if steady else None,
        "ok": ok,
        "errors": errors,
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "mean_ms": mean * 1000,
        "peak_rss_mb": peak / 2**20,
        "longest_silence_s": silence,
        "longest_heartbeat_gap_s": heartbeat_gap,
        "heartbeats": heartbeats,
        "worker_cpu_us_per_job": (end.total - start.total) / jobs * 1e6,
        "worker_main_thread_us_per_job": (end.main - start.main) / jobs * 1e6,
        "harness_cpu_us_per_job": harness_cpu / jobs * 1e6,
    }


def read_line(proc: subprocess.Popen, deadline: float) -> str:
    """The next line of ``proc``'s stdout, or RuntimeError at ``deadline``
    (a worker that lost a message would otherwise hang the run)."""
    fd = proc.stdout.fileno()
    while not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        if time.monotonic() >= deadline:
            raise RuntimeError("the stand-in router did not finish in time "
                               "(jobs lost on the way?)")
    return proc.stdout.readline()


def run_with_c_router(label: str, payload: str, jobs: int, concurrency: int,
                      extra_flags: list[str], workdir: str, standin: str | None,
                      profile: str | None = None) -> dict:
    assert standin is not None
    router = subprocess.Popen([standin, str(jobs), payload, str(concurrency)],
                              stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        first = router.stdout.readline().split()
        if first[:1] != ["endpoint"]:
            raise RuntimeError(f"stand-in router said {first!r}")
        worker = start_worker(label, first[1], concurrency, extra_flags, workdir, profile)
        sampler = PeakRss(worker.pid)
        sampler.start()
        if router.stdout.readline().strip() != "acked":
            raise RuntimeError(f"{label}: the worker never registered")
        start = CpuMark(worker.pid)
        line = read_line(router, deadline=time.monotonic() + 600)
        end = CpuMark(worker.pid)
        sampler.stop.set()
        if not line:
            raise RuntimeError(f"{label}: the stand-in router exited with {router.wait()}")
        r = json.loads(line)
        if label in BARE_WORKERS:
            ok, errors = jobs, 0  # answers every REQUEST with a value, no error
        else:
            ok, errors = outcome_counts(worker, os.path.join(workdir, f"worker-{label}.log"))
        if ok + errors != jobs:
            raise RuntimeError(f"{label}: the worker counted {ok} + {errors} jobs, the "
                               f"router {jobs}")
        if not ok:
            raise RuntimeError(f"{label}: every one of {jobs} jobs failed")
        # The C router's latencies cover every REPLY: error replies included
        # (none in a run whose ``errors`` is 0).
        steady = None
        if "steady_jobs" in r and not errors:
            steady = (r["steady_jobs"], r["steady_elapsed"], r["steady_p50"], r["steady_p99"])
        return summary(ok, errors, r["elapsed"], r["p50"], r["p99"], r["mean"],
                       r["longest_silence"], sampler.peak, start, end, r["cpu"],
                       steady=steady)
    finally:
        if worker is not None:
            stop([worker])
        router.kill()
        router.wait()


def run_with_python_router(label: str, payload: str, jobs: int, concurrency: int,
                           extra_flags: list[str], workdir: str, standin: str | None,
                           profile: str | None = None) -> dict:
    sock, addr = standin_router_socket()
    worker = start_worker(label, addr, concurrency, extra_flags, workdir, profile)
    sampler = PeakRss(worker.pid)
    sampler.start()
    requests = [frames("REQUEST", "default", "reply-requested", payload) for _ in range(jobs)]
    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []  # successful replies only
    by_job: dict[bytes, float] = {}  # msgid -> latency, for the steady state
    done_at: list[float] = []  # time of each REPLY
    errors = 0
    credit = 0
    next_job = 0
    identity = None
    last_from_worker = None
    longest_silence = 0.0
    last_heartbeat = None
    longest_heartbeat_gap = 0.0
    heartbeats = 0
    started = None
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + 600
    start = None
    harness_cpu_start = time.process_time()

    def overdue() -> str:
        return f"{label}: only {len(latencies) + errors} of {jobs} jobs done"

    try:
        while len(latencies) + errors < jobs:
            if not poll_worker(poller, worker, deadline, overdue, f"{label}: "):
                continue
            while True:
                msg = recv_now(sock)
                if msg is None:
                    break
                now = time.monotonic()
                if last_from_worker is not None and started is not None:
                    longest_silence = max(longest_silence, now - last_from_worker)
                last_from_worker = now
                command = msg[3]
                if command == b"READY":
                    credit += 1
                elif command == b"REPLY":
                    took = now - sent_at.pop(msg[6])
                    by_job[msg[6]] = took
                    done_at.append(now)
                    if b'"error"' in msg[5] and "error" in json.loads(msg[5]):
                        errors += 1
                    else:
                        latencies.append(took)
                elif command == b"INFORM":
                    identity = msg[0]
                    sock.send_multipart([identity, *frames("ACK", msg[4].decode())])
                    started = time.monotonic()
                    start = CpuMark(worker.pid)
                    harness_cpu_start = time.process_time()
                elif command == b"HEARTBEAT":
                    sock.send_multipart([identity, *frames("HEARTBEAT", str(time.time()))])
                    if started is not None:
                        heartbeats += 1
                        since = last_heartbeat if last_heartbeat is not None else started
                        longest_heartbeat_gap = max(longest_heartbeat_gap, now - since)
                        last_heartbeat = now
            if credit and next_job < jobs:
                now = time.monotonic()
                while credit and next_job < jobs:
                    job = requests[next_job]
                    sent_at[job[3]] = now
                    _Backend.send(sock, identity, _MORE)
                    send_all(sock, job)
                    credit -= 1
                    next_job += 1
        end_at = time.monotonic()
        elapsed = end_at - started
        # the gap still open at the end counts too
        longest_heartbeat_gap = max(longest_heartbeat_gap, end_at - (
            last_heartbeat if last_heartbeat is not None else started))
        end = CpuMark(worker.pid)
        harness_cpu = time.process_time() - harness_cpu_start
    finally:
        sampler.stop.set()
        stop([worker])
        sock.close(0)
    assert start is not None
    if not latencies:
        raise RuntimeError(f"{label}: every one of {jobs} jobs failed")
    steady = None
    edge = concurrency
    if not errors and 4 * edge <= jobs:
        middle = [by_job[job[3]] for job in requests[edge:jobs - edge]]
        steady = (len(middle), done_at[jobs - edge - 1] - done_at[edge - 1],
                  percentile(middle, 0.50), percentile(middle, 0.99))
    return summary(len(latencies), errors, elapsed, percentile(latencies, 0.50),
                   percentile(latencies, 0.99), statistics.fmean(latencies), longest_silence,
                   sampler.peak, start, end, harness_cpu,
                   heartbeat_gap=longest_heartbeat_gap, heartbeats=heartbeats, steady=steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["bare", "noop", "sleep", "bare-sleep"], action="append",
                    help="run this workload (repeatable); bare-sleep, run only when named: "
                         "the sleep workload on a minimal gevent worker, the reference for "
                         "the sleep target")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--noop-j", type=int, default=100)
    ap.add_argument("--sleep-j", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per workload (median shown)")
    ap.add_argument("--python-router", action="store_true",
                    help="use the stand-in router written in Python, not the C one")
    ap.add_argument("--profile", metavar="FILE",
                    help="run the worker under cProfile, its stats written to FILE (the last "
                         "run's); total calls per job printed, start-up and shutdown included "
                         "(subtract a short run's to get the per-job figure)")
    ap.add_argument("--worker-flag", action="append", default=[],
                    help="extra emq-green flag (repeatable), e.g. --worker-flag=--foo=1")
    opts = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="emq-bench-")
    try:
        _main(opts, workdir)
    finally:  # (a probe: left behind on Ctrl-C or an error)
        shutil.rmtree(workdir, ignore_errors=True)


def _main(opts: argparse.Namespace, workdir: str) -> None:
    with open(os.path.join(workdir, "benchjobs.py"), "w") as f:
        f.write(JOB_MODULE)
    plan = [("bare", "noop", [], opts.noop_j), ("noop", "noop", [], opts.noop_j),
            ("sleep", "sleep", [0.1], opts.sleep_j), ("bare-sleep", "sleep", [0.1], opts.sleep_j)]
    standin = None if opts.python_router else build_standin(workdir)
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}; stand-in router "
          f"in {'C' if standin else 'Python'}")
    rows = []
    for label, name, args, j in plan:
        if label not in (opts.only or ("bare", "noop", "sleep")):
            continue
        runs = [run_workload(label, name, args, opts.jobs, j, opts.worker_flag, workdir,
                             standin, opts.profile)
                for _ in range(opts.repeat)]
        if opts.profile and label not in BARE_WORKERS:
            calls = pstats.Stats(opts.profile).total_calls  # type: ignore[attr-defined]
            print(f"{label}: {calls} Python calls in the worker, {calls / opts.jobs:.1f} per job "
                  f"(profile in {opts.profile})")
        runs.sort(key=lambda r: r["jobs_per_s"])
        row = runs[len(runs) // 2]
        row["runs_jobs_per_s"] = [round(r["jobs_per_s"]) for r in runs]
        rows.append(row)
    header = f"{'workload':10} {'jobs':>6} {'ok':>6} {'errors':>6} {'-J':>5} {'ok jobs/s':>9} " \
             f"{'p50 ms':>8} {'p99 ms':>8} {'steady/s':>8} {'st p99':>7} {'peak MB':>8} " \
             f"{'silence s':>9} {'hb gap s':>8} " \
             f"{'wkr us/job':>10} {'main us/job':>11} {'rtr us/job':>10}"
    print(header)
    for r in rows:
        gap = r["longest_heartbeat_gap_s"]
        print(f"{r['workload']:10} {r['jobs']:>6} {r['ok']:>6} {r['errors']:>6} {r['J']:>5} "
              f"{r['jobs_per_s']:>9.0f} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{fmt(r['steady_jobs_per_s'], '.0f'):>8} {fmt(r['steady_p99_ms'], '.1f'):>7} "
              f"{r['peak_rss_mb']:>8.1f} "
              f"{r['longest_silence_s']:>9.2f} "
              f"{'n/a' if gap is None else f'{gap:.2f}':>8} "
              f"{r['worker_cpu_us_per_job']:>10.0f} "
              f"{r['worker_main_thread_us_per_job']:>11.0f} "
              f"{r['harness_cpu_us_per_job']:>10.0f}")
    print("ok jobs/s: successful replies only; errors: error replies (failed, timed out, "
          "killed); silence: longest gap between any two messages from the worker; hb gap: "
          "longest gap between its HEARTBEATs (sent only when it sent nothing else for "
          "heartbeat_interval; n/a with the C stand-in router); steady/s and st p99: the "
          "rate and p99 latency without the first and last -J jobs (STEADY above)")
    by_label = {r["workload"]: r for r in rows}
    if "bare" in by_label and "noop" in by_label:
        ratio = by_label["noop"]["jobs_per_s"] / by_label["bare"]["jobs_per_s"]
        print(f"no-op jobs: emq-green reaches {ratio:.2f} of the bare pyzmq worker's rate, "
              "measured in this run")
    for label in ("sleep", "bare-sleep"):
        if label not in by_label:
            continue
        sleep = by_label[label]
        limit = sleep["J"] / 0.1
        steady = sleep["steady_jobs_per_s"]
        print(f"{label} jobs: {sleep['jobs_per_s'] / limit:.3f} of the concurrency limit "
              f"({limit:.0f} jobs/s) over the whole run"
              + (f", {steady / limit:.3f} in the steady state (p99 "
                 f"{sleep['steady_p99_ms']:.1f} ms)" if steady else ""))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
