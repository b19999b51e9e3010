#!/usr/bin/env python
"""emq-green against EventMQ 0.3.13's own emq-jobmanager, side by side.

One real ``emq-router`` (on free loopback ports) serves every run; each job
manager is started in turn, gets the same jobs from EventMQ's own client
(``defer_job`` on a ``Sender``), and is stopped (SIGTERM) before the next one
starts. Completion is observed for real: every job appends a line to a file
(``tests/interop_jobs.py``) that the harness reads; latency is the time from
just before the job was sent to the line the job wrote. Peak memory is the
largest sum of RSS over the job manager's whole process tree (the process and
all its children), sampled every 50 ms with psutil from the start of the
process to the end of its run.

    .venv/bin/python scripts/bench_side_by_side.py            # ~5 min on 2 cores
    .venv/bin/python scripts/bench_side_by_side.py --quick    # a smoke run

Slow configurations run fewer jobs (``--slow-jobs``, ``--mid-jobs``); jobs/s
is comparable across counts and the table says how many jobs each row ran.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peers import (  # noqa: E402
    BIN,
    EVENTMQ_IDENTITY,
    RECORD_ENV,
    Client,
    Proc,
    Router,
    RouterAddrs,
    clean_env,
)

SLEEP = 0.1
STALL_SECONDS = 30


@dataclass
class Run:
    workload: str
    manager: str
    concurrency: int
    jobs: int
    jobs_per_s: float
    p50_ms: float
    p99_ms: float
    peak_rss_mb: float
    wall_s: float
    manager_cpu_s: float
    router_cpu_s: float
    #: jobs whose completion was never seen (the run stalled); 0 normally
    lost: int = 0

    @property
    def rss_per_job_mb(self) -> float:
        return self.peak_rss_mb / self.concurrency


class TreeMemory:
    """Peak RSS of a process and all its descendants, sampled every 50 ms."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.cpu: dict[int, float] = {}  # pid -> latest user+system seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> int:
        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
                t = p.cpu_times()
                self.cpu[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class DoneLines:
    """Reads the record file incrementally: tag -> time the job recorded."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix  # only this run's jobs count
        self.path.write_text("")
        self._offset = 0
        self._partial = b""
        self.done: dict[str, float] = {}
        self.duplicates = 0

    def poll(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            event, tag, _pid, when = line.decode().split()
            if event == "done" and tag.startswith(self.prefix):
                if tag in self.done:
                    self.duplicates += 1
                self.done[tag] = float(when)
        return len(self.done)


def start_manager(kind: str, concurrency: int, addrs: RouterAddrs, tmp: Path,
                  env: dict[str, str], n: int) -> Proc:
    argv = ["-B", addrs.backend, "-J", str(concurrency)]
    if kind == "emq-green":
        argv += ["-n", f"bench{n}"]
    return Proc(kind, [str(BIN / kind), *argv], tmp / f"{n:02d}-{kind}-J{concurrency}.log",
                env, tmp)


def stop_manager(proc: Proc, timeout: float = 60) -> None:
    proc.signal(signal.SIGTERM)
    try:
        proc.popen.wait(timeout)
    except Exception:
        print(f"  {proc.name} did not stop in {timeout:g} s; killing it", file=sys.stderr)
    proc.kill()


def run_one(router: Router, kind: str, concurrency: int, workload: str, jobs: int,
            tmp: Path, n: int) -> Run:
    record = DoneLines(tmp / f"record-{n:02d}.txt", f"{n}-")
    env = clean_env(**{RECORD_ENV: str(record.path)})
    router_ps = psutil.Process(router.pid)
    proc = start_manager(kind, concurrency, router.addrs, tmp, env, n)
    memory = TreeMemory(proc.pid)
    router_cpu = sum(router_ps.cpu_times()[:2])
    try:
        ident = EVENTMQ_IDENTITY if kind == "emq-jobmanager" else f"bench{n}:"
        router.wait_for_worker(ident, concurrency, timeout=120)
        client = Client(router.addrs.frontend)
        func, args = (("interop_jobs.sleep_then_record", (SLEEP,)) if workload == "sleep"
                      else ("interop_jobs.record", ()))
        sent: dict[str, float] = {}
        start = time.time()
        for i in range(jobs):
            tag = f"{n}-{i}"
            sent[tag] = time.time()
            client.defer(func, tag, *args)
            if i % 500 == 0:
                record.poll()
        ideal = jobs * (SLEEP if workload == "sleep" else 0.002) / concurrency
        deadline = time.monotonic() + 120 + 5 * ideal
        progress, last_progress = 0, time.monotonic()
        while record.poll() < jobs:
            client.drain()
            if len(record.done) > progress:
                progress, last_progress = len(record.done), time.monotonic()
            stalled = time.monotonic() - last_progress > STALL_SECONDS
            if time.monotonic() > deadline or not proc.alive or stalled:
                print(f"\n  STALLED: {kind} -J {concurrency}: {len(record.done)} of {jobs} "
                      f"jobs done, none for {STALL_SECONDS} s; see {tmp}", flush=True)
                break
            time.sleep(0.05)
        router_cpu = sum(router_ps.cpu_times()[:2]) - router_cpu
        client.close()
    finally:
        stop_manager(proc)
        peak = memory.stop()
    if record.duplicates:
        raise RuntimeError(f"{kind}: {record.duplicates} job(s) ran twice")
    end = max(record.done.values())
    latencies = sorted((record.done[t] - sent[t]) * 1000 for t in record.done)
    q = statistics.quantiles(latencies, n=100)
    done = len(record.done)
    return Run(workload, kind, concurrency, jobs, done / (end - start), q[49], q[98],
               peak / 2**20, end - start, sum(memory.cpu.values()), router_cpu,
               lost=jobs - done)


def fmt_table(runs: list[Run]) -> str:
    base = {(r.workload, r.concurrency): r for r in runs if r.manager == "emq-jobmanager"}
    head = ("| workload | job manager | -J | jobs run | jobs/s | p50 ms | p99 ms "
            "| peak tree RSS MB | RSS MB per -J slot | green / jobmanager -J 4 "
            "| green / jobmanager -J 50 | CPU s manager / router |")
    out = [head, "|" + "---|" * 12]
    for r in runs:
        ratios = []
        for j in (4, 50):
            b = base.get((r.workload, j))
            ratios.append(f"{r.jobs_per_s / b.jobs_per_s:.1f}x jobs/s, "
                          f"{r.peak_rss_mb / b.peak_rss_mb:.2f}x RSS"
                          if r.manager == "emq-green" and b else "")
        jobs = f"{r.jobs}" + (f" ({r.lost} never done)" if r.lost else "")
        out.append(f"| {r.workload} | {r.manager} | {r.concurrency} | {jobs} "
                   f"| {r.jobs_per_s:.1f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} "
                   f"| {r.peak_rss_mb:.0f} | {r.rss_per_job_mb:.2f} | {ratios[0]} "
                   f"| {ratios[1]} | {r.manager_cpu_s:.1f} / {r.router_cpu_s:.1f} |")
    return "\n".join(out)


def verdict(runs: list[Run]) -> list[str]:
    def find(workload: str, manager: str, j: int) -> Optional[Run]:
        return next((r for r in runs if (r.workload, r.manager, r.concurrency)
                     == (workload, manager, j)), None)

    lines = []
    for workload, target in (("sleep", 100), ("noop", 5)):
        g, b = find(workload, "emq-green", 1000), find(workload, "emq-jobmanager", 4)
        if g and b:
            ratio = g.jobs_per_s / b.jobs_per_s
            lines.append(f"{workload}: emq-green is {ratio:.1f}x emq-jobmanager -J 4 "
                         f"(target >= {target}x): {'met' if ratio >= target else 'NOT met'}")
    for workload in ("sleep", "noop"):
        g, b = find(workload, "emq-green", 1000), find(workload, "emq-jobmanager", 50)
        if g and b:
            ratio = g.peak_rss_mb / b.peak_rss_mb
            lines.append(f"{workload}: emq-green -J 1000 uses {ratio:.3f} of the memory of "
                         f"emq-jobmanager -J 50 (target <= 0.1): "
                         f"{'met' if ratio <= 0.1 else 'NOT met'}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=5000,
                    help="sleep jobs for emq-green -J 1000")
    ap.add_argument("--mid-jobs", type=int, default=1000,
                    help="sleep jobs for emq-jobmanager -J 50 (50 jobs/s)")
    ap.add_argument("--slow-jobs", type=int, default=200,
                    help="sleep jobs for emq-jobmanager -J 4 (4 jobs/s)")
    ap.add_argument("--noop-jobs", type=int, default=20000, help="no-op jobs for every row")
    ap.add_argument("--green-jobs", type=int, default=1000, help="emq-green's -J")
    ap.add_argument("--quick", action="store_true", help="a smoke run with 1/10 the jobs")
    ap.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = ap.parse_args()
    if args.quick:
        for name in ("jobs", "mid_jobs", "slow_jobs", "noop_jobs"):
            setattr(args, name, max(20, getattr(args, name) // 10))

    plan = [
        ("sleep", "emq-jobmanager", 4, args.slow_jobs),
        ("sleep", "emq-jobmanager", 50, args.mid_jobs),
        ("sleep", "emq-green", args.green_jobs, args.jobs),
        ("noop", "emq-jobmanager", 4, args.noop_jobs),
        ("noop", "emq-jobmanager", 50, args.noop_jobs),
        ("noop", "emq-green", args.green_jobs, args.noop_jobs),
    ]
    tmp = Path(tempfile.mkdtemp(prefix="emq-bench-"))
    addrs = RouterAddrs.fresh()
    config = tmp / "eventmq.conf"
    config.write_text(f"[global]\nfrontend_addr = {addrs.frontend}\n"
                      f"backend_addr = {addrs.backend}\n"
                      f"administrative_addr = {addrs.admin}\n")
    router = Router(addrs, config, tmp / "00-router.log", clean_env(), tmp)
    runs: list[Run] = []
    try:
        for n, (workload, kind, j, jobs) in enumerate(plan, start=1):
            print(f"[{n}/{len(plan)}] {workload}: {kind} -J {j}, {jobs} jobs ...",
                  end=" ", flush=True)
            r = run_one(router, kind, j, workload, jobs, tmp, n)
            runs.append(r)
            if r.lost:
                # The router may still hold the lost jobs; they must not
                # reach the next job manager.
                print("  restarting the router after the stalled run", flush=True)
                router.kill()
                router = Router(addrs, config, tmp / f"{n:02d}-router-restarted.log",
                                clean_env(), tmp)
            print(f"{r.jobs_per_s:.1f} jobs/s, p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms, "
                  f"peak {r.peak_rss_mb:.0f} MB in {r.wall_s:.1f} s; CPU s: manager "
                  f"{r.manager_cpu_s:.1f}, router {r.router_cpu_s:.1f}", flush=True)
    finally:
        router.kill()
        if not args.keep and not any(r.lost for r in runs):
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        else:
            print(f"logs in {tmp}")

    print()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
          f"{platform.python_version()}, {platform.system()} {platform.release()}")
    print("latency: send -> the job's own record; memory: peak sum of RSS over the "
          "process tree; CPU: user+system seconds during the row")
    print()
    print(fmt_table(runs))
    print()
    for line in verdict(runs):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
