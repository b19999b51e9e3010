"""Python function calls the router makes per job: a figure that does not
depend on how busy the machine is, to compare two trees of the router.

One router, one worker and one client in this process, on loopback TCP;
the worker answers every REQUEST with REPLY and READY. Only the part where
jobs flow is profiled (cProfile); calls in ``emq_green`` modules and calls
in all are divided by the number of jobs.

    PYTHONPATH=<tree> .venv/bin/python scripts/bench_router_calls.py [--jobs N]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats

import gevent
import zmq.green as zmq

from emq_green.protocol import Command, Message
from emq_green.router import Router
from emq_green.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--top", type=int, default=0, help="also list the N most called")
    args = parser.parse_args()
    jobs, top = args.jobs, args.top
    loopback = "tcp://127.0.0.1:*"
    router = Router(settings=Settings().replace(
        frontend_addr=loopback, backend_addr=loopback, administrative_addr=loopback,
        disable_heartbeats=True))
    router.start()
    context = zmq.Context.instance()
    worker = context.socket(zmq.DEALER)
    worker.connect(router.endpoints["backend"])
    client = context.socket(zmq.DEALER)
    client.connect(router.endpoints["frontend"])
    worker.send_multipart(Message.new(Command.INFORM, '[[10, "default"]]', "worker").frames())
    worker.recv_multipart()  # ACK
    for _ in range(50):
        worker.send_multipart(Message.new(Command.READY).frames())

    def work() -> None:
        for _ in range(jobs):
            frames = worker.recv_multipart()  # ['', version, REQUEST, msgid, ...]
            worker.send_multipart(Message.new(Command.REPLY, "null", frames[3].decode()).frames())
            worker.send_multipart(Message.new(Command.READY).frames())

    def drain_acks() -> None:
        while True:  # buffered requests leave without an acknowledgement
            client.recv_multipart()

    gevent.sleep(0.2)  # the READYs reach the router before the profile starts
    working, acks = gevent.spawn(work), gevent.spawn(drain_acks)
    profile = cProfile.Profile()
    profile.enable()
    for i in range(jobs):
        client.send_multipart(
            Message(Command.REQUEST, f"m{i}", ("default", "", '["run", {}]')).frames())
        if i % 40 == 0:
            gevent.sleep(0)
    working.join(timeout=60)
    profile.disable()
    acks.kill()
    router.stop()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    ours = {k: v[1] for k, v in stats.items() if "emq_green" in k[0]}
    print(json.dumps({"jobs": jobs, "done": working.successful(),
                      "emq_green_calls_per_job": round(sum(ours.values()) / jobs, 2),
                      "all_calls_per_job": round(sum(v[1] for v in stats.values()) / jobs, 2)}))
    for (path, _line, name), calls in sorted(ours.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{calls / jobs:8.2f}  {path.rsplit('/', 1)[-1]}:{name}")
    return 0 if working.successful() else 1


if __name__ == "__main__":
    raise SystemExit(main())
