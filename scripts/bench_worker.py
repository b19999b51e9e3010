#!/usr/bin/env python3
"""Benchmark one emq-green worker against a stand-in router.

The harness process is the router: a plain pyzmq ROUTER that ACKs the
worker's INFORM, sends a REQUEST for each READY it counts (never more) and
waits for every job's REPLY, so completion is observed, not inferred. The
worker is the real ``emq-green`` console script in its own process.

Printed per workload: jobs/s, latency p50/p99 (REQUEST sent -> REPLY
received), the worker's peak RSS (sampled every 20 ms) and the longest
silence from the worker (no message of any kind).

    .venv/bin/python scripts/bench_worker.py                 # both workloads
    .venv/bin/python scripts/bench_worker.py --only sleep --jobs 5000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import psutil
import zmq
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


def frames(command: str, *body: str) -> list[bytes]:
    return [b"", b"eMQP/1.0", command.encode(), str(uuid.uuid4()).encode(),
            *(b.encode() for b in body)]


def run_workload(label: str, callable_name: str, args: list, jobs: int, concurrency: int,
                 extra_flags: list[str], workdir: str) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    addr = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (workdir, os.environ.get("PYTHONPATH")) if p))
    cmd = [shutil.which("emq-green") or os.path.join(os.path.dirname(sys.executable),
                                                     "emq-green"),
           "-B", addr, "-J", str(concurrency), "-n", f"bench-{label}", *extra_flags]
    log = open(os.path.join(workdir, f"worker-{label}.log"), "w")
    worker = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    sampler = PeakRss(worker.pid)
    sampler.start()
    payload = json.dumps(["run", {"path": "benchjobs", "callable": callable_name,
                                  "args": args, "kwargs": {}}])
    requests = [frames("REQUEST", "default", "reply-requested", payload) for _ in range(jobs)]
    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    credit = 0
    next_job = 0
    identity = None
    last_from_worker = None
    longest_silence = 0.0
    started = None
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + 600
    cpu_at_start = main_at_start = 0.0
    harness_cpu_start = time.process_time()
    try:
        while len(latencies) < jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: only {len(latencies)} of {jobs} jobs done")
            if not poller.poll(1000):
                if worker.poll() is not None:
                    raise RuntimeError(f"{label}: worker exited with {worker.returncode}")
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
                    latencies.append(now - sent_at.pop(msg[6]))
                elif command == b"INFORM":
                    identity = msg[0]
                    sock.send_multipart([identity, *frames("ACK", msg[4].decode())])
                    started = time.monotonic()
                    t = psutil.Process(worker.pid).cpu_times()
                    cpu_at_start = t.user + t.system
                    main_at_start = main_thread_cpu(psutil.Process(worker.pid))
                    harness_cpu_start = time.process_time()
                elif command == b"HEARTBEAT":
                    sock.send_multipart([identity, *frames("HEARTBEAT", str(time.time()))])
            if credit and next_job < jobs:
                now = time.monotonic()
                while credit and next_job < jobs:
                    job = requests[next_job]
                    sent_at[job[3]] = now
                    _Backend.send(sock, identity, _MORE)
                    send_all(sock, job)
                    credit -= 1
                    next_job += 1
        elapsed = time.monotonic() - started
        proc = psutil.Process(worker.pid)
        cpu = proc.cpu_times()
        worker_cpu = cpu.user + cpu.system - cpu_at_start
        main_cpu = main_thread_cpu(proc) - main_at_start
        harness_cpu = time.process_time() - harness_cpu_start
    finally:
        sampler.stop.set()
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
        sock.close(0)
        log.close()
    return {
        "workload": label, "jobs": jobs, "J": concurrency,
        "jobs_per_s": jobs / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "peak_rss_mb": sampler.peak / 2**20,
        "longest_silence_s": longest_silence,
        "worker_cpu_us_per_job": worker_cpu / jobs * 1e6,
        "harness_cpu_us_per_job": harness_cpu / jobs * 1e6,
        "worker_main_thread_us_per_job": main_cpu / jobs * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["noop", "sleep"])
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--noop-j", type=int, default=100)
    ap.add_argument("--sleep-j", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per workload (median shown)")
    ap.add_argument("--worker-flag", action="append", default=[],
                    help="extra emq-green flag (repeatable), e.g. --worker-flag=--foo=1")
    opts = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="emq-bench-")
    with open(os.path.join(workdir, "benchjobs.py"), "w") as f:
        f.write(JOB_MODULE)
    plan = [("noop", "noop", [], opts.noop_j), ("sleep", "sleep", [0.1], opts.sleep_j)]
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    rows = []
    for label, name, args, j in plan:
        if opts.only and opts.only != label:
            continue
        runs = [run_workload(label, name, args, opts.jobs, j, opts.worker_flag, workdir)
                for _ in range(opts.repeat)]
        runs.sort(key=lambda r: r["jobs_per_s"])
        row = runs[len(runs) // 2]
        row["runs_jobs_per_s"] = [round(r["jobs_per_s"]) for r in runs]
        rows.append(row)
    header = f"{'workload':8} {'jobs':>6} {'-J':>5} {'jobs/s':>8} {'p50 ms':>8} " \
             f"{'p99 ms':>8} {'peak MB':>8} {'silence s':>9} {'wkr us/job':>10} " \
             f"{'rtr us/job':>10}"
    print(header)
    for r in rows:
        print(f"{r['workload']:8} {r['jobs']:>6} {r['J']:>5} {r['jobs_per_s']:>8.0f} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['peak_rss_mb']:>8.1f} "
              f"{r['longest_silence_s']:>9.2f} {r['worker_cpu_us_per_job']:>10.0f} "
              f"{r['harness_cpu_us_per_job']:>10.0f}")
    print(json.dumps(rows))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
