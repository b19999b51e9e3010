"""Python function calls the router makes per job: a figure that does not
depend on how busy the machine is, to compare two trees of the router.

The router runs in this process, profiled with cProfile while jobs flow;
its peers run in a subprocess of their own (plain pyzmq, no profiler): one
worker that answers every REQUEST (with REPLY when it asked for one, then
READY) and one client that sends ``--jobs`` REQUESTs. Every call counted is
the router's: its handlers, pyzmq's Python layer under it, gevent's hub.

    PYTHONPATH=<tree> .venv/bin/python scripts/bench_router_calls.py [--jobs N]
        [--headers reply-requested] [--top N] [--cpu]

With ``--cpu`` there is no profiler, and the figure is the router's CPU
time per job (its process does nothing else; the peers' CPU is theirs).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import time

import gevent

from emq_green.router import Router
from emq_green.settings import Settings

#: the peers: argv = frontend backend jobs headers; prints "done" when the
#: worker has answered every job
PEERS = r"""
import sys, threading, uuid, zmq
front, back, jobs, headers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
ctx = zmq.Context()
def frames(command, *body):
    return [b"", b"eMQP/1.0", command, str(uuid.uuid4()).encode(), *body]
worker = ctx.socket(zmq.DEALER); worker.connect(back)
worker.send_multipart(frames(b"INFORM", b'[[10, "default"]]', b"worker"))
worker.recv_multipart()  # ACK
for _ in range(50):
    worker.send_multipart(frames(b"READY"))
client = ctx.socket(zmq.DEALER); client.setsockopt(zmq.SNDHWM, 0); client.connect(front)
def drain():
    while True:
        client.recv_multipart()
threading.Thread(target=drain, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()  # the profile is on
def send():
    for i in range(jobs):
        client.send_multipart(frames(b"REQUEST", b"default", headers, b'["run", {}]'))
threading.Thread(target=send, daemon=True).start()
for _ in range(jobs):
    got = worker.recv_multipart()  # ['', version, REQUEST, msgid, queue, headers, payload]
    if b"reply-requested" in got[5]:
        worker.send_multipart(frames(b"REPLY", b"null", got[3]))
    worker.send_multipart(frames(b"READY"))
print("done", flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--headers", default="", help="the REQUESTs' header text")
    parser.add_argument("--top", type=int, default=0, help="also list the N most called")
    parser.add_argument("--cpu", action="store_true",
                        help="no profiler: the router's CPU time per job (this process; the "
                             "peers run in another)")
    args = parser.parse_args()
    loopback = "tcp://127.0.0.1:*"
    router = Router(settings=Settings().replace(
        frontend_addr=loopback, backend_addr=loopback, administrative_addr=loopback,
        disable_heartbeats=True))
    router.start()
    peers = subprocess.Popen(
        [sys.executable, "-c", PEERS, router.endpoints["frontend"], router.endpoints["backend"],
         str(args.jobs), args.headers], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    lines = gevent.get_hub().threadpool.spawn(peers.stdout.readline)
    while not lines.ready():
        gevent.sleep(0.01)  # the router serves the INFORM and the READYs meanwhile
    assert lines.get().strip() == "ready"
    gevent.sleep(0.2)  # the READYs are in before the profile starts
    profile = cProfile.Profile()
    started = time.process_time()
    if not args.cpu:
        profile.enable()
    peers.stdin.write("go\n")
    peers.stdin.flush()
    done = gevent.get_hub().threadpool.spawn(peers.stdout.readline)
    while not done.ready():
        gevent.sleep(0.001)
    cpu = time.process_time() - started
    profile.disable()
    finished = done.get().strip() == "done"
    peers.wait(30)
    router.stop()
    jobs = args.jobs
    if args.cpu:
        print(json.dumps({"jobs": jobs, "done": finished, "headers": args.headers,
                          "router_cpu_us_per_job": round(cpu / jobs * 1e6, 1)}))
        return 0 if finished else 1
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    ours = {k: v[1] for k, v in stats.items() if "emq_green" in k[0]}
    print(json.dumps({"jobs": jobs, "done": finished, "headers": args.headers,
                      "emq_green_calls_per_job": round(sum(ours.values()) / jobs, 2),
                      "all_calls_per_job": round(sum(v[1] for v in stats.values()) / jobs, 2),
                      "cpu_us_per_job_profiled": round(cpu / jobs * 1e6, 1)}))
    # calls per job, and own time per job (us, under the profiler: relative)
    for (path, _line, name), v in sorted(stats.items(), key=lambda kv: -kv[1][2])[:args.top]:
        print(f"{v[1] / jobs:8.2f} calls {v[2] / jobs * 1e6:8.2f} us  "
              f"{path.rsplit('/', 1)[-1]}:{name}")
    return 0 if finished else 1


if __name__ == "__main__":
    raise SystemExit(main())
