#!/usr/bin/env python3
"""Guaranteed jobs against plain ones, end to end, the modes alternating.

    .venv/bin/python scripts/bench_guarantee.py [--jobs 10000] [--repeat 3]
        [--concurrency 1000] [--only plain,normal,full,memory]

Each run starts ``emq-green-router`` and one ``emq-green -J N`` as real
processes (this tree, on free loopback ports), then one raw DEALER client
sends ``--jobs`` REQUESTs as fast as ZeroMQ takes them (pipelined: a sender
that waits for each confirmation measures the round trip, not the router),
reading the router's acknowledgements as they come. The jobs are
``examples.jobs.mark`` (one line appended to a file): a job is done when
its line is there. Modes:

* ``plain``: no header (EventMQ's fire-and-forget);
* ``normal``: ``guarantee``, router with ``--journal-file`` (``journal_sync
  = normal``, the default);
* ``full``: the same with ``--journal-sync full`` (an fsync per commit);
* ``memory``: ``guarantee``, router without a journal.

Reported per run: jobs/s (first send to last line), acknowledgements seen
(guaranteed: every request is confirmed), router CPU us per job, and the
router's loop stall: a probe process asks the administrative socket
(``ROUTER_SHOW_SCHEDULERS``, a constant answer) every 2 ms and times the
answers; p99 and max of those round trips are what the loop made a request
wait (an upper bound: the probe shares the 2 cores too). Then the medians
per mode and each mode's ratio to ``plain``.
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
from benchlib import (  # noqa: E402
    LineCounter,
    admin_request,
    cpu_seconds,
    free_ports,
    stop,
    wait_for_slots,
)

from emq_green.protocol import Command  # noqa: E402

BIN = Path(sys.executable).parent
MODES = ("plain", "normal", "full", "memory")


#: the stall probe, a process of its own (a thread beside the sender would
#: wait for the sender's GIL, not for the router): every 2 ms it times
#: ROUTER_SHOW_SCHEDULERS on the admin socket until stdin closes, then
#: prints the round trips (s) as JSON
PROBE = r"""
import json, select, sys, time, uuid
import zmq
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.IDENTITY, f"probe:{uuid.uuid4()}".encode())
sock.connect(sys.argv[1])
frames = [b"", b"eMQP/1.0", b"ROUTER_SHOW_SCHEDULERS", b"probe"]
rtts = []
while not select.select([sys.stdin], [], [], 0.002)[0]:
    started = time.perf_counter()
    sock.send_multipart(frames)
    if not sock.poll(10_000):
        rtts.append((started, 10.0))
        break
    sock.recv_multipart()
    rtts.append((started, time.perf_counter() - started))
print(json.dumps(rtts))
"""


def idle_seconds() -> float:
    """Seconds all CPUs were idle since boot (Linux ``/proc/stat``): with
    the run's wall time, how much of the machine the run left unused."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


class StallProbe:
    """Times the router's answers on its admin socket from another process."""

    def __init__(self, addr: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, addr],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def finish(self) -> list[tuple[float, float]]:
        """(perf_counter at the send, round trip) of every probe."""
        if self.proc.poll() is not None:
            return []
        out, _err = self.proc.communicate(b"stop\n", timeout=30)
        return [tuple(x) for x in json.loads(out or b"[]")][1:]  # the first: connecting


def run(mode: str, jobs: int, concurrency: int, tmp: Path,
        profile: Path | None = None, tree: Path = REPO) -> dict:
    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    marks = tmp / f"{mode}.marks"
    (tmp / "empty.conf").write_text("")
    env = dict(os.environ, PYTHONPATH=str(tree), EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"))
    log = open(tmp / f"{mode}.log", "wb")
    router_argv = [sys.executable, "-c", "import sys; from emq_green.cli import router_main; "
                   "sys.exit(router_main())", "--frontend-addr", front, "--backend-addr",
                   back, "--administrative-addr", admin]
    if os.environ.get("BENCH_ROUTER_SCRIPT"):
        router_argv[1:3] = [os.environ["BENCH_ROUTER_SCRIPT"]]
    if mode in ("normal", "full"):
        router_argv += ["--journal-file", str(tmp / f"{mode}-journal.db"),
                        "--journal-sync", mode]
    # cwd: ``-c`` and ``-m`` put the current directory first on sys.path
    router = subprocess.Popen(router_argv, env=env, stdout=log, stderr=log, cwd=str(tree))
    spy = None
    if profile is not None:  # py-spy's collapsed stacks of the router, for flame graphs
        profile.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--format", "raw", "--rate",
                                "250", "--pid", str(router.pid), "-o",
                                str(profile / f"{mode}-{tmp.name}.txt")], stdout=log,
                               stderr=log)
    worker = subprocess.Popen([sys.executable, "-m", "emq_green.cli", "-B", back, "-J",
                               str(concurrency), "--kill-grace-period", "5"], env=env,
                              stdout=log, stderr=log, cwd=str(tree))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"bench-{uuid.uuid4()}".encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    probe: StallProbe | None = None
    try:
        if not wait_for_slots(admin, concurrency, time.monotonic() + 30):
            raise SystemExit(f"{mode}: no worker with {concurrency} slots in 30 s")
        sock.connect(front)
        headers = b"" if mode == "plain" else b"guarantee"
        acks = 0

        def read_acks() -> int:
            n = 0
            while True:
                try:
                    sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return n
                n += 1

        probe = StallProbe(admin)
        cpu_before = cpu_seconds(router.pid)
        worker_before = cpu_seconds(worker.pid)
        idle_before = idle_seconds()
        started = time.time()
        for n in range(jobs):
            payload = json.dumps(["run", {"path": "examples.jobs", "callable": "mark",
                                          "args": [str(marks), str(n)]}]).encode()
            sock.send_multipart([b"", b"eMQP/1.0", b"REQUEST", str(uuid.uuid4()).encode(),
                                 b"default", headers, payload])
            if n % 256 == 0:
                acks += read_acks()
        deadline = time.monotonic() + 180
        counter = LineCounter(marks)
        while counter.count() < jobs and time.monotonic() < deadline:
            acks += read_acks()
            time.sleep(0.01)  # polling interval for the file
        elapsed = time.time() - started
        cpu = cpu_seconds(router.pid) - cpu_before
        worker_cpu = cpu_seconds(worker.pid) - worker_before
        idle = (idle_seconds() - idle_before) / (os.cpu_count() or 1)
        done = counter.count()
        if done < jobs:
            raise SystemExit(f"{mode}: only {done}/{jobs} jobs done (see {log.name})")
        settle = time.monotonic() + 5
        while mode != "plain" and acks < jobs and time.monotonic() < settle:
            acks += read_acks()
            time.sleep(0.01)
        last = max(float(line.split()[-1]) for line in marks.read_text().splitlines())
        status = admin_request(admin, Command.STATUS, timeout=5) or {}
        elapsed = min(elapsed, last - started)
        timed = probe.finish()
        if os.environ.get("BENCH_STALLS"):  # where the long ones were, for a look
            t0 = timed[0][0] if timed else 0
            print(mode, [(round(at - t0, 2), round(rtt * 1000)) for at, rtt in timed
                         if rtt > 0.05], file=sys.stderr)
        rtts = sorted(rtt for _at, rtt in timed) or [0.0]
        return {
            "mode": mode, "jobs": jobs, "concurrency": concurrency,
            "jobs_per_s": round(jobs / elapsed), "acknowledged": acks,
            "router_cpu_us_per_job": round(cpu / jobs * 1e6, 1),
            "worker_cpu_us_per_job": round(worker_cpu / jobs * 1e6, 1),
            "idle_pct": round(100 * idle / (time.time() - started), 1),
            "stall_p99_ms": round(rtts[int(len(rtts) * 0.99) - 1] * 1000, 2),
            "stall_max_ms": round(rtts[-1] * 1000, 2), "probes": len(rtts),
            **{k: status.get(k) for k in ("journal_commits", "journal_written", "journal_skipped",
                                          "journal_longest_commit_ms",
                                          "redelivered", "late_replies") if k in status},
        }
    finally:
        if probe is not None and probe.proc.poll() is None:
            probe.proc.kill()
        sock.close()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(30)
        stop([worker, router])
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--concurrency", "-J", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path, default=None,
                        help="directory: sample the router with py-spy (collapsed stacks; "
                             "needs py-spy in the venv; the sampling costs the router a little)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="directory for the runs' logs and files, kept afterwards "
                             "(default: a temporary one, removed)")
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="run the router and the worker of this source tree (e.g. a "
                             "worktree of an older commit, for plain before/after)")
    parser.add_argument("--only", default=",".join(MODES),
                        help="comma-separated modes, in the order each round runs them")
    ns = parser.parse_args()
    modes = [m for m in ns.only.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="bench-guarantee-") as tmp:
        if ns.keep is not None:
            ns.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(ns.keep)
        for round_ in range(ns.repeat):
            for mode in modes:
                where = Path(tmp) / f"{round_}"
                where.mkdir(exist_ok=True)
                result = run(mode, ns.jobs, ns.concurrency, where, ns.profile, ns.tree)
                results[mode].append(result)
                print(json.dumps(result), flush=True)
    keys = ("jobs_per_s", "router_cpu_us_per_job", "worker_cpu_us_per_job", "idle_pct",
            "stall_p99_ms", "stall_max_ms")
    medians = {m: {k: statistics.median(r[k] for r in runs) for k in keys}
               for m, runs in results.items()}
    print(f"\n{'mode':8} {'jobs/s':>8} {'x plain':>8} {'rtr us/job':>11} {'wkr us/job':>11} "
          f"{'idle %':>7} {'stall p99 ms':>13} {'stall max ms':>13}   (medians of {ns.repeat})")
    for mode, med in medians.items():
        ratio = (med["jobs_per_s"] / medians["plain"]["jobs_per_s"]
                 if "plain" in medians else float("nan"))
        print(f"{mode:8} {med['jobs_per_s']:8.0f} {ratio:8.2f} "
              f"{med['router_cpu_us_per_job']:11.1f} {med['worker_cpu_us_per_job']:11.1f} "
              f"{med['idle_pct']:7.1f} {med['stall_p99_ms']:13.2f} "
              f"{med['stall_max_ms']:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
