"""The audit trail: append-only, each entry chained to the one before by a hash.

``hash = sha256(canonical JSON of {seq, at, actor, action, subject, before, after,
prev_hash})``, where ``before`` and ``after`` are the stored JSON text and the first entry's
``prev_hash`` is 64 zeros. Editing, deleting or reordering any entry breaks the chain from
that entry on, which :func:`verify` reports. Entries are appended inside the change's own
transaction (see change.py), so an entry exists exactly when its change was committed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64


def entry_hash(seq: int, at: float, actor: str, action: str, subject: str,
               before: str | None, after: str | None, prev_hash: str) -> str:
    canonical = json.dumps({"seq": seq, "at": at, "actor": actor, "action": action,
                            "subject": subject, "before": before, "after": after,
                            "prev_hash": prev_hash}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def append(conn: sqlite3.Connection, actor: str, action: str, subject: str,
           before: Any, after: Any) -> int:
    """Append one entry; call inside the change's transaction. Returns its seq."""
    row = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
    at = time.time()
    b, a = _json(before), _json(after)
    conn.execute("INSERT INTO audit_log (seq, at, actor, action, subject, before, after, "
                 "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (seq, at, actor, action, subject, b, a, prev,
                  entry_hash(seq, at, actor, action, subject, b, a, prev)))
    return int(seq)


@dataclass(frozen=True)
class Verification:
    entries: int
    broken_seq: int | None
    """The first entry whose hash or link does not match, or None when the chain holds."""
    problem: str | None


def verify(conn: sqlite3.Connection) -> Verification:
    """Recompute the chain from the first entry; stop at the first that does not match."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for seq, at, actor, action, subject, before, after, prev_hash, stored in conn.execute(
            "SELECT seq, at, actor, action, subject, before, after, prev_hash, hash "
            "FROM audit_log ORDER BY seq"):
        count += 1
        if seq != expected_seq:
            return Verification(count, seq, f"entry {expected_seq} is missing")
        if prev_hash != prev:
            return Verification(count, seq, "prev_hash does not match the previous entry")
        if entry_hash(seq, at, actor, action, subject, before, after, prev_hash) != stored:
            return Verification(count, seq, "content does not match its hash")
        prev, expected_seq = stored, seq + 1
    return Verification(count, None, None)


def entry_dict(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    """An audit row (seq, at, actor, action, subject, before, after, prev_hash, hash) as
    the API shows it, JSON fields decoded."""
    seq, at, actor, action, subject, before, after, prev_hash, hash_ = row
    return {"seq": seq, "at": at, "actor": actor, "action": action, "subject": subject,
            "before": None if before is None else json.loads(before),
            "after": None if after is None else json.loads(after),
            "prev_hash": prev_hash, "hash": hash_}
