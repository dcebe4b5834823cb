"""Cases and casework as events between databases (issues 19 and 20): the data side of
operations/case_flows.py, which carries them over JetStream.

Two flows, each the same on a site of several scorer machines and between branches and a
regional hub:

- **raised**, from where transactions are scored to where cases are worked: each new alert
  as a :class:`Raised` event, carrying what its case page is made from: the alert's row and
  the account's transactions up to and including the alerted one (``CONTEXT_ROWS`` of them,
  every column: features, verdicts, branch) and its explanation, made where it was scored,
  so the case file, its baseline, timeline and terminals, and its explanation read the
  same at the analyst place as where it was scored. :func:`apply_raised` stores it: rows
  and alert each once, keyed by transaction id, so applying an event again changes nothing.
- **worked**, back from where cases are worked: each disposition that makes a label, each
  list entry added or removed, and each model promotion, as a :class:`Worked` event read
  from the audit trail, where every such change already is. :func:`apply_worked` makes the
  same change where the transactions are scored: the label (audited there when it corrects
  one), the list entry (audited there, its ``origin`` recording where it came from); a
  model, which goes to the registry, is the flows' (operations/case_flows.py).

Changes applied from elsewhere are made under the actor ``<origin>/<actor>``; what this
database sends as worked is only what its own people did (actors without a ``/``), so a
change never travels back to where it came from.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Literal

import msgspec

from ..scoring.labels import set_label
from ..scoring.lists import add_entry, remove_entry
from .casefile import BASELINE_ROWS
from .dispositions import DISPOSITIONS

CONTEXT_ROWS = BASELINE_ROWS + 1
"""The account's rows a raised case carries: the alerted one and the ``BASELINE_ROWS``
before it (its baseline; its timeline is the most recent of them)."""
ALERT_COLUMNS = ("transaction_id", "created_at", "ts", "account_id", "terminal_id",
                 "severity", "risk", "reasons", "updated_at")
"""What an alert is when it is raised (its case's state starts as NEW where it lands)."""
MINUTE_GRACE_SECONDS = 10.0
WORKED_ACTIONS = ("case.change", "list.add", "list.remove", "model.promote")


class Raised(msgspec.Struct, frozen=True):
    """A new alert and the rows its case is read from."""

    origin: str
    branch: str
    alert: dict[str, Any]
    columns: list[str]
    """The transactions columns of ``rows``, as the sender's schema has them."""
    rows: list[list[Any]]
    explanation: dict[str, Any] | None = None
    """The alert's explanation, made where it was scored (with the model that scored it,
    which the place the case goes to may not have); stored there with the alert."""


class Worked(msgspec.Struct, frozen=True):
    """A change made where cases are worked, to be made where transactions are scored."""

    origin: str
    seq: int
    """The change's audit sequence at ``origin`` (its id there)."""
    kind: Literal["label", "list.add", "list.remove", "model"]
    actor: str
    at: float
    branch: str | None = None
    """For a label: the branch of its transaction (lists go to every branch)."""
    transaction_id: str | None = None
    label: int | None = None
    typology: str | None = None
    entry: dict[str, Any] | None = None
    """For a list change: the entry as the audit trail has it at ``origin``."""
    version: str | None = None
    """For a model promotion: the version put in production, its card and its ONNX file
    (filled in by the sender from its registry: operations/case_flows.py)."""
    reason: str | None = None
    card: dict[str, Any] | None = None
    onnx: bytes | None = None


class MinuteStats(msgspec.Struct, frozen=True):
    """A branch's statistics for one minute of when it stored its transactions, sent up
    once the minute is over (a branch's rows are stored in order, so it is complete)."""

    origin: str
    branch: str
    minute: int
    """Epoch seconds // 60."""
    transactions: int = 0
    declined: int = 0
    alerts: int = 0
    critical: int = 0
    high: int = 0
    warning: int = 0
    dead_letters: int = 0
    model_version: str | None = None


encode = msgspec.msgpack.Encoder().encode
decode_stats = msgspec.msgpack.Decoder(MinuteStats).decode
decode_raised = msgspec.msgpack.Decoder(Raised).decode
decode_worked = msgspec.msgpack.Decoder(Worked).decode


def cursor(conn: sqlite3.Connection, flow: str) -> int:
    """How far ``flow`` ('raised' or 'worked') has been sent from ``conn``."""
    row = conn.execute("SELECT position FROM case_flow_cursors WHERE flow = ?",
                       [flow]).fetchone()
    return int(row[0]) if row else 0


def set_cursor(conn: sqlite3.Connection, flow: str, position: int) -> None:
    """Record that ``flow`` has been sent up to ``position`` (never backwards)."""
    conn.execute("INSERT INTO case_flow_cursors (flow, position) VALUES (?, ?) "
                     "ON CONFLICT (flow) DO UPDATE SET position = excluded.position "
                 "WHERE excluded.position > position", [flow, position])


def raised_since(conn: sqlite3.Connection, after: int, origin: str, limit: int = 100
                 ) -> list[tuple[int, Raised]]:
    """The alerts after alert id ``after`` as raised events, with their alert ids, oldest
    first (read them in one read transaction)."""
    columns = [c for (c,) in conn.execute("SELECT name FROM pragma_table_info('transactions')")]
    out = []
    for alert_id, *values in conn.execute(
            f"SELECT alert_id, {', '.join(ALERT_COLUMNS)} FROM alerts "  # noqa: S608
            "WHERE alert_id > ? ORDER BY alert_id LIMIT ?", [after, limit]).fetchall():
        alert = dict(zip(ALERT_COLUMNS, values))
        rows = conn.execute(
            f"SELECT {', '.join(columns)} FROM transactions "  # noqa: S608 - the table's
            "WHERE account_id = ? AND (ts < ? OR transaction_id = ?) "
            "ORDER BY ts DESC LIMIT ?",
            [alert["account_id"], alert["ts"], alert["transaction_id"], CONTEXT_ROWS]
        ).fetchall()
        tid, branch = columns.index("transaction_id"), columns.index("branch")
        home = next((r[branch] for r in rows if r[tid] == alert["transaction_id"]), "")
        out.append((int(alert_id), Raised(origin=origin, branch=str(home), alert=alert,
                                          columns=columns, rows=[list(r) for r in rows])))
    return out


def apply_raised(conn: sqlite3.Connection, event: Raised, outbox: bool) -> bool:
    """Store ``event`` inside the caller's transaction: its rows (those not stored yet, in
    the columns both schemas have) and its alert, with an outbox row when ``outbox`` (the
    place that delivers alerts). Returns whether the alert is new here."""
    mine = {c for (c,) in conn.execute("SELECT name FROM pragma_table_info('transactions')")}
    keep = [i for i, c in enumerate(event.columns) if c in mine]
    names = ", ".join(event.columns[i] for i in keep)
    conn.executemany(
        f"INSERT OR IGNORE INTO transactions ({names}) "  # noqa: S608 - checked names
        f"VALUES ({', '.join('?' * len(keep))})",
        [[row[i] for i in keep] for row in reversed(event.rows)])  # oldest first, as scored
    alert = event.alert
    inserted = conn.execute(
        f"INSERT OR IGNORE INTO alerts ({', '.join(ALERT_COLUMNS)}) "  # noqa: S608 - constant
        f"VALUES ({', '.join('?' * len(ALERT_COLUMNS))})",
        [alert[c] for c in ALERT_COLUMNS]).rowcount == 1
    if event.explanation is not None:
        conn.execute("INSERT OR IGNORE INTO alert_explanations (transaction_id, explanation, "
                     "created_at) VALUES (?, ?, ?)",
                     [alert["transaction_id"], json.dumps(event.explanation),
                      alert["created_at"]])
    if inserted and outbox:
        conn.execute("INSERT INTO alert_outbox (alert_id) SELECT alert_id FROM alerts "
                     "WHERE transaction_id = ?", [alert["transaction_id"]])
    return inserted


def minutes_since(conn: sqlite3.Connection, after: int, now: float, origin: str,
                  branch: str) -> list[MinuteStats]:
    """The statistics of every minute after minute ``after`` that was over
    ``MINUTE_GRACE_SECONDS`` before ``now`` (its last batches committed), one
    per minute with any transaction, alert or dead letter, oldest first. Rows are found by
    their stored time through rowid ranges (the tables are in the order they were stored),
    so a minute costs what it holds, not the table's size."""
    start, end = (after + 1) * 60.0, (int(now - MINUTE_GRACE_SECONDS) // 60) * 60.0
    if end <= start:
        return []
    first = _first_rowid(conn, "transactions", "stored_at", start)
    minutes: dict[int, dict[str, Any]] = {}
    for minute, count, declined, model in conn.execute(
            "SELECT CAST(stored_at / 60 AS INTEGER) AS m, count(*), "
            "sum(decision = 'decline'), max(model_version) FROM transactions "
            "WHERE rowid >= ? AND stored_at >= ? AND stored_at < ? GROUP BY m",
            [first, start, end]):
        minutes.setdefault(minute, {}).update(transactions=count, declined=declined or 0,
                                              model_version=model)
    first = _first_rowid(conn, "alerts", "created_at", start)
    for minute, severity, count in conn.execute(
            "SELECT CAST(created_at / 60 AS INTEGER) AS m, severity, count(*) FROM alerts "
            "WHERE rowid >= ? AND created_at >= ? AND created_at < ? GROUP BY m, severity",
            [first, start, end]):
        row = minutes.setdefault(minute, {})
        row["alerts"] = row.get("alerts", 0) + count
        if severity in ("CRITICAL", "HIGH", "WARNING"):
            row[severity.lower()] = count
    for minute, count in conn.execute(
            "SELECT CAST(received_at / 60 AS INTEGER) AS m, count(*) FROM dead_letters "
            "WHERE received_at >= ? AND received_at < ? GROUP BY m", [start, end]):
        minutes.setdefault(minute, {})["dead_letters"] = count
    return [MinuteStats(origin=origin, branch=branch, minute=m, **minutes[m])
            for m in sorted(minutes)]


def _first_rowid(conn: sqlite3.Connection, table: str, column: str, at: float) -> int:
    """The first rowid of ``table`` whose ``column`` (non-decreasing in rowid order) is at
    or after ``at``, by binary search on the rowid (the table has no index on it)."""
    low, high = conn.execute(
        f"SELECT min(rowid), max(rowid) FROM {table}").fetchone()  # noqa: S608 - constant
    if low is None:
        return 0
    while low < high:
        mid = (low + high) // 2
        row = conn.execute(f"SELECT {column} FROM {table} WHERE rowid >= ? "  # noqa: S608
                           "ORDER BY rowid LIMIT 1", [mid]).fetchone()
        if row is None or row[0] >= at:
            high = mid
        else:
            low = mid + 1
    return int(low)


def apply_stats(conn: sqlite3.Connection, stats: MinuteStats) -> None:
    """Store a branch's minute inside the caller's transaction (again: the same row)."""
    conn.execute(
        "INSERT OR REPLACE INTO branch_minutes (branch, minute, transactions, declined, "
        "alerts, critical, high, warning, dead_letters, model_version) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [stats.branch, stats.minute, stats.transactions, stats.declined, stats.alerts,
         stats.critical, stats.high, stats.warning, stats.dead_letters,
         stats.model_version])


def worked_since(conn: sqlite3.Connection, after: int, origin: str, limit: int = 500
                 ) -> tuple[int, list[Worked]]:
    """The changes to send after audit sequence ``after``: labels made by dispositions and
    list changes, made here by this place's own people. Returns the last sequence read (to
    store as the cursor once the events are sent) and the events."""
    entries = conn.execute(
        "SELECT seq, at, actor, action, subject, before, after FROM audit_log WHERE seq > ? "
        "ORDER BY seq LIMIT ?", [after, limit]).fetchall()
    out = []
    for seq, at, actor, action, subject, before, after_json in entries:
        if action not in WORKED_ACTIONS or "/" in actor:
            continue
        new = msgspec.json.decode(after_json) if after_json else {}
        if action == "case.change":
            event = _label_of(conn, seq, at, actor, subject, before, new, origin)
            if event is not None:
                out.append(event)
        elif action == "model.promote":
            out.append(Worked(origin=origin, seq=seq, kind="model", actor=actor, at=at,
                              version=subject.removeprefix("model:"),
                              reason=new.get("reason")))
        else:
            out.append(Worked(origin=origin, seq=seq, kind=action, actor=actor, at=at,
                              entry=new if action == "list.add"
                              else msgspec.json.decode(before or "{}") | new))
    return (int(entries[-1][0]) if entries else after), out


def _label_of(conn: sqlite3.Connection, seq: int, at: float, actor: str, subject: str,
              before: str | None, after: dict[str, Any], origin: str) -> Worked | None:
    """The label a ``case.change`` made, if it disposed the case (a close or re-dispose)."""
    code = after.get("disposition")
    old = msgspec.json.decode(before) if before else {}
    if code is None or (code, after.get("fraud_type")) == (old.get("disposition"),
                                                         old.get("fraud_type")):
        return None
    row = conn.execute("SELECT a.transaction_id, t.branch FROM alerts a LEFT JOIN "
                       "transactions t USING (transaction_id) WHERE a.alert_id = ?",
                       [int(subject.removeprefix("alert:"))]).fetchone()
    if row is None:
        return None
    return Worked(origin=origin, seq=seq, kind="label", actor=actor, at=at, branch=row[1],
                  transaction_id=row[0], label=DISPOSITIONS[code].label,
                  typology=after.get("fraud_type"))


def apply_worked(conn: sqlite3.Connection, event: Worked) -> str:
    """Make ``event``'s change inside the caller's transaction, as ``<origin>/<actor>``.
    Idempotent: a label already so is unchanged, an entry already added or removed is left.
    Returns what was done (for the log)."""
    actor = f"{event.origin}/{event.actor}"
    if event.kind == "model":
        return "not here"  # a model goes to the registry: operations/case_flows.py
    if event.kind == "label":
        if event.transaction_id is None or event.label is None:
            return "incomplete"
        return set_label(conn, event.transaction_id, event.label, event.typology, actor,
                         event.at)
    entry = event.entry or {}
    origin = f"{event.origin}:{entry.get('entry_id')}"
    if event.kind == "list.add":
        if conn.execute("SELECT 1 FROM list_entries WHERE origin = ?", [origin]).fetchone():
            return "unchanged"
        expires = entry.get("expires_at")
        if expires is not None and expires <= time.time():
            return "expired"
        added = add_entry(conn, entry["list"], entry["kind"], entry["value"], entry["reason"],
                          actor, expires)
        conn.execute("UPDATE list_entries SET origin = ? WHERE entry_id = ?",
                     [origin, added["entry_id"]])
        return "added"
    row = conn.execute("SELECT entry_id, removed_at FROM list_entries WHERE origin = ?",
                       [origin]).fetchone()
    if row is None or row[1] is not None:
        return "unchanged"
    remove_entry(conn, int(row[0]), actor)
    return "removed"
