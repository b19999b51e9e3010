"""The router's figures in Prometheus' text format (``GET /metrics`` on
``--dashboard-addr``), from the same :meth:`Router.status` as STATUS: what a
scraper keeps as series, jobs handed out and dropped, redeliveries and late
replies of guaranteed jobs, the journal. Built only when asked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from .broker import Router

PREFIX = "emq_green_router"


class _Collector:
    """A prometheus_client collector over one router's STATUS."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.router.status()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        handed = CounterMetricFamily(f"{PREFIX}_handed_out", "Requests handed to a worker.",
                                     labels=["queue"])
        for queue, n in sorted(status["processed_messages_by_queue"].items()):
            handed.add_metric([queue], n)
        yield handed
        waiting = GaugeMetricFamily(f"{PREFIX}_waiting", "Requests buffered for a free slot.",
                                    labels=["queue"])
        for queue, n in sorted(status["waiting_messages_by_queue"].items()):
            waiting.add_metric([queue], n)
        yield waiting
        dropped = CounterMetricFamily(f"{PREFIX}_dropped", "Requests the router dropped.",
                                      labels=["reason"])
        for reason, n in sorted(status["dropped_requests_by_reason"].items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield gauge("workers", "Connected workers.", len(self.router.workers))
        yield gauge("buffered_bytes", "Bytes of buffered requests.", status["buffered_bytes"])
        yield gauge("frontend_paused", "1 while clients are not read (backpressure).",
                    int(status["frontend_paused"]))
        yield gauge("pending_results", "Clients waiting for a result.",
                    status["pending_results"])
        yield gauge("guaranteed_held", "Guaranteed requests accepted and not finished.",
                    status["guaranteed_held"])
        yield counter("guaranteed_accepted", "Guaranteed requests accepted (confirmed).",
                      status["guaranteed_accepted"])
        yield counter("guaranteed_refused", "Guaranteed requests refused (journal fault).",
                      status["guaranteed_refused"])
        yield counter("redelivered", "Guaranteed requests sent again after their worker "
                      "died.", status["redelivered"])
        yield counter("guaranteed_given_up", "Guaranteed requests given up after their "
                      "workers died running them more than max_redeliveries times.",
                      status["guaranteed_given_up"])
        yield counter("late_replies", "REPLYs for jobs already sent elsewhere or finished "
                      "(dropped).", status["late_replies"])
        if status.get("journal_file"):
            yield gauge("journal_rows", "Requests in the journal.", status["journal_rows"])
            yield counter("journal_commit_failures", "Journal commits that failed.",
                          status["journal_commit_failures"])


def render(router: Router) -> tuple[bytes, str]:
    """``(body, content type)`` of ``GET /metrics``."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(router))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST


__all__ = ["PREFIX", "render"]
