"""``/metrics``: the API's own figures and the scorer's, for Prometheus.

Request counts by route, method and status, and a latency histogram whose buckets go from
0.1 ms to 10 s, are measured by an ASGI middleware around the whole app (so 401s, 429s and
404s count too). The scorer's figures are read from the database at scrape time (so they are
right whichever process wrote them, and nothing needs a multi-process directory): stored
transactions, alerts by severity, status and reason, dead letters, checkpoints, model
version. The consumer lag is the one figure that needs NATS; it is updated by ``/readyz``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..settings import Settings

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StoreCollector(Collector):
    """The scorer's figures, read from the database at each scrape."""

    def __init__(self, reader: Callable[[], sqlite3.Connection], settings: Settings) -> None:
        self.reader = reader
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        conn = self.reader()
        stored = conn.execute("SELECT max(rowid) FROM transactions").fetchone()[0] or 0
        yield GaugeMetricFamily("branchguard_transactions_stored",
                                "Transactions stored (rows are never deleted).", value=stored)
        alerts = GaugeMetricFamily("branchguard_alerts", "Alerts by severity and case status.",
                                   labels=["severity", "status"])
        for severity, status, n in conn.execute(
                "SELECT severity, status, count(*) FROM alerts GROUP BY severity, status"):
            alerts.add_metric([severity, status], n)
        yield alerts
        reasons = GaugeMetricFamily("branchguard_alert_reasons",
                                    "Alerts giving each reason.", labels=["reason"])
        for reason, n in conn.execute("SELECT j.value, count(*) FROM alerts, "
                                      "json_each(alerts.reasons) AS j GROUP BY j.value"):
            reasons.add_metric([str(reason)], n)
        yield reasons
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        yield GaugeMetricFamily("branchguard_dead_letters", "Dead-lettered messages.",
                                value=dead)
        checkpoints = GaugeMetricFamily("branchguard_checkpoint_stream_seq",
                                        "Last TX stream sequence committed, per consumer.",
                                        labels=["consumer"])
        for consumer, seq in conn.execute("SELECT consumer, stream_seq FROM checkpoints"):
            checkpoints.add_metric([consumer], seq)
        yield checkpoints
        row = conn.execute("SELECT model_version, rules_version FROM transactions "
                           "ORDER BY rowid DESC LIMIT 1").fetchone()
        info = GaugeMetricFamily("branchguard_model_info",
                                 "1, labelled with the configured model version and the "
                                 "versions of the last transaction scored.",
                                 labels=["configured", "last_model", "last_rules"])
        info.add_metric([self.settings.model_version, row[0] if row else "",
                         row[1] if row else ""], 1)
        yield info


class ApiMetrics:
    """One registry per app (so two apps in one process never share counters)."""

    def __init__(self, reader: Callable[[], sqlite3.Connection], settings: Settings) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("branchguard_api_requests", "API requests answered.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("branchguard_api_request_seconds",
                                 "Time from request to the end of the response.",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("branchguard_api_cache_hits",
                                  "Responses served from the cache.", ["route"], registry=r)
        self.cache_misses = Counter("branchguard_api_cache_misses",
                                    "Cacheable responses computed.", ["route"], registry=r)
        self.consumer_lag = Gauge("branchguard_consumer_lag",
                                  "TX messages not yet committed (last_seq - checkpoint), "
                                  "as of the last /readyz.", registry=r)
        r.register(StoreCollector(reader, settings))

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def measured(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = 500

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                method = scope["method"]
                self.requests.labels(path, method, str(status)).inc()
                self.latency.labels(path, method).observe(time.perf_counter() - started)

        return measured
