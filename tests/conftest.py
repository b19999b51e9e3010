"""Shared fixtures: a fake router on loopback and in-process job managers."""

from __future__ import annotations

import logging
from typing import Any, Callable

import jobs_for_tests
import pytest
from fakerouter import FakeRouter

from emq_green.jobmanager import JobManager, State
from emq_green.settings import Settings

FAST_HEARTBEATS = dict(heartbeat_interval=0.2, heartbeat_timeout=0.5, heartbeat_liveness=3)


@pytest.fixture
def router():
    r = FakeRouter(heartbeat_interval=0.2)
    yield r
    r.close()


@pytest.fixture
def make_manager(router) -> Callable[..., JobManager]:
    """Start a JobManager connected to the fake router; stopped at teardown."""
    made: list[JobManager] = []
    jobs_for_tests.reset()

    def make(wait_running: bool = True, **overrides: Any) -> JobManager:
        values: dict[str, Any] = dict(name="test-worker", worker_addr=router.addr,
                                      worker_addr_default=router.addr,
                                      worker_addr_failover=router.addr,
                                      concurrent_jobs=4, reconnect_timeout=1.0,
                                      kill_grace_period=5.0, **FAST_HEARTBEATS)
        values.update(overrides)
        manager = JobManager(settings=Settings(**values), skip_signal=True)
        manager.start()
        made.append(manager)
        if wait_running:
            assert manager.wait_for_state(State.RUNNING, timeout=10)
        return manager

    yield make
    for manager in made:
        if manager.state is not State.STOPPED:
            manager.stop(timeout=10, graceful=False)
    jobs_for_tests.reset()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="emq_green")
