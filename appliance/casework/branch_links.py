"""At a regional hub: each branch's link, as the hub's analyst side last saw it
(operations/case_flows.py watches; the API and console read).

A branch is **connected** while its leaf link is up, **lagging** when it is up and holds
cases the hub has not stored yet (``lag`` of them), and **down** since the moment the hub
saw it go. ``since`` changes only when the link comes up or goes down, so "down since" is
when it went, not when the hub last looked.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

STALE_SECONDS = 30.0
"""A reading older than this is shown as not known: the hub's analyst side is not running."""


@dataclass(frozen=True)
class LinkReading:
    branch: str
    connected: bool
    lag: int | None
    last_heard: float | None


def record(conn: sqlite3.Connection, readings: list[LinkReading], now: float) -> None:
    """Store one look at every branch's link inside the caller's transaction, keeping
    ``since`` unless the link came up or went down."""
    for r in readings:
        conn.execute(
            "INSERT INTO branch_links (branch, connected, since, lag, last_heard, checked_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (branch) DO UPDATE SET "
            "since = CASE WHEN connected = excluded.connected THEN since ELSE excluded.since "
            "END, connected = excluded.connected, lag = excluded.lag, "
            "last_heard = excluded.last_heard, checked_at = excluded.checked_at",
            [r.branch, int(r.connected), now, r.lag, r.last_heard, now])


def links(conn: sqlite3.Connection, now: float | None = None) -> list[dict[str, Any]]:
    """Every branch's link, by branch: ``state`` is ``connected``, ``lagging``, ``down`` or
    ``unknown`` (no recent reading), with ``since``, ``lag``, ``last_heard`` and
    ``checked_at`` (epoch seconds), and ``last_hour``: the branch's transactions, declines,
    alerts, critical and high alerts over the last 60 minutes it sent (None before any)."""
    now = time.time() if now is None else now
    hour = {b: {"transactions": t, "declined": d, "alerts": a, "critical": c, "high": h}
            for b, t, d, a, c, h in conn.execute(
                "SELECT branch, sum(transactions), sum(declined), sum(alerts), sum(critical), "
                "sum(high) FROM branch_minutes WHERE minute >= ? GROUP BY branch",
                [int(now // 60) - 60])}
    out = []
    for branch, connected, since, lag, heard, checked in conn.execute(
            "SELECT branch, connected, since, lag, last_heard, checked_at FROM branch_links "
            "ORDER BY branch"):
        if now - checked > STALE_SECONDS:
            state = "unknown"
        elif not connected:
            state = "down"
        else:
            state = "lagging" if lag else "connected"
        out.append({"branch": branch, "state": state, "since": since, "lag": lag,
                    "last_heard": heard, "checked_at": checked,
                    "last_hour": hour.get(branch)})
    return out


def link_text(link: dict[str, Any], now: float | None = None) -> str:
    """One link as a person reads it: ``br1: connected``, ``br2: lagging by 40 cases``,
    ``br3: down since 14:02:10 UTC (3 min)``, each followed by the last hour's
    transactions and alerts once the branch has sent a minute."""
    now = time.time() if now is None else now
    name, state = link["branch"], link["state"]
    if state == "lagging":
        text = f"{name}: lagging by {link['lag']} case{'s' if link['lag'] != 1 else ''}"
    elif state == "down":
        at = time.strftime("%H:%M:%S", time.gmtime(link["since"]))
        minutes = int((now - link["since"]) // 60)
        text = f"{name}: down since {at} UTC ({minutes} min)"
    elif state == "unknown":
        text = f"{name}: not known (the hub's analyst side is not running)"
    else:
        text = f"{name}: connected"
    hour = link.get("last_hour")
    if hour:
        text += f" · last hour {hour['transactions']} tx, {hour['alerts']} alerts"
    return text
