#!/usr/bin/env python3
"""Benchmark the subprocess pool: CPU-bound jobs mixed with IO-bound jobs.

The harness process is a stand-in router (a plain pyzmq ROUTER): it ACKs
the worker's INFORM, sends one REQUEST per READY it counts (never more),
answers HEARTBEATs and waits for every job's REPLY. The worker is the real
``emq-green`` console script in its own process.

Workload (defaults): 40 CPU jobs of about 0.5 s each, flagged
``"subprocess": true``, sent first, then 5,000 IO jobs of ``time.sleep(0.1)``,
at ``-J 1000`` with ``--subprocess-pool-size 2``. A CPU job is a fixed amount
of pure-Python work, calibrated here so one takes about ``--cpu-seconds``.

Printed: total time; the longest silence from the worker (no message of any
kind; its heartbeat interval is ``--heartbeat-interval``); when the IO jobs
were done; the CPU jobs' throughput against running the same 40 jobs one
after the other in this (single) process.

    .venv/bin/python scripts/bench_cpu.py
    .venv/bin/python scripts/bench_cpu.py --in-process   # the CPU jobs unflagged
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import zmq
from benchlib import frames, poll_worker, standin_router_socket, stop

JOB_MODULE = '''
import time

def burn(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total

def sleep(seconds):
    time.sleep(seconds)
    return seconds
'''


def payload(name: str, args: list, flagged: bool) -> str:
    opts = {"path": "cpubenchjobs", "callable": name, "args": args, "kwargs": {}}
    if flagged:
        opts["subprocess"] = True
    return json.dumps(["run", opts])


def calibrate(burn, seconds: float) -> int:
    n = 200_000
    while True:
        t = time.perf_counter()
        burn(n)
        took = time.perf_counter() - t
        if took > 0.2:
            return int(n * seconds / took)
        n *= 2


def run(opts: argparse.Namespace, workdir: str, n: int) -> dict:
    sock, addr = standin_router_socket()
    env = dict(os.environ, PYTHONPATH=workdir, EVENTMQ_CONFIG_FILE="")
    exe = shutil.which("emq-green") or os.path.join(os.path.dirname(sys.executable),
                                                    "emq-green")
    cmd = [exe, "-B", addr, "-J", str(opts.J), "-n", "bench-cpu",
           "--subprocess-pool-size", str(opts.pool_size),
           "--heartbeat-interval", str(opts.heartbeat_interval)]
    log = open(os.path.join(workdir, "worker.log"), "w")
    worker = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    jobs = [("cpu", payload("burn", [n], not opts.in_process))] * opts.cpu_jobs
    jobs += [("io", payload("sleep", [opts.io_seconds], False))] * opts.io_jobs
    kind_of: dict[bytes, str] = {}
    # good replies only; a REPLY with an error is counted apart, never as work
    done: dict[str, list[float]] = {"cpu": [], "io": []}
    errors: dict[str, list[bytes]] = {"cpu": [], "io": []}
    credit = next_job = 0
    identity = None
    started = last_from_worker = None
    longest_silence = 0.0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + 600

    def overdue() -> str:
        return (f"only {len(done['cpu'])} CPU and {len(done['io'])} IO jobs done "
                f"({len(errors['cpu']) + len(errors['io'])} errors)")

    def answered() -> int:
        return sum(len(v) for v in done.values()) + sum(len(v) for v in errors.values())

    try:
        while answered() < len(jobs):
            if not poll_worker(poller, worker, deadline, overdue):
                continue
            while True:
                try:
                    msg = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.monotonic()
                if started is not None:
                    longest_silence = max(longest_silence, now - last_from_worker)
                last_from_worker = now
                command = msg[3]
                if command == b"READY":
                    credit += 1
                elif command == b"REPLY":
                    kind = kind_of.pop(msg[6])
                    if "error" in json.loads(msg[5]):
                        errors[kind].append(msg[5])
                    else:
                        done[kind].append(now)
                elif command == b"INFORM":
                    identity = msg[0]
                    sock.send_multipart([identity, *frames("ACK", msg[4].decode())])
                elif command == b"HEARTBEAT":
                    sock.send_multipart([identity, *frames("HEARTBEAT", str(time.time()))])
            if credit and started is None:
                started = last_from_worker = time.monotonic()
            while credit and next_job < len(jobs):
                kind, body = jobs[next_job]
                job = frames("REQUEST", "default", "reply-requested", body)
                kind_of[job[3]] = kind
                sock.send_multipart([identity, *job])
                credit -= 1
                next_job += 1
        end = time.monotonic()
    finally:
        stop([worker])
        sock.close(0)
        log.close()
    return {"total_s": end - started, "longest_silence_s": longest_silence,
            "cpu_done_s": max(done["cpu"]) - started if done["cpu"] else 0.0,
            "io_done_s": max(done["io"]) - started if done["io"] else 0.0,
            "cpu_ok": len(done["cpu"]), "io_ok": len(done["io"]),
            "cpu_errors": len(errors["cpu"]), "io_errors": len(errors["io"]),
            "first_error": (errors["cpu"] + errors["io"] or [b""])[0].decode()[:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-jobs", type=int, default=40)
    ap.add_argument("--cpu-seconds", type=float, default=0.5,
                    help="target duration of one CPU job (calibrated)")
    ap.add_argument("--io-jobs", type=int, default=5000)
    ap.add_argument("--io-seconds", type=float, default=0.1)
    ap.add_argument("-J", type=int, default=1000)
    ap.add_argument("--pool-size", type=int, default=2)
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument("--in-process", action="store_true",
                    help="send the CPU jobs without the subprocess flag")
    opts = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="emq-bench-cpu-")
    try:
        with open(os.path.join(workdir, "cpubenchjobs.py"), "w") as f:
            f.write(JOB_MODULE)
        namespace: dict = {}
        exec(JOB_MODULE, namespace)
        burn = namespace["burn"]
        n = calibrate(burn, opts.cpu_seconds)
        t = time.perf_counter()
        for _ in range(opts.cpu_jobs):
            burn(n)
        sequential = time.perf_counter() - t
        result = run(opts, workdir, n)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # a rate over the good replies only (an error is no work done)
    speedup = (sequential * result["cpu_ok"] / opts.cpu_jobs / result["cpu_done_s"]
               if result["cpu_done_s"] else 0.0)
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.2f} at the end (figures need a quiet machine)")
    print(f"workload: {opts.cpu_jobs} CPU jobs of burn({n}) "
          f"({'in-process' if opts.in_process else 'subprocess, pool ' + str(opts.pool_size)})"
          f" + {opts.io_jobs} x sleep({opts.io_seconds:g}) at -J {opts.J}, "
          f"heartbeat_interval {opts.heartbeat_interval:g} s")
    print(f"sequential, one process: {sequential:.2f} s for the CPU jobs "
          f"({opts.cpu_jobs / sequential:.2f} jobs/s)")
    print(f"total {result['total_s']:.2f} s; IO jobs done at {result['io_done_s']:.2f} s; "
          f"CPU jobs done at {result['cpu_done_s']:.2f} s "
          f"({result['cpu_ok'] / max(result['cpu_done_s'], 1e-9):.2f} jobs/s, "
          f"{speedup:.2f}x sequential)")
    print(f"good replies: {result['cpu_ok']} of {opts.cpu_jobs} CPU, {result['io_ok']} of "
          f"{opts.io_jobs} IO; errors (not counted above): {result['cpu_errors']} CPU, "
          f"{result['io_errors']} IO")
    if result["first_error"]:
        print(f"first error: {result['first_error']}")
    print(f"longest silence from the worker: {result['longest_silence_s']:.2f} s")
    print(json.dumps({**result, "sequential_s": sequential, "speedup": speedup,
                      "burn_n": n}))
    if result["cpu_errors"] or result["io_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
