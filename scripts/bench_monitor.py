#!/usr/bin/env python3
"""Overhead of the loop-block monitor (and the heartbeat thread) on a worker.

Runs scripts/bench_worker.py's workload (its stand-in router, in C when it
builds, and the real emq-green console script in its own process) with three worker
configurations, interleaved in the same run so that machine drift hits them
alike, and prints the medians and their ratio to "off":

    off       --block-threshold 0 --thread-heartbeats false
    monitor   --thread-heartbeats false        (gevent's monitor thread on)
    defaults  (monitor and heartbeat thread on)

    .venv/bin/python scripts/bench_monitor.py                   # sleep jobs
    .venv/bin/python scripts/bench_monitor.py --workload noop --repeat 7

Only successful jobs count (bench_worker.py reads the worker's own outcome
counters); error replies are printed separately, and a run with errors is
flagged. The ratios compare medians; the spread of each configuration's runs
(min-max of worker CPU per job) is printed so the noise can be judged
against the difference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_worker import JOB_MODULE, build_standin, run_workload  # noqa: E402

CONFIGS = {
    "off": ["--block-threshold=0", "--thread-heartbeats=false"],
    "monitor": ["--thread-heartbeats=false"],
    "defaults": [],
}
WORKLOADS = {"sleep": ("sleep", [0.1], 1000), "noop": ("noop", [], 100)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="sleep")
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    opts = ap.parse_args()
    name, args, concurrency = WORKLOADS[opts.workload]
    workdir = tempfile.mkdtemp(prefix="emq-bench-monitor-")
    with open(os.path.join(workdir, "benchjobs.py"), "w") as f:
        f.write(JOB_MODULE)
    standin = build_standin(workdir)
    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    try:
        for i in range(opts.repeat):
            for config, flags in CONFIGS.items():
                row = run_workload(f"{opts.workload}-{config}-{i}", name, args, opts.jobs,
                                   concurrency, flags, workdir, standin)
                results[config].append(row)
                print(f"run {i + 1}/{opts.repeat} {config:8} {row['jobs_per_s']:7.0f} ok jobs/s "
                      f"({row['errors']} errors) "
                      f"{row['worker_cpu_us_per_job']:6.1f} us/job worker CPU "
                      f"p99 {row['p99_ms']:6.1f} ms", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{opts.workload}: {opts.jobs} jobs, -J {concurrency}, median of {opts.repeat}, "
          f"{os.cpu_count()} CPUs")
    base = {k: statistics.median(r[k] for r in results["off"])
            for k in ("jobs_per_s", "worker_cpu_us_per_job", "p99_ms")}
    print(f"{'config':9} {'ok jobs/s':>9} {'ratio':>6} {'us/job':>7} {'ratio':>6} "
          f"{'us/job range':>13} {'p99 ms':>7} {'errors':>6}")
    for config, rows in results.items():
        rate = statistics.median(r["jobs_per_s"] for r in rows)
        cpus = [r["worker_cpu_us_per_job"] for r in rows]
        cpu = statistics.median(cpus)
        p99 = statistics.median(r["p99_ms"] for r in rows)
        errors = sum(r["errors"] for r in rows)
        print(f"{config:9} {rate:9.0f} {rate / base['jobs_per_s']:6.3f} {cpu:7.1f} "
              f"{cpu / base['worker_cpu_us_per_job']:6.3f} "
              f"{min(cpus):6.1f}-{max(cpus):<6.1f} {p99:7.1f} {errors:6d}")
    # Runs of one round ran back to back, so their ratio to "off" cancels the
    # machine's drift between rounds; the median of those ratios, with range.
    print("\npaired with 'off' in the same round (median, min-max):")
    for config, rows in results.items():
        if config == "off":
            continue
        rate = [r["jobs_per_s"] / o["jobs_per_s"] for r, o in zip(rows, results["off"])]
        cpu = [r["worker_cpu_us_per_job"] / o["worker_cpu_us_per_job"]
               for r, o in zip(rows, results["off"])]
        print(f"{config:9} ok jobs/s {statistics.median(rate):.3f} "
              f"({min(rate):.3f}-{max(rate):.3f})  worker CPU/job "
              f"{statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f})")


if __name__ == "__main__":
    main()
