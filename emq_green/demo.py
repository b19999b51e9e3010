"""``emq-green-demo``: emq-green processing a batch of IO-bound jobs, end to end.

What it does, all on 127.0.0.1 and without network access:

1. starts a small HTTP server in this process that serves pages after a
   simulated upstream delay (``--page-delay``, with jitter);
2. starts ``emq-green --standalone`` (router and job manager in one process)
   on free ports, with ``examples/`` importable;
3. submits ``--jobs`` jobs of ``examples.jobs.fetch_page``: each fetches a
   page with urllib, parses it, and posts a summary back to the server;
4. shows progress from those summaries, then prints jobs/s and the p50/p99
   latency (from submission to the summary, queueing included);
5. collects each job's result through the router (``result=True``: the
   summary the job returned) and prints the sizes of the fetched pages;
6. stops emq-green with SIGTERM and checks that it exits cleanly.

Like the ``emq-green`` script, it monkeypatches before importing anything else.
"""

import os
import sys
from typing import Callable


def main(argv: "list[str] | None" = None) -> int:
    from gevent import monkey

    monkey.patch_all()
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # (its clean-up has run: no traceback for a Ctrl-C, a probe)
        sys.stderr.write("emq-green-demo: interrupted\n")
        return 130


def _parse(argv: "list[str]"):
    import argparse

    parser = argparse.ArgumentParser(
        prog="emq-green-demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--jobs", "-n", type=int, default=1000, help="jobs to run")
    parser.add_argument("--concurrency", "-J", type=int, default=200,
                        help="concurrent_jobs of the job manager")
    parser.add_argument("--page-delay", type=float, default=0.05,
                        help="mean simulated upstream delay per page, seconds")
    parser.add_argument("--timeout", type=float, default=45.0,
                        help="give up when the jobs take longer than this, seconds")
    parser.add_argument("--keep-log", action="store_true",
                        help="keep emq-green's log file and print its path")
    parser.add_argument("--curve-keys", metavar="DIR", default=None,
                        help="run over CURVE with the certificates in DIR (made by "
                             "emq-green-keys --dir DIR router client)")
    ns = parser.parse_args(argv)
    if ns.jobs < 1 or ns.concurrency < 1:
        parser.error("--jobs and --concurrency must be at least 1")
    return ns


class PageServer:
    """WSGI app: ``GET /page/<n>`` after a delay, ``POST /done/<n>`` records a summary."""

    def __init__(self, delay: float) -> None:
        import gevent.event

        self.delay = delay
        #: page -> (monotonic time the summary arrived, summary)
        self.done: dict[int, tuple[float, dict]] = {}
        self.changed = gevent.event.Event()

    def page(self, n: int) -> bytes:
        words = " ".join(f"word{(n * 7 + i) % 97}" for i in range(150))
        links = "".join(f'<li><a href="/page/{(n + k) % 1000}">next {k}</a></li>'
                        for k in range(1, 11))
        return (f"<!doctype html><html><head><title>Page {n}</title></head><body>"
                f"<h1>Page {n}</h1><p>{words}</p><ul>{links}</ul></body></html>").encode()

    def __call__(self, environ: dict, start_response) -> "list[bytes]":
        import json
        import random
        import time

        import gevent

        parts = environ.get("PATH_INFO", "").strip("/").split("/")
        try:
            kind, n = parts[0], int(parts[1])
        except (IndexError, ValueError):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if kind == "page" and environ["REQUEST_METHOD"] == "GET":
            gevent.sleep(self.delay * (0.5 + random.random()))
            body = self.page(n)
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if kind == "done" and environ["REQUEST_METHOD"] == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            summary = json.loads(environ["wsgi.input"].read(size) or b"{}")
            self.done.setdefault(n, (time.monotonic(), summary))
            self.changed.set()
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]


def free_ports(count: int) -> "list[int]":
    import socket

    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_worker(admin_addr: str, deadline: float, curve: object = None,
                    alive: Callable[[], bool] = lambda: True) -> bool:
    """True once the router reports a connected worker with free slots;
    False at the deadline, or as soon as ``alive()`` is false."""
    import json
    import time
    import uuid

    import gevent
    import zmq.green as zmq

    from .protocol import Command, Message

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"admin:{uuid.uuid4()}".encode())
    if curve is not None:  # an emq_green.curve.ClientCurve
        curve.apply(sock)  # type: ignore[attr-defined]
    sock.connect(admin_addr)
    try:
        while time.monotonic() < deadline and alive():
            sock.send_multipart(Message.new(Command.ROUTER_SHOW_WORKERS).frames())
            if sock.poll(500):
                reply = Message.parse(sock.recv_multipart())
                workers = json.loads(reply.body[0])["connected_workers"]
                if any(w["available_slots"] > 0 for w in workers.values()):
                    return True
                gevent.sleep(0.05)  # poll interval while the worker connects
        return False
    finally:
        sock.close()


def collect_results(handles: list, limit: float) -> list:
    """Each job's returned value (None for a job that failed or whose
    result did not come within ``limit`` seconds for all)."""
    import time

    deadline = time.monotonic() + limit
    values = []
    for handle in handles:
        try:
            values.append(handle.get(timeout=max(0.0, deadline - time.monotonic())))
        except Exception:  # failed jobs are counted from the summaries
            values.append(None)
    return values


def percentile(values: "list[float]", q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _run(argv: "list[str]") -> int:
    import shutil
    import signal
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    import gevent
    from gevent.pywsgi import WSGIServer

    from .client.api import Client

    ns = _parse(argv)
    out = sys.stdout
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "examples" / "jobs.py").exists():
        out.write(f"emq-green-demo: {repo / 'examples' / 'jobs.py'} not found; run the demo "
                  "from a checkout of emq-green (pip install -e .)\n")
        return 2

    server = PageServer(ns.page_delay)
    http = WSGIServer(("127.0.0.1", 0), server, log=None, error_log=None, backlog=2048)
    http.start()
    base_url = f"http://127.0.0.1:{http.server_port}"
    front, back, admin = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    log = tempfile.NamedTemporaryFile(prefix="emq-green-demo-", suffix=".log", delete=False)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "emq_green.cli", "--standalone",
               "-J", str(ns.concurrency), "--name", "emq-green-demo",
               "--frontend-addr", front, "--backend-addr", back,
               "--administrative-addr", admin, "--kill-grace-period", "10"]
    curve = authorized = None
    if ns.curve_keys:
        from .curve import ClientCurve, CurveError

        keys = Path(ns.curve_keys).resolve()  # the box runs in another directory
        authorized = Path(tempfile.mkdtemp(prefix="emq-green-demo-keys-"))
        try:
            curve = ClientCurve.from_files(str(keys / "client.key_secret"),
                                           str(keys / "router.key"))
            shutil.copy(keys / "client.key", authorized)
        except (CurveError, OSError) as exc:
            out.write(f"emq-green-demo: {exc} (make the keys with emq-green-keys --dir "
                      f"{keys} router client)\n")
            return 2
        command += ["--curve-secret-key-file", str(keys / "router.key_secret"),
                    "--curve-authorized-keys", str(authorized)]
    out.write(f"emq-green demo: {ns.jobs} jobs of examples.jobs.fetch_page "
              f"(HTTP server {base_url}, ~{ns.page_delay * 1000:.0f} ms per page)\n"
              f"starting: emq-green --standalone -J {ns.concurrency}"
              f"{' over CURVE' if curve else ''}\n")
    out.flush()
    proc = subprocess.Popen(command, cwd=str(repo), env=env, stdout=log, stderr=log)
    status = 1
    try:
        if not wait_for_worker(admin, time.monotonic() + 30, curve,
                               alive=lambda: proc.poll() is None):
            if proc.poll() is None:  # else its exit status is shown below
                out.write("emq-green-demo: the job manager did not connect in 30 s\n")
            return 1
        client = Client(front, green=True, curve=curve)
        submitted: dict[int, float] = {}
        handles: list = []

        def submit() -> None:
            for n in range(ns.jobs):
                submitted[n] = time.monotonic()
                handles.append(client.defer_job("examples.jobs.fetch_page", [base_url, n],
                                                result=True))
                if n % 100 == 99:
                    gevent.sleep(0)  # let the progress line and the server run

        started = time.monotonic()
        sender = gevent.spawn(submit)
        deadline = started + ns.timeout
        tty = out.isatty()
        every = 0.5 if tty else 1.0
        shown = started
        while len(server.done) < ns.jobs and time.monotonic() < deadline:
            server.changed.clear()
            server.changed.wait(every)
            if len(server.done) < ns.jobs and time.monotonic() - shown < every:
                continue
            shown = time.monotonic()
            done, elapsed = len(server.done), shown - started
            line = (f"  submitted {len(submitted)}/{ns.jobs}, done {done}/{ns.jobs} "
                    f"({done / max(elapsed, 1e-6):.0f} jobs/s)")
            out.write(("\r" + line + "\033[K") if tty else line + "\n")
            out.flush()
        if tty:
            out.write("\n")
        sender.join(timeout=1)
        results = collect_results(handles, max(1.0, deadline - time.monotonic()))
        client.close()

        done = server.done
        failed = sum(1 for _t, summary in done.values() if "error" in summary)
        if not done:
            out.write("emq-green-demo: no job finished\n")
            return 1
        last = max(t for t, _s in done.values())
        elapsed = last - started
        latencies = [t - submitted[n] for n, (t, _s) in done.items() if n in submitted]
        out.write(f"results: {len(done)}/{ns.jobs} jobs done ({failed} failed) in "
                  f"{elapsed:.2f} s: {len(done) / elapsed:.0f} jobs/s; latency from submission "
                  f"p50 {percentile(latencies, 50) * 1000:.0f} ms, "
                  f"p99 {percentile(latencies, 99) * 1000:.0f} ms\n")
        sizes = [r["bytes"] for r in results if isinstance(r, dict) and "bytes" in r]
        line = f"results back to the client: {len(sizes)}/{ns.jobs}"
        if sizes:
            first = results[0] if isinstance(results[0], dict) else {}
            line += (f", {sum(sizes) / 1024:.0f} KiB of pages in all, {min(sizes)}-"
                     f"{max(sizes)} bytes each (page 0: {first.get('title')!r}, "
                     f"{first.get('bytes')} bytes, {first.get('words')} words)")
        out.write(line + "\n")
        status = 0 if len(done) == ns.jobs and not failed and len(sizes) == ns.jobs else 1
        if len(done) < ns.jobs:
            out.write(f"emq-green-demo: {ns.jobs - len(done)} job(s) not done after "
                      f"{ns.timeout:g} s\n")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=20)
                out.write(f"emq-green stopped (exit status {code})\n")
                if code != 0:
                    status = 1
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                out.write("emq-green-demo: emq-green did not stop in 20 s; killed\n")
                status = 1
        else:
            out.write(f"emq-green-demo: emq-green exited early (status {proc.returncode})\n")
            status = 1
        http.stop(timeout=1)
        if authorized is not None:
            shutil.rmtree(authorized, ignore_errors=True)
        log.close()
        if status != 0 or ns.keep_log:
            out.write(f"emq-green's log: {log.name}\n")
        else:
            os.unlink(log.name)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
