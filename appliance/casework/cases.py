"""The case workflow on alerts: statuses, allowed transitions, assignment and notes.

``NEW -> INVESTIGATING -> CONFIRMED_FRAUD | FALSE_POSITIVE``; a closed case can be reopened
(back to INVESTIGATING) by a supervisor. Every change names the version it was made
against; the row's ``version`` is bumped by each change, and a change against an older
version is refused (:class:`StaleVersion`) instead of silently overwriting what someone else
did. Each change writes one audit entry in the same transaction. Closing sets
``disposed_at`` / ``disposed_by`` (the disposition is status + time + who), which reopening
clears.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from .. import audit
from ..scoring.labels import record_disposition
from . import case_text

ALERT_COLUMNS = ("alert_id", "transaction_id", "created_at", "ts", "account_id",
                 "terminal_id", "severity", "risk", "reasons", "status", "assignee",
                 "version", "updated_at", "updated_by", "disposed_at", "disposed_by")
"""An alert as the API, the queue and the case file read it (a case is its alert's row)."""
ALERT_SELECT = f"SELECT {', '.join('a.' + c for c in ALERT_COLUMNS)} FROM alerts a"
"""The start of every query for alert rows (the table as ``a``), for :func:`alert_row`."""
_list = msgspec.json.Decoder(list[Any])
STATUSES = ("NEW", "INVESTIGATING", "CONFIRMED_FRAUD", "FALSE_POSITIVE")
OPEN_STATUSES = ("NEW", "INVESTIGATING")
CLOSED_STATUSES = ("CONFIRMED_FRAUD", "FALSE_POSITIVE")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "NEW": ("INVESTIGATING",),
    "INVESTIGATING": CLOSED_STATUSES,
    "CONFIRMED_FRAUD": ("INVESTIGATING",),  # reopen
    "FALSE_POSITIVE": ("INVESTIGATING",),   # reopen
}
CASE_COLUMNS = ("status", "assignee", "version", "updated_at", "updated_by", "disposed_at",
                "disposed_by")


def alert_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """An ``ALERT_COLUMNS`` row as a dict, its reasons decoded."""
    out = dict(zip(ALERT_COLUMNS, row))
    out["reasons"] = _list.decode(out["reasons"])
    return out


class CaseError(Exception):
    """A change that cannot be made; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 current: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.current = current


def _checked(check: Any, value: str) -> str:
    """``value`` through one of case_text's checks, a refusal as a 422 CaseError."""
    try:
        result: str = check(value)
    except case_text.TextRefused as exc:
        raise CaseError(422, exc.message, exc.field) from None
    return result


class StaleVersion(CaseError):
    def __init__(self, current: dict[str, Any]) -> None:
        super().__init__(409, "the alert was changed since that version; reload it and retry",
                         "version", current)


def is_reopen(before: str, after: str) -> bool:
    return before in CLOSED_STATUSES and after in OPEN_STATUSES


@dataclass(frozen=True)
class Change:
    """What to change: a new status, a new assignee (``unassign`` clears it), or both."""

    version: int
    status: str | None = None
    assignee: str | None = None
    unassign: bool = False


def case_of(conn: sqlite3.Connection, alert_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {', '.join(CASE_COLUMNS)} FROM alerts WHERE alert_id = ?",
                       (alert_id,)).fetchone()
    return None if row is None else dict(zip(CASE_COLUMNS, row))


def change_case(conn: sqlite3.Connection, alert_id: int, change: Change,
                actor: str) -> dict[str, Any]:
    """Apply ``change`` to one alert inside the caller's transaction; returns the new case
    state. Raises CaseError (404 unknown alert, 409 stale version, 422 not allowed or an
    assignee case_text refuses). A change that leaves status and assignee as they are is a
    no-op: the case is returned as it is, with no version bump and no audit entry."""
    assignee = None if change.assignee is None else _checked(case_text.assignee,
                                                             change.assignee)
    before = case_of(conn, alert_id)
    if before is None:
        raise CaseError(404, "no such alert", "alert_id")
    if before["version"] != change.version:
        raise StaleVersion(before)
    status = before["status"] if change.status is None else change.status
    assigned = None if change.unassign else assignee or before["assignee"]
    if status == before["status"] and assigned == before["assignee"]:
        return dict(before)
    after = dict(before, assignee=assigned)
    now = time.time()
    if status != before["status"]:
        if status not in TRANSITIONS[before["status"]]:
            raise CaseError(422, f"{before['status']} cannot become {status}; allowed: "
                            f"{', '.join(TRANSITIONS[before['status']])}", "status")
        after["status"] = status
        closing = status in CLOSED_STATUSES
        after["disposed_at"] = now if closing else None
        after["disposed_by"] = actor if closing else None
    after.update(version=before["version"] + 1, updated_at=now, updated_by=actor)
    cursor = conn.execute(
        "UPDATE alerts SET status = ?, assignee = ?, version = ?, updated_at = ?, "
        "updated_by = ?, disposed_at = ?, disposed_by = ? WHERE alert_id = ? AND version = ?",
        (after["status"], after["assignee"], after["version"], now, actor,
         after["disposed_at"], after["disposed_by"], alert_id, before["version"]))
    if cursor.rowcount != 1:  # cannot happen while this transaction holds the write lock
        raise StaleVersion(before)
    audit.append(conn, actor, "case.change", f"alert:{alert_id}",
                 _audited(before), _audited(after))
    if after["status"] != before["status"]:  # a disposition is a label for the models
        record_disposition(conn, alert_id, after["status"], actor, now)
    return after


def _audited(case: dict[str, Any]) -> dict[str, Any]:
    return {k: case[k] for k in ("status", "assignee", "version")}


def add_note(conn: sqlite3.Connection, alert_id: int, text: str, actor: str) -> dict[str, Any]:
    """Append a note to an alert (notes are never edited); audited. A note case_text
    refuses (blank, control characters) is a 422 CaseError."""
    text = _checked(case_text.note, text)
    if conn.execute("SELECT 1 FROM alerts WHERE alert_id = ?", (alert_id,)).fetchone() is None:
        raise CaseError(404, "no such alert", "alert_id")
    now = time.time()
    note_id = conn.execute("INSERT INTO alert_notes (alert_id, at, author, text) "
                           "VALUES (?, ?, ?, ?)", (alert_id, now, actor, text)).lastrowid
    audit.append(conn, actor, "case.note", f"alert:{alert_id}", None,
                 {"note_id": note_id, "text": text})
    return {"note_id": note_id, "alert_id": alert_id, "at": now, "author": actor, "text": text}


def related_open(conn: sqlite3.Connection, alert_id: int, scope: str) -> list[int]:
    """Open alerts on the same account (``scope="account"``) or terminal as ``alert_id``,
    itself included, oldest first."""
    column = {"account": "account_id", "terminal": "terminal_id"}[scope]
    return [r[0] for r in conn.execute(
        f"SELECT alert_id FROM alerts WHERE {column} = (SELECT {column} FROM alerts "
        f"WHERE alert_id = ?) AND status IN ('NEW', 'INVESTIGATING') ORDER BY alert_id",
        (alert_id,))]


def bulk_change(conn: sqlite3.Connection, alert_id: int, anchor_version: int, scope: str,
                status: str | None, assignee: str | None, actor: str) -> dict[str, Any]:
    """Apply one change to ``alert_id`` (at ``anchor_version``) and every other open alert
    on the same account or terminal, in one transaction with one audit entry per alert.
    Alerts the transition does not apply to, or that already are as asked, are left alone
    and listed as skipped."""
    if assignee is not None:
        assignee = _checked(case_text.assignee, assignee)
    anchor = case_of(conn, alert_id)
    if anchor is None:
        raise CaseError(404, "no such alert", "alert_id")
    if anchor["version"] != anchor_version:
        raise StaleVersion(anchor)
    if anchor["status"] not in OPEN_STATUSES:
        raise CaseError(422, "bulk changes apply to open alerts; reopen this one first",
                        "status")
    changed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    targets = related_open(conn, alert_id, scope)
    for target in targets:
        current = case_of(conn, target)
        if current is None:  # cannot happen: alerts are never deleted
            continue
        if status is not None and status != current["status"] and \
                status not in TRANSITIONS[current["status"]]:
            skipped.append({"alert_id": target, "status": current["status"],
                            "reason": f"{current['status']} cannot become {status}"})
            continue
        after = change_case(conn, target, Change(current["version"], status, assignee),
                            actor)
        if after["version"] == current["version"]:
            skipped.append({"alert_id": target, "status": current["status"],
                            "reason": "nothing to change"})
            continue
        changed.append({"alert_id": target, **after})
    return {"changed": changed, "skipped": skipped}
