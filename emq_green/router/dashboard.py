"""The router's dashboard: one HTML page and the JSON it polls.

``emq-green-router --dashboard-addr 127.0.0.1:9400`` (INI ``dashboard_addr``,
``EVENTMQ_DASHBOARD_ADDR``; ``PORT`` or ``:PORT`` alone means loopback)
serves, from the router's own gevent loop (:mod:`gevent.pywsgi`):

- ``GET /``: ``web/router.html``, self-contained (no CDN, no framework);
  it fetches ``/dashboard.json`` every second and draws the chart in SVG;
- ``GET /dashboard.json``: workers, queues, the jobs/s history, and the
  router's STATUS taken at the same moment;
- ``GET /metrics``: the router's figures for Prometheus
  (:mod:`emq_green.router.metrics`).

Cost to the router: per job, one deque append in :meth:`handed_over` and
:meth:`replied` (the :class:`~emq_green.router.workers.RouterObserver` hooks), and
once a second a copy of the per-queue counters into a ring of
:data:`HISTORY` samples. Everything else is done when a page asks.
Read-only: GET and HEAD only.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from typing import Any, Iterable, Optional

import gevent

from ..web.pages import answer, page
from ..web.serve import HostCheck, exposure_warning, page_server, parse_http_addr
from . import metrics
from .broker import Router, Worker

logger = logging.getLogger(__name__)

#: seconds of jobs/s history kept for the chart (one sample a second)
HISTORY = 300
#: latencies and buffer waits kept per queue for p50 / p99
LATENCY_SAMPLES = 2048
#: only latencies this recent count in p50 / p99 (s)
LATENCY_WINDOW = 60.0
#: departed workers stay on the page this long (s)
DEPARTED_SHOWN = 60.0
#: the sampler's period (s)
PERIOD = 1.0
#: queues with latency series of their own at most (queue names come from
#: workers' INFORMs); a series whose queue is gone leaves once its samples
#: are older than LATENCY_WINDOW
MAX_QUEUE_SERIES = 256


def parse_dashboard_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT``; no host (``:PORT``, ``PORT``) is loopback, not all interfaces."""
    return parse_http_addr(addr)


def percentile(values: list[float], fraction: float) -> Optional[float]:
    """The nearest-rank percentile of ``values`` (sorted here), or None."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered) - 1e-9) - 1))
    return ordered[rank]


class RouterDashboard:
    """Watches a :class:`Router` (as its observer) and serves the page.

    Life: :meth:`start` (binds; :attr:`address` tells where),
    :meth:`stop`. One per router.
    """

    def __init__(self, router: Router, addr: str) -> None:
        self.router = router
        self._addr = addr
        self.address: Optional[tuple[str, int]] = None
        self._latency: dict[str, collections.deque[tuple[float, float]]] = {}
        self._waited: dict[str, collections.deque[tuple[float, float]]] = {}
        #: (monotonic time, {queue: handed out so far}), oldest first
        self.history: collections.deque[tuple[float, dict[str, int]]] = collections.deque(
            maxlen=HISTORY + 1)
        #: identity -> (time left, dead, the worker)
        self._departed: collections.OrderedDict[bytes, tuple[float, bool, Worker]] = (
            collections.OrderedDict())
        self._started = time.monotonic()
        self._server: Any = None
        self._sampler: Optional[gevent.Greenlet] = None
        self._page = page("router.html")

    # -- RouterObserver: O(1) per job ------------------------------------------
    def handed_over(self, queue: str, waited: float) -> None:
        samples = self._waited.get(queue)
        if samples is None:
            if len(self._waited) >= MAX_QUEUE_SERIES:
                return  # capped: this queue has no latency figures
            samples = self._waited[queue] = collections.deque(maxlen=LATENCY_SAMPLES)
        samples.append((time.monotonic(), waited))

    def replied(self, queue: str, latency: float) -> None:
        samples = self._latency.get(queue)
        if samples is None:
            if len(self._latency) >= MAX_QUEUE_SERIES:
                return
            samples = self._latency[queue] = collections.deque(maxlen=LATENCY_SAMPLES)
        samples.append((time.monotonic(), latency))

    def _prune(self, now: float) -> None:
        """Series of queues that are gone, with no sample in the window, leave."""
        router = self.router
        for series in (self._latency, self._waited):
            stale = [q for q, samples in series.items()
                     if q not in router.queues and q not in router.waiting
                     and (not samples or now - samples[-1][0] > LATENCY_WINDOW)]
            for queue in stale:
                del series[queue]

    def worker_left(self, worker: Worker, dead: bool) -> None:
        self._departed[worker.identity] = (time.monotonic(), dead, worker)
        while len(self._departed) > 100:
            self._departed.popitem(last=False)

    # -- life ----------------------------------------------------------------------
    def start(self) -> None:
        host, port = parse_dashboard_addr(self._addr)
        #: the Host header check in front of the page (its ``refused`` count)
        self.host_check = HostCheck(self._app, host, self.router.settings.http_allowed_hosts)
        server = page_server(host, port, self.host_check, logger)
        server.start()  # OSError (the address is taken) before anything else is set up
        self._server = server
        self.router.observer = self
        self._sample()
        self._sampler = gevent.spawn(self._sample_forever)
        self.address = (self._server.server_host, self._server.server_port)
        logger.info("router dashboard on http://%s:%d/", *self.address)
        warning = exposure_warning(host, "the router dashboard")
        if warning:
            logger.warning("%s", warning)

    def stop(self, timeout: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(timeout=timeout)
            self._server = None
        if self._sampler is not None:
            self._sampler.kill(block=False)
            self._sampler = None
        if self.router.observer is self:
            self.router.observer = None

    def _sample_forever(self) -> None:
        while True:
            gevent.sleep(PERIOD)
            self._sample()

    def _sample(self) -> None:
        now = time.monotonic()
        self.history.append((now, dict(self.router.processed_by_queue)))
        self._prune(now)

    # -- the JSON ------------------------------------------------------------------
    @staticmethod
    def _worker_row(worker: Worker, now: float) -> dict[str, Any]:
        return {
            "identity": worker.name,
            "queues": [[weight, name] for weight, name in worker.queues],
            "busy": len(worker.in_flight),
            "free": worker.slots,
            "heartbeat_age": round(now - worker.last_seen, 3),
        }

    def snapshot(self) -> dict[str, Any]:
        """What the page shows, and the router's STATUS of the same moment."""
        router, now = self.router, time.monotonic()
        status = router.status()
        handed_out = router.processed_by_worker
        workers = []
        for worker in router.workers.values():
            row = self._worker_row(worker, now)
            row.update(state="connected", handed_out=handed_out.get(worker.name, 0))
            workers.append(row)
        for identity, (left, dead, gone) in list(self._departed.items()):
            if now - left > DEPARTED_SHOWN:
                del self._departed[identity]
            elif identity not in router.workers:
                # as it is now, not as it left (a probe: a draining worker's
                # row said 2 busy a minute after its jobs had ended): it takes
                # no job; a lost one's jobs went elsewhere or were lost
                row = self._worker_row(gone, now)
                row.update(state="lost" if dead else "draining", free=0,
                           left_ago=round(now - left, 1),
                           handed_out=handed_out.get(row["identity"], 0))
                if dead:
                    row["busy"] = 0
                workers.append(row)
        history = self._rates()
        names = (set(router.queues) | set(router.waiting) | set(router.processed_by_queue)
                 | set(router.dropped_by_queue))
        in_flight = status["inflight_messages_by_queue"]
        queues = []
        for name in sorted(names):
            latencies = self._recent(self._latency.get(name), now)
            waits = self._recent(self._waited.get(name), now)
            queues.append({
                "name": name,
                "waiting": len(router.waiting.get(name, ())),
                "in_flight": in_flight.get(name, 0),
                "handed_out": router.processed_by_queue.get(name, 0),
                "rate": history[-1][2].get(name, 0.0) if history else 0.0,
                "latency_p50": _ms(percentile(latencies, 0.5)),
                "latency_p99": _ms(percentile(latencies, 0.99)),
                "replies": len(latencies),
                "wait_p50": _ms(percentile(waits, 0.5)),
                "wait_p99": _ms(percentile(waits, 0.99)),
                "dropped": router.dropped_by_queue.get(name, 0),
                "workers": len(router.queues.get(name, ())),
            })
        return {
            "time": time.time(),
            "uptime": round(now - self._started, 1),
            "state": router.state.value,
            "endpoints": dict(router.endpoints),
            "handed_out": sum(router.processed_by_queue.values()),
            "waiting": sum(map(len, router.waiting.values())),
            "dropped": sum(router.dropped_by_reason.values()),
            "frontend_paused": router.frontend_paused,
            "frontend_pauses": router.counters["frontend_pauses"],
            "possibly_lost": router.counters["possibly_lost"],
            "guaranteed": {k: status[k] for k in ("guaranteed_held", "redelivered",
                                                  "guaranteed_given_up", "late_replies",
                                                  "journal_file")},
            "workers": workers,
            "queues": queues,
            "schedulers": status["schedulers"],
            "schedules": status["schedules"],
            "history": [[round(t - now, 1), total] for t, total, _ in history],
            "status": status,
        }

    @staticmethod
    def _recent(samples: Optional[Iterable[tuple[float, float]]], now: float) -> list[float]:
        if not samples:
            return []
        return [value for at, value in list(samples) if now - at <= LATENCY_WINDOW]

    def _rates(self) -> list[tuple[float, float, dict[str, float]]]:
        """(time, jobs/s in all, jobs/s by queue) between successive samples."""
        rates = []
        samples = list(self.history)
        for (t0, before), (t1, after) in zip(samples, samples[1:]):
            span = max(t1 - t0, 1e-6)
            # (a count starts again at 0 when a gone queue's name was pruned)
            by_queue = {q: round(max(0, n - before.get(q, 0)) / span, 2)
                        for q, n in after.items()}
            rates.append((t1, round(sum(by_queue.values()), 2), by_queue))
        return rates

    # -- HTTP ------------------------------------------------------------------------
    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return answer(start_response, "405 Method Not Allowed", b"GET only\n")
        path = environ.get("PATH_INFO", "")
        if path == "/":
            return answer(start_response, "200 OK", self._page, "text/html; charset=utf-8")
        if path == "/dashboard.json":
            body = json.dumps(self.snapshot(), sort_keys=True).encode()
            return answer(start_response, "200 OK", body, "application/json")
        if path == "/metrics":
            body, content_type = metrics.render(self.router)
            return answer(start_response, "200 OK", body, content_type)
        return answer(start_response, "404 Not Found", b"try /, /dashboard.json or /metrics\n")


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 2)


def start_dashboard(router: Router, addr: str) -> Optional[RouterDashboard]:
    """Start a dashboard for ``router`` when ``addr`` is set; None when it is not,
    or when the address cannot be bound (logged: the router runs on without it)."""
    if not addr:
        return None
    dashboard = RouterDashboard(router, addr)
    try:
        dashboard.start()
    except OSError as exc:
        # the router routes on without its page (a taken port killed it,
        # with a traceback, after it had said it was listening)
        logger.error("router dashboard: cannot listen on %s (%s); the router runs on "
                     "without it", addr, exc)
        return None
    return dashboard


__all__ = ["RouterDashboard", "parse_dashboard_addr", "percentile", "start_dashboard"]
