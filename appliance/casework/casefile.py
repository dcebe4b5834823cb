"""Everything an analyst reads to decide one case, in one call: the alert, its transaction,
the reasons (each a sentence with the values and thresholds that fired it), the features
against the account's own baseline, the account's timeline and terminals, the related open
alerts, the notes and the case's audit history.

The baseline of a feature is its mean over the account's previous ``BASELINE_ROWS``
transactions (event time before this one), read from the feature vectors stored with them,
so it is what the account looked like, not what the whole branch looks like.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from ..audit import entry_dict
from ..scoring.explain import Explainer
from ..scoring.registry import Registry
from ..settings import Settings
from ..store import decode_features
from ..scoring.features import HORIZON, VERSIONS
from ..transaction import UNSAFE_TEXT
from .cases import ALERT_SELECT, alert_row
from .numbers import number_text

BASELINE_ROWS = 100
TIMELINE_ROWS = 50
TX_COLUMNS = ("transaction_id", "branch", "account_id", "terminal_id", "amount", "currency",
              "ts", "utc_offset", "channel", "merchant_category", "location", "features",
              "features_version", "model_risk", "risk", "severity", "decision", "reasons",
              "details", "model_version", "rules_version", "stored_at", "sent_amount",
              "sent_currency")
"""``amount`` and ``currency`` are the node's; ``sent_amount`` and ``sent_currency`` what the
terminal sent, when it was another currency (else None): schema m011."""
_list = msgspec.json.Decoder(list[Any])
_PLAIN = Explainer(None)


def explainer_for(settings: Settings) -> Explainer:
    """The explainer a reading process keeps: models from the node's registry, read once."""
    return Explainer(Registry.of(settings))


def case_file(conn: sqlite3.Connection, alert_id: int,
              explainer: Explainer | None = None) -> dict[str, Any] | None:
    """The case of ``alert_id`` (see module doc), or None when there is no such alert.
    The explanation is made now, by ``explainer`` (without one: rules and sentences only)."""
    row = conn.execute(ALERT_SELECT + " WHERE a.alert_id = ?", (alert_id,)).fetchone()
    if row is None:
        return None
    alert = alert_row(row)
    tx, values, reasons = _stored_transaction(conn, alert["transaction_id"])
    names = VERSIONS.get(tx.get("features_version", ""))
    return {
        "alert": alert,
        "transaction": tx,
        "reasons": reasons,
        "features": _against_baseline(conn, tx, values, names) if names else [],
        "explanation": ((explainer or _PLAIN).of(conn, alert["transaction_id"]) if tx
                        else None),
        "timeline": timeline(conn, alert["account_id"]),
        "terminals": terminals_used(conn, alert["account_id"]),
        "related": {scope: related_alerts(conn, alert, scope)
                    for scope in ("account", "terminal")},
        "notes": notes(conn, alert_id),
        "history": history(conn, alert_id),
    }


def alert_transaction(conn: sqlite3.Connection, transaction_id: str,
                      explainer: Explainer | None = None) -> dict[str, Any]:
    """An alert's transaction as the API shows it: the stored row (without the encoded
    features, reasons and details), its features by name (``{"values": [...]}`` under a
    features version this code does not know), its reasons as code and detail, and the
    explanation stored with the alert. All empty when the row is gone (retention)."""
    tx, values, reasons = _stored_transaction(conn, transaction_id)
    names = VERSIONS.get(tx.get("features_version", ""))
    features: dict[str, Any] = dict(zip(names, values)) if names else {}
    if tx and not names:  # a features version this code does not know: the values as stored
        features = {"values": values}
    return {"transaction": tx, "features": features, "reasons": reasons,
            "explanation": (explainer or _PLAIN).of(conn, transaction_id) if tx else None}


def _stored_transaction(conn: sqlite3.Connection, transaction_id: str
                        ) -> tuple[dict[str, Any], list[float], list[dict[str, str]]]:
    """The stored row of ``transaction_id`` without its encoded columns, its feature values,
    and its reasons as code and detail; all empty when the row is gone (retention)."""
    row = conn.execute(f"SELECT {', '.join(TX_COLUMNS)} FROM transactions "
                       "WHERE transaction_id = ?", (transaction_id,)).fetchone()
    if row is None:
        return {}, [], []
    tx = dict(zip(TX_COLUMNS, row))
    codes, details = _list.decode(tx.pop("reasons")), _list.decode(tx.pop("details"))
    values = decode_features(tx.pop("features"))
    return tx, values, [{"code": c, "detail": d} for c, d in zip(codes, details)]


def _against_baseline(conn: sqlite3.Connection, tx: dict[str, Any], values: list[float],
                      names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each feature against its mean over the account's previous rows (of any version that
    has it: every version is a prefix of the next)."""
    previous = [decode_features(f) for (f,) in conn.execute(
        "SELECT features FROM transactions WHERE account_id = ? AND ts < ? "
        f"AND features_version IN ({', '.join('?' * len(VERSIONS))}) ORDER BY ts DESC LIMIT ?",
        (tx["account_id"], tx["ts"], *VERSIONS, BASELINE_ROWS))]
    out = []
    for i, name in enumerate(names):
        having = [p[i] for p in previous if len(p) > i]
        out.append({"name": name, "value": values[i],
                    "baseline": sum(having) / len(having) if having else None,
                    "baseline_rows": len(having)})
    return out


def timeline(conn: sqlite3.Connection, account_id: str, limit: int = TIMELINE_ROWS
             ) -> list[dict[str, Any]]:
    """The account's most recent transactions, oldest first (to plot left to right)."""
    columns = ("transaction_id", "ts", "amount", "currency", "terminal_id", "location",
               "merchant_category", "risk", "severity", "decision")
    rows = [dict(zip(columns, r)) for r in conn.execute(
        f"SELECT {', '.join(columns)} FROM transactions WHERE account_id = ? "
        "ORDER BY ts DESC LIMIT ?", (account_id, limit))]
    return rows[::-1]


def terminals_used(conn: sqlite3.Connection, account_id: str) -> list[dict[str, Any]]:
    """Each terminal the account used: where it is (the transactions' location, and the
    terminal directory's name and coordinates, None when it has none), how often, when last."""
    used = [{"terminal_id": t, "location": loc, "transactions": n, "last_ts": last}
            for t, loc, n, last in conn.execute(
                "SELECT terminal_id, max(location), count(*), max(ts) FROM transactions "
                "WHERE account_id = ? GROUP BY terminal_id ORDER BY count(*) DESC",
                (account_id,))]
    ids = [u["terminal_id"] for u in used]
    places = {t: (name, lat, lon) for t, name, lat, lon in conn.execute(
        f"SELECT terminal_id, name, latitude, longitude FROM terminals WHERE terminal_id "
        f"IN ({', '.join('?' * len(ids))})", ids)} if ids else {}
    for u in used:
        u["name"], u["latitude"], u["longitude"] = places.get(u["terminal_id"],
                                                              (None, None, None))
    return used


def related_alerts(conn: sqlite3.Connection, alert: dict[str, Any], scope: str
                   ) -> list[dict[str, Any]]:
    """The other open alerts on the same account or terminal, newest first."""
    column = {"account": "account_id", "terminal": "terminal_id"}[scope]
    return [alert_row(r) for r in conn.execute(
        ALERT_SELECT + f" WHERE a.{column} = ? AND a.status IN ('NEW', 'INVESTIGATING') "
        "AND a.alert_id != ? ORDER BY a.alert_id DESC LIMIT 200",
        (alert[column], alert["alert_id"]))]


def notes(conn: sqlite3.Connection, alert_id: int) -> list[dict[str, Any]]:
    return [{"note_id": n, "at": at, "author": author, "text": text}
            for n, at, author, text in conn.execute(
                "SELECT note_id, at, author, text FROM alert_notes WHERE alert_id = ? "
                "ORDER BY note_id", (alert_id,))]


def history(conn: sqlite3.Connection, alert_id: int) -> list[dict[str, Any]]:
    """The case's audit entries (status, assignee and note changes), oldest first."""
    return [entry_dict(r) for r in conn.execute(
        "SELECT seq, at, actor, action, subject, before, after, prev_hash, hash "
        "FROM audit_log WHERE subject = ? ORDER BY seq", (f"alert:{alert_id}",))]


def value_text(value: Any) -> str:
    """A stored value as the console shows it: numbers as a person writes them
    (numbers.number_text: ``12,260``, never ``1.226e+04``), None as nothing, and in text
    every control or bidirectional formatting character shown as its code (``<U+202E>``):
    rows stored before the contract refused them would otherwise show reversed or hidden
    text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return number_text(value)
    if isinstance(value, str):
        return UNSAFE_TEXT.sub(lambda m: f"<U+{ord(m.group()):04X}>", value)
    return "" if value is None else str(value)


def plain_value(name: str, value: Any, mean: bool = False) -> str:
    """A feature's value in the unit an analyst reads: a duration for the time since the
    previous transaction (capped at 7 days: 7 days or more, or none before), yes/no for the
    first-use flags (not for their ``mean`` over a baseline, a share); else a number."""
    if not isinstance(value, (int, float)):
        return value_text(value)
    if name == "seconds_since_previous":
        if value >= HORIZON:
            return "7 d or more"
        for unit, seconds in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
            if value >= 2 * seconds:
                return f"{value / seconds:.1f} {unit}"  # under 7 d: never an exponent
        return f"{value:.0f} s"
    if name.startswith("first_time_") and not mean:
        return "yes" if value else "no"
    return value_text(value)
