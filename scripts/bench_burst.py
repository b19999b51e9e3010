#!/usr/bin/env python3
"""A burst into one ``-J 4`` worker: every job runs, exactly once, and the
router's memory stays bounded (issue 10).

    .venv/bin/python scripts/bench_burst.py [--jobs 100000] [--concurrency 4]
        [--only green|eventmq] [--hwm 10000]

Each mode starts a router and one ``emq-green -J 4`` job manager as
processes on free loopback ports:

* ``green``: ``emq-green-router`` (buffers at most ``hwm`` requests per queue
  and ``max_buffer_bytes`` in all, then stops reading clients);
* ``eventmq``: EventMQ 0.3.13's ``emq-router`` (buffers the default queue
  without bound), the baseline.

emq-green's plain (not green) :class:`~emq_green.client.Client` sends the
burst as fast as the router takes it; it blocks while the router pushes back.
Each job is ``examples.jobs.mark``: one line ``TAG PID TIME`` appended to a
file. The check is real: every tag 0..N-1 must be in the file exactly once.
Printed per mode: jobs, seconds to send, seconds until the last line, jobs/s,
the router's RSS before the burst and its peak (psutil, sampled every 50 ms),
the router's CPU time per job and, for emq-green's router, its STATUS
counters (pauses, drops). Exit status 1 when a job is missing or ran twice.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import admin_request, count_lines, free_ports, stop, wait_for_slots  # noqa: E402

from emq_green.client import Client  # noqa: E402
from emq_green.protocol import Command  # noqa: E402

BIN = Path(sys.executable).parent


class PeakRss:
    """Samples a process's resident set size in a thread."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run(mode: str, jobs: int, concurrency: int, hwm: int, tmp: Path) -> dict[str, Any]:
    front, back, admin_addr = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    marks = tmp / f"{mode}.marks"
    (tmp / "empty.conf").write_text("")  # no side reads /etc/eventmq.conf
    env = dict(os.environ, PYTHONPATH=str(REPO), EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"))
    log = open(tmp / f"{mode}.log", "wb")
    procs: list[subprocess.Popen] = []
    if mode == "green":
        router = subprocess.Popen(
            [str(BIN / "emq-green-router"), "--frontend-addr", front, "--backend-addr", back,
             "--administrative-addr", admin_addr, "--hwm", str(hwm)],
            env=env, stdout=log, stderr=log)
    else:
        router = subprocess.Popen(
            [str(BIN / "emq-router")], stdout=log, stderr=log,
            env=dict(env, EVENTMQ_FRONTEND_ADDR=front, EVENTMQ_BACKEND_ADDR=back,
                     EVENTMQ_ADMINISTRATIVE_ADDR=admin_addr))
    procs.append(router)
    procs.append(subprocess.Popen(
        [str(BIN / "emq-green"), "-B", back, "-J", str(concurrency), "--kill-grace-period", "5"],
        env=env, stdout=log, stderr=log))
    try:
        if not wait_for_slots(admin_addr, concurrency, time.monotonic() + 30):
            raise SystemExit(f"{mode}: no worker with {concurrency} slots in 30 s "
                             f"(see {log.name})")
        with PeakRss(router.pid) as rss:
            idle_rss = rss.process.memory_info().rss
            cpu_before = sum(rss.process.cpu_times()[:2])
            client = Client(front, green=False)
            started = time.monotonic()
            for n in range(jobs):
                client.defer_job("examples.jobs.mark", [str(marks), str(n)])
            sent_in = time.monotonic() - started
            deadline = time.monotonic() + max(120, jobs / 200)
            while count_lines(marks) < jobs and time.monotonic() < deadline:
                time.sleep(0.05)  # polling interval for the file
            elapsed = time.monotonic() - started
            router_cpu = sum(rss.process.cpu_times()[:2]) - cpu_before
            client.close()
        status = admin_request(admin_addr, Command.STATUS) or {}
        tags = collections.Counter(line.split()[0] for line in marks.read_text().splitlines())
        missing = jobs - sum(1 for n in range(jobs) if str(n) in tags)
        twice = sum(1 for c in tags.values() if c > 1)
        result: dict[str, Any] = {
            "mode": mode, "jobs": jobs, "concurrency": concurrency,
            "lines": sum(tags.values()), "missing": missing, "more_than_once": twice,
            "exactly_once": missing == 0 and twice == 0 and len(tags) == jobs,
            "send_s": round(sent_in, 2), "elapsed_s": round(elapsed, 2),
            "jobs_per_s": round(jobs / elapsed),
            "router_idle_rss_mb": round(idle_rss / 2**20, 1),
            "router_peak_rss_mb": round(rss.peak / 2**20, 1),
            "router_cpu_us_per_job": round(router_cpu / jobs * 1e6, 1),
        }
        if mode == "green":
            result.update({k: status.get(k) for k in (
                "hwm", "frontend_pauses", "dropped_messages_by_queue",
                "dropped_requests_by_reason")})
        return result
    finally:
        stop(procs[::-1])
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--concurrency", "-J", type=int, default=4)
    parser.add_argument("--hwm", type=int, default=10_000,
                        help="emq-green-router's hwm (requests buffered per queue)")
    parser.add_argument("--only", choices=("green", "eventmq"))
    ns = parser.parse_args()
    modes = [ns.only] if ns.only else ["green", "eventmq"]
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        for mode in modes:
            result = run(mode, ns.jobs, ns.concurrency, ns.hwm, Path(tmp))
            ok = ok and result["exactly_once"]
            print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
