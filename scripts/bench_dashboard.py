#!/usr/bin/env python3
"""What the dashboards cost: jobs/s of ``emq-green --standalone`` without
them, with them on and nobody looking, and with both pages open.

    .venv/bin/python scripts/bench_dashboard.py [--jobs 20000] [-J 200]
        [--sleep 0.01] [--repeat 5] [--viewer chromium|http]

Modes, interleaved in each round, their order rotated (same jobs, same machine, same run):

* ``off``: no ``--dashboard-addr``, no ``--metrics-addr``;
* ``idle``: ``--dashboard-addr`` and ``--metrics-addr`` set, nobody looks;
* ``open``: the same, with the router's page and the worker's page open in
  headless Chromium (Debian's ``chromium``) for the whole run, each polling
  its JSON once a second as it does for a person; ``--viewer http`` instead
  polls both JSON endpoints once a second from this script (no browser).

Jobs are ``examples.jobs.sleep_and_mark`` sent by emq-green's client as fast
as it can; jobs/s is from the first submission to the last line in the file
(as ``scripts/bench_router.py``), and the CPU time the emq-green process
used meanwhile, per job (the steadier figure on a shared machine). Medians
over the rounds are printed last, with each mode's difference from ``off``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import count_lines, cpu_seconds, free_ports, stop, wait_for_slots  # noqa: E402

from emq_green.client import Client  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--remote-debugging-port=0")
MODES = ("off", "idle", "open")


class HttpViewer(threading.Thread):
    """Polls the pages' JSON once a second, as an open page does."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls, self.polls, self.halt = urls, 0, threading.Event()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            for url in self.urls:
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                self.polls += 1


def open_pages(viewer: str, pages: list[str], tmp: Path) -> tuple[list, HttpViewer | None]:
    if viewer == "http":
        poller = HttpViewer([p + "dashboard.json" for p in pages])
        poller.start()
        return [], poller
    browsers = []
    for n, url in enumerate(pages):
        profile = tmp / f"profile-{n}"
        browsers.append(subprocess.Popen(
            [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS,
             f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return browsers, None


def page_up(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "dashboard.json", timeout=2) as response:
                response.read()
            return
        except OSError:
            time.sleep(0.05)  # polling interval while the server starts
    raise SystemExit(f"no page at {url}")


def run(mode: str, ns: argparse.Namespace, tmp: Path) -> dict:
    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    dash, metrics = free_ports(2)
    marks = tmp / f"{mode}.marks"
    (tmp / "empty.conf").write_text("")
    env = dict(os.environ, PYTHONPATH=str(REPO), EVENTMQ_CONFIG_FILE=str(tmp / "empty.conf"))
    command = [sys.executable, "-m", "emq_green.cli", "--standalone", "-J", str(ns.concurrency),
               "-n", f"bench-{mode}", "--frontend-addr", front, "--backend-addr", back,
               "--administrative-addr", admin, "--kill-grace-period", "5"]
    pages = []
    if mode != "off":
        command += ["--dashboard-addr", f"127.0.0.1:{dash}",
                    "--metrics-addr", f"127.0.0.1:{metrics}"]
        pages = [f"http://127.0.0.1:{dash}/", f"http://127.0.0.1:{metrics}/"]
    log = open(tmp / f"{mode}.log", "wb")
    procs = [subprocess.Popen(command, env=env, stdout=log, stderr=log)]
    browsers: list[subprocess.Popen] = []
    poller = None
    try:
        if not wait_for_slots(admin, 1, time.monotonic() + 30):
            raise SystemExit(f"{mode}: no worker in 30 s (see {log.name})")
        for url in pages:
            page_up(url, time.monotonic() + 10)
        if mode == "open":
            browsers, poller = open_pages(ns.viewer, pages, tmp)
            time.sleep(3)  # let the browsers load the pages before the clock starts
        client = Client(front, green=False)
        cpu_before = cpu_seconds(procs[0].pid)
        started = time.time()
        for n in range(ns.jobs):
            client.defer_job("examples.jobs.sleep_and_mark", [ns.sleep, str(marks), str(n)])
        deadline = time.monotonic() + 300
        while count_lines(marks) < ns.jobs and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval for the file
        cpu = cpu_seconds(procs[0].pid) - cpu_before
        client.close()
        stamps = [float(line.split()[2]) for line in marks.read_text().splitlines()]
        if len(stamps) < ns.jobs:
            raise SystemExit(f"{mode}: only {len(stamps)}/{ns.jobs} jobs done")
        elapsed = max(stamps) - started
        return {"mode": mode, "jobs": ns.jobs, "elapsed_s": round(elapsed, 3),
                "jobs_per_s": round(ns.jobs / elapsed, 1),
                "cpu_us_per_job": round(cpu / ns.jobs * 1e6, 2),
                "viewer": ns.viewer if mode == "open" else None,
                "http_polls": poller.polls if poller else None}
    finally:
        if poller is not None:
            poller.halt.set()
        stop(browsers + procs[::-1])
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", "-J", type=int, default=200)
    parser.add_argument("--sleep", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--viewer", choices=("chromium", "http"),
                        default="chromium" if shutil.which("chromium") else "http")
    ns = parser.parse_args()
    results: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        for round_ in range(ns.repeat):
            # rotated, so that each mode runs first, second and third equally
            order = MODES[round_ % 3:] + MODES[:round_ % 3]
            for mode in order:
                where = Path(tmp) / f"{round_}-{mode}"
                where.mkdir()
                result = run(mode, ns, where)
                results[mode].append(result["jobs_per_s"])
                cpu[mode].append(result["cpu_us_per_job"])
                print(json.dumps({"round": round_, **result}), flush=True)
    base = statistics.median(results["off"])
    base_cpu = statistics.median(cpu["off"])
    for mode in MODES:
        median = statistics.median(results[mode])
        median_cpu = statistics.median(cpu[mode])
        print(json.dumps({"mode": mode, "median_jobs_per_s": median, "runs": results[mode],
                          "vs_off_percent": round((median - base) / base * 100, 2),
                          "median_cpu_us_per_job": median_cpu, "cpu_runs": cpu[mode],
                          "cpu_vs_off_percent": round((median_cpu - base_cpu) / base_cpu * 100,
                                                      2)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
