"""``/metrics``: the API's own figures and the scorer's, for Prometheus.

Request counts by route, method and status, and a latency histogram whose buckets go from
0.1 ms to 10 s, are measured by an ASGI middleware around the whole app (so 401s, 429s and
404s count too). The scorer's figures are read from the database at scrape time (so they are
right whichever process wrote them, and nothing needs a multi-process directory): stored
transactions, alerts by severity, status and reason, dead letters, checkpoints, model
version, the alert outbox, disk space and replication lag. The consumer lag is the one figure
that needs NATS; each ``/metrics`` and ``/readyz`` refreshes it. These names are the contract
the Prometheus rules in ``monitoring/`` rely on (docs/operations.md; a test checks it).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..alerts.metrics import OutboxCollector
from ..alerts.routing import destinations
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
        stored = conn.execute("SELECT count(*) FROM transactions").fetchone()[0]
        yield CounterMetricFamily("branchguard_transactions",
                                  "Transactions scored and stored in the node database.",
                                  value=stored)
        raised = CounterMetricFamily("branchguard_alerts",
                                     "Alerts raised (decision review or decline).",
                                     labels=["severity"])
        cases = GaugeMetricFamily("branchguard_alert_cases",
                                  "Alerts by severity and case status.",
                                  labels=["severity", "status"])
        by_severity: dict[str, int] = {}
        for severity, status, n in conn.execute(
                "SELECT severity, status, count(*) FROM alerts GROUP BY severity, status"):
            cases.add_metric([severity, status], n)
            by_severity[severity] = by_severity.get(severity, 0) + n
        for severity, n in sorted(by_severity.items()):
            raised.add_metric([severity], n)
        yield raised
        yield cases
        reasons = GaugeMetricFamily("branchguard_alert_reasons",
                                    "Alerts giving each reason.", labels=["reason"])
        for reason, n in conn.execute("SELECT j.value, count(*) FROM alerts, "
                                      "json_each(alerts.reasons) AS j GROUP BY j.value"):
            reasons.add_metric([str(reason)], n)
        yield reasons
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        yield CounterMetricFamily("branchguard_dead_letters",
                                  "Messages dead-lettered to TX_DLQ.", value=dead)
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
        drift = GaugeMetricFamily("branchguard_drift_psi",
                                  "Population stability index of each feature (and 'risk') "
                                  "in the last `branchguard drift run`.", labels=["feature"])
        for name, value in conn.execute(
                "SELECT name, psi FROM drift_reports WHERE run_at = "
                "(SELECT max(run_at) FROM drift_reports)"):
            drift.add_metric([name], value)
        yield drift
        yield from disk_metrics(self.settings.data_dir)
        lag = replication_lag_seconds(self.settings)
        if lag is not None:
            yield GaugeMetricFamily("branchguard_replication_lag_seconds",
                                    "How far the local Litestream replica is behind the "
                                    "database's last write (0 when in step).", value=lag)


def disk_metrics(path: Path) -> Iterator[Metric]:
    """Free and total bytes of the filesystem holding the data directory."""
    st = os.statvfs(path)
    yield GaugeMetricFamily("branchguard_data_dir_free_bytes",
                            "Free bytes on the data directory's filesystem.",
                            value=st.f_bavail * st.f_frsize)
    yield GaugeMetricFamily("branchguard_data_dir_size_bytes",
                            "Size of the data directory's filesystem.",
                            value=st.f_blocks * st.f_frsize)


def replication_lag_seconds(settings: Settings) -> float | None:
    """Seconds between the database's last write (its WAL or file mtime) and the newest file
    Litestream wrote to a ``file://`` replica; 0 when the replica is newer. None when the
    node does not replicate or the replica is remote (Litestream's own metrics cover those)."""
    if not settings.replicate or not settings.replica.startswith("file://"):
        return None
    replica = Path(unquote(urlparse(settings.replica).path))
    newest = max((f.stat().st_mtime for f in replica.rglob("*") if f.is_file()), default=0.0)
    written = max((f.stat().st_mtime for f in (settings.db_path,
                                               settings.db_path.with_name(
                                                   settings.db_path.name + "-wal"))
                   if f.exists()), default=0.0)
    return max(0.0, written - newest)


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
        self.consumer_lag = Gauge("branchguard_consumer_pending_messages",
                                  "TX messages not yet committed (last_seq - checkpoint), "
                                  "refreshed by each /metrics and /readyz.", registry=r)
        r.register(StoreCollector(reader, settings))
        r.register(OutboxCollector(settings.db_path,
                                   [d.key for d in destinations(settings)]))

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
