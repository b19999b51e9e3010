#!/usr/bin/env python3
"""How accurately a 1-second schedule fires while the worker is busy.

    .venv/bin/python scripts/bench_schedule.py [--seconds 60] [--busy 1000]
        [--interval 1] [--repeat 1]

Starts ``emq-green-router``, one ``emq-green -J busy+100`` and
``emq-green-scheduler`` as real processes (this tree, free loopback ports).
It fills the worker with ``--busy`` jobs that stay in flight until the end
(each wakes ten times a second to look for a gate file: 10,000 wake-ups a
second on the worker), waits until all of them run, then schedules a job
every ``--interval`` seconds (``nohaste``) with emq-green's client and
unschedules it ``--seconds`` (+ half an interval) later.

Each run of the scheduled job appends the time it started. Reported: runs
counted (expected ``seconds / interval``), and lateness = start time minus
the tick it belongs to, the ticks being ``sent + k * interval`` where
``sent`` is when the SCHEDULE left the bench (the scheduler anchors its grid
when it receives it, a little later: the figures are upper bounds). The
lateness covers the whole path: scheduler, router, worker, job start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import admin_request, free_ports, stop  # noqa: E402

from emq_green.client import Client, schedule, unschedule  # noqa: E402
from emq_green.protocol import Command  # noqa: E402

BIN = Path(sys.executable).parent

JOBS = '''
import os, time

def hold(gate, started):
    fd = os.open(started, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"s\\n")
    os.close(fd)
    while not os.path.exists(gate):
        time.sleep(0.1)

def tick(path):
    line = f"{time.time():.6f}\\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line)
    os.close(fd)
'''


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_schedule: timed out waiting for {what}")
        time.sleep(0.05)  # polling interval


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def run(seconds: float, busy: int, interval: float, tmp: Path) -> dict:
    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    (tmp / "bench_sched_jobs.py").write_text(JOBS)
    (tmp / "empty.conf").write_text("")
    env = dict(os.environ, PYTHONPATH=f"{tmp}{os.pathsep}{REPO}",
               EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"))
    log = open(tmp / "bench.log", "ab")
    started, gate, ticks = tmp / "started", tmp / "gate", tmp / "ticks"
    for path in (started, gate, ticks):
        path.unlink(missing_ok=True)
    procs = [
        subprocess.Popen([str(BIN / "emq-green-router"), "--frontend-addr", front,
                          "--backend-addr", back, "--administrative-addr", admin],
                         env=env, stdout=log, stderr=log, cwd=str(tmp)),
        subprocess.Popen([str(BIN / "emq-green"), "-B", back, "-J", str(busy + 100),
                          "-n", "busy-worker"], env=env, stdout=log, stderr=log, cwd=str(tmp)),
        subprocess.Popen([str(BIN / "emq-green-scheduler"), "--scheduler-addr", front,
                          "--scheduler-file", str(tmp / "schedules.db")],
                         env=env, stdout=log, stderr=log, cwd=str(tmp)),
    ]
    try:
        wait(lambda: (admin_request(admin, Command.ROUTER_SHOW_SCHEDULERS, timeout=1)
                      or {}).get("connected_schedulers"), 30, "the scheduler")
        with Client(front, green=False) as client:
            for _ in range(busy):
                client.defer_job("bench_sched_jobs.hold", [str(gate), str(started)])
            wait(lambda: len(lines(started)) >= busy, 60, f"{busy} jobs in flight")
            sent = time.time()
            schedule("bench_sched_jobs.tick", [str(ticks)], every=interval, nohaste=True,
                     guarantee=False, client=client)
            time.sleep(seconds + interval / 2)  # the measured period itself
            unschedule("bench_sched_jobs.tick", [str(ticks)], client=client)
            stopped = time.time()
            still_busy = len(lines(started))  # hold jobs started, none has ended
        times = [float(t) for t in lines(ticks) if float(t) <= stopped]
        log.flush()
        # the scheduler's own view: firings it sent late (over 50 ms)
        late_at_scheduler = (tmp / "bench.log").read_text(errors="replace").count(
            "bench_sched_jobs.tick fired")
        late = sorted(t - (sent + round((t - sent) / interval) * interval) for t in times)
        late_ms = [x * 1000 for x in late]
        return {"runs": len(times), "expected": int(seconds / interval),
                "busy_jobs_running_at_end": still_busy,
                "lateness_ms_p50": round(statistics.median(late_ms), 2),
                "lateness_ms_p99": round(late_ms[min(len(late_ms) - 1,
                                                     int(len(late_ms) * 0.99))], 2),
                "lateness_ms_max": round(late_ms[-1], 2),
                "lateness_ms_min": round(late_ms[0], 2),
                "slowest_ms": [round(x, 1) for x in late_ms[-3:]],
                "sent_late_by_scheduler": late_at_scheduler}
    finally:
        gate.touch()
        stop(procs)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--busy", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1)
    ns = parser.parse_args()
    for i in range(ns.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-schedule-") as tmp:
            result = run(ns.seconds, ns.busy, ns.interval, Path(tmp))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
