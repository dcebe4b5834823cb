"""The console's overview: what the node did over the last window, per minute.

Times are event times (``ts``, indexed), bucketed by ``bucket_seconds``. Latency is the
time from the event to its row being stored (``stored_at - ts``), so it includes the
network and queueing as well as scoring. "Waiting" counts HIGH and CRITICAL alerts still
NEW, whenever they came: the number the banner shows. ``last_stored_at`` (when the scorer
last stored a transaction) is the node's pulse: it stops moving when the scorer or the
terminals do. The drift status is the latest ``branchguard drift run`` (drift_reports).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..scoring.rules import RULES_VERSION

URGENT = ("HIGH", "CRITICAL")


def overview(conn: sqlite3.Connection, now: float, window_seconds: float = 3600.0,
             bucket_seconds: float = 60.0, ahead_seconds: float = 300.0) -> dict[str, Any]:
    """Per-bucket throughput, alerts and latency since ``now - window_seconds``, and the
    window's totals, severity mix, top terminals and reasons. Event times more than
    ``ahead_seconds`` (the clock skew the node admits) ahead of ``now`` are left out: rows
    stored before the event-time window existed may be dated years ahead, and would
    stretch every chart to them and read as a latency of minus those years."""
    since, until = now - window_seconds, now + ahead_seconds
    window = (since, until)
    buckets: dict[int, dict[str, float]] = {}
    for b, n, latency in conn.execute(
            "SELECT CAST(ts / ? AS INTEGER), count(*), avg(stored_at - ts) FROM transactions "
            "WHERE ts >= ? AND ts < ? GROUP BY 1", (bucket_seconds, *window)):
        buckets[int(b)] = {"transactions": n, "alerts": 0, "latency_seconds": latency}
    for b, n in conn.execute("SELECT CAST(ts / ? AS INTEGER), count(*) FROM alerts "
                             "WHERE ts >= ? AND ts < ? GROUP BY 1", (bucket_seconds, *window)):
        buckets.setdefault(int(b), {"transactions": 0, "alerts": 0,
                                    "latency_seconds": 0.0})["alerts"] = n
    series = [{"at": b * bucket_seconds, **v} for b, v in sorted(buckets.items())]
    transactions = sum(int(v["transactions"]) for v in buckets.values())
    alerts = sum(int(v["alerts"]) for v in buckets.values())
    latest = conn.execute("SELECT model_version, rules_version, stored_at FROM transactions "
                          "ORDER BY rowid DESC LIMIT 1").fetchone()
    return {
        "since": since,
        "series": series,
        "transactions": transactions,
        "alerts": alerts,
        "alert_rate": alerts / transactions if transactions else 0.0,
        "by_severity": {s: n for s, n in conn.execute(
            "SELECT severity, count(*) FROM alerts WHERE ts >= ? AND ts < ? GROUP BY 1",
            window)},
        "top_terminals": [{"terminal_id": t, "alerts": n} for t, n in conn.execute(
            "SELECT terminal_id, count(*) FROM alerts WHERE ts >= ? AND ts < ? GROUP BY 1 "
            "ORDER BY 2 DESC, 1 LIMIT 10", window)],
        "top_reasons": [{"reason": r, "alerts": n} for r, n in conn.execute(
            "SELECT j.value, count(*) FROM alerts, json_each(alerts.reasons) AS j "
            "WHERE alerts.ts >= ? AND alerts.ts < ? GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
            window)],
        "waiting_urgent": waiting_urgent(conn),
        "dead_letters": int(conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]),
        "model_version": latest[0] if latest else None,
        "rules_version": latest[1] if latest else RULES_VERSION,
        "last_stored_at": latest[2] if latest else None,
    }


def waiting_urgent(conn: sqlite3.Connection) -> int:
    """HIGH and CRITICAL alerts nobody has started on (status NEW); uses the
    (status, severity) index."""
    return int(conn.execute(
        "SELECT count(*) FROM alerts WHERE status = 'NEW' AND severity IN (?, ?)",
        URGENT).fetchone()[0])


def drift_status(conn: sqlite3.Connection, threshold: float) -> dict[str, Any] | None:
    """The latest drift run (drift.py): when, on which model and window, the PSI of each
    feature and of the risk score (``risk``), and the names above ``threshold``; None when
    drift was never run. Two indexed reads."""
    (run_at,) = conn.execute("SELECT max(run_at) FROM drift_reports").fetchone()
    if run_at is None:
        return None
    rows = conn.execute("SELECT name, psi, model_version, window_from, window_to, rows, "
                        "reference FROM drift_reports WHERE run_at = ? ORDER BY name",
                        (run_at,)).fetchall()
    psi = {name: value for name, value, *_ in rows}
    _, _, model_version, window_from, window_to, count, reference = rows[0]
    return {"run_at": run_at, "model_version": model_version, "window": (window_from, window_to),
            "rows": count, "reference": reference, "psi": psi, "threshold": threshold,
            "drifted": sorted(n for n, v in psi.items() if v > threshold)}
