"""Fraud labels, stored apart from transactions, and the risk features learnt from them.

A label says that a transaction was (1) or was not (0) fraud, and *when that became known*
(``known_at``): chargebacks and customer claims arrive days or weeks after the transaction.
Labels live in the ``labels`` table (migration ``m006_labels``), never in a transaction row,
and come from ``branchguard labels import FILE`` (CSV ``transaction_id,label,known_at``, with
an optional ``source`` column). A transaction keeps its first label: importing the same id
again is counted as ``already_labelled`` and changes nothing, so an import can be repeated.

Label features (:data:`LABEL_FEATURES`), for a transaction at event time ``t``, from the labels
of earlier transactions at the same terminal and of the same account whose ``known_at`` lies in
``(t - w, t]`` for w = 1, 7 and 30 days:

- ``*_known_fraud_count_<w>``: how many became known as fraud;
- ``*_known_fraud_share_<w>``: that count over all labels that became known (0 without any).

When every outcome is eventually labelled ``D`` days after the transaction, the share is the
Fraud Detection Handbook's terminal risk with delay ``D``. A label whose ``known_at`` is after
``t`` never influences the features at ``t``: the lookup cuts at ``t`` itself, so the features
are the same whatever was imported later.

Cost: :class:`LabelState` keeps per terminal and per account the label times in order with
cumulative fraud counts, so a lookup is a few C-level bisections (entities without labels cost
one dict miss); :class:`LabelFeed` refreshes it from the table with one query every few seconds,
never per transaction.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from bisect import bisect_right, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from .. import logs
from ..errors import BranchguardError

log = logs.get("appliance.labels")

LABEL_WINDOWS: tuple[tuple[str, float], ...] = (("1d", 86400.0), ("7d", 7 * 86400.0),
                                                ("30d", 30 * 86400.0))
LABEL_FEATURES: tuple[str, ...] = tuple(
    f"{entity}_known_fraud_{kind}_{name}"
    for entity in ("terminal", "account") for name, _ in LABEL_WINDOWS
    for kind in ("count", "share"))
"""Label feature names, in the order :meth:`LabelState.features` returns them; appended after
``features.FEATURES`` in a model's input space."""
_NONE = (0.0,) * (len(LABEL_FEATURES) // 2)
_HEADER = ("transaction_id", "label", "known_at")
_json = msgspec.json.Encoder()


def rfc3339(ts: float) -> str:
    """Epoch seconds as UTC RFC 3339 with microseconds, fixed width (sorts as text)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    """RFC 3339 / ISO 8601 to epoch seconds; a time without offset is UTC."""
    stamp = datetime.fromisoformat(text.strip())
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


class _Events:
    """One entity's label events ordered by known time, with cumulative fraud counts."""

    __slots__ = ("times", "cum")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cum: list[int] = [0]

    def add(self, known: float, fraud: int) -> None:
        times = self.times
        if not times or known >= times[-1]:
            times.append(known)
            self.cum.append(self.cum[-1] + fraud)
            return
        # out of order (rare: a label back-dated before one already held): rebuild the counts
        frauds = [b - a for a, b in zip(self.cum, self.cum[1:])]
        i = bisect_right(times, known)
        insort(times, known)
        frauds.insert(i, fraud)
        cum = [0]
        for f in frauds:
            cum.append(cum[-1] + f)
        self.cum = cum

    def window(self, t: float) -> tuple[float, ...]:
        """(count, share) per label window at time ``t``."""
        times, cum = self.times, self.cum
        hi = bisect_right(times, t)
        if hi == 0:
            return _NONE
        out: list[float] = []
        top = cum[hi]
        for _, w in LABEL_WINDOWS:
            lo = bisect_right(times, t - w, 0, hi)
            frauds = top - cum[lo]
            out += (float(frauds), frauds / (hi - lo) if hi > lo else 0.0)
        return tuple(out)


class LabelState:
    """In-memory label events per terminal and per account."""

    def __init__(self) -> None:
        self.terminals: dict[str, _Events] = {}
        self.accounts: dict[str, _Events] = {}
        self.count = 0

    def add(self, account_id: str, terminal_id: str, known: float, label: int) -> None:
        """One label of a transaction of ``account_id`` at ``terminal_id``, known at ``known``
        (epoch seconds)."""
        for table, key in ((self.terminals, terminal_id), (self.accounts, account_id)):
            events = table.get(key)
            if events is None:
                events = table[key] = _Events()
            events.add(known, label)
        self.count += 1

    def features(self, account_id: str, terminal_id: str, t: float) -> tuple[float, ...]:
        """LABEL_FEATURES at event time ``t`` (epoch seconds), from labels known by ``t``."""
        term = self.terminals.get(terminal_id)
        acct = self.accounts.get(account_id)
        return ((term.window(t) if term is not None else _NONE)
                + (acct.window(t) if acct is not None else _NONE))


@dataclass(frozen=True)
class ImportResult:
    rows: int
    imported: int
    already_labelled: int
    frauds: int


def read_label_rows(path: Path, source: str) -> list[tuple[str, int, str, str]]:
    """Parse a labels CSV into (transaction_id, label, known_at, source); all or nothing: the
    first bad row raises, naming its line and column, and nothing is imported."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BranchguardError(f"cannot read {path}: {exc.strerror}", field="path",
                               value=str(path)) from exc
    if raw[:2] == b"\x1f\x8b":
        import gzip
        raw = gzip.decompress(raw)
    reader = csv.reader(io.StringIO(raw.decode("utf-8-sig")))
    header = [h.strip() for h in next(reader, [])]
    if not set(_HEADER) <= set(header):
        raise BranchguardError("not a labels file", field="header", value=header,
                               hint="expected columns " + ",".join(_HEADER)
                                    + " (and optionally source)")
    col = {name: header.index(name) for name in (*_HEADER, "source") if name in header}
    out: list[tuple[str, int, str, str]] = []
    for line, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        try:
            tid = row[col["transaction_id"]].strip()
            label_text = row[col["label"]].strip()
            known_text = row[col["known_at"]].strip()
        except IndexError:
            raise BranchguardError(f"line {line}: missing columns", field="row",
                                   value=row) from None
        if not tid:
            raise BranchguardError(f"line {line}: empty transaction id",
                                   field="transaction_id", value=tid)
        if label_text not in ("0", "1"):
            raise BranchguardError(f"line {line}: label must be 0 or 1", field="label",
                                   value=label_text)
        try:
            known = rfc3339(parse_time(known_text))
        except ValueError:
            raise BranchguardError(f"line {line}: not an RFC 3339 time", field="known_at",
                                   value=known_text,
                                   hint="e.g. 2026-12-01T10:00:00Z") from None
        src = row[col["source"]].strip() if "source" in col and len(row) > col["source"] \
            else ""
        out.append((tid, int(label_text), known, src or source))
    return out


DISPOSITION_LABELS = {"CONFIRMED_FRAUD": 1, "FALSE_POSITIVE": 0}
"""The case statuses that are a label: an analyst's disposition of an alert."""


def record_disposition(conn: sqlite3.Connection, alert_id: int, status: str, actor: str,
                       at: float) -> bool:
    """Store an analyst's disposition as the label of the alert's transaction, inside the
    caller's transaction (the case change), known from ``at``. Like an import, a
    transaction keeps its first label: a later disposition or import does not replace it.
    True when a label was added."""
    label = DISPOSITION_LABELS.get(status)
    if label is None:
        return False
    cursor = conn.execute(
        "INSERT OR IGNORE INTO labels (transaction_id, label, known_at, source, imported_at) "
        "SELECT transaction_id, ?, ?, ?, ? FROM alerts WHERE alert_id = ?",
        (label, rfc3339(at), f"analyst:{actor}", rfc3339(at), alert_id))
    return cursor.rowcount == 1


def import_labels(db_path: Path, path: Path, source: str | None = None) -> ImportResult:
    """Import a labels CSV into the node database in one transaction (idempotent)."""
    from ..store import open_db

    rows = read_label_rows(path, source or f"file:{path.name}")
    db = open_db(db_path)
    try:
        conn = db.conn
        now = rfc3339(time.time())
        with db.atomic():
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO labels (transaction_id, label, known_at, "
                             "source, imported_at) VALUES (?, ?, ?, ?, ?)",
                             [(*r, now) for r in rows])
            imported = conn.total_changes - before
    finally:
        db.close()
    result = ImportResult(rows=len(rows), imported=imported,
                          already_labelled=len(rows) - imported,
                          frauds=sum(r[1] for r in rows))
    log.info("labels.imported", txn_id=None, file=str(path), rows=result.rows,
             imported=result.imported, already_labelled=result.already_labelled)
    return result


def write_label_file(path: Path, rows: Iterable[tuple[str, int, float]],
                     source: str | None = None) -> int:
    """Write (transaction_id, label, known epoch seconds) rows as a labels CSV."""
    n = 0
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow((*_HEADER, "source") if source else _HEADER)
        for tid, label, known in rows:
            writer.writerow((tid, label, rfc3339(known), *((source,) if source else ())))
            n += 1
    return n


class LabelFeed:
    """Keeps a :class:`LabelState` up to date from the ``labels`` table of ``conn``.

    :meth:`refresh` reads only labels added since the last call (by rowid) joined with their
    transactions (for account and terminal); labels whose transaction is not stored yet are
    kept pending and retried on later refreshes.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.state = LabelState()
        self.last_rowid = 0
        self.pending: dict[str, tuple[int, float]] = {}

    def refresh(self, limit: int = -1) -> int:
        """Load up to ``limit`` new labels (all with -1); returns how many were added to the
        state (0 once there is nothing new)."""
        rows = self.conn.execute(
            "SELECT l.rowid, l.transaction_id, l.label, l.known_at, t.account_id, "
            "t.terminal_id FROM labels l LEFT JOIN transactions t USING (transaction_id) "
            "WHERE l.rowid > ? ORDER BY l.rowid LIMIT ?", [self.last_rowid, limit]).fetchall()
        added = self._add(rows)
        if rows:
            self.last_rowid = rows[-1][0]
        if self.pending:
            found = self.conn.execute(
                "SELECT 0, transaction_id, NULL, NULL, account_id, terminal_id FROM "
                "transactions WHERE transaction_id IN (SELECT value FROM json_each(?))",
                [_json.encode(list(self.pending)).decode()]).fetchall()
            for _, tid, _, _, account_id, terminal_id in found:
                label, known = self.pending.pop(tid)
                self.state.add(account_id, terminal_id, known, label)
                added += 1
        return added

    def _add(self, rows: Sequence[tuple[int, str, int, str, str | None, str | None]]) -> int:
        add, pending, added = self.state.add, self.pending, 0
        for _, tid, label, known_at, account_id, terminal_id in rows:
            known = parse_time(known_at)
            if account_id is None or terminal_id is None:
                pending[tid] = (int(label), known)
            else:
                add(account_id, terminal_id, known, int(label))
                added += 1
        return added
