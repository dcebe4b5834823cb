"""The case workflow on alerts: statuses, allowed transitions, assignment and notes.

``NEW -> INVESTIGATING -> CONFIRMED_FRAUD | FALSE_POSITIVE``; a closed case can be reopened
(back to INVESTIGATING) by a supervisor. Every change names the version it was made
against; the row's ``version`` is bumped by each change, and a change against an older
version is refused (:class:`StaleVersion`) instead of silently overwriting what someone else
did. Each change writes one audit entry in the same transaction.

Closing takes a disposition code (dispositions.py), which decides the closed status, and for
fraud a fraud type; it sets ``disposition``, ``fraud_type``, ``disposed_at`` and
``disposed_by``, which reopening clears, and makes the transaction's label (and typology).
A supervisor can also *re-dispose* a closed case (a new code or fraud type, without
reopening it); when that changes the label, the label is corrected and the correction
audited (scoring/labels.py ``set_label``).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from .. import audit
from ..scoring.labels import set_label
from . import case_text
from .dispositions import DISPOSITIONS, problem

ALERT_COLUMNS = ("alert_id", "transaction_id", "created_at", "ts", "account_id",
                 "terminal_id", "severity", "risk", "reasons", "status", "assignee",
                 "version", "updated_at", "updated_by", "disposed_at", "disposed_by",
                 "disposition", "fraud_type")
"""An alert as the API, the queue and the case file read it (a case is its alert's row)."""
QUEUE_TX_COLUMNS = ("amount", "currency", "channel", "merchant_category", "location",
                    "branch")
"""What an analyst reads of the transaction in a queue row (NULL once retention purged it):
the node's amount and currency, the channel, where (merchant category, location), and the
branch (at a regional hub, the queue holds every branch's alerts: docs/hub.md)."""
ALERT_SELECT = (f"SELECT {', '.join('a.' + c for c in ALERT_COLUMNS)}, "
                f"{', '.join('t.' + c for c in QUEUE_TX_COLUMNS)} FROM alerts a "
                "LEFT JOIN transactions t ON t.transaction_id = a.transaction_id")
"""The start of every query for alert rows (the table as ``a``, its transaction as ``t``),
for :func:`alert_row`."""
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
                "disposed_by", "disposition", "fraud_type")


def alert_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """An ``ALERT_COLUMNS`` row as a dict, its reasons decoded."""
    out = dict(zip(ALERT_COLUMNS + QUEUE_TX_COLUMNS, row))
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


def needs_supervisor(before: str, status: str | None, disposition: str | None) -> bool:
    """Whether a change from status ``before`` needs the supervisor role: reopening a closed
    case, or re-disposing one (a disposition given while it is closed)."""
    return before in CLOSED_STATUSES and (
        disposition is not None or (status is not None and status in OPEN_STATUSES))


@dataclass(frozen=True)
class Change:
    """What to change: a new status, a new assignee (``unassign`` clears it), a disposition
    (with its fraud type), or several. A disposition implies its closed status."""

    version: int
    status: str | None = None
    assignee: str | None = None
    unassign: bool = False
    disposition: str | None = None
    fraud_type: str | None = None


def case_of(conn: sqlite3.Connection, alert_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {', '.join(CASE_COLUMNS)} FROM alerts WHERE alert_id = ?",
                       (alert_id,)).fetchone()
    return None if row is None else dict(zip(CASE_COLUMNS, row))


def _target(before: dict[str, Any], change: Change) -> str:
    """The status ``change`` asks for, its disposition checked (CaseError 422 naming the
    field): a disposition decides the closed status; closing needs one."""
    if change.disposition is None and change.fraud_type is None:
        status = before["status"] if change.status is None else change.status
        if status in CLOSED_STATUSES and status != before["status"]:
            field, message = problem(None, None) or ("disposition", "")
            raise CaseError(422, message, field)
        return status
    found = problem(change.disposition, change.fraud_type)
    if found is not None:
        raise CaseError(422, found[1], found[0])
    status = DISPOSITIONS[str(change.disposition)].status
    if change.status is not None and change.status != status:
        raise CaseError(422, f"{change.disposition} closes a case as {status}, not "
                        f"{change.status}", "status")
    return status


def change_case(conn: sqlite3.Connection, alert_id: int, change: Change,
                actor: str) -> dict[str, Any]:
    """Apply ``change`` to one alert inside the caller's transaction; returns the new case
    state. Raises CaseError (404 unknown alert, 409 stale version, 422 not allowed, a
    disposition missing or wrong, or an assignee case_text refuses). A change that leaves
    status, disposition and assignee as they are is a no-op: the case is returned as it
    is, with no version bump and no audit entry. The role checks (reopen and re-dispose
    need a supervisor: :func:`needs_supervisor`) are the caller's."""
    assignee = None if change.assignee is None else _checked(case_text.assignee,
                                                             change.assignee)
    before = case_of(conn, alert_id)
    if before is None:
        raise CaseError(404, "no such alert", "alert_id")
    if before["version"] != change.version:
        raise StaleVersion(before)
    status = _target(before, change)
    assigned = None if change.unassign else assignee or before["assignee"]
    disposing = change.disposition is not None and (
        (change.disposition, change.fraud_type) != (before["disposition"],
                                                    before["fraud_type"])
        or status != before["status"])
    if status == before["status"] and assigned == before["assignee"] and not disposing:
        return dict(before)
    after = dict(before, assignee=assigned)
    now = time.time()
    redispose = before["status"] in CLOSED_STATUSES and status in CLOSED_STATUSES
    if status != before["status"] and not redispose:
        if status not in TRANSITIONS[before["status"]]:
            raise CaseError(422, f"{before['status']} cannot become {status}; allowed: "
                            f"{', '.join(TRANSITIONS[before['status']])}", "status")
    if disposing:
        after.update(status=status, disposed_at=now, disposed_by=actor,
                     disposition=change.disposition, fraud_type=change.fraud_type)
    elif status != before["status"]:  # a reopen, or NEW -> INVESTIGATING
        after.update(status=status, disposed_at=None, disposed_by=None, disposition=None,
                     fraud_type=None)
    after.update(version=before["version"] + 1, updated_at=now, updated_by=actor)
    cursor = conn.execute(
        "UPDATE alerts SET status = ?, assignee = ?, version = ?, updated_at = ?, "
        "updated_by = ?, disposed_at = ?, disposed_by = ?, disposition = ?, fraud_type = ? "
        "WHERE alert_id = ? AND version = ?",
        (after["status"], after["assignee"], after["version"], now, actor,
         after["disposed_at"], after["disposed_by"], after["disposition"],
         after["fraud_type"], alert_id, before["version"]))
    if cursor.rowcount != 1:  # cannot happen while this transaction holds the write lock
        raise StaleVersion(before)
    audit.append(conn, actor, "case.change", f"alert:{alert_id}",
                 _audited(before), _audited(after))
    if disposing:  # a disposition is a label for the models (corrected when it changes)
        (transaction_id,) = conn.execute("SELECT transaction_id FROM alerts WHERE "
                                         "alert_id = ?", (alert_id,)).fetchone()
        set_label(conn, transaction_id, DISPOSITIONS[str(change.disposition)].label,
                  change.fraud_type, actor, now)
    return after


def _audited(case: dict[str, Any]) -> dict[str, Any]:
    return {k: case[k] for k in ("status", "assignee", "version", "disposition",
                                 "fraud_type")}


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
                status: str | None, assignee: str | None, actor: str,
                disposition: str | None = None, fraud_type: str | None = None
                ) -> dict[str, Any]:
    """Apply one change to ``alert_id`` (at ``anchor_version``) and every other open alert
    on the same account or terminal, in one transaction with one audit entry per alert.
    Closing takes a disposition (and fraud type) as for one case, checked once up front.
    Alerts the transition does not apply to, or that already are as asked, are left alone
    and listed as skipped."""
    if disposition is not None or fraud_type is not None:
        found = problem(disposition, fraud_type)
        if found is not None:
            raise CaseError(422, found[1], found[0])
        implied = DISPOSITIONS[str(disposition)].status
        if status is not None and status != implied:
            raise CaseError(422, f"{disposition} closes a case as {implied}, not {status}",
                            "status")
        status = implied
    elif status in CLOSED_STATUSES:
        field, message = problem(None, None) or ("disposition", "")
        raise CaseError(422, message, field)
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
        after = change_case(conn, target, Change(current["version"], status, assignee,
                                                 disposition=disposition,
                                                 fraud_type=fraud_type), actor)
        if after["version"] == current["version"]:
            skipped.append({"alert_id": target, "status": current["status"],
                            "reason": "nothing to change"})
            continue
        changed.append({"alert_id": target, **after})
    return {"changed": changed, "skipped": skipped}
