"""Status and metrics over HTTP, and the process title.

:class:`MetricsExtension` counts jobs per callable and queue (started,
succeeded, failed, timed out, killed, and a duration histogram) with plain
dict increments, and when ``metrics_addr`` is set serves them from the
worker's own gevent loop (:mod:`gevent.pywsgi`):

- ``GET /metrics``: Prometheus text, rendered at scrape time by
  ``prometheus_client`` from those counters and from
  :meth:`JobManager.status` (slots, jobs in flight, loop blocks, heartbeat
  gaps, subprocess pool, reconnects);
- ``GET /status``: the same status as JSON;
- ``GET /``: a page for people (:mod:`emq_green.worker.page`).

While the loop is blocked the endpoint cannot answer either: what it shows
afterwards (``loop_blocks``, ``longest_heartbeat_gap``) is how you find out.

:class:`ProcessTitle` sets the title (``ps``, ``top``) to the worker's name
and its busy/total slots.

Both optional libraries degrade with one log line: without
``prometheus_client`` ``/metrics`` answers 501 (``/status`` still works);
without ``setproctitle`` the title stays as it is.
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import gevent

from ..extensions import Extension
from ..jobs import Status
from ..records import INVALID_REQUEST, STATUS_KEYS
from ..web.pages import answer
from ..web.serve import HostCheck, exposure_warning, page_server, parse_http_addr
from . import page as worker_page

if TYPE_CHECKING:  # pragma: no cover
    from ..extensions import WorkerView
    from ..jobs import JobOutcome
    from ..protocol import RunRequest
    from ..records import JobRecord

logger = logging.getLogger(__name__)

#: Upper bounds (s) of the job duration histogram.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0)
PREFIX = "emq_green"
#: (callable, queue) pairs with series of their own; later ones count under
#: OTHER. With the duration histogram a pair is ~23 lines of /metrics, so
#: this keeps the page under 256 KB whatever names clients send.
MAX_SERIES = 64
#: a callable name longer than this counts under OTHER
MAX_NAME = 80
#: the label of everything else: callables past MAX_SERIES, callables that
#: could not be found (clients choose those names), queues the worker does
#: not serve (the router forwards unknown queue names untouched)
OTHER = "other"


class JobStats:
    """Counters and a duration histogram for one (callable, queue).

    Only finished jobs are counted as they end (one hook per job);
    ``started`` is what :meth:`MetricsExtension.job_stats` adds up: jobs
    that ran and finished, plus those running now."""

    __slots__ = ("started", "finished", "buckets", "duration_sum")

    def __init__(self) -> None:
        self.started = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0

    def observe(self, status: str, duration: float) -> None:
        self.finished[status] += 1
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration

    def summary(self) -> dict[str, Any]:
        return {"started": self.started, **{s.value: self.finished[s.value] for s in Status},
                "duration_sum": round(self.duration_sum, 6)}


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT``; ``PORT`` or ``:PORT`` alone is loopback (as the dashboard's)."""
    return parse_http_addr(addr)


class MetricsExtension(Extension):
    """Per-callable job counters; the HTTP endpoint when ``metrics_addr`` is set.

    ``addr`` overrides the setting (``"127.0.0.1:0"`` picks a free port;
    :attr:`address` tells which).
    """

    def __init__(self, addr: Optional[str] = None) -> None:
        self._addr = addr
        self.jobs: dict[tuple[str, str], JobStats] = collections.defaultdict(JobStats)
        #: finished jobs not yet counted in :attr:`jobs` (see job_finished)
        self._finished: list[tuple[Optional[RunRequest], str, Status, float, int]] = []
        self.longest_heartbeat_gap = 0.0
        self.address: Optional[tuple[str, int]] = None
        self._server: Any = None
        self._manager: Optional[WorkerView] = None
        self._render: Optional[Callable[[], bytes]] = None
        self._queues: set[str] = set()
        self._content_type = "text/plain; version=0.0.4; charset=utf-8"

    # -- hooks ------------------------------------------------------------------
    def manager_started(self, manager: WorkerView) -> None:
        self._manager = manager
        self._queues = {name for _w, name in manager.queues}
        addr = self._addr if self._addr is not None else manager.settings.metrics_addr
        if addr:
            self._serve(addr)

    def manager_stopped(self, manager: WorkerView) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None

    def job_finished(self, manager: WorkerView, record: JobRecord, outcome: JobOutcome,
                     duration: float) -> None:
        # One append per job; the counters are brought up to date in bulk.
        # (the request, not its name: the name is built in bulk)
        self._finished.append((record.request, record.queue, outcome.status,
                               duration, outcome.attempts))
        if len(self._finished) >= 2048:
            self._count_finished()

    def _count_finished(self) -> None:
        finished, self._finished = self._finished, []
        for request, queue, status, duration, attempts in finished:
            name = request.name if request is not None else INVALID_REQUEST
            stats = self.jobs[self._key(self.jobs, name, queue, known=attempts > 0)]
            stats.observe(STATUS_KEYS[status], duration)
            stats.started += 1

    def _key(self, table: dict[tuple[str, str], JobStats], name: str, queue: str,
             known: bool) -> tuple[str, str]:
        """The labels a job is counted under in ``table`` (see MAX_SERIES
        and OTHER)."""
        if queue not in self._queues:
            queue = OTHER
        key = (name, queue)
        if key in table:
            return key
        if known and len(table) < MAX_SERIES and len(name) <= MAX_NAME:
            return key
        return (OTHER, queue)

    def job_stats(self) -> dict[tuple[str, str], JobStats]:
        """Per (callable, queue): a copy of the counters, ``started``
        including the jobs running now."""
        self._count_finished()
        result: dict[tuple[str, str], JobStats] = {}
        for key, stats in self.jobs.items():
            copy = result[key] = JobStats()
            copy.started, copy.duration_sum = stats.started, stats.duration_sum
            copy.finished.update(stats.finished)
            copy.buckets[:] = stats.buckets
        if self._manager is not None:
            for record in list(self._manager.jobs_in_flight.values()):
                if record.greenlet is not None and not record.done:
                    # its series is taken in the table itself (a probe: shown
                    # while it ran, then gone when jobs that ended first had
                    # taken the last free ones, and counted under "other")
                    key = self._key(self.jobs, record.callable_name, record.queue, known=True)
                    self.jobs[key]  # noqa: B018 (the defaultdict makes the series)
                    result.setdefault(key, JobStats()).started += 1
        return result

    def reload(self, manager: WorkerView) -> None:
        self._count_finished()  # under the queues they came for
        self._queues |= {name for _w, name in manager.queues}

    def disconnected(self, manager: WorkerView, reason: str) -> None:
        self.heartbeat_gap(manager)  # keep the gap of the connection that ends

    def heartbeat_gap(self, manager: WorkerView) -> float:
        """Longest silence towards the router so far, over all connections."""
        conn = manager.outgoing
        if conn is not None:
            self.longest_heartbeat_gap = max(self.longest_heartbeat_gap,
                                             conn.longest_gap)
        return self.longest_heartbeat_gap

    def status(self, manager: WorkerView) -> dict[str, Any]:
        return {
            "jobs": [{"callable": c, "queue": q, **s.summary()}
                     for (c, q), s in sorted(self.job_stats().items())],
            "longest_heartbeat_gap": round(self.heartbeat_gap(manager), 3),
            "metrics_addr": f"{self.address[0]}:{self.address[1]}" if self.address else None,
        }

    # -- HTTP -------------------------------------------------------------------
    def _serve(self, addr: str) -> None:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        except ImportError:
            logger.warning("prometheus_client is not installed: /metrics answers 501, "
                           "/status works (pip install prometheus_client)")
        else:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self))
            self._render = lambda: generate_latest(registry)
            self._content_type = CONTENT_TYPE_LATEST
        host, port = parse_addr(addr)
        names = self._manager.settings.http_allowed_hosts if self._manager else ()
        #: the Host header check in front of the pages (its ``refused`` count)
        self.host_check = HostCheck(self._app, host, names)
        server = page_server(host, port, self.host_check, logger)
        try:
            server.start()
        except OSError as exc:  # was a traceback of the extension hook
            logger.error("metrics: cannot listen on %s (%s); the worker runs on without "
                         "its pages", addr, exc)
            return
        self._server = server
        self.address = (self._server.server_host, self._server.server_port)
        logger.info("metrics on http://%s:%d/metrics, status on /status", *self.address)
        warning = exposure_warning(host, "the metrics endpoint")
        if warning:
            logger.warning("%s", warning)

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return answer(start_response, "405 Method Not Allowed", b"GET only\n")
        if path == "/metrics":
            if self._render is None:
                return answer(start_response, "501 Not Implemented",
                               b"prometheus_client is not installed\n")
            return answer(start_response, "200 OK", self._render(), self._content_type)
        if path in worker_page.PATHS:
            return worker_page.serve(path, self._manager, start_response)
        if path == "/status":
            assert self._manager is not None
            body = json.dumps(self._manager.status(), indent=1, sort_keys=True).encode()
            return answer(start_response, "200 OK", body + b"\n", "application/json")
        return answer(start_response, "404 Not Found", b"try /, /metrics or /status\n")


class _Collector:
    """Renders the current state as Prometheus metric families at scrape time."""

    def __init__(self, ext: MetricsExtension) -> None:
        self.ext = ext

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        ext, manager = self.ext, self.ext._manager
        assert manager is not None
        status = manager.status()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        info = GaugeMetricFamily(f"{PREFIX}_info", "The worker (always 1).",
                                 labels=["name", "version", "state"])
        info.add_metric([status["name"], status["version"], status["state"]], 1)
        yield info
        started = CounterMetricFamily(f"{PREFIX}_jobs_started", "Jobs started.",
                                      labels=["callable", "queue"])
        finished = CounterMetricFamily(f"{PREFIX}_jobs_finished",
                                       "Jobs finished, by outcome.",
                                       labels=["callable", "queue", "status"])
        durations = HistogramMetricFamily(f"{PREFIX}_job_duration_seconds",
                                          "Job duration, from start to result.",
                                          labels=["callable", "queue"])
        bounds = [str(b) for b in DURATION_BUCKETS] + ["+Inf"]
        for (name, queue), stats in sorted(ext.job_stats().items()):
            started.add_metric([name, queue], stats.started)
            for s in Status:
                finished.add_metric([name, queue, s.value], stats.finished[s.value])
            cumulative, total = [], 0
            for bound, n in zip(bounds, stats.buckets):
                total += n
                cumulative.append((bound, total))
            durations.add_metric([name, queue], cumulative, stats.duration_sum)
        yield from (started, finished, durations)
        yield gauge("jobs_in_flight", "Jobs accepted and not finished.",
                    len(status["jobs_in_flight"]))
        yield gauge("slots", "Jobs run at once (concurrent_jobs).", status["concurrent_jobs"])
        yield gauge("free_slots", "Slots not taken by a job.", status["free_slots"])
        counters = status.get("counters", {})
        connections = counters.get("connections", 0)
        yield counter("connections", "Connections the router ACKed.", connections)
        yield counter("requests_refused", "REQUESTs naming a callable that may not run "
                      "(allowed_callables, private names).", counters.get("refused", 0))
        yield counter("requests_invalid", "REQUESTs that could not be read (frames, JSON, "
                      "headers, size).", counters.get("invalid_requests", 0))
        yield counter("reconnects", "Connections after the first (a link lost and made "
                      "again, or a SIGHUP reload, which connects anew).", max(0, connections - 1))
        yield counter("curve_handshakes_failed", "CURVE handshakes the router refused (key "
                      "not authorized, wrong server key).",
                      counters.get("curve_handshakes_failed", 0))

        blocks = status.get("loop_blocks") or {}
        by_callable = blocks.get("by_callable", {})
        incidents = CounterMetricFamily(f"{PREFIX}_loop_blocks",
                                        "Times a job held the event loop past the threshold.",
                                        labels=["callable"])
        blocked = CounterMetricFamily(f"{PREFIX}_loop_blocked_seconds",
                                      "Time the event loop was held, by callable.",
                                      labels=["callable"])
        for name, s in sorted(by_callable.items()):
            incidents.add_metric([name], s["incidents"])
            blocked.add_metric([name], s["blocked_seconds"])
        yield from (incidents, blocked)
        yield gauge("loop_longest_block_seconds", "Longest block of the event loop.",
                    blocks.get("longest", 0.0))
        yield gauge("longest_heartbeat_gap_seconds",
                    "Longest silence towards the router (any message counts).",
                    status.get("longest_heartbeat_gap", 0.0))
        lifeline = status.get("thread_heartbeats") or {}
        yield counter("thread_heartbeats", "HEARTBEATs sent by the native thread while "
                      "the loop was blocked.", lifeline.get("sent", 0))
        offload = status.get("offload") or {}
        yield gauge("offloaded_callables", "Callables sent to the subprocess pool for "
                    "blocking the loop.", len(offload.get("callables", ())))
        pool = status.get("subprocess_pool") or {}
        yield gauge("subprocess_pool_size", "Subprocess children configured.",
                    pool.get("size", 0) if pool.get("started") else 0)
        yield gauge("subprocess_pool_busy", "Subprocess children running a job.",
                    pool.get("busy", 0))


class ProcessTitle(Extension):
    """``emq-green: NAME busy/total STATE`` as the process title.

    Refreshed by a greenlet every :attr:`PERIOD` seconds and on connection
    changes, not per job: setting the title costs a system call, and the
    busy count changes with every job.
    """

    PERIOD = 1.0

    def __init__(self) -> None:
        self._set: Optional[Callable[[str], None]] = None
        self._title = ""
        self._ticker: Any = None

    def manager_started(self, manager: WorkerView) -> None:
        try:
            from setproctitle import setproctitle
        except ImportError:
            logger.info("setproctitle is not installed: the process title stays as it is")
            return
        self._set = setproctitle
        self._update(manager)
        self._ticker = gevent.spawn(self._tick, manager)

    def _tick(self, manager: WorkerView) -> None:
        while True:
            gevent.sleep(self.PERIOD)
            self._update(manager)

    def _update(self, manager: WorkerView) -> None:
        if self._set is None:
            return
        title = (f"emq-green: {manager.name} {len(manager.jobs_in_flight)}/"
                 f"{manager.concurrent_jobs} {manager.state.value}")
        if title != self._title:
            self._title = title
            self._set(title)

    def connected(self, manager: WorkerView, addr: str, identity: str) -> None:
        self._update(manager)

    def disconnected(self, manager: WorkerView, reason: str) -> None:
        self._update(manager)

    def manager_stopped(self, manager: WorkerView) -> None:
        if self._ticker is not None:
            self._ticker.kill(block=False)
        self._update(manager)


__all__ = ["MetricsExtension", "ProcessTitle", "parse_addr"]
