"""The alert outbox as the dispatcher sees it: routing new alerts to destinations, the
deliveries still to make, and marking each one sent or failed.

The scorer writes one ``alert_outbox`` row per alert in the same SQLite transaction as the
alert (``Store.save_batch``). The dispatcher turns each into one ``alert_deliveries`` row per
destination its severity is routed to, and marks a delivery sent right after the destination
accepted it, in a transaction of its own. A crash in between sends it again once: delivery is
at least once, and not again once marked.

Every write here is a short transaction on the dispatcher's own connection, so the scorer's
writer waits at most for one of them (``busy_timeout`` covers it); reads never block it (WAL).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ..scoring.explain import StoredTransaction, unusual
from ..scoring.features import FEATURES, FEATURES_VERSION
from ..store import decode_features, open_db
from .messages import AlertView

DISPATCHER = "alerts"
"""The one dispatcher per database (its cursor's name)."""
UNROUTED = ("SELECT count(*) FROM alert_outbox WHERE alert_id > "
            "coalesce((SELECT max(routed_upto) FROM alert_outbox_cursor), 0)")
"""Outbox rows the dispatcher has not routed yet (a query any connection can run)."""
ROUTE_BATCH = 2000
"""Most outbox rows routed per transaction, so the write lock is never held for long."""

_decode_list = msgspec.json.Decoder(list[str])

_VIEW = ("SELECT a.alert_id, a.severity, a.risk, a.created_at, a.ts, a.account_id, "
         "a.terminal_id, t.branch, t.amount, t.currency, a.reasons, t.details, t.decision, "
         "t.channel, t.location, t.merchant_category, e.explanation, t.features, "
         "t.features_version, t.label_features FROM alert_deliveries d "
         "JOIN alerts a ON a.alert_id = d.alert_id "
         "JOIN transactions t ON t.transaction_id = a.transaction_id "
         "LEFT JOIN alert_explanations e ON e.transaction_id = a.transaction_id ")


@dataclass(frozen=True, slots=True)
class Route:
    """Alerts of ``severity`` go to ``destination``; ``digest`` ones wait for the digest."""

    severity: str
    destination: str
    digest: bool


@dataclass(frozen=True, slots=True)
class FailedDelivery:
    alert_id: int
    destination: str
    label: str
    severity: str
    created_at: float
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    """Totals for metrics and ``alerts status``, all from the database (so they are the same
    whichever process asks, and survive restarts)."""

    unrouted: int
    pending: int
    sent: int
    failed: int
    retried: int
    """Failed attempts that were (or will be) tried again."""
    oldest_pending_at: float | None
    """Creation time of the oldest alert with a delivery still to make."""
    oldest_unrouted_at: float | None
    """Creation time of the oldest alert the dispatcher has not yet routed."""

    def oldest_undelivered(self, routing: bool = True) -> float | None:
        """The oldest alert still to be delivered. Unrouted alerts count only when
        ``routing``: with no destination configured nothing routes them, and they are not
        owed to anyone."""
        times = [t for t in (self.oldest_pending_at,
                             self.oldest_unrouted_at if routing else None) if t is not None]
        return min(times) if times else None


class Outbox:
    """The dispatcher's connection to the node database (one per thread)."""

    def __init__(self, path: Path) -> None:
        self.conn = open_db(path).conn

    def close(self) -> None:
        self.conn.close()

    # --- routing ------------------------------------------------------------------------

    def register(self, labels: dict[str, str]) -> None:
        """Record what each destination key stands for (secrets masked), for people."""
        with self.conn:
            self.conn.executemany(
                "INSERT INTO alert_destinations (destination, label) VALUES (?, ?) "
                "ON CONFLICT (destination) DO UPDATE SET label = excluded.label",
                list(labels.items()))

    def routed_upto(self) -> int:
        """The last outbox row (alert id) whose deliveries are made."""
        row = self.conn.execute("SELECT routed_upto FROM alert_outbox_cursor WHERE "
                                "dispatcher = ?", (DISPATCHER,)).fetchone()
        return int(row[0]) if row else 0

    def route(self, routes: Sequence[Route], digest_interval: float,
              limit: int = ROUTE_BATCH) -> int:
        """Make the deliveries of up to ``limit`` new outbox rows, oldest first, in one
        transaction (one statement for every route). Immediate deliveries are due at once
        (the dispatcher's throttle decides when a burst goes out); digest ones at the end of
        the digest interval the alert fell in. A severity without a route goes nowhere.
        Returns rows routed."""
        conn = self.conn
        with conn:
            after = self.routed_upto()
            row = conn.execute(
                "SELECT max(alert_id), count(*) FROM (SELECT alert_id FROM alert_outbox "
                "WHERE alert_id > ? ORDER BY alert_id LIMIT ?)", (after, limit)).fetchone()
            upto, count = row[0], int(row[1])
            if not count:
                return 0
            if routes:
                values = ", ".join("(?, ?, ?)" for _ in routes)
                conn.execute(
                    f"WITH r (severity, destination, digest) AS (VALUES {values}) "
                    "INSERT OR IGNORE INTO alert_deliveries (destination, alert_id, digest, "
                    "due_at, created_at) SELECT r.destination, a.alert_id, r.digest, "
                    "CASE WHEN r.digest THEN (CAST(a.created_at / ? AS INTEGER) + 1) * ? "
                    "ELSE a.created_at END, a.created_at "
                    "FROM alert_outbox o JOIN alerts a ON a.alert_id = o.alert_id "
                    "JOIN r ON r.severity = a.severity WHERE o.alert_id > ? AND o.alert_id <= ?",
                    [x for r in routes for x in (r.severity, r.destination, int(r.digest))]
                    + [digest_interval, digest_interval, after, upto])
            conn.execute(
                "INSERT INTO alert_outbox_cursor (dispatcher, routed_upto, updated_at) "
                "VALUES (?, ?, ?) ON CONFLICT (dispatcher) DO UPDATE SET "
                "routed_upto = excluded.routed_upto, updated_at = excluded.updated_at",
                (DISPATCHER, upto, time.time()))
        return count

    # --- what to send -------------------------------------------------------------------

    def anything_due(self, destination: str, now: float) -> bool:
        """Cheap check (an index seek) before reading alerts to send."""
        for digest in (0, 1):
            if self.conn.execute(
                    "SELECT 1 FROM alert_deliveries WHERE destination = ? AND digest = ? "
                    "AND state = 'pending' AND due_at <= ? LIMIT 1",
                    (destination, digest, now)).fetchone():
                return True
        return False

    def pending(self, destination: str, digest: bool, due_by: float | None,
                limit: int) -> list[AlertView]:
        """Pending alerts for ``destination``, oldest first; with ``due_by`` only those due
        by then (digests), otherwise all of them (so a burst goes out whole)."""
        sql = _VIEW + ("WHERE d.destination = ? AND d.digest = ? AND d.state = 'pending' "
                       + ("AND d.due_at <= ? " if due_by is not None else "")
                       + "ORDER BY d.due_at, d.alert_id LIMIT ?")
        params: tuple[object, ...] = ((destination, int(digest), due_by, limit)
                                      if due_by is not None else
                                      (destination, int(digest), limit))
        return [_view(r) for r in self.conn.execute(sql, params)]

    # --- outcomes -----------------------------------------------------------------------

    def mark_sent(self, destination: str, alert_ids: Iterable[int]) -> None:
        """The destination accepted the message carrying these alerts: never again."""
        now = time.time()
        with self.conn:
            self.conn.executemany(
                "UPDATE alert_deliveries SET state = 'sent', sent_at = ?, "
                "attempts = attempts + 1 WHERE destination = ? AND alert_id = ? "
                "AND state = 'pending'", [(now, destination, i) for i in alert_ids])

    def mark_attempt_failed(self, destination: str, alert_ids: Iterable[int], error: str,
                            max_age: float) -> list[int]:
        """Record a failed attempt at these alerts. Then every alert pending for this
        destination and older than ``max_age`` becomes failed (no more retries): the
        destination has just failed, and they are past their time. Returns their ids."""
        now = time.time()
        with self.conn:
            self.conn.executemany(
                "UPDATE alert_deliveries SET attempts = attempts + 1, last_error = ? "
                "WHERE destination = ? AND alert_id = ? AND state = 'pending'",
                [(error[:500], destination, i) for i in alert_ids])
            expired = [int(r[0]) for r in self.conn.execute(
                "UPDATE alert_deliveries SET state = 'failed', "
                "last_error = coalesce(last_error, ?) WHERE destination = ? "
                "AND state = 'pending' AND created_at <= ? RETURNING alert_id",
                (f"not attempted before the destination failed: {error[:400]}", destination,
                 now - max_age))]
        return sorted(expired)

    # --- reads for people and metrics ---------------------------------------------------

    def counts(self, owed_to: Collection[str] | None = None) -> OutboxCounts:
        """The totals. ``owed_to``: the destination keys configured now, when known. Pending
        deliveries to any other destination (one configured once and since removed) are
        owed to nobody, since no dispatcher will ever make them: they are left out of the
        queue and its age. The counters (sent, failed, retried) stay totals over every
        destination, so they never go down."""
        conn = self.conn
        after = self.routed_upto()
        unrouted = conn.execute(
            "SELECT count(*) FROM alert_outbox WHERE alert_id > ?", (after,)).fetchone()[0]
        by_state = dict.fromkeys(("pending", "sent", "failed"), 0)
        retried = 0
        for state, n, attempts in conn.execute(
                "SELECT state, count(*), sum(attempts) FROM alert_deliveries GROUP BY state"):
            by_state[state] = int(n)
            if state == "pending":
                retried += int(attempts or 0)
            elif state == "sent":
                retried += int(attempts or 0) - int(n)
        owed = (None if owed_to is None else json.dumps(sorted(owed_to)),)
        pending, pending_at = conn.execute(
            "SELECT count(*), min(created_at) FROM alert_deliveries WHERE state = 'pending' "
            "AND (?1 IS NULL OR destination IN (SELECT value FROM json_each(?1)))",
            owed).fetchone()
        unrouted_at = conn.execute(
            "SELECT min(a.created_at) FROM alert_outbox o JOIN alerts a "
            "ON a.alert_id = o.alert_id WHERE o.alert_id > ?", (after,)).fetchone()[0]
        return OutboxCounts(int(unrouted), int(pending), by_state["sent"],
                            by_state["failed"], retried, pending_at, unrouted_at)

    def failed(self, limit: int = 100) -> list[FailedDelivery]:
        """Deliveries given up on, newest first: the dead-letter view."""
        rows = self.conn.execute(
            "SELECT d.alert_id, d.destination, coalesce(l.label, d.destination), a.severity, "
            "d.created_at, d.attempts, d.last_error FROM alert_deliveries d "
            "JOIN alerts a ON a.alert_id = d.alert_id "
            "LEFT JOIN alert_destinations l ON l.destination = d.destination "
            "WHERE d.state = 'failed' ORDER BY d.alert_id DESC LIMIT ?", (limit,))
        return [FailedDelivery(*r) for r in rows]


def _view(r: Any) -> AlertView:
    """A row of ``_VIEW`` (its first 16 columns are AlertView's fields, in order). The
    plain-words sentences are made here, from the stored features (explain.unusual); an
    alert stored before issue 16 has them in its stored explanation."""
    values = list(r[:17])
    values[10] = _decode_list.decode(values[10])
    values[11] = _decode_list.decode(values[11])
    stored, features, version, label_features = r[16:20]
    if stored:
        values[16] = list(json.loads(stored).get("unusual", []))
    elif version == FEATURES_VERSION and len(row := decode_features(features)) == len(FEATURES):
        if label_features is not None:
            row += decode_features(label_features)
        values[16] = unusual(StoredTransaction(values[8], values[14], values[15]), row)
    else:
        values[16] = []
    return AlertView(*values)
