#!/usr/bin/env python3
"""What CURVE costs end to end: the same jobs through plain and CURVE links.

    .venv/bin/python scripts/bench_curve.py [--jobs 5000] [--concurrency 100]
        [--repeat 3]

Each round starts ``emq-green-router`` and ``emq-green -J N`` as processes on
free loopback ports, sends ``--jobs`` near no-op jobs (``examples.jobs.mark``:
one line appended to a file) with emq-green's client as fast as it goes, and
counts a job as done when its line is in the file. Modes alternate in one
run (plain, curve, curve, plain, ...): client -> router -> worker are plain
TCP, or CURVE-authenticated and encrypted on both links with keys made by
``emq-green-keys``. Reported per round and as medians: jobs/s from the first
submission to the last line, and the ratio CURVE / plain; and the CPU time
the router and worker processes used (all threads: ZeroMQ's IO threads do
the encryption), in microseconds per job, a steadier measure of the cost
than the rate on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import count_lines, cpu_seconds, free_ports, wait_for_slots  # noqa: E402

from emq_green.client import Client  # noqa: E402
from emq_green.curve import ClientCurve, create_key_pair  # noqa: E402

BIN = Path(sys.executable).parent


def one_round(mode: str, ns: argparse.Namespace, keys: Path,
              work: Path) -> tuple[float, float]:
    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    marks = work / f"marks-{mode}-{time.monotonic_ns()}"
    (work / "empty.conf").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTMQ_", "EMQ_"))}
    env.update(EVENTMQ_CONFIG_FILE=str(work / "empty.conf"),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    router_argv = [str(BIN / "emq-green-router"), "--frontend-addr", front,
                   "--backend-addr", back, "--administrative-addr", admin]
    worker_argv = [str(BIN / "emq-green"), "-B", back, "-J", str(ns.concurrency),
                   "-n", f"bench-{mode}"]
    curve = None
    if mode == "curve":
        router_argv += ["--curve-secret-key-file", str(keys / "router.key_secret"),
                        "--curve-authorized-keys", str(keys / "authorized")]
        worker_argv += ["--curve-secret-key-file", str(keys / "worker.key_secret"),
                        "--curve-server-key-file", str(keys / "router.key")]
        curve = ClientCurve.from_files(str(keys / "client.key_secret"),
                                       str(keys / "router.key"))
    procs = []
    try:
        for name, argv in (("router", router_argv), ("worker", worker_argv)):
            log = open(work / f"{mode}-{name}.log", "ab")
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log,
                                          start_new_session=True))
        if not wait_for_slots(admin, ns.concurrency, time.monotonic() + 30,
                              curve.apply if curve is not None else None):
            raise SystemExit(f"bench_curve: the {mode} worker did not connect; see {work}")
        cpu_before = sum(cpu_seconds(p.pid) for p in procs)
        client = Client(front, green=False, curve=curve)
        started = time.monotonic()
        for i in range(ns.jobs):
            client.defer_job("examples.jobs.mark", [str(marks), str(i)])
        sent = time.monotonic() - started
        deadline = time.monotonic() + ns.timeout
        while count_lines(marks) < ns.jobs:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench_curve: {mode}: {count_lines(marks)}/{ns.jobs} "
                                 f"jobs done after {ns.timeout:g} s; see {work}")
            time.sleep(0.005)  # polling interval
        elapsed = time.monotonic() - started
        cpu = (sum(cpu_seconds(p.pid) for p in procs) - cpu_before) / ns.jobs * 1e6
        client.close()
        rate = ns.jobs / elapsed
        print(f"  {mode:5s}: {ns.jobs} jobs in {elapsed:.2f} s = {rate:,.0f} jobs/s "
              f"(sent in {sent:.2f} s); router + worker CPU {cpu:.0f} us/job", flush=True)
        return rate, cpu
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", "-J", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each mode")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a round may take at most")
    ns = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="emq-green-bench-curve-"))
    keys = work / "keys"
    for name in ("router", "worker", "client"):
        create_key_pair(str(keys), name)
    (keys / "authorized").mkdir()
    for name in ("worker", "client"):
        shutil.copy(keys / f"{name}.key", keys / "authorized")
    print(f"bench_curve: {ns.jobs} jobs of examples.jobs.mark, emq-green-router + "
          f"emq-green -J {ns.concurrency}, {ns.repeat} round(s) per mode", flush=True)
    rates: dict[str, list[float]] = {"plain": [], "curve": []}
    cpus: dict[str, list[float]] = {"plain": [], "curve": []}
    for i in range(ns.repeat):
        # which mode goes first alternates: neither gets the quieter half
        for mode in ("plain", "curve")[::1 if i % 2 == 0 else -1]:
            rate, cpu = one_round(mode, ns, keys, work)
            rates[mode].append(rate)
            cpus[mode].append(cpu)
    plain, curve = (statistics.median(rates[m]) for m in ("plain", "curve"))
    for mode in ("plain", "curve"):
        print(f"{mode}: {', '.join(f'{r:,.0f}' for r in rates[mode])} jobs/s")
    print(f"median: plain {plain:,.0f} jobs/s, CURVE {curve:,.0f} jobs/s, "
          f"ratio CURVE/plain {curve / plain:.2f} (target >= 0.80)")
    plain_cpu, curve_cpu = (statistics.median(cpus[m]) for m in ("plain", "curve"))
    print(f"median CPU of router + worker: plain {plain_cpu:.0f} us/job, CURVE "
          f"{curve_cpu:.0f} us/job (+{curve_cpu - plain_cpu:.0f} us, "
          f"x{curve_cpu / plain_cpu:.2f})")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if curve / plain >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
