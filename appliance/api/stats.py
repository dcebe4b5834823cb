"""``/api/v1/stats``: volumes, alert rates, alerts by severity, status, reason, terminal and
hour of day, and the model and rules versions. Cached like the alert list."""

from __future__ import annotations

from typing import Any

from ..scoring import rulebook
from ..settings import Settings
from .endpoint import Call, Routes

routes = Routes()


@routes.route("GET", "/api/v1/stats", "viewer", ("since", "until"), cached=True)
def stats(call: Call) -> dict[str, Any]:
    """
    summary: Volumes and alert rates over a time range (event time; default everything).
    parameters:
      - {$ref: '#/components/parameters/since'}
      - {$ref: '#/components/parameters/until'}
    responses:
      200: {description: '{"transactions", "alerts", "alert_rate", "by_severity", ...}'}
      400: {$ref: '#/components/responses/BadRequest'}
    """
    p = call.params()
    since, until = p.time("since"), p.time("until")
    where, args = p.time_range("ts")
    cond = (" WHERE " + " AND ".join(where)) if where else ""
    conn = call.conn

    def grouped(sql: str) -> dict[str, int]:
        return {str(k): int(n) for k, n in conn.execute(sql, args)}

    transactions = conn.execute(f"SELECT count(*) FROM transactions{cond}", args).fetchone()[0]
    alerts = conn.execute(f"SELECT count(*) FROM alerts{cond}", args).fetchone()[0]
    tx_hours = grouped(f"SELECT CAST(ts / 3600 AS INTEGER) % 24 AS h, count(*) "
                       f"FROM transactions{cond} GROUP BY h")
    alert_hours = grouped(f"SELECT CAST(ts / 3600 AS INTEGER) % 24 AS h, count(*) "
                          f"FROM alerts{cond} GROUP BY h")
    by_hour = [{"hour_utc": h, "transactions": tx_hours.get(str(h), 0),
                "alerts": alert_hours.get(str(h), 0),
                "alert_rate": round(alert_hours.get(str(h), 0) / tx_hours[str(h)], 6)
                if tx_hours.get(str(h)) else 0.0} for h in range(24)]
    latest = conn.execute("SELECT model_version, rules_version FROM transactions "
                          "ORDER BY rowid DESC LIMIT 1").fetchone()
    return {
        "since": since, "until": until,
        "transactions": transactions, "alerts": alerts,
        "alert_rate": round(alerts / transactions, 6) if transactions else 0.0,
        "by_severity": grouped(f"SELECT severity, count(*) FROM alerts{cond} GROUP BY 1"),
        "by_status": grouped(f"SELECT status, count(*) FROM alerts{cond} GROUP BY 1"),
        "by_reason": grouped(f"SELECT j.value, count(*) FROM alerts, json_each(alerts.reasons)"
                             f" AS j{cond} GROUP BY 1"),
        "top_terminals": [{"terminal_id": t, "alerts": n} for t, n in conn.execute(
            f"SELECT terminal_id, count(*) AS n FROM alerts{cond} GROUP BY 1 "
            "ORDER BY n DESC, terminal_id LIMIT 20", args)],
        "by_hour": by_hour,
        "dead_letters": conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0],
        "model_version": {"configured": call.api.settings.model_version,
                          "last_scored": latest[0] if latest else None},
        "rules_version": {"running": rules_in_force(call.api.settings),
                          "last_scored": latest[1] if latest else None},
    }


def rules_in_force(settings: Settings) -> str | None:
    """The version of the rules file the scorer reads (a deployed one, else the shipped one;
    rulebook.rules_path), or None when it cannot be read: the scorer then keeps the rules it
    had, and ``last_scored`` says which."""
    try:
        return rulebook.load(rulebook.rules_path(settings)).version
    except rulebook.RulesError:
        return None
