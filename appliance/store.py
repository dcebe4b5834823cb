"""The data layer: the node's one writer, and the read queries the CLI, API and console use.

The database is SQLite in WAL mode with ``synchronous=NORMAL``: a commit can be lost on power
loss, never half-applied. That is safe here because the checkpoint (the last stream sequence
whose outcome is stored) is committed in the same transaction as the rows, and JetStream keeps
the transactions: after a lost commit the consumer simply replays from the older checkpoint.

Writes are idempotent by ``transaction_id``: a batch never stores a transaction twice.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
import sqlite3
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from sqlite_utils import Database

from .errors import FencedError, StoreError
from .schema import migrate
from .transaction import MAX_MESSAGE_BYTES, MILLI, Transaction
from .verdict import SEVERITIES, Verdict

_json = msgspec.json.Encoder()
_decode_list = msgspec.json.Decoder(list[str])
_decode_floats = msgspec.json.Decoder(list[float])

_TX_COLUMNS = ("transaction_id", "stream_seq", "branch", "account_id", "terminal_id", "amount",
               "amount_milli", "currency", "ts", "utc_offset", "channel", "merchant_category",
               "location", "features", "features_version", "model_risk", "risk", "severity",
               "decision", "reasons", "details", "model_version", "rules_version", "stored_at",
               "body_digest", "label_features", "sent_amount", "sent_currency")
_PARAMS = ", ".join("?" * len(_TX_COLUMNS))
_INSERT_TX = (f"INSERT OR IGNORE INTO transactions ({', '.join(_TX_COLUMNS)}) "
              f"VALUES ({_PARAMS})")
_CHUNKS = (500, 50)
"""Rows per multi-row INSERT, largest first (the rest go one statement a row). One
statement of 500 rows (14,000 parameters, under SQLite's 32,766) costs 10.5 µs a row
against 14.4 for 500 executions of one row, and the writer thread gives up and takes
back the GIL once per statement rather than once per row: with the event loop holding
the GIL, each take-back can wait up to the 5 ms switch interval (issue 16)."""
_INSERT_TX_ROWS = {n: f"{_INSERT_TX}{f', ({_PARAMS})' * (n - 1)}" for n in _CHUNKS}
_INSERT_ALERT = ("INSERT OR IGNORE INTO alerts (transaction_id, created_at, ts, account_id, "
                 "terminal_id, severity, risk, reasons, status, updated_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'NEW', ?)")
_INSERT_OUTBOX = ("INSERT INTO alert_outbox (alert_id) SELECT alert_id FROM alerts "
                  "WHERE alert_id > ?")
"""The alerts just inserted are exactly those above the largest id before the insert."""


def _check_fence(conn: sqlite3.Connection, consumer: str, token: int) -> None:
    """Refuse a commit under an older tenure of the partition's lease than the one that last
    wrote its checkpoint (inside the commit's transaction, so no other writer comes between)."""
    row = conn.execute("SELECT lease_token FROM checkpoints WHERE consumer = ?",
                       [consumer]).fetchone()
    if row is not None and row[0] is not None and int(row[0]) > token:
        raise FencedError("a later owner of this partition has written its checkpoint",
                          field="lease_token", value=token,
                          hint=f"{consumer} is now written under token {row[0]}; this "
                               "owner lost its lease and must stop")


def _insert_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """``_INSERT_TX`` for every row, as few statements as :data:`_CHUNKS` allow."""
    start = 0
    for n in _CHUNKS:
        whole = start + (len(rows) - start) // n * n
        if whole > start:
            conn.executemany(_INSERT_TX_ROWS[n], [
                [value for row in rows[i:i + n] for value in row] for i in range(start, whole, n)])
            start = whole
    if start < len(rows):
        conn.executemany(_INSERT_TX, rows[start:])


@dataclass(slots=True)  # not frozen: a frozen init costs 5x, and this is per message
class Scored:
    """One transaction with its features and verdict, ready to store."""

    tx: Transaction
    branch: str
    stream_seq: int
    features: tuple[float, ...]
    features_version: str
    """Names the list ``features`` follows (``scoring.features.FEATURES_VERSION``)."""
    verdict: Verdict
    digest: bytes | None = None
    """``transaction.digest`` of the body: tells a re-send from a conflicting one."""
    label_features: tuple[float, ...] | None = None
    """The label features the model read, when it reads any (kept for explanations)."""
    shadow: tuple[str, float, float, str] | None = None
    """The shadow model's (version, model_risk, risk, decision): stored, never acted on."""


@dataclass(slots=True)  # not frozen: a frozen init costs 5x, and this is per message
class DeadLetter:
    stream_seq: int
    subject: str
    reason: str
    size: int
    body: bytes | None = None
    """The message as received; stored up to MAX_MESSAGE_BYTES (casework/deadletters.py)."""


WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the WAL file is cut back to when it restarts (it otherwise keeps its largest size)."""


def encode_features(values: Sequence[float]) -> bytes:
    """Features as stored: float64 values, native byte order (a third of the JSON's cost)."""
    return array("d", values).tobytes()


def decode_features(value: bytes | str) -> list[float]:
    """Stored features back as floats: the binary blob, or the JSON text of older rows."""
    if isinstance(value, bytes):
        out = array("d")
        out.frombytes(value)
        return out.tolist()
    return _decode_floats.decode(value)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a consumer's committed work ends (see schema m001 and m011)."""

    stream_seq: int
    """Last TX stream sequence whose outcome is committed."""
    verdict_seq: int | None
    """VERDICTS sequence at or below which no uncommitted transaction's verdict lies (None:
    written by a node older than issue 16, which published only what it had committed)."""
    confirmed_seq: int
    """TX stream sequence up to which every stored verdict is known to be in VERDICTS."""


def require_db(db_path: Path) -> None:
    """Refuse a data directory with no node database: a command that reads the node's data
    would otherwise create an empty one at a mistyped path and report nothing."""
    if not db_path.exists():
        raise StoreError("no node database here", field="data_dir", value=str(db_path.parent),
                         hint="pass the --data-dir the node runs with")


@contextmanager
def setting_up(path: Path) -> Iterator[None]:
    """Hold the set-up lock of the SQLite file at ``path`` (``<path>.migrating``): one
    process sets up and migrates it at a time. Processes starting side by side open a new
    file together; two migrations would collide, and switching a new file to WAL takes a
    lock no busy_timeout waits for."""
    with open(path.with_name(path.name + ".migrating"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One transaction that takes the write lock first (``BEGIN IMMEDIATE``, waiting out
    ``busy_timeout`` for a commit in progress), so what it reads next is current: a fence
    read in it cannot be overtaken by another writer's commit. Committed at the end, rolled
    back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def open_db(path: Path) -> Database:
    """Open (creating if needed) and migrate the node database.

    The connection may be handed to another thread (the scorer writes from a worker thread),
    but is never used by two threads at once.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with setting_up(path):  # partitioned scorers open the node database together
            db = Database(sqlite3.connect(path, check_same_thread=False))
            db.execute("PRAGMA busy_timeout = 5000")
            db.enable_wal()
            db.execute("PRAGMA synchronous = NORMAL")
            # No checkpoints on commit: they fsync, and would stall the batch that triggers
            # one. The scorer checkpoints from its own thread instead (Store.checkpoint_wal).
            db.execute("PRAGMA wal_autocheckpoint = 0")
            db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            migrate(db)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot open database: {exc}", field="data_dir", value=str(path),
                         hint="check the path is writable and the file is a SQLite database"
                         ) from exc
    return db


class Store:
    """The single writer of the node database, and its reads.

    Two connections: ``db`` for :meth:`save_batch` (which the scorer runs on its writer
    thread) and ``reader`` for every read, so reads never wait for, or race with, a write in
    progress. In WAL mode the reader sees the last committed batch.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = open_db(path)
        self.reader = Database(sqlite3.connect(path, check_same_thread=False))
        self.reader.execute("PRAGMA busy_timeout = 5000")

    @classmethod
    def open(cls, path: Path) -> Store:
        return cls(path)

    def close(self) -> None:
        self.reader.close()
        self.db.close()

    def checkpoint_wal(self) -> tuple[int, int, int]:
        """Copy committed WAL pages into the database file without blocking the writer
        (``PRAGMA wal_checkpoint(PASSIVE)``), on a connection of its own, so any thread
        may call it. Returns SQLite's (busy, wal pages, pages checkpointed)."""
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(row[0]), int(row[1]), int(row[2])
        finally:
            conn.close()

    def restart_wal(self, wait_ms: int = 50) -> tuple[int, int, int]:
        """Checkpoint everything and make the next commit write the WAL from its start
        (``RESTART``), waiting at most ``wait_ms`` for readers; with ``journal_size_limit``
        the file then shrinks. Only for the writer's thread, and never while Litestream
        replicates (it restarts the WAL itself, after copying it)."""
        conn = self.db.conn
        conn.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
        try:
            row = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            return int(row[0]), int(row[1]), int(row[2])
        finally:
            conn.execute("PRAGMA busy_timeout = 5000")

    # --- writes -------------------------------------------------------------------------

    def claim(self, consumer: str, lease_token: int) -> None:
        """Write a new tenure's ``lease_token`` to the partition's checkpoint before its owner
        reads any state. Without it the fence (:func:`_check_fence`) learns of the tenure
        only at its first commit, so an owner stopped in the middle of its commit (SIGSTOP,
        a frozen VM) and woken after the next owner had read the database would still commit:
        rows the next owner's state lacks, which it then takes for re-sends (seen in the
        partition drill). After a claim that commit is refused. Waits (``busy_timeout``) for
        a commit in progress, which then lands before the state is read; raises
        :class:`FencedError` if a later tenure has already claimed the partition."""
        with write_transaction(self.db.conn) as conn:
            _check_fence(conn, consumer, lease_token)
            conn.execute(
                "INSERT INTO checkpoints (consumer, stream_seq, verdict_seq, confirmed_seq, "
                "updated_at, lease_token) VALUES (?, 0, 0, 0, ?, ?) ON CONFLICT (consumer) "
                "DO UPDATE SET lease_token = excluded.lease_token",
                (consumer, time.time(), lease_token))

    def save_batch(self, scored: Sequence[Scored], dead: Sequence[DeadLetter], consumer: str,
                   last_seq: int, verdict_seq: int = 0, confirmed_seq: int = 0,
                   history: bool = False, lease_token: int | None = None) -> int:
        """Store a batch (or several, for a group commit) in one transaction: rows, their
        alerts (each with its outbox row, for the alert dispatcher), shadow scores, dead
        letters and the new checkpoint. Idempotent by transaction id and stream sequence.
        ``last_seq``, ``verdict_seq`` and ``confirmed_seq`` are the new :class:`Checkpoint`.
        ``history`` (the demo's past, feed/history.py): rows and verdicts only, no alert and
        no checkpoint, since they were never in the stream and are no one's work now.
        ``lease_token`` (a partition's owner, issue 19): the commit is refused with
        :class:`FencedError`, writing nothing, if the checkpoint was written under a later
        tenure of the lease; else the token is stored with it. The transaction takes the
        write lock before anything else (``BEGIN IMMEDIATE``), so the fence is read after any
        claim committed before it and no claim can come between that read and the writes.
        Returns alerts created."""
        now = time.time()
        rows: list[tuple[Any, ...]] = []
        alerts = []
        encode = _json.encode
        for s in scored:
            tx, v = s.tx, s.verdict
            stamp = tx.timestamp
            ts = stamp.timestamp()
            offset = stamp.utcoffset()
            reasons = encode(v.reasons).decode() if v.reasons else "[]"
            rows.append((
                tx.transaction_id, s.stream_seq, s.branch, tx.account_id, tx.terminal_id,
                tx.amount, round(tx.amount * MILLI), tx.currency, ts,
                int(offset.total_seconds()) if offset else 0, tx.channel,
                tx.merchant_category, tx.location, array("d", s.features).tobytes(),
                s.features_version, v.model_risk, v.risk, v.severity, v.decision, reasons,
                encode(v.details).decode() if v.details else "[]", v.model_version,
                v.rules_version, now, s.digest,
                None if s.label_features is None else array("d", s.label_features).tobytes(),
                tx.sent_amount, tx.sent_currency))
            if v.decision != "approve" and not history:
                alerts.append((tx.transaction_id, now, ts, tx.account_id, tx.terminal_id,
                               v.severity, v.risk, reasons, now))
        conn = self.db.conn
        with write_transaction(conn):  # the write lock first: the fence read is current
            if lease_token is not None:
                _check_fence(conn, consumer, lease_token)
            _insert_rows(conn, rows)
            created = 0
            if alerts:
                before = conn.total_changes
                last_alert = conn.execute("SELECT max(alert_id) FROM alerts").fetchone()[0]
                conn.executemany(_INSERT_ALERT, alerts)
                created = conn.total_changes - before
                if created:  # issue 6: each new alert's outbox row, in the same transaction
                    conn.execute(_INSERT_OUTBOX, (last_alert or 0,))
            shadows = [(s.tx.transaction_id, *s.shadow) for s in scored if s.shadow is not None]
            if shadows:
                conn.executemany(
                    "INSERT OR IGNORE INTO shadow_scores (transaction_id, model_version, "
                    "model_risk, risk, decision) VALUES (?, ?, ?, ?, ?)", shadows)
            if dead:
                conn.executemany(
                    "INSERT OR IGNORE INTO dead_letters (stream_seq, subject, reason, size, "
                    "received_at, body) VALUES (?, ?, ?, ?, ?, ?)",
                    [(d.stream_seq, d.subject, d.reason, d.size, now,
                      None if d.body is None else d.body[:MAX_MESSAGE_BYTES]) for d in dead])
            if history:
                return 0
            conn.execute(
                "INSERT INTO checkpoints (consumer, stream_seq, verdict_seq, confirmed_seq, "
                "updated_at, lease_token) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (consumer) "
                "DO UPDATE SET stream_seq = max(stream_seq, excluded.stream_seq), "
                "verdict_seq = excluded.verdict_seq, confirmed_seq = excluded.confirmed_seq, "
                "updated_at = excluded.updated_at, "
                "lease_token = coalesce(excluded.lease_token, lease_token)",
                (consumer, last_seq, verdict_seq, confirmed_seq, now, lease_token))
        return created

    # --- reads used by the pipeline -----------------------------------------------------

    def checkpoint(self, consumer: str) -> int:
        """Last committed stream sequence for ``consumer`` (0 when it never ran)."""
        return self.checkpoint_marks(consumer).stream_seq

    def checkpoint_marks(self, consumer: str) -> Checkpoint:
        """Where ``consumer``'s committed work ends (all zero when it never ran)."""
        row = self.reader.execute(
            "SELECT stream_seq, verdict_seq, confirmed_seq FROM checkpoints WHERE consumer = ?",
            [consumer]).fetchone()
        if row is None:
            return Checkpoint(0, 0, 0)
        return Checkpoint(int(row[0]), None if row[1] is None else int(row[1]), int(row[2]))

    def verdicts_for(self, ids: Iterable[str]) -> dict[str, Verdict]:
        """Stored verdicts of those of ``ids`` already stored."""
        return {tid: verdict for tid, (verdict, _) in self.stored_for(ids).items()}

    def stored_for(self, ids: Iterable[str]) -> dict[str, tuple[Verdict, bytes | None]]:
        """Stored verdicts, with their body digests (None on rows older than issue 16), of
        those of ``ids`` already stored: to answer re-sends and spot conflicting ones."""
        rows = self.reader.execute(
            "SELECT transaction_id, risk, severity, decision, reasons, details, model_risk, "
            "model_version, rules_version, body_digest FROM transactions WHERE transaction_id "
            "IN (SELECT value FROM json_each(?))", [_json.encode(list(ids)).decode()])
        return {row[0]: (_verdict_from_row(row), row[9]) for row in rows}

    def verdicts_between(self, after_seq: int, upto_seq: int) -> list[tuple[str, str, Verdict]]:
        """(branch, terminal_id, verdict) of rows stored from stream sequences in
        (after_seq, upto_seq], in stream order: the verdicts that may not have been published
        before a crash."""
        rows = self.reader.execute(
            "SELECT transaction_id, risk, severity, decision, reasons, details, model_risk, "
            "model_version, rules_version, branch, terminal_id FROM transactions "
            "WHERE stream_seq > ? AND stream_seq <= ? ORDER BY stream_seq", [after_seq, upto_seq])
        return [(r[9], r[10], _verdict_from_row(r)) for r in rows]

    # --- reads for people ---------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Totals: transactions, alerts (by severity), dead letters."""
        out = {
            "transactions": self._scalar("SELECT count(*) FROM transactions"),
            "alerts": self._scalar("SELECT count(*) FROM alerts"),
            "dead_letters": self._scalar("SELECT count(*) FROM dead_letters"),
        }
        for severity in SEVERITIES[:3]:  # INFO never raises an alert
            out[f"alerts_{severity.lower()}"] = 0
        for severity, n in self.reader.execute(
                "SELECT severity, count(*) FROM alerts GROUP BY severity"):
            out[f"alerts_{severity.lower()}"] = int(n)
        return out

    def newest_ts(self) -> float | None:
        """The event time (epoch seconds) of the newest stored transaction, None if none."""
        row = self.reader.execute("SELECT max(ts) FROM transactions").fetchone()
        return None if row[0] is None else float(row[0])

    def transaction(self, transaction_id: str) -> dict[str, Any] | None:
        """One stored transaction with its verdict, or None."""
        rows = list(self.reader["transactions"].rows_where("transaction_id = ?", [transaction_id]))
        return rows[0] if rows else None

    def _scalar(self, sql: str) -> int:
        return int(self.reader.execute(sql).fetchone()[0])


def _verdict_from_row(row: Sequence[Any]) -> Verdict:
    return Verdict(transaction_id=row[0], risk=row[1], severity=row[2], decision=row[3], reasons=_decode_list.decode(row[4]),
                   details=_decode_list.decode(row[5]), model_risk=row[6],
                   model_version=row[7], rules_version=row[8])
