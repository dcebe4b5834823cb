"""Fraud labels, stored apart from transactions, and the risk features learnt from them.

A label says that a transaction was (1) or was not (0) fraud, and *when that became known*
(``known_at``): chargebacks and customer claims arrive days or weeks after the transaction.
Labels live in the ``labels`` table (migration ``m006_labels``), never in a transaction row,
and come from ``branchguard labels import FILE`` (CSV ``transaction_id,label,known_at``, with
optional ``source`` and ``typology`` columns) and from analysts closing cases. An import never
replaces a label: importing the same id again is counted as ``already_labelled`` and changes
nothing, so an import can be repeated. An analyst's disposition does (:func:`set_label`): when
a case is closed again with another outcome or fraud type, the label is *corrected* in place,
known from the moment of the correction, the change is kept in ``label_corrections`` and
audited (``label.correct``: who, when, from what to what). A fraud label may carry its
``typology``, one of :data:`FRAUD_TYPES`.

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
never per transaction, and takes a corrected label's old event out again (see its doc).
"""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import msgspec

from .. import audit, logs
from ..errors import BranchguardError
from .rulebook import TYPOLOGIES

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
FRAUD_TYPES = (*TYPOLOGIES, "other")
"""The typologies a fraud label can name (the names the rules and the simulator use too):
a velocity burst, card testing, an amount far above the account's own maximum, impossible
travel between terminals, ATM cash-out across terminals, first use of a terminal with a
large amount; ``other`` for any other kind."""
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

    def remove(self, known: float, fraud: int) -> bool:
        """Take one event out (a label corrected since it was added); False when there is
        no such event. Rare (a person's correction), so the counts are simply rebuilt."""
        frauds = [b - a for a, b in zip(self.cum, self.cum[1:])]
        lo = bisect_left(self.times, known)
        for i in range(lo, len(self.times)):
            if self.times[i] != known:
                break
            if frauds[i] == fraud:
                del self.times[i], frauds[i]
                cum = [0]
                for f in frauds:
                    cum.append(cum[-1] + f)
                self.cum = cum
                return True
        return False

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

    def remove(self, account_id: str, terminal_id: str, known: float, label: int) -> None:
        """Take out one label added before with these values (it has been corrected)."""
        removed = False
        for table, key in ((self.terminals, terminal_id), (self.accounts, account_id)):
            events = table.get(key)
            if events is not None:
                removed = events.remove(known, label) or removed
        self.count -= removed

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


def read_label_rows(path: Path, source: str
                    ) -> list[tuple[str, int, str, str, str | None]]:
    """Parse a labels CSV into (transaction_id, label, known_at, source, typology); all or
    nothing: the first bad row raises, naming its line and column, and nothing is imported.
    ``typology`` (optional column) is empty or one of :data:`FRAUD_TYPES`, on fraud only."""
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
    col = {name: header.index(name) for name in (*_HEADER, "source", "typology")
           if name in header}
    out: list[tuple[str, int, str, str, str | None]] = []
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
        src, typology = (row[col[name]].strip() if name in col and len(row) > col[name] else ""
                         for name in ("source", "typology"))
        if typology and (typology not in FRAUD_TYPES or label_text != "1"):
            raise BranchguardError(f"line {line}: a typology is one of the fraud types, on a "
                                   "fraud label (1)", field="typology", value=typology,
                                   hint=", ".join(FRAUD_TYPES))
        out.append((tid, int(label_text), known, src or source, typology or None))
    return out


LabelChange = Literal["added", "corrected", "unchanged"]
"""What :func:`set_label` did: ``"added"``, ``"corrected"`` or ``"unchanged"``."""


def set_label(conn: sqlite3.Connection, transaction_id: str, label: int,
              typology: str | None, actor: str, at: float) -> LabelChange:
    """Make ``label`` (1 fraud, 0 not) with ``typology`` the label of ``transaction_id``,
    known from ``at``, inside the caller's transaction: an analyst's disposition, which is
    the last word on the transaction whichever way its label came.

    No label yet: one is added (source ``analyst:<actor>``). The same label and typology:
    nothing changes. Another: the row is corrected in place (its rowid stays), its
    ``known_at`` becomes ``at``, and the change is kept in ``label_corrections`` and in the
    audit trail as ``label.correct`` on ``transaction:<id>`` (before and after: label,
    typology, known_at, source), so the scorer's feed takes the old label out."""
    if label not in (0, 1):
        raise BranchguardError("a label is 0 or 1", field="label", value=label)
    if typology is not None and typology not in FRAUD_TYPES:
        raise BranchguardError("not a fraud type", field="typology", value=typology,
                               hint="one of " + ", ".join(FRAUD_TYPES))
    known, source = rfc3339(at), f"analyst:{actor}"
    row = conn.execute("SELECT rowid, label, typology, known_at, source FROM labels "
                       "WHERE transaction_id = ?", (transaction_id,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO labels (transaction_id, label, known_at, source, "
                     "imported_at, typology) VALUES (?, ?, ?, ?, ?, ?)",
                     (transaction_id, label, known, source, known, typology))
        return "added"
    rowid, before_label, before_typology, before_known, before_source = row
    if (before_label, before_typology) == (label, typology):
        return "unchanged"
    conn.execute("UPDATE labels SET label = ?, typology = ?, known_at = ?, source = ?, "
                 "imported_at = ? WHERE rowid = ?",
                 (label, typology, known, source, known, rowid))
    conn.execute("INSERT INTO label_corrections (transaction_id, label_rowid, before_label, "
                 "before_typology, before_known_at, after_label, after_typology, "
                 "after_known_at, at, actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (transaction_id, rowid, before_label, before_typology, before_known, label,
                  typology, known, known, actor))
    audit.append(conn, actor, "label.correct", f"transaction:{transaction_id}",
                 {"label": before_label, "typology": before_typology,
                  "known_at": before_known, "source": before_source},
                 {"label": label, "typology": typology, "known_at": known, "source": source})
    log.info("labels.corrected", txn_id=transaction_id, label_from=before_label,
             label_to=label, typology_from=before_typology, typology_to=typology,
             actor=actor)
    return "corrected"


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
                             "source, typology, imported_at) VALUES (?, ?, ?, ?, ?, ?)",
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

    A corrected label keeps its rowid, so reading by rowid alone would never see the
    correction. Each refresh therefore also reads, in the same read transaction, the
    ``label_corrections`` committed since the last one (corrections are numbered in commit
    order: there is one writer). A correction of a row already read (``label_rowid`` at or
    below the rowid read so far) takes the old event out and puts the new one in; a row not
    read yet is read later with its corrected values, so its corrections are skipped. The
    state is then what a fresh feed would build from the table.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.state = LabelState()
        self.last_rowid = 0
        self.last_correction = 0
        self.pending: dict[str, tuple[int, float]] = {}

    def refresh(self, limit: int = -1) -> int:
        """Load up to ``limit`` new labels (all with -1) and every correction since the last
        call; returns how many labels were added or corrected in the state (0 once there is
        nothing new)."""
        conn = self.conn
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")
        try:
            corrections = conn.execute(
                "SELECT c.correction_id, c.transaction_id, c.label_rowid, c.before_label, "
                "c.before_known_at, c.after_label, c.after_known_at, t.account_id, "
                "t.terminal_id FROM label_corrections c LEFT JOIN transactions t "
                "USING (transaction_id) WHERE c.correction_id > ? ORDER BY c.correction_id",
                [self.last_correction]).fetchall()
            rows = conn.execute(
                "SELECT l.rowid, l.transaction_id, l.label, l.known_at, t.account_id, "
                "t.terminal_id FROM labels l LEFT JOIN transactions t USING (transaction_id) "
                "WHERE l.rowid > ? ORDER BY l.rowid LIMIT ?",
                [self.last_rowid, limit]).fetchall()
            pending_found = conn.execute(
                "SELECT transaction_id, account_id, terminal_id FROM transactions WHERE "
                "transaction_id IN (SELECT value FROM json_each(?))",
                [_json.encode(list(self.pending)).decode()]).fetchall() if self.pending else []
        finally:
            if own:
                conn.execute("COMMIT")
        added = self._correct(corrections)
        if corrections:
            self.last_correction = corrections[-1][0]
        added += self._add(rows)
        if rows:
            self.last_rowid = rows[-1][0]
        for tid, account_id, terminal_id in pending_found:
            entry = self.pending.pop(tid, None)
            if entry is not None:
                self.state.add(account_id, terminal_id, entry[1], entry[0])
                added += 1
        return added

    def _correct(self, rows: Sequence[tuple[int, str, int, int, str, int, str, str | None,
                                            str | None]]) -> int:
        corrected = 0
        for _, tid, rowid, before, before_known, after, after_known, account_id, \
                terminal_id in rows:
            if rowid > self.last_rowid:
                continue  # not read yet: it will be, corrected
            if tid in self.pending:
                self.pending[tid] = (int(after), parse_time(after_known))
            elif account_id is not None and terminal_id is not None:
                self.state.remove(account_id, terminal_id, parse_time(before_known),
                                  int(before))
                self.state.add(account_id, terminal_id, parse_time(after_known), int(after))
            corrected += 1
        return corrected

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
