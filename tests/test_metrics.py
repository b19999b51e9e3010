"""The HTTP endpoint, read with a real HTTP client while jobs run."""

from __future__ import annotations

import gevent
import jobs_for_tests as J
import pytest
import requests
import setproctitle
from prometheus_client.parser import text_string_to_metric_families

from emq_green.protocol import Command
from emq_green.worker.metrics import MetricsExtension

JOBS = "jobs_for_tests"


def http_get(url: str) -> requests.Response:
    # The server runs in this process's event loop, which is not patched:
    # the client must wait in a real thread while the loop serves.
    return gevent.get_hub().threadpool.apply(requests.get, (url,), {"timeout": 10})


class Endpoint:
    def __init__(self, manager):
        [ext] = [e for e in manager.extensions if isinstance(e, MetricsExtension)]
        host, port = ext.address
        self.base = f"http://{host}:{port}"

    def metrics(self) -> dict[tuple[str, tuple], float]:
        response = http_get(self.base + "/metrics")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.text)
                for s in family.samples}

    def status(self) -> dict:
        response = http_get(self.base + "/status")
        assert response.status_code == 200
        return response.json()


def sample(metrics, metric, /, **labels):
    return metrics.get((metric, tuple(sorted(labels.items()))))


@pytest.fixture
def endpoint_manager(make_manager):
    def make(**settings):
        manager = make_manager(metrics_addr="127.0.0.1:0", **settings)
        return manager, Endpoint(manager)
    return make


def test_metrics_move_as_jobs_run(router, endpoint_manager):
    manager, endpoint = endpoint_manager(concurrent_jobs=4)
    ident = router.wait_inform()
    router.wait_count(Command.READY, 4)
    before = endpoint.metrics()
    assert sample(before, "emq_green_jobs_in_flight") == 0
    assert sample(before, "emq_green_free_slots") == 4

    router.request(ident, JOBS, "wait_gate", args=["m"])
    router.wait_until(lambda: J.calls["wait_gate"] == 1)
    during = endpoint.metrics()
    assert sample(during, "emq_green_jobs_in_flight") == 1
    assert sample(during, "emq_green_free_slots") == 3
    gate = dict(callable=f"{JOBS}.wait_gate", queue="default")
    assert sample(during, "emq_green_jobs_started_total", **gate) == 1
    assert sample(during, "emq_green_jobs_finished_total", status="succeeded", **gate) == 0

    done = [router.request(ident, JOBS, name, args=args, headers=headers)
            for name, args, headers in [("add", [1, 2], "reply-requested"),
                                        ("boom", [], "reply-requested"),
                                        ("nap", [5], "reply-requested,timeout:0.2")]]
    for msgid in done:
        router.wait_reply(msgid)
    after = endpoint.metrics()
    for name, status in [("add", "succeeded"), ("boom", "failed"), ("nap", "timed_out")]:
        labels = dict(callable=f"{JOBS}.{name}", queue="default")
        assert sample(after, "emq_green_jobs_started_total", **labels) == 1
        assert sample(after, "emq_green_jobs_finished_total", status=status, **labels) == 1
        assert sample(after, "emq_green_job_duration_seconds_count", **labels) == 1
    nap = dict(callable=f"{JOBS}.nap", queue="default")
    assert sample(after, "emq_green_job_duration_seconds_bucket", le="0.1", **nap) == 0
    assert sample(after, "emq_green_job_duration_seconds_bucket", le="0.25", **nap) == 1
    assert 0.19 <= sample(after, "emq_green_job_duration_seconds_sum", **nap) < 0.5

    J.gates["m"].set()
    router.wait_until(lambda: not manager.jobs_in_flight)
    status = endpoint.status()
    assert status["free_slots"] == 4 and status["state"] == "running"
    jobs = {(j["callable"], j["queue"]): j for j in status["jobs"]}
    assert jobs[(f"{JOBS}.wait_gate", "default")]["succeeded"] == 1
    assert jobs[(f"{JOBS}.nap", "default")]["timed_out"] == 1
    final = endpoint.metrics()
    assert sample(final, "emq_green_jobs_in_flight") == 0
    assert sample(final, "emq_green_connections_total") == 1
    assert sample(final, "emq_green_reconnects_total") == 0
    assert sample(final, "emq_green_info", name="test-worker", state="running",
                  version=status["version"]) == 1


def test_loop_blocks_and_heartbeat_gap_in_metrics(router, endpoint_manager):
    manager, endpoint = endpoint_manager(block_threshold=0.3)
    ident = router.wait_inform()
    msgid = router.request(ident, "blocking_jobs", "block_unpatched", args=[1.2],
                           headers="reply-requested")
    router.wait_reply(msgid)
    name = "blocking_jobs.block_unpatched"
    metrics = router.wait_until(
        lambda: (m := endpoint.metrics()).get(("emq_green_loop_blocks_total",
                                               (("callable", name),))) and m)
    assert sample(metrics, "emq_green_loop_blocks_total", callable=name) == 1
    [incident] = manager.status()["loop_blocks"]["recent"]
    blocked = sample(metrics, "emq_green_loop_blocked_seconds_total", callable=name)
    # the whole block, and the very figure the monitor measured (how closely
    # it measures is test_monitor's)
    assert blocked >= 1.1
    assert blocked == pytest.approx(incident["blocked_seconds"], abs=2e-3)
    assert sample(metrics, "emq_green_loop_longest_block_seconds") == pytest.approx(blocked)
    # the heartbeat thread spoke while the loop was held (interval 0.2 s): no
    # gap as long as the block, which the loop's own heartbeats would show
    assert sample(metrics, "emq_green_thread_heartbeats_total") >= 3
    assert sample(metrics, "emq_green_longest_heartbeat_gap_seconds") < 1.1
    status = endpoint.status()
    recent = status["loop_blocks"]["recent"][0]
    assert recent["callable"] == name and "msgid" not in recent  # issue 20: no msgids over HTTP


def test_process_title_shows_name_and_busy_slots(router, make_manager):
    make_manager(concurrent_jobs=3)
    ident = router.wait_inform()
    router.wait_until(lambda: setproctitle.getproctitle() == "emq-green: test-worker 0/3 running")
    router.request(ident, JOBS, "wait_gate", args=["t"])
    router.wait_until(lambda: setproctitle.getproctitle() == "emq-green: test-worker 1/3 running")
    J.gates["t"].set()
    router.wait_until(lambda: setproctitle.getproctitle() == "emq-green: test-worker 0/3 running")


def test_unknown_path_and_method(router, endpoint_manager):
    manager, endpoint = endpoint_manager()
    assert http_get(endpoint.base + "/nope").status_code == 404
    response = gevent.get_hub().threadpool.apply(requests.post, (endpoint.base + "/metrics",),
                                                 {"timeout": 10})
    assert response.status_code == 405


def test_a_taken_metrics_port_is_an_error_line_and_jobs_run_on(router, make_manager, caplog):
    """It was a traceback of the extension hook; the worker ran on then too."""
    import logging
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        with caplog.at_level(logging.ERROR):
            make_manager(metrics_addr=addr)
        ident = router.wait_inform()
        msgid = router.request(ident, JOBS, "add", args=[1, 2], headers="reply-requested")
        assert router.wait_reply(msgid) == {"value": 3}
        [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        text = error.getMessage()
        assert text.startswith(f"metrics: cannot listen on {addr} (") and "in use" in text
        assert text.endswith("the worker runs on without its pages")
        assert error.exc_info is None
    finally:
        taken.close()


def test_a_running_job_s_series_stays_its_own_when_it_ends(monkeypatch):
    """A probe's find: with the series nearly all taken, a running job was
    exported under its own callable; two jobs that ended first took the last
    free series, and once it ended it was counted under "other": a series
    that vanished. The series is taken while it runs."""
    import types

    from emq_green.jobs import JobOutcome, Status
    from emq_green.protocol import Headers, RunRequest
    from emq_green.records import JobRecord
    from emq_green.worker import metrics

    monkeypatch.setattr(metrics, "MAX_SERIES", 2)

    def record(name: str) -> JobRecord:
        request = RunRequest.parse(
            f'["run", {{"path": "probe3", "callable": "{name}", "args": []}}]')
        job = JobRecord(name, "default", Headers(), request)
        job.greenlet = object()
        return job

    ext = MetricsExtension()
    running = record("f62")
    ext._manager = types.SimpleNamespace(jobs_in_flight={"f62": running})
    ext._queues = {"default"}
    assert ("probe3.f62", "default") in ext.job_stats()
    for name in ("f63", "f64"):
        ext.job_finished(None, record(name), JobOutcome(Status.SUCCEEDED, 1), 0.01)
    running.done = True
    ext.job_finished(None, running, JobOutcome(Status.SUCCEEDED, 1), 2.0)
    stats = ext.job_stats()
    assert stats[("probe3.f62", "default")].started == 1
    assert ("probe3.f63", "default") in stats  # the second series
    assert stats[("other", "default")].started == 1  # f64: no series left
