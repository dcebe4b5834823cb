"""Retention in four tiers, legal hold, and right-to-erasure (``branchguard retention ...``).

By a transaction's event time (``ts``), against a clock passed in (``now``):

- **hot** (younger than ``hot_days``): the node database;
- **warm** (to ``warm_days``): monthly archive databases (archive.py), rows moved in chunks;
- **cold** (to ``cold_days``): compressed, checksummed monthly files, whole months at a time
  once a month's last day is older than ``warm_days``;
- **purged** after that, whole months, except the rows of accounts on legal hold.

Every move copies, verifies (row count and SHA-256 over the canonical rows, source against
destination) and only then deletes the source, each step its own transaction or atomic
rename. A crash at any point leaves a row in two tiers, never in none, and the next run
finishes the move: copies are idempotent (``INSERT OR REPLACE``; a cold month is rewritten
from its old file plus the warm rows). The copy into a warm database is committed with
``synchronous = FULL`` before the node database deletes its rows.

The node database is never VACUUMed (Litestream's rule); SQLite reuses the freed pages.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .. import logs
from ..errors import RetentionError
from ..settings import Settings
from ..store import open_db
from . import archive
from .archive import MOVED_TABLES, Digest, digest, read_rows

log = logs.get("appliance.retention")

CHUNK_ROWS = 5000
"""Transactions moved per node-database transaction: short enough that the scorer's next
commit waits milliseconds, well inside its 5 s busy timeout."""
_MOVING = "transaction_id IN (SELECT transaction_id FROM temp.moving)"

_DEPENDENT = (
    ("alert_notes", "alert_id", "alerts"),
    ("alert_outbox", "alert_id", "alerts"),
    ("alert_deliveries", "alert_id", "alerts"),
    ("alert_explanations", "transaction_id", "transactions"),
    ("shadow_scores", "transaction_id", "transactions"),
    ("labels", "transaction_id", "transactions"),
    ("label_corrections", "transaction_id", "transactions"),
)
"""Tables whose rows belong to a transaction or its alert: (table, key, parent). They move
to the warm tier with their transactions (verified with them), are erased with the account's
rows, and are not carried into the cold tier, which keeps transactions and alerts only. The
audit trail is not among them: it is hash-chained and append-only, and names alerts by id."""


def _moving_by(key: str, parent: str) -> str:
    """The rows of a dependent table that belong to the moving transactions, in the
    ``{schema}`` the statement reads (alerts are matched in the same database)."""
    if parent == "transactions":
        return _MOVING
    return (f"{key} IN (SELECT {key} FROM {{schema}}.{parent} "  # noqa: S608 (constants)
            "WHERE transaction_id IN (SELECT transaction_id FROM temp.moving))")


@dataclass(frozen=True)
class Action:
    """One step of a retention run, as printed (and, without --dry-run, carried out)."""

    action: str
    """``hot->warm``, ``warm->cold``, ``purge`` or ``keep-held``."""
    month: str
    transactions: int
    alerts: int
    held_rows: int = 0
    """With ``purge``: rows kept because their account is on legal hold."""


def _connect(settings: Settings) -> sqlite3.Connection:
    """The node database (migrated), with explicit transactions and the 5 s busy timeout."""
    db = open_db(settings.db_path)
    conn = db.conn
    conn.isolation_level = None
    return conn


def _cutoff(now: datetime, days: int) -> float:
    return (now - timedelta(days=days)).timestamp()


def holds(settings: Settings) -> set[str]:
    conn = _connect(settings)
    try:
        return {row[0] for row in conn.execute("SELECT account_id FROM legal_holds")}
    finally:
        conn.close()


def hold(settings: Settings, account: str, reason: str, now: datetime | None = None) -> None:
    """Put an account on legal hold: no tier purges or erases its rows until released."""
    conn = _connect(settings)
    try:
        conn.execute("INSERT INTO legal_holds (account_id, reason, placed_at) VALUES (?, ?, ?) "
                     "ON CONFLICT (account_id) DO UPDATE SET reason = excluded.reason",
                     (account, reason, (now or datetime.now(timezone.utc)).timestamp()))
    finally:
        conn.close()
    log.info("retention.hold", txn_id=None, account_id=account, reason=reason)


def release(settings: Settings, account: str) -> bool:
    """Lift a legal hold. Returns whether there was one."""
    conn = _connect(settings)
    try:
        released = conn.execute("DELETE FROM legal_holds WHERE account_id = ?",
                                (account,)).rowcount > 0
    finally:
        conn.close()
    log.info("retention.release", txn_id=None, account_id=account, released=released)
    return released


# --- the run --------------------------------------------------------------------------


def run_retention(settings: Settings, now: datetime | None = None, dry_run: bool = False
                  ) -> list[Action]:
    """Move every row to the tier its age says, purge what is past ``cold_days`` (except
    held accounts). With ``dry_run`` nothing changes and the actions are what it would do.
    Idempotent: a second run with the same clock does nothing."""
    now = now or datetime.now(timezone.utc)
    conn = _connect(settings)
    try:
        actions = _hot_to_warm(settings, conn, _cutoff(now, settings.hot_days), dry_run)
        held = {row[0] for row in conn.execute("SELECT account_id FROM legal_holds")}
    finally:
        conn.close()
    pending = {a.month: a for a in actions} if dry_run else {}
    actions += _warm_to_cold(settings, _cutoff(now, settings.warm_days), dry_run, pending)
    actions += _purge(settings, _cutoff(now, settings.cold_days), held, dry_run)
    if not dry_run:
        _check_cold(settings)
    for a in actions:
        log.info("retention.action", txn_id=None, dry_run=dry_run, **asdict(a))
    return actions


def _hot_to_warm(settings: Settings, conn: sqlite3.Connection, cutoff: float, dry_run: bool
                 ) -> list[Action]:
    months = [row[0] for row in conn.execute(
        "SELECT DISTINCT strftime('%Y-%m', ts, 'unixepoch') FROM transactions WHERE ts < ? "
        "ORDER BY 1", (cutoff,))]
    actions = []
    for month in months:
        start, end = archive.month_bounds(month)
        window = (start, min(end, cutoff))
        n, alerts = conn.execute(
            "SELECT count(*), (SELECT count(*) FROM alerts WHERE transaction_id IN "
            "(SELECT transaction_id FROM transactions WHERE ts >= ? AND ts < ?)) "
            "FROM transactions WHERE ts >= ? AND ts < ?", (*window, *window)).fetchone()
        actions.append(Action("hot->warm", month, int(n), int(alerts)))
        if not dry_run:
            _move_month_to_warm(settings, conn, month, window)
    return actions


def _move_month_to_warm(settings: Settings, conn: sqlite3.Connection, month: str,
                        window: tuple[float, float]) -> None:
    path = archive.warm_path(settings, month)
    _create_warm(conn, path)
    conn.execute("ATTACH DATABASE ? AS warm", (str(path),))
    try:
        conn.execute("PRAGMA warm.synchronous = FULL")  # durable before the source goes
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS moving (transaction_id TEXT PRIMARY KEY)")
        while True:
            ids = conn.execute("SELECT transaction_id FROM main.transactions WHERE ts >= ? "
                               "AND ts < ? ORDER BY ts LIMIT ?", (*window, CHUNK_ROWS)).fetchall()
            if not ids:
                return
            conn.execute("DELETE FROM temp.moving")
            conn.executemany("INSERT INTO temp.moving VALUES (?)", ids)
            _move_chunk(conn, month)
    finally:
        conn.execute("DETACH DATABASE warm")


def _create_warm(conn: sqlite3.Connection, path: Path) -> None:
    """A new warm database with the node database's schema (tables, indexes and the
    migrations applied), so the API reads it with the same SQL and ``open_db`` finds it up
    to date. The statements are copied from ``sqlite_master`` and run verbatim, rather
    than re-running the migrations (sqlite-utils parses scripts slowly, once per month).
    Written beside and renamed, so a crash never leaves a half-made archive."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = [row[0] for row in conn.execute(
        "SELECT sql FROM main.sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE "
        "'sqlite_%' ORDER BY type != 'table'")]
    cursor = conn.execute("SELECT * FROM main._sqlite_migrations")
    names = ", ".join(d[0] for d in cursor.description)
    applied = cursor.fetchall()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    warm = sqlite3.connect(tmp, isolation_level=None)
    try:
        warm.execute("PRAGMA journal_mode = WAL")
        warm.execute("BEGIN")
        for sql in schema:
            warm.execute(sql)
        warm.executemany(f"INSERT INTO _sqlite_migrations ({names}) "  # noqa: S608
                         f"VALUES ({', '.join('?' * len(applied[0]))})" if applied else
                         "SELECT 1 WHERE 0", applied)
        warm.execute("COMMIT")
    finally:
        warm.close()
    tmp.replace(path)


def _move_chunk(conn: sqlite3.Connection, month: str, attempts: int = 3) -> None:
    """Copy the rows named in temp.moving to warm, then verify and delete them in one write
    transaction on the node database (so nothing changes them in between)."""
    present = {row[0] for row in conn.execute(
        "SELECT name FROM main.sqlite_master WHERE type = 'table'")}
    moved = [(t, _MOVING) for t in MOVED_TABLES] + [
        (table, _moving_by(key, parent)) for table, key, parent in _DEPENDENT
        if table in present]

    def lines(schema: str) -> Digest:
        return digest(line for table, where in moved
                      for line in read_rows(conn, schema, table, where.format(schema=schema)))

    for _ in range(attempts):
        conn.execute("BEGIN")
        for table, where in moved:
            conn.execute(f"INSERT OR REPLACE INTO warm.{table} SELECT * FROM main.{table} "  # noqa: S608
                         f"WHERE {where.format(schema='main')}")
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        if lines("main") == lines("warm"):
            for table, where in reversed(moved):  # what refers to a row before the row
                conn.execute(f"DELETE FROM main.{table} "  # noqa: S608
                             f"WHERE {where.format(schema='main')}")
            conn.execute("COMMIT")
            return
        conn.execute("ROLLBACK")  # changed since the copy (an alert updated): copy again
    raise RetentionError("warm copy does not match the node database", field="month",
                         value=month, hint="nothing was deleted; see the logs and re-run")


def _warm_to_cold(settings: Settings, cutoff: float, dry_run: bool,
                  pending: dict[str, Action]) -> list[Action]:
    """Whole months whose last day is past ``cutoff``. ``pending``: in a dry run, what the
    hot->warm step would have added (counted here too, as a real run would move it)."""
    actions = []
    for month in sorted(set(archive.warm_months(settings)) | set(pending)):
        if archive.month_bounds(month)[1] > cutoff:
            continue
        lines = _warm_lines(settings, month)
        n, alerts = _counts(lines)
        if month in pending:
            n, alerts = n + pending[month].transactions, alerts + pending[month].alerts
        actions.append(Action("warm->cold", month, n, alerts))
        if dry_run:
            continue
        merged = {_key(line): line for line in archive.read_cold(settings, month, repair=True)
                  or []}
        merged.update((_key(line), line) for line in lines)
        archive.write_cold(settings, month, list(merged.values()))
        kept = set(archive.read_cold(settings, month) or [])
        if not kept.issuperset(lines):
            raise RetentionError("cold file lacks rows of the warm month", field="month",
                                 value=month, hint="the warm database was kept; re-run")
        archive.remove_warm(settings, month)
    return actions


def _warm_lines(settings: Settings, month: str) -> list[bytes]:
    path = archive.warm_path(settings, month)
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        return [line for t in MOVED_TABLES for line in read_rows(conn, "main", t)]
    finally:
        conn.close()


def _purge(settings: Settings, cutoff: float, held: set[str], dry_run: bool) -> list[Action]:
    actions = []
    for month in archive.cold_months(settings):
        if archive.month_bounds(month)[1] > cutoff:
            continue
        lines = archive.read_cold(settings, month, repair=not dry_run) or []
        keep = [line for line in lines if archive.row_account(line) in held]
        if len(keep) == len(lines) and keep:
            actions.append(Action("keep-held", month, *_counts(keep), held_rows=len(keep)))
            continue
        gone = [line for line in lines if archive.row_account(line) not in held]
        actions.append(Action("purge", month, *_counts(gone), held_rows=len(keep)))
        if dry_run:
            continue
        if keep:
            archive.write_cold(settings, month, keep)
        else:
            archive.remove_cold(settings, month)
    return actions


def _check_cold(settings: Settings) -> None:
    """Every cold file against its manifest's SHA-256 (a read, no decompression); one that
    differs is read in full, and either was a write interrupted before its manifest was
    renamed (the manifest is rewritten) or is corrupt (ArchiveError: the operator must
    restore it from a backup of the archive)."""
    for month in archive.cold_months(settings):
        if not archive.cold_matches_manifest(settings, month):
            archive.read_cold(settings, month, repair=True)
            log.warning("retention.manifest_rewritten", txn_id=None, month=month)


def _key(line: bytes) -> tuple[str, str]:
    return archive.row_table(line), _transaction_id(line)


def _transaction_id(line: bytes) -> str:
    return str(json.loads(line)["row"]["transaction_id"])


def _counts(lines: list[bytes]) -> tuple[int, int]:
    tables = [archive.row_table(line) for line in lines]
    return tables.count("transactions"), tables.count("alerts")


# --- right to erasure -----------------------------------------------------------------


def erase(settings: Settings, account: str, now: datetime | None = None) -> dict[str, Any]:
    """Delete every row of ``account`` from every tier (node database, warm databases, cold
    files), verify none is left, and record the erasure (by the account's SHA-256 only).
    Refused for an account on legal hold."""
    now = now or datetime.now(timezone.utc)
    conn = _connect(settings)
    try:
        if conn.execute("SELECT 1 FROM legal_holds WHERE account_id = ?", (account,)).fetchone():
            raise RetentionError("account is on legal hold", field="account", value=account,
                                 hint="release the hold first (branchguard retention release)")
        counts = {"hot": _erase_db(conn, account)}
    finally:
        conn.close()
    for month in archive.warm_months(settings):
        warm = sqlite3.connect(archive.warm_path(settings, month), isolation_level=None)
        try:
            warm.execute("PRAGMA busy_timeout = 5000")
            counts[f"warm {month}"] = _erase_db(warm, account)
        finally:
            warm.close()
    for month in archive.cold_months(settings):
        lines = archive.read_cold(settings, month, repair=True) or []
        keep = [line for line in lines if archive.row_account(line) != account]
        if len(keep) == len(lines):
            continue
        counts[f"cold {month}"] = _counts([line for line in lines
                                           if archive.row_account(line) == account])
        if keep:
            archive.write_cold(settings, month, keep)
        else:
            archive.remove_cold(settings, month)
    transactions = sum(c[0] for c in counts.values())
    alerts = sum(c[1] for c in counts.values())
    conn = _connect(settings)
    try:
        conn.execute("INSERT INTO erasures (account_sha256, erased_at, transactions, alerts) "
                     "VALUES (?, ?, ?, ?)", (hashlib.sha256(account.encode()).hexdigest(),
                                             now.timestamp(), transactions, alerts))
    finally:
        conn.close()
    report = {"transactions": transactions, "alerts": alerts,
              "tiers": {k: {"transactions": v[0], "alerts": v[1]} for k, v in counts.items()
                        if v != (0, 0)}}
    log.info("retention.erased", txn_id=None, transactions=transactions, alerts=alerts)
    return report





def _erase_db(conn: sqlite3.Connection, account: str) -> tuple[int, int]:
    """Delete an account's rows from one database in one transaction, checked to be gone."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        present = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, key, parent in _DEPENDENT:  # what hangs off the account's rows, first
            if table in present:
                conn.execute(f"DELETE FROM {table} WHERE {key} IN "  # noqa: S608
                             f"(SELECT {key} FROM {parent} WHERE account_id = ?)", (account,))
        alerts = conn.execute("DELETE FROM alerts WHERE account_id = ?", (account,)).rowcount
        rows = conn.execute("DELETE FROM transactions WHERE account_id = ?", (account,)).rowcount
        left = conn.execute("SELECT (SELECT count(*) FROM transactions WHERE account_id = ?) + "
                            "(SELECT count(*) FROM alerts WHERE account_id = ?)",
                            (account, account)).fetchone()[0]
        if left:
            raise RetentionError("rows left after erasure", field="account", value=account)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return rows, alerts
