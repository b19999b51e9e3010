#!/usr/bin/env python3
"""Routers side by side: emq-green's, EventMQ 0.3.13's, and a bare forwarder.

    .venv/bin/python scripts/bench_routers.py [--jobs 20000] [--repeat 3]
        [--workloads noop,sleep] [--routers green,eventmq,forwarder] [--tree DIR]

The same client, worker and jobs for every router; only the router differs,
and the routers alternate within each round:

* ``green``: ``emq-green-router`` (this tree, or ``--tree``), every check of
  its hardening on (sizes, allowlist at the worker, results, backpressure);
* ``eventmq``: EventMQ 0.3.13's ``emq-router``;
* ``forwarder``: the physical ceiling, a bare pyzmq loop (ROUTER in, ROUTER
  out) that reads only the command frame: it ACKs the worker's INFORM,
  counts READYs, and forwards each REQUEST as it comes while the worker has
  credit, else keeps it in a deque for the next READY. No JSON, no headers,
  no checks, no heartbeats: what moving the frames costs.

Client: one raw DEALER that sends ``--jobs`` REQUESTs as fast as ZeroMQ
takes them and reads acknowledgements as they come. Worker: one
``emq-green -J 1000`` (``--concurrency``). Jobs: ``noop`` is
``examples.jobs.mark`` (one line appended to a file), ``sleep`` is
``examples.jobs.sleep_and_mark`` with 0.1 s. A job is done when its line is
in the file. Reported per run: jobs/s from the first send to the last line,
router CPU us per job (/proc), and at the end the medians and the ratios:
green / eventmq, and green / forwarder (the fraction of the ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import zmq  # noqa: E402
from benchlib import LineCounter, cpu_seconds, free_ports, stop, wait_for_slots  # noqa: E402

BIN = Path(sys.executable).parent
ROUTERS = ("green", "eventmq", "forwarder")
WORKLOADS = {"noop": ("mark", []), "sleep": ("sleep_and_mark", [0.1])}

#: the bare forwarder: ROUTER in (clients), ROUTER out (the worker); argv:
#: frontend backend admin. It answers the admin socket's ROUTER_SHOW_WORKERS
#: with one worker and its unused credit as free slots (for the harness's
#: wait), and nothing else.
FORWARDER = r"""
import collections, json, sys, zmq
ctx = zmq.Context()
front, back, admin = (ctx.socket(zmq.ROUTER) for _ in range(3))
for s, addr in zip((front, back, admin), sys.argv[1:4]):
    s.setsockopt(zmq.SNDHWM, 0); s.setsockopt(zmq.RCVHWM, 0); s.bind(addr)
poller = zmq.Poller()
for s in (front, back, admin):
    poller.register(s, zmq.POLLIN)
ready, queued = collections.deque(), collections.deque()  # a worker per READY
while True:
    for sock, _ in poller.poll():
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if sock is front:
                if frames[3] == b"REQUEST":
                    if ready:
                        back.send_multipart([ready.popleft(), *frames[1:]])
                    else:
                        queued.append(frames[1:])
            elif sock is back:
                if frames[3] == b"INFORM":
                    back.send_multipart([frames[0], b"", b"eMQP/1.0", b"ACK", b"ack",
                                         frames[4]])
                elif frames[3] == b"READY":
                    if queued:
                        back.send_multipart([frames[0], *queued.popleft()])
                    else:
                        ready.append(frames[0])
            else:
                body = json.dumps({"connected_workers": {"w": {"available_slots": len(ready)}}})
                admin.send_multipart([frames[0], b"", b"eMQP/1.0", b"REPLY", b"x",
                                      body.encode()])
"""


def start_router(kind: str, front: str, back: str, admin: str, env: dict, log) -> subprocess.Popen:
    if kind == "green":
        argv = [sys.executable, "-c", "import sys; from emq_green.cli import router_main; "
                "sys.exit(router_main())", "--frontend-addr", front, "--backend-addr", back,
                "--administrative-addr", admin]
        return subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=env["PYTHONPATH"])
    if kind == "eventmq":
        return subprocess.Popen([str(BIN / "emq-router")], env=dict(
            env, EVENTMQ_FRONTEND_ADDR=front, EVENTMQ_BACKEND_ADDR=back,
            EVENTMQ_ADMINISTRATIVE_ADDR=admin), stdout=log, stderr=log)
    return subprocess.Popen([sys.executable, "-c", FORWARDER, front, back, admin], env=env,
                            stdout=log, stderr=log)


def run(kind: str, workload: str, jobs: int, concurrency: int, tmp: Path, tree: Path,
        profile: Path | None = None, workers: int = 1) -> dict:
    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    marks = tmp / f"{kind}-{workload}.marks"
    (tmp / "empty.conf").write_text("")
    env = dict(os.environ, PYTHONPATH=str(tree), EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"))
    log = open(tmp / f"{kind}-{workload}.log", "wb")
    router = start_router(kind, front, back, admin, env, log)
    spy = None
    if profile is not None:  # the router's collapsed stacks (py-spy in the venv)
        profile.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--format", "raw", "--rate",
                                "250", "--pid", str(router.pid), "-o",
                                str(profile / f"{kind}-{workload}-{tmp.name}.txt")],
                               stdout=log, stderr=log)
    # cwd: ``-c`` and ``-m`` put the current directory first on sys.path
    pool = [subprocess.Popen([sys.executable, "-m", "emq_green.cli", "-B", back, "-J",
                              str(concurrency), "--kill-grace-period", "5"], env=env,
                             stdout=log, stderr=log, cwd=str(tree)) for _ in range(workers)]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"bench-{uuid.uuid4()}".encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if not wait_for_slots(admin, concurrency * workers, time.monotonic() + 30):
            raise SystemExit(f"{kind}: not {workers} x {concurrency} slots in 30 s")
        sock.connect(front)
        name, extra = WORKLOADS[workload]
        payloads = [json.dumps(["run", {"path": "examples.jobs", "callable": name,
                                        "args": [*extra, str(marks), str(n)]}]).encode()
                    for n in range(jobs)]
        msgids = [str(uuid.uuid4()).encode() for _ in range(jobs)]
        time.sleep(0.5)  # the worker's READYs are in (EventMQ's router logs each)
        cpu_before = cpu_seconds(router.pid)
        worker_before = sum(cpu_seconds(w.pid) for w in pool)
        client_before = time.process_time()
        started = time.time()
        for n in range(jobs):
            sock.send_multipart([b"", b"eMQP/1.0", b"REQUEST", msgids[n], b"default", b"",
                                 payloads[n]])
            if n % 256 == 0:
                while sock.poll(0):
                    sock.recv_multipart()
        deadline = time.monotonic() + 300
        counter = LineCounter(marks)
        while counter.count() < jobs and time.monotonic() < deadline:
            while sock.poll(0):
                sock.recv_multipart()
            dead = [w.pid for w in pool if w.poll() is not None]
            if dead or router.poll() is not None:
                # (a probe: a worker gone, the run waited its whole 300 s)
                who = f"worker(s) {dead}" if dead else "the router"
                raise SystemExit(f"{kind} {workload}: {who} exited mid-run, "
                                 f"{counter.count()}/{jobs} jobs done ({log.name})")
            time.sleep(0.01)  # polling interval for the file
        cpu = cpu_seconds(router.pid) - cpu_before
        worker_cpu = sum(cpu_seconds(w.pid) for w in pool) - worker_before
        client_cpu = time.process_time() - client_before
        done = counter.count()
        if done < jobs:
            raise SystemExit(f"{kind} {workload}: only {done}/{jobs} jobs done ({log.name})")
        last = max(float(line.split()[-1]) for line in marks.read_text().splitlines())
        return {"router": kind, "workload": workload, "jobs": jobs,
                "jobs_per_s": round(jobs / (last - started)),
                "router_cpu_us_per_job": round(cpu / jobs * 1e6, 1),
                "worker_cpu_us_per_job": round(worker_cpu / jobs * 1e6, 1),
                "client_cpu_us_per_job": round(client_cpu / jobs * 1e6, 1)}
    finally:
        sock.close()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(30)
        stop([*pool, router])
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", "-J", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1,
                        help="emq-green processes, each with --concurrency slots")
    parser.add_argument("--workloads", default="noop,sleep")
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="source tree of emq-green's router and worker (default: this one)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="directory: sample each router with py-spy while it runs")
    ns = parser.parse_args()
    routers = [r for r in ns.routers.split(",") if r]
    workloads = [w for w in ns.workloads.split(",") if w]
    if set(routers) - set(ROUTERS) or set(workloads) - set(WORKLOADS):
        parser.error(f"routers from {ROUTERS}, workloads from {tuple(WORKLOADS)}")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-routers-") as tmp:
        for round_ in range(ns.repeat):
            for workload in workloads:
                for kind in routers:
                    where = Path(tmp) / str(round_)
                    where.mkdir(exist_ok=True)
                    result = run(kind, workload, ns.jobs, ns.concurrency, where, ns.tree,
                                 ns.profile, ns.workers)
                    results.setdefault((kind, workload), []).append(result)
                    print(json.dumps(result), flush=True)
    print(f"\n{'workload':9} {'router':10} {'jobs/s':>8} {'rtr us/job':>11}   "
          f"(medians of {ns.repeat})")
    med = {}
    for (kind, workload), runs in results.items():
        med[kind, workload] = (statistics.median(r["jobs_per_s"] for r in runs),
                               statistics.median(r["router_cpu_us_per_job"] for r in runs))
        print(f"{workload:9} {kind:10} {med[kind, workload][0]:8.0f} "
              f"{med[kind, workload][1]:11.1f}")
    for workload in workloads:
        green = med.get(("green", workload))
        if green is None:
            continue
        for other, label in (("eventmq", "x EventMQ's router"), ("forwarder", "of the ceiling")):
            if (other, workload) in med:
                print(f"{workload}: green {green[0] / med[other, workload][0]:.2f} {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
