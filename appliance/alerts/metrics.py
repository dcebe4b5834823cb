"""Alert delivery metrics for Prometheus, read from the database when collected.

The dispatcher is a process of its own, so counters kept in its memory would be invisible to
the API and reset at every restart. Each figure is therefore computed from the outbox tables
at collection time: the same in every process that asks, and monotonic across restarts.
``REGISTRY`` is the module-level registry the API can expose (``register(db_path)`` first);
``branchguard alerts status`` prints the same figures.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..settings import Settings
from .outbox import Outbox, OutboxCounts
from .routing import destinations

REGISTRY = CollectorRegistry(auto_describe=False)


def figures(counts: OutboxCounts, now: float | None = None, routing: bool = True
            ) -> dict[str, float]:
    """Metric name (without ``_total``) -> value. ``routing`` is whether any alert
    destination is configured: without one, alerts are not owed to anybody, so the queue and
    its age leave out the alerts nothing routes (and the undelivered-alerts rule stays
    quiet on a node that sends no alerts)."""
    now = time.time() if now is None else now
    oldest = counts.oldest_undelivered(routing)
    return {
        "branchguard_alerts_sent": counts.sent,
        "branchguard_alerts_failed": counts.failed,
        "branchguard_alerts_retried": counts.retried,
        "branchguard_alerts_queue_depth": (counts.unrouted if routing else 0) + counts.pending,
        "branchguard_alerts_oldest_undelivered_seconds":
            0.0 if oldest is None else round(max(0.0, now - oldest), 3),
    }


HELP = {
    "branchguard_alerts_sent": "Alert deliveries a destination accepted (one per alert and "
                               "destination, however grouped).",
    "branchguard_alerts_failed": "Alert deliveries given up on after alerts_max_age_seconds "
                                 "(a health warning; see branchguard alerts failed).",
    "branchguard_alerts_retried": "Failed delivery attempts that were or will be retried.",
    "branchguard_alerts_queue_depth": "Alert deliveries not yet made (including alerts not "
                                      "yet routed).",
    "branchguard_alerts_oldest_undelivered_seconds": "Age of the oldest alert not yet "
                                                     "delivered everywhere it goes.",
}
COUNTERS = ("branchguard_alerts_sent", "branchguard_alerts_failed", "branchguard_alerts_retried")


class OutboxCollector(Collector):
    """Collects the alert figures from the node database at ``path``. ``destinations``: the
    keys of the destinations configured (``routing.destinations``); only what is owed to
    them counts as undelivered (:func:`figures`, ``Outbox.counts``). None: every one."""

    def __init__(self, path: Path, destinations: Collection[str] | None = None) -> None:
        self.path = path
        self.destinations = None if destinations is None else frozenset(destinations)

    def collect(self) -> Iterator[Metric]:
        outbox = Outbox(self.path)
        try:
            values = figures(outbox.counts(self.destinations),
                             routing=self.destinations is None or bool(self.destinations))
        finally:
            outbox.close()
        for name, value in values.items():
            family: Metric = (CounterMetricFamily(name, HELP[name], value=value)
                              if name in COUNTERS else
                              GaugeMetricFamily(name, HELP[name], value=value))
            yield family


_registered: dict[Path, OutboxCollector] = {}


def register(path: Path) -> OutboxCollector:
    """Add the collector for the database at ``path`` to REGISTRY (once)."""
    key = path.resolve()
    if key not in _registered:
        _registered[key] = OutboxCollector(path)
        REGISTRY.register(_registered[key])
    return _registered[key]


def unregister(path: Path) -> None:
    """Remove the collector of the database at ``path`` (when that database goes away)."""
    collector = _registered.pop(path.resolve(), None)
    if collector is not None:
        REGISTRY.unregister(collector)


def health(counts: OutboxCounts, max_age: float, now: float | None = None,
           routing: bool = True) -> list[str]:
    """Node-health warnings about alert delivery (empty when all is well)."""
    now = time.time() if now is None else now
    warnings = []
    if counts.failed:
        warnings.append(f"{counts.failed} alert deliveries failed (not accepted within "
                        f"{max_age:g} s): see branchguard alerts failed")
    oldest = counts.oldest_undelivered(routing)
    if oldest is not None and now - oldest > max_age:
        warnings.append(f"an alert has waited {now - oldest:.0f} s for delivery: is "
                        "branchguard alerts run running, and its destinations reachable?")
    return warnings


def status(settings: Settings) -> dict[str, object]:
    """``branchguard alerts status``: the metrics, health warnings and destinations."""
    dests = destinations(settings)
    outbox = Outbox(settings.db_path)
    try:
        counts = outbox.counts([d.key for d in dests])
    finally:
        outbox.close()
    now = time.time()
    return {"metrics": figures(counts, now, routing=bool(dests)),
            "health": health(counts, settings.alerts_max_age_seconds, now, routing=bool(dests)),
            "destinations": [{"label": d.label, "severities": sorted(d.severities)}
                             for d in dests]}
