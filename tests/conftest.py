"""Shared fixtures: a fake router on loopback and in-process job managers."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import jobs_for_tests
import pytest
from fakerouter import FakeRouter
from peers import Peers, require_eventmq

from emq_green.jobmanager import JobManager, State
from emq_green.limits import worker_log
from emq_green.router import clients as router_clients
from emq_green.settings import Settings

FAST_HEARTBEATS = dict(heartbeat_interval=0.2, heartbeat_timeout=0.5, heartbeat_liveness=3)


@pytest.fixture
def router():
    r = FakeRouter(heartbeat_interval=0.2)
    yield r
    r.close()


@pytest.fixture
def peers(tmp_path) -> Iterator[Peers]:
    """Real processes (emq-green's and EventMQ 0.3.13's programs), all
    killed at teardown; EventMQ missing is an error, not a skip."""
    require_eventmq()
    p = Peers(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def make_manager(router) -> Callable[..., JobManager]:
    """Start a JobManager connected to the fake router; stopped at teardown.
    ``settings_loader`` is what :meth:`JobManager.reload` (SIGHUP) reads."""
    made: list[JobManager] = []
    jobs_for_tests.reset()

    def make(wait_running: bool = True,
             settings_loader: Optional[Callable[[], Settings]] = None,
             manager_class: type[JobManager] = JobManager,
             **overrides: Any) -> JobManager:
        values: dict[str, Any] = dict(name="test-worker", worker_addr=router.addr,
                                      worker_addr_default=router.addr,
                                      worker_addr_failover=router.addr,
                                      concurrent_jobs=4, reconnect_timeout=1.0,
                                      kill_grace_period=5.0, **FAST_HEARTBEATS)
        values.update(overrides)
        manager = manager_class(settings=Settings(**values), skip_signal=True,
                                settings_loader=settings_loader)
        manager.start()
        made.append(manager)
        if wait_running:
            assert manager.wait_for_state(State.RUNNING, timeout=10)
        return manager

    yield make
    # Runs when the test failed too: a manager left running would keep
    # reconnecting into later tests. A stop that fails is an error here.
    stuck = [m.name for m in made if not stop_for_good(m)]
    jobs_for_tests.reset()
    if stuck:
        pytest.fail(f"manager(s) {stuck} did not stop within their deadline")


def stop_for_good(manager: JobManager, timeout: float = 15.0) -> bool:
    """Stop ``manager`` at once; True when it stopped. One that does not is
    killed (its main greenlet) so that it cannot outlive the test."""
    if manager.stop(timeout=timeout, graceful=False):
        return manager.state is State.STOPPED
    main = getattr(manager, "_main", None)  # last resort, not an API
    if main is not None:
        main.kill(block=True, timeout=5)
    return False


@pytest.fixture(autouse=True)
def _routers_settle_at_once(monkeypatch):
    """In-process routers send a request for a queue no worker announced to
    the default queue at once, as the tests written before the start's
    grace expect (``Router.settle_for``; its own tests set it)."""
    from emq_green.router import Router

    monkeypatch.setattr(Router, "settle_for", 0.0)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="emq_green")
    worker_log.reset()  # the process's rate limiter: each test starts with a full burst
    router_clients._waits_log.reset()  # (the router's lines of queues beginning to wait)

