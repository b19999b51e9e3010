"""The worst loop stalls hostile peers can cause in emq-green's router (issue 20).

Runs a router in this process and, for each attack, a watcher greenlet that
wakes every millisecond and records the longest gap: the longest time the
router's loop was held. The attacks are sent from plain ZeroMQ sockets in a
process of their own (as an attacker would: no share of this process's
GIL), as fast as they go; an attack in phases keeps its sockets between
them:

    .venv/bin/python scripts/bench_security.py [--scale 1.0] [--only NAME]

Prints one line per phase: the longest stall (ms, wall clock: on a busy
machine it includes time the process was not scheduled), the most CPU time
one message took the router's loop (``time.thread_time`` around the
handler: not inflated by the scheduler), how many messages it took, and
this process's CPU time per message (the router's work, its ZeroMQ
threads and the watcher's wake-ups). docs/security.md records them.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import gevent
import zmq

from emq_green.protocol import Command, Message, queues_json
from emq_green.router import Router
from emq_green.settings import Settings

ANY = "tcp://127.0.0.1:*"
_MP = multiprocessing.get_context("fork")


class Stalls:
    """The longest gap between the watcher's 1 ms wake-ups, and the most CPU
    time one message took (the router's handler, timed)."""

    def __init__(self, router: Router) -> None:
        self.longest = 0.0
        self.costliest = 0.0
        self._greenlet = gevent.spawn(self._watch)
        handle = router.sockets._handle

        def timed(*args: Any) -> None:
            cpu = time.thread_time()
            try:
                handle(*args)
            finally:
                self.costliest = max(self.costliest, time.thread_time() - cpu)

        router.sockets._handle = timed  # type: ignore[method-assign]

    def _watch(self) -> None:
        last = time.perf_counter()
        while True:
            gevent.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.001)
            last = now

    def reset(self) -> None:
        self.longest = self.costliest = 0.0

    def stop(self) -> None:
        self._greenlet.kill()


def frames(command: Command, *body: str) -> list[bytes]:
    return Message.new(command, *body).frames()


class Attacker:
    """The attacking process's side: sockets, made in that process."""

    def __init__(self, endpoints: dict[str, str]) -> None:
        self.endpoints = endpoints
        self.context = zmq.Context()
        self.socks: list[zmq.Socket] = []

    def dealer(self, where: str, identity: bytes) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, -1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self.endpoints[where])
        self.socks.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.context.term()  # every message out before the process ends


@dataclass
class Phase:
    label: str
    messages: int
    done: Callable[[Router], bool]


@dataclass
class Attack:
    name: str
    phases: list[Phase]
    #: (attacker, phase index) -> None; sends that phase's messages
    send: Callable[[Attacker, int], None]
    #: run in the router's process before the attack (e.g. to remember a count)
    before: Callable[[Router], Any] = lambda router: None


def _child(attack: Attack, endpoints: dict[str, str], go: list[Any], sent: list[Any]) -> None:
    attacker = Attacker(endpoints)
    for i in range(len(attack.phases)):
        go[i].wait()
        attack.send(attacker, i)
        sent[i].set()
    attacker.close()


def settle(until: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise SystemExit("the router did not get there in time")
        gevent.sleep(0.01)


def run(attack: Attack, router: Router, stalls: Stalls) -> None:
    go = [_MP.Event() for _ in attack.phases]
    sent = [_MP.Event() for _ in attack.phases]
    attack.before(router)
    process = _MP.Process(target=_child, args=(attack, router.endpoints, go, sent))
    process.start()
    for i, phase in enumerate(attack.phases):
        gevent.sleep(0.3)  # connections up, the loop quiet
        stalls.reset()
        cpu = time.process_time()
        go[i].set()
        settle(lambda: sent[i].is_set() and phase.done(router))  # noqa: B023
        spent = time.process_time() - cpu
        print(f"{phase.label:60s} stall {stalls.longest * 1000:7.2f} ms  one message "
              f"{stalls.costliest * 1000:6.2f} ms CPU  {phase.messages:6d} messages "
              f"{spent / max(1, phase.messages) * 1e6:7.1f} us CPU/message", flush=True)
    process.join(30)


def attacks(n: Callable[[int], int]) -> list[Attack]:
    found: list[Attack] = []
    marks: dict[str, int] = {}

    # -- one INFORM of 200,000 queues, then READYs -------------------------------
    huge = json.dumps([[10, f"q{i}"] for i in range(200_000)])

    def huge_send(a: Attacker, _i: int) -> None:
        sock = a.dealer("backend", b"huge")
        sock.send_multipart(frames(Command.INFORM, huge, "worker"))
        for _ in range(256):
            sock.send_multipart(frames(Command.READY))

    def huge_done(r: Router) -> bool:
        # the 256 READYs of an identity the router does not know were read
        # (an older router without that counter: nothing left unread)
        if "unknown_worker_messages" in r.status():
            return r.counters["unknown_worker_messages"] >= marks["unknown"] + 256
        return not r.sockets.has_unread("backend")

    found.append(Attack(  # (this one runs against older routers too: PYTHONPATH=<tree>)
        "huge", [Phase("INFORM of 200,000 queues (3.4 MB), then 256 READYs", 257, huge_done)],
        huge_send, lambda r: marks.update(unknown=r.counters["unknown_worker_messages"])))

    # -- the widest INFORM accepted, then READYs with requests waiting -----------
    widest = queues_json([(i, f"{i:03d}" + "n" * 253) for i in range(256)])
    readies = n(10_000)

    def widest_send(a: Attacker, i: int) -> None:
        sock = a.dealer("backend", b"widest") if i == 0 else a.socks[0]
        if i == 0:
            sock.send_multipart(frames(Command.INFORM, widest, "worker"))
            for _ in range(readies):
                sock.send_multipart(frames(Command.READY))
        else:
            sock.send_multipart(frames(Command.KBYE))

    found.append(Attack("widest", [
        Phase("widest INFORM accepted (256 x 256-byte names), 10,000 READYs", readies + 1,
              lambda r: b"widest" in r.workers and r.workers[b"widest"].slots >= readies),
        Phase("  ... and its KBYE", 1, lambda r: b"widest" not in r.workers)], widest_send))

    # -- the longest INFORM text that is parsed ---------------------------------
    escaped = json.dumps([[i, f"{i:03d}" + "\u2028" * 84] for i in range(256)])
    count_escaped = n(200)

    def escaped_send(a: Attacker, _i: int) -> None:
        sock = a.dealer("backend", b"escaped")
        for _ in range(count_escaped):
            sock.send_multipart(frames(Command.INFORM, escaped, "worker"))

    found.append(Attack("escaped", [
        Phase(f"longest INFORM parsed ({len(escaped):,} chars, escapes) x{count_escaped}",
              count_escaped, lambda r: b"escaped" in r.workers
              and not r.sockets.has_unread("backend"))],
        escaped_send))

    # -- many workers on the same queues --------------------------------------------
    workers = n(1000)
    shared = queues_json([(10, f"shared-{i}") for i in range(256)])

    def many_send(a: Attacker, i: int) -> None:
        if i == 0:
            for k in range(workers):
                a.dealer("backend", f"many-{k}".encode()).send_multipart(
                    frames(Command.INFORM, shared, "worker"))
        elif i == 1:
            client = a.dealer("frontend", b"picky")
            for _ in range(n(1000)):
                client.send_multipart(frames(Command.REQUEST, "shared-7", "", "[]"))
        elif i == 2:
            # a lighter worker with free slots behind the 1,000 busy ones
            free = a.dealer("backend", b"free")
            free.send_multipart(frames(Command.INFORM, queues_json([(5, "shared-8")]), "worker"))
            for _ in range(n(1000)):
                free.send_multipart(frames(Command.READY))
        elif i == 3:
            client = a.dealer("frontend", b"served")
            for _ in range(n(1000)):
                client.send_multipart(frames(Command.REQUEST, "shared-8", "", "[]"))
        else:
            for sock in a.socks[:workers]:
                sock.send_multipart(frames(Command.KBYE))

    def many(r: Router) -> int:
        return sum(1 for w in r.workers if w.startswith(b"many-"))

    found.append(Attack("many", [
        Phase(f"{workers:,} workers on the same 256 queues join", workers,
              lambda r: many(r) == workers),
        Phase(f"{n(1000):,} REQUESTs for a queue of {workers:,} busy workers", n(1000),
              lambda r: len(r.waiting.get("shared-7", ())) >= n(1000)),
        Phase(f"  one more worker, lighter, {n(1000):,} READYs", n(1000) + 1,
              lambda r: b"free" in r.workers and r.workers[b"free"].slots >= n(1000)),
        Phase(f"{n(1000):,} REQUESTs handed to it past the {workers:,} busy ones", n(1000),
              lambda r: r.workers[b"free"].slots == 0),
        Phase(f"{workers:,} workers on the same 256 queues leave", workers,
              lambda r: many(r) == 0)], many_send))

    # -- malformed and short-but-huge messages ------------------------------------
    def malformed_send(a: Attacker, _i: int) -> None:
        socks = [a.dealer("frontend", b"flood-front"), a.dealer("backend", b"flood-back")]
        for k in range(3000):
            for sock in socks:
                sock.send_multipart([b"", b"eMQP/1.0", b"NOPE", str(k).encode()])

    found.append(Attack("malformed", [
        Phase("6,000 malformed messages", 6000,
              lambda r: r.counters["malformed_messages"] >= marks["malformed"] + 6000)],
        malformed_send, lambda r: marks.update(malformed=r.counters["malformed_messages"])))

    def big_send(a: Attacker, _i: int) -> None:
        a.dealer("frontend", b"big").send_multipart(
            [b"", b"eMQP/1.0", b"x" * (16 * 1024 * 1024 - 100)])

    found.append(Attack("big", [
        Phase("a 3-frame message with a 16 MiB frame", 1,
              lambda r: r.counters["malformed_messages"] > marks["big"])],
        big_send, lambda r: marks.update(big=r.counters["malformed_messages"])))

    # -- forged REPLYs ------------------------------------------------------------------
    forged = n(20_000)

    def forged_send(a: Attacker, _i: int) -> None:
        sock = a.dealer("backend", b"forger")
        sock.send_multipart(frames(Command.INFORM, queues_json([(10, "forged")]), "worker"))
        for _ in range(forged):
            sock.send_multipart(frames(Command.REPLY, '{"value": 1}', str(uuid.uuid4())))

    found.append(Attack("forged", [
        Phase(f"{forged:,} forged REPLYs (after an INFORM)", forged + 1,
              lambda r: r.counters["late_replies"] >= marks["forged"] + forged)],
        forged_send, lambda r: marks.update(forged=r.counters["late_replies"])))

    # -- result requests past the per-client share -------------------------------
    results = n(40_000)

    def results_send(a: Attacker, _i: int) -> None:
        sock = a.dealer("frontend", b"greedy")
        for _ in range(results):
            sock.send_multipart(frames(Command.REQUEST, "nobody", "result-requested", "[]"))

    def results_done(r: Router) -> bool:
        return (len(r.results) + sum(r.client_side.refused_by_reason.values()) - marks["results"]
                >= results)

    found.append(Attack("results", [
        Phase(f"{results:,} result requests from one client (share 25,000)", results,
              results_done)],
        results_send, lambda r: marks.update(
            results=len(r.results) + sum(r.client_side.refused_by_reason.values()))))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="scale the counts")
    parser.add_argument("--only", default="", help="run attacks whose name contains this")
    args = parser.parse_args()
    # the router logs as in production (INFO), to nowhere: its lines cost what they cost
    logging.basicConfig(filename=os.devnull, level=logging.INFO)

    router = Router(settings=Settings(frontend_addr=ANY, backend_addr=ANY,
                                      administrative_addr=ANY, heartbeat_interval=3,
                                      heartbeat_timeout=60, hwm=200_000))
    router.start()
    stalls = Stalls(router)
    try:
        for attack in attacks(lambda count: max(1, int(count * args.scale))):
            if args.only in attack.name:
                run(attack, router, stalls)
    finally:
        stalls.stop()
        router.stop()


if __name__ == "__main__":
    main()
