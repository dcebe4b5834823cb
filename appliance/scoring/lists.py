"""Allow and deny lists of accounts and terminals, and how the scorer applies them.

Precedence: **deny beats allow beats the model.** A transaction whose account or terminal is
on the deny list is declined (severity CRITICAL, reason ``deny_list``) whatever its risk; one
on the allow list (and not denied) is approved (severity INFO, reason ``allow_list``, so no
alert), whatever the rules and model said. Risk stays what the rules and model computed, so
the verdict still shows how unusual the transaction was. Entries can expire; removing one is
a soft delete (``removed_at``), and every change is audited.

The scorer never queries per transaction: :class:`ListFilter` holds the active entries in
memory and re-reads them (one small query) every ``refresh_seconds``.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from .. import audit
from ..transaction import Transaction
from ..verdict import Verdict

LISTS = ("allow", "deny")
KINDS = ("account", "terminal")
_COLUMNS = ("entry_id", "list", "kind", "value", "reason", "owner", "created_at",
            "expires_at", "removed_at", "removed_by")


class ListError(Exception):
    def __init__(self, status: int, message: str, field: str) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def entries(conn: sqlite3.Connection, list_name: str | None = None, kind: str | None = None,
            include_inactive: bool = False) -> list[dict[str, Any]]:
    """Entries, newest first; by default only active ones (not removed, not expired)."""
    where: list[str] = []
    params: list[Any] = []
    if list_name:
        where.append("list = ?")
        params.append(list_name)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    if not include_inactive:
        where.append("removed_at IS NULL AND (expires_at IS NULL OR expires_at > ?)")
        params.append(time.time())
    sql = f"SELECT {', '.join(_COLUMNS)} FROM list_entries"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return [dict(zip(_COLUMNS, r)) for r in conn.execute(sql + " ORDER BY entry_id DESC",
                                                         params)]


def add_entry(conn: sqlite3.Connection, list_name: str, kind: str, value: str, reason: str,
              owner: str, expires_at: float | None) -> dict[str, Any]:
    """Add one entry inside the caller's transaction; audited."""
    now = time.time()
    if expires_at is not None and expires_at <= now:
        raise ListError(422, "expires_at is in the past", "expires_at")
    entry_id = conn.execute(
        "INSERT INTO list_entries (list, kind, value, reason, owner, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (list_name, kind, value, reason, owner, now, expires_at)).lastrowid
    entry = {"entry_id": entry_id, "list": list_name, "kind": kind, "value": value,
             "reason": reason, "owner": owner, "created_at": now, "expires_at": expires_at,
             "removed_at": None, "removed_by": None}
    audit.append(conn, owner, "list.add", f"list_entry:{entry_id}", None, entry)
    return entry


def remove_entry(conn: sqlite3.Connection, entry_id: int, actor: str) -> dict[str, Any]:
    """Soft-delete an entry inside the caller's transaction; audited."""
    row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM list_entries WHERE entry_id = ?",
                       (entry_id,)).fetchone()
    if row is None:
        raise ListError(404, "no such list entry", "entry_id")
    before = dict(zip(_COLUMNS, row))
    if before["removed_at"] is not None:
        raise ListError(409, "the entry was already removed", "entry_id")
    after = {**before, "removed_at": time.time(), "removed_by": actor}
    conn.execute("UPDATE list_entries SET removed_at = ?, removed_by = ? WHERE entry_id = ?",
                 (after["removed_at"], actor, entry_id))
    audit.append(conn, actor, "list.remove", f"list_entry:{entry_id}", before, after)
    return after


@dataclass(frozen=True)
class _Hit:
    kind: str
    value: str
    reason: str
    expires_at: float | None


class ListFilter:
    """The scorer's view of the lists: in memory, refreshed every ``refresh_seconds``."""

    def __init__(self, conn: sqlite3.Connection, refresh_seconds: float) -> None:
        self.conn = conn
        self.refresh_seconds = refresh_seconds
        self._deny: dict[tuple[str, str], _Hit] = {}
        self._allow: dict[tuple[str, str], _Hit] = {}
        self._next_refresh = 0.0

    def refresh_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + self.refresh_seconds
        deny: dict[tuple[str, str], _Hit] = {}
        allow: dict[tuple[str, str], _Hit] = {}
        try:
            rows = self.conn.execute(
                "SELECT list, kind, value, reason, expires_at FROM list_entries "
                "WHERE removed_at IS NULL").fetchall()
        except sqlite3.OperationalError:
            return  # keep the lists we have; the next refresh tries again
        for list_name, kind, value, reason, expires_at in rows:
            target = deny if list_name == "deny" else allow
            target[(kind, value)] = _Hit(kind, value, reason, expires_at)
        self._deny, self._allow = deny, allow

    def apply(self, tx: Transaction, verdict: Verdict, now: float) -> Verdict:
        """The verdict after the lists: deny beats allow beats model (see module doc)."""
        if not self._deny and not self._allow:
            return verdict
        deny = self._match(self._deny, tx, now)
        if deny is not None:
            return _listed(verdict, deny, "deny")
        allow = self._match(self._allow, tx, now)
        return verdict if allow is None else _listed(verdict, allow, "allow")

    @staticmethod
    def _match(entries: dict[tuple[str, str], _Hit], tx: Transaction, now: float
               ) -> _Hit | None:
        for key in (("account", tx.account_id), ("terminal", tx.terminal_id)):
            hit = entries.get(key)
            if hit is not None and (hit.expires_at is None or hit.expires_at > now):
                return hit
        return None


def _listed(verdict: Verdict, hit: _Hit, list_name: str) -> Verdict:
    severity, decision = ("CRITICAL", "decline") if list_name == "deny" else ("INFO", "approve")
    return msgspec.structs.replace(
        verdict, severity=severity, decision=decision,
        reasons=[*verdict.reasons, f"{list_name}_list"],
        details=[*verdict.details,
                 f"{hit.kind} {hit.value} is on the {list_name} list: {hit.reason}"])
