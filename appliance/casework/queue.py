"""The console's alert queue: filtered, searched, sorted, paged reads, and the cheap marker
the live queue polls.

The marker is ``(max(alert_id), api_generation)``: the first moves when the scorer stores
a new alert, the second when anyone changes a case, list or key (change.py bumps it in the
change's own transaction). Both are single-row reads, so polling twice a second costs
nothing; the page itself is only re-read when the marker moves.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from ..scoring.rulebook import TYPOLOGIES
from ..scoring.rules import RULES
from ..verdict import SEVERITIES
from .cases import ALERT_SELECT, STATUSES, alert_row

REASONS = (*TYPOLOGIES, *(rule.__name__ for rule in RULES), "deny_list")
"""Reason codes an alert can carry, the typologies first (allow-listed transactions raise
no alert)."""
SORTS = {
    "newest": "a.alert_id DESC",
    "oldest": "a.alert_id ASC",
    "risk": "a.risk DESC, a.alert_id DESC",
    "event_time": "a.ts DESC, a.alert_id DESC",
}
UNASSIGNED = "(unassigned)"
BRANCH_FILTER = ("a.transaction_id IN (SELECT transaction_id FROM transactions "
                 "WHERE branch = ?)")
"""An alert of one branch: its transaction's (the queue's and the API's filter)."""


@dataclass(frozen=True)
class QueueQuery:
    """What the analyst asked for. Empty tuples and None mean "any"."""

    statuses: tuple[str, ...] = ("NEW", "INVESTIGATING")
    severities: tuple[str, ...] = ()
    reason: str | None = None
    min_risk: float | None = None
    max_risk: float | None = None
    since: float | None = None
    """Event time at or after this (epoch seconds)."""
    until: float | None = None
    assignee: str | None = None
    """A username, or :data:`UNASSIGNED`."""
    search: str | None = None
    """An exact transaction, account or terminal id."""
    branch: str | None = None
    """Only this branch's alerts (at a regional hub)."""
    sort: str = "newest"
    page: int = 0
    page_size: int = 25


@dataclass(frozen=True)
class QueuePage:
    total: int
    alerts: list[dict[str, Any]]

    def pages(self, page_size: int) -> int:
        return max(1, -(-self.total // page_size))


def _where(q: QueueQuery) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for values, column, allowed in ((q.statuses, "a.status", STATUSES),
                                    (q.severities, "a.severity", SEVERITIES)):
        values = tuple(v for v in values if v in allowed)
        if values:
            where.append(f"{column} IN ({', '.join('?' * len(values))})")
            args.extend(values)
    if q.reason:
        where.append("EXISTS (SELECT 1 FROM json_each(a.reasons) WHERE value = ?)")
        args.append(q.reason)
    for bound, sql in ((q.min_risk, "a.risk >= ?"), (q.max_risk, "a.risk <= ?"),
                       (q.since, "a.ts >= ?"), (q.until, "a.ts < ?")):
        if bound is not None:
            where.append(sql)
            args.append(bound)
    if q.assignee == UNASSIGNED:
        where.append("a.assignee IS NULL")
    elif q.assignee:
        where.append("a.assignee = ?")
        args.append(q.assignee)
    if q.branch:
        where.append(BRANCH_FILTER)
        args.append(q.branch)
    if q.search and q.search.strip():
        term = q.search.strip()
        where.append("(a.transaction_id = ? OR a.account_id = ? OR a.terminal_id = ?)")
        args.extend((term, term, term))
    return (" WHERE " + " AND ".join(where)) if where else "", args


def alert_page(conn: sqlite3.Connection, q: QueueQuery) -> QueuePage:
    """One page of alerts matching ``q`` and how many match in all. An unknown sort is
    read as newest first; a page past the end is empty."""
    where, args = _where(q)
    total = int(conn.execute(f"SELECT count(*) FROM alerts a{where}", args).fetchone()[0])
    order = SORTS.get(q.sort, SORTS["newest"])
    size = max(1, min(q.page_size, 500))
    rows = conn.execute(
        f"{ALERT_SELECT}{where} "
        f"ORDER BY {order} LIMIT ? OFFSET ?", [*args, size, max(0, q.page) * size])
    return QueuePage(total, [alert_row(r) for r in rows])


def marker(conn: sqlite3.Connection) -> tuple[int, int]:
    """(newest alert id, change generation): when either moves, the queue is re-read."""
    row = conn.execute("SELECT (SELECT coalesce(max(alert_id), 0) FROM alerts), "
                       "(SELECT value FROM api_generation WHERE id = 1)").fetchone()
    return int(row[0]), int(row[1] or 0)


def newer_than(conn: sqlite3.Connection, alert_id: int, limit: int = 100
               ) -> list[dict[str, Any]]:
    """Alerts stored after ``alert_id``, oldest first (what arrived since the last poll)."""
    return [alert_row(r) for r in conn.execute(
        f"{ALERT_SELECT} WHERE a.alert_id > ? ORDER BY a.alert_id LIMIT ?", (alert_id, limit))]
