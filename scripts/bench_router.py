#!/usr/bin/env python3
"""End to end through a router: emq-green's embedded router against EventMQ's.

    .venv/bin/python scripts/bench_router.py [--jobs 5000] [--concurrency 1000]
        [--sleep 0.1] [--only standalone|eventmq]

Both runs use the same jobs (``examples.jobs.sleep_and_mark``: time.sleep,
then one line appended to a file) and the same emq-green job manager; only
the router differs:

* ``standalone``: ``emq-green --standalone -J N`` (router embedded, the job
  manager on inproc);
* ``eventmq``: EventMQ 0.3.13's ``emq-router`` plus ``emq-green -J N``.

The jobs are sent by emq-green's client as fast as it can, and a job counts
as done when its line is in the file. Reported: jobs/s from the first
submission to the last line, p50/p99 latency from submission to the line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import count_lines, free_ports, stop, wait_for_slots  # noqa: E402

from emq_green.client import Client  # noqa: E402

BIN = Path(sys.executable).parent


def run(mode: str, jobs: int, concurrency: int, sleep: float, tmp: Path) -> dict:
    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    marks = tmp / f"{mode}.marks"
    (tmp / "empty.conf").write_text("")  # neither side reads /etc/eventmq.conf
    env = dict(os.environ, PYTHONPATH=str(REPO), EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"))
    log = open(tmp / f"{mode}.log", "wb")
    procs: list[subprocess.Popen] = []
    green = [sys.executable, "-m", "emq_green.cli", "-J", str(concurrency),
             "--kill-grace-period", "5"]
    if mode == "standalone":
        procs.append(subprocess.Popen(
            [*green, "--standalone", "--frontend-addr", front, "--backend-addr", back,
             "--administrative-addr", admin], env=env, stdout=log, stderr=log))
    else:
        router_env = dict(env, EVENTMQ_FRONTEND_ADDR=front, EVENTMQ_BACKEND_ADDR=back,
                          EVENTMQ_ADMINISTRATIVE_ADDR=admin)
        procs.append(subprocess.Popen([str(BIN / "emq-router")], env=router_env,
                                      stdout=log, stderr=log))
        procs.append(subprocess.Popen([*green, "-B", back], env=env, stdout=log, stderr=log))
    try:
        if not wait_for_slots(admin, 1, time.monotonic() + 30):
            raise SystemExit(f"{mode}: no worker connected in 30 s (see {log.name})")
        client = Client(front, green=False)
        submitted: dict[str, float] = {}
        started = time.time()
        for n in range(jobs):
            submitted[str(n)] = time.time()
            client.defer_job("examples.jobs.sleep_and_mark", [sleep, str(marks), str(n)])
        sent_in = time.time() - started
        deadline = time.monotonic() + 120
        while count_lines(marks) < jobs and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval for the file
        client.close()
        done = {}
        for line in marks.read_text().splitlines():
            tag, _pid, at = line.split()
            done[tag] = float(at)
        if len(done) < jobs:
            raise SystemExit(f"{mode}: only {len(done)}/{jobs} jobs done (see {log.name})")
        latencies = sorted(done[t] - submitted[t] for t in done)
        elapsed = max(done.values()) - started
        return {
            "mode": mode, "jobs": jobs, "concurrency": concurrency, "sleep": sleep,
            "submit_s": round(sent_in, 2), "elapsed_s": round(elapsed, 2),
            "jobs_per_s": round(jobs / elapsed),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000),
        }
    finally:
        stop(procs[::-1])
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", "-J", type=int, default=1000)
    parser.add_argument("--sleep", type=float, default=0.1)
    parser.add_argument("--only", choices=("standalone", "eventmq"))
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds, the modes alternating; medians are printed last")
    ns = parser.parse_args()
    modes = [ns.only] if ns.only else ["standalone", "eventmq"]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        for round_ in range(ns.repeat):
            for mode in modes:
                tmp_round = Path(tmp) / f"{round_}"
                tmp_round.mkdir(exist_ok=True)
                result = run(mode, ns.jobs, ns.concurrency, ns.sleep, tmp_round)
                results[mode].append(result)
                print(json.dumps(result), flush=True)
    if ns.repeat > 1:
        for mode, runs in results.items():
            median = {k: statistics.median(r[k] for r in runs)
                      for k in ("jobs_per_s", "p50_ms", "p99_ms")}
            print(json.dumps({"mode": mode, "median_of": len(runs), **median}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
