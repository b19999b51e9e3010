#!/usr/bin/env python3
"""The experiment behind heartbeats from a native thread (docs/monitoring.md).

One in-process worker, a fake router on loopback, N jobs (every 300th holds
the loop 50 ms with an unpatched sleep) while the heartbeat thread sends on
the worker's DEALER as fast as it can (every 0.2 ms), with:

    full            the guard lock and the loop's state re-check after each
                    thread send (what emq-green does)
    nopoke          the guard, but no re-check: the thread's send may eat the
                    descriptor's edge notification and leave the reader asleep
    noguard         the re-check, but no lock: libzmq calls from two threads
    noguard-nopoke  neither

    .venv/bin/python scripts/experiment_thread_heartbeats.py full 6000
"""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from fakerouter import FakeRouter  # noqa: E402

import emq_green.worker.connection as C  # noqa: E402
from emq_green.jobmanager import JobManager  # noqa: E402
from emq_green.protocol import Command  # noqa: E402
from emq_green.settings import Settings  # noqa: E402
from emq_green.worker.lifeline import Lifeline  # noqa: E402


class NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "full"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    if "nopoke" in variant:
        C.Connection._check_state = lambda self: None
    if variant.startswith("noguard"):
        C._RealRLock = NoLock
    router = FakeRouter(heartbeat_interval=0.2)
    manager = JobManager(settings=Settings(
        name="exp", worker_addr=router.addr, worker_addr_default=router.addr,
        worker_addr_failover=router.addr, concurrent_jobs=20, heartbeat_interval=0.2,
        heartbeat_timeout=0.5, heartbeat_liveness=3, block_threshold=0.3), skip_signal=True)
    manager.start()
    [lifeline] = [e for e in manager.extensions if isinstance(e, Lifeline)]
    lifeline.force_every = 0.0002
    ident = router.wait_inform()
    sent_at: dict[str, float] = {}
    i = 0
    t0 = time.monotonic()
    try:
        while i < n:
            router.wait_until(lambda i=i: router.count(Command.READY) > i, timeout=30)
            ready = router.count(Command.READY)
            while i < min(ready, n):
                if i % 300 == 150:
                    msgid = router.request(ident, "blocking_jobs", "block_unpatched",
                                           args=[0.05], headers="reply-requested")
                else:
                    msgid = router.request(ident, "jobs_for_tests", "add", args=[i, 1],
                                           headers="reply-requested")
                sent_at[msgid] = time.monotonic()
                i += 1
        router.wait_until(lambda: router.count(Command.REPLY) >= n, timeout=120)
    except Exception as exc:  # the fake router's reader dies on a corrupt message
        print(f"FAILED: {exc!r} after {i} jobs sent")
    replies = router.messages(Command.REPLY)
    latencies = sorted(r.at - sent_at[r.message.body[1]] for r in replies
                       if r.message.body[1] in sent_at) or [0.0]
    print(f"{variant}: {n} jobs, {len(replies)} replies in {time.monotonic() - t0:.1f} s, "
          f"max latency {latencies[-1]:.3f} s, thread heartbeats {lifeline.sent}, "
          f"reconnects {manager.counters['router_lost']}, "
          f"malformed {manager.counters['malformed_messages']}")
    os._exit(0)


if __name__ == "__main__":
    main()
