#!/usr/bin/env python3
"""Results back to the caller against fire-and-forget, for the same no-op jobs.

    .venv/bin/python scripts/bench_results.py [--jobs 5000] [--concurrency 200]
        [--repeat 3] [--split] [--client threads|green]

One router and one worker as real processes: ``emq-green --standalone -J N``
(default), or with ``--split`` ``emq-green-router`` plus ``emq-green -J N``.
Each round sends the same ``--jobs`` jobs of ``examples.jobs.noop`` twice,
from one emq-green client, as fast as it can:

* ``fire_and_forget``: ``defer_job(...)``; the jobs are done when the
  router's STATUS says every request was handed to the worker and none is in
  flight (each READY retires one; the worker's first READYs came before any
  request, so the count is exact here), polled every 5 ms. What counts is
  the worker's own books (its ``/status``, ``--metrics-addr``): jobs that
  succeeded; the router's processed figure includes failures;
* ``results``: ``defer_job(..., result=True)``, then ``get()`` on every
  handle; done when the last result is in. A handle that raises (JobError,
  ResultTimeout, ...) is an error.

Reported per mode: good jobs/s from the first send to done, errors apart
(any error makes the run exit 1); and the ratio results / fire-and-forget of
the medians. Each round line also gives the CPU time (user + system) per
job of the client (this process, all its threads) and of each server
process (``cpu_us_per_job``): on a machine shared with other work, CPU per
job is the steadier figure (median per mode in the summary).
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
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import zmq  # noqa: E402
from benchlib import free_ports  # noqa: E402

from emq_green.client import Client  # noqa: E402
from emq_green.protocol import Command, Message  # noqa: E402

JOB = "examples.jobs.noop"


class Admin:
    """One DEALER on the router's administrative socket."""

    def __init__(self, addr: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"admin:{uuid.uuid4()}".encode())
        self.sock.connect(addr)

    def ask(self, command: Command, timeout: float = 2.0) -> Optional[dict[str, Any]]:
        self.sock.send_multipart(Message.new(command).frames())
        if not self.sock.poll(int(timeout * 1000)):
            raise SystemExit(f"no answer to {command.value} in {timeout} s")
        return json.loads(Message.parse(self.sock.recv_multipart()).body[0])

    def close(self) -> None:
        self.sock.close()


def wait_for_slots(admin: Admin, slots: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        workers = admin.ask(Command.ROUTER_SHOW_WORKERS)["connected_workers"]
        if sum(w["available_slots"] for w in workers.values()) >= slots:
            return
        time.sleep(0.05)  # polling interval while the worker connects
    raise SystemExit(f"no worker with {slots} free slots in 30 s")


def worker_books(status_url: str) -> tuple[int, int]:
    """(succeeded, any other end) of :data:`JOB` in the worker's /status."""
    import requests

    rows = [j for j in requests.get(status_url, timeout=5).json()["jobs"]
            if j["callable"] == JOB]
    good = sum(j["succeeded"] for j in rows)
    bad = sum(j["failed"] + j["timed_out"] + j["killed"] for j in rows)
    return good, bad


def fire_and_forget(client: Client, admin: Admin, jobs: int, before: int,
                    status_url: str) -> tuple[float, int, int]:
    """Seconds to done, good jobs, errors."""
    good0, bad0 = worker_books(status_url)
    started = time.perf_counter()
    for n in range(jobs):
        client.defer_job(JOB, [n])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = admin.ask(Command.STATUS)
        processed = sum(status["processed_messages_by_queue"].values()) - before
        if (processed >= jobs and not any(status["inflight_messages_by_queue"].values())
                and not any(status["waiting_messages_by_queue"].values())):
            elapsed = time.perf_counter() - started
            while time.monotonic() < deadline:  # the worker's books, once all ended
                good, bad = worker_books(status_url)
                if good - good0 + bad - bad0 >= jobs:
                    return elapsed, good - good0, bad - bad0
                time.sleep(0.05)  # polling interval for /status
            break
        time.sleep(0.005)  # polling interval for STATUS
    raise SystemExit("fire-and-forget: the jobs did not finish in 120 s")


def with_results(client: Client, jobs: int) -> tuple[float, int, int]:
    """Seconds to done, good results, errors (raised by get())."""
    started = time.perf_counter()
    handles = [client.defer_job(JOB, [n], result=True) for n in range(jobs)]
    good = bad = 0
    for handle in handles:
        try:
            handle.get(timeout=120)
            good += 1
        except Exception as exc:  # JobError, ResultTimeout, ...: counted apart
            bad += 1
            if bad == 1:
                print(f"first error: {exc!r}", file=sys.stderr, flush=True)
    return time.perf_counter() - started, good, bad


def start(split: bool, concurrency: int,
          tmp: Path) -> tuple[list[subprocess.Popen], str, str, str]:
    ports = free_ports(4)
    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in ports[:3])
    status_url = f"http://127.0.0.1:{ports[3]}/status"
    (tmp / "empty.conf").write_text("")
    env = dict(os.environ, PYTHONPATH=str(REPO), EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"))
    log = open(tmp / "emq-green.log", "wb")
    addrs = ["--frontend-addr", front, "--backend-addr", back, "--administrative-addr", admin]
    worker = [sys.executable, "-m", "emq_green.cli", "-J", str(concurrency),
              "--kill-grace-period", "5", "--metrics-addr", f"127.0.0.1:{ports[3]}"]
    if split:
        router = Path(sys.executable).parent / "emq-green-router"
        procs = [subprocess.Popen([str(router), *addrs], env=env, stdout=log, stderr=log),
                 subprocess.Popen([*worker, "-B", back], env=env, stdout=log, stderr=log)]
    else:
        procs = [subprocess.Popen([*worker, "--standalone", *addrs], env=env, stdout=log,
                                  stderr=log)]
    log.close()
    return procs, front, admin, status_url


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", "-J", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="rounds, modes alternating")
    parser.add_argument("--split", action="store_true",
                        help="emq-green-router and emq-green as two processes")
    parser.add_argument("--client", choices=("threads", "green"), default="threads",
                        help="emq-green client with plain zmq (a reader thread) or zmq.green")
    ns = parser.parse_args()
    if ns.client == "green":
        from gevent import monkey

        monkey.patch_all()
    rates: dict[str, list[float]] = {"fire_and_forget": [], "results": []}
    cpu: dict[str, list[dict[str, float]]] = {"fire_and_forget": [], "results": []}
    errors = 0
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        procs, front, admin_addr, status_url = start(ns.split, ns.concurrency, Path(tmp))
        admin = Admin(admin_addr)
        try:
            wait_for_slots(admin, ns.concurrency, time.monotonic() + 30)
            client = Client(front, green=ns.client == "green")
            # warm-up: sockets connected, modules imported on the worker
            with_results(client, 200)
            before = sum(admin.ask(Command.STATUS)["processed_messages_by_queue"].values())
            watched = {"client": psutil.Process()}
            for p, name in zip(procs, ("router", "worker") if ns.split else ("server",)):
                watched[name] = psutil.Process(p.pid)
            for round_ in range(ns.repeat):
                for mode in ("fire_and_forget", "results"):
                    cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in watched.items()}
                    if mode == "fire_and_forget":
                        elapsed, good, bad = fire_and_forget(client, admin, ns.jobs, before,
                                                             status_url)
                    else:
                        elapsed, good, bad = with_results(client, ns.jobs)
                    cpu_us = {k: round((sum(p.cpu_times()[:2]) - cpu0[k]) / ns.jobs * 1e6, 1)
                              for k, p in watched.items()}
                    cpu[mode].append(cpu_us)
                    before += ns.jobs
                    errors += bad
                    rates[mode].append(good / elapsed)  # good replies only
                    print(json.dumps({"round": round_, "mode": mode, "jobs": ns.jobs,
                                      "good": good, "errors": bad,
                                      "seconds": round(elapsed, 3),
                                      "jobs_per_s": round(good / elapsed),
                                      "cpu_us_per_job": cpu_us}), flush=True)
            client.close()
        finally:
            admin.close()
            stop(procs)
    ff = statistics.median(rates["fire_and_forget"])
    res = statistics.median(rates["results"])
    print(json.dumps({"median_of": ns.repeat, "router": "split" if ns.split else "standalone",
                      "client": ns.client, "concurrency": ns.concurrency,
                      "fire_and_forget_per_s": round(ff), "results_per_s": round(res),
                      "ratio": round(res / ff, 2),
                      "cpu_us_per_job": {
                          mode: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                          for mode, rows in cpu.items()},
                      "errors": errors}), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
