"""Gathering the partitions' databases into the node's (issue 19): what analysts, the API, the
console and the alert dispatcher read.

Each partition's scorer commits to its own database (operations/partitioned.py). People work
on the node database, ``<data_dir>/branchguard.db``: the queue, cases, the case file, the
alert outbox the dispatcher delivers, retraining. So the partitions on this machine are
copied into it, in one direction, every ``GATHER_SECONDS``: each partition database's new
transactions (all their columns, features included) with their alerts (each new alert with
its outbox row, in the same transaction, exactly as the scorer writes them), shadow scores
and dead letters. A cursor per source (``gathered``, migration m016) records how far each one
has been copied; every insert is keyed (transaction id, stream sequence), so copying again
after a crash changes nothing.

One process per data directory gathers (an exclusive ``flock`` on ``gather.lock``): several
scorer processes sharing a machine's data directory do not contend for the node database's
write lock. A partition whose database lives on another machine is gathered there, into that
machine's node database; bringing every machine's together is the hub's work (issue 20).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sqlite3
from pathlib import Path
from typing import IO

from .. import logs
from ..settings import Settings
from ..store import open_db

log = logs.get("appliance.gather")

GATHER_SECONDS = 1.0
BATCH_ROWS = 5000
"""Transactions copied from one source per step (a step is one short write transaction)."""
SOURCES = "partitions/p*/branchguard.db"

_ALERT_COLUMNS = ("transaction_id, created_at, ts, account_id, terminal_id, severity, risk, "
                  "reasons, updated_at")


def sources(data_dir: Path) -> list[Path]:
    """The partition databases under ``data_dir``, in partition order."""
    return sorted(data_dir.glob(SOURCES), key=lambda p: int(p.parent.name.removeprefix("p")))


def gather_once(node: sqlite3.Connection, data_dir: Path, limit: int = BATCH_ROWS) -> int:
    """Copy what is new in every partition database into ``node`` (up to ``limit``
    transactions per source). Returns the transactions copied."""
    copied = 0
    for source in sources(data_dir):
        copied += _gather_source(node, source, limit)
    return copied


def _gather_source(node: sqlite3.Connection, source: Path, limit: int) -> int:
    name = str(source.parent.name)
    node.execute("ATTACH DATABASE ? AS src", [f"{source.resolve().as_uri()}?mode=ro"])
    try:
        node.execute("BEGIN IMMEDIATE")
        try:
            row = node.execute("SELECT last_rowid, last_dead_seq FROM gathered WHERE source = ?",
                               [name]).fetchone()
            last, last_dead = (int(row[0]), int(row[1])) if row else (0, 0)
            upto = node.execute(
                "SELECT max(rowid) FROM (SELECT rowid FROM src.transactions WHERE rowid > ? "
                "ORDER BY rowid LIMIT ?)", [last, limit]).fetchone()[0]
            dead_upto = node.execute("SELECT max(stream_seq) FROM src.dead_letters"
                                     ).fetchone()[0] or last_dead
            if upto is None and dead_upto == last_dead:
                node.execute("ROLLBACK")
                return 0
            upto = last if upto is None else int(upto)
            copied = node.execute(
                "INSERT OR IGNORE INTO main.transactions SELECT * FROM src.transactions "
                "WHERE rowid > ? AND rowid <= ?", [last, upto]).rowcount
            before = node.execute("SELECT max(alert_id) FROM main.alerts").fetchone()[0] or 0
            changes = node.total_changes
            node.execute(
                f"INSERT OR IGNORE INTO main.alerts ({_ALERT_COLUMNS}) "  # noqa: S608 - constant
                f"SELECT {_ALERT_COLUMNS} FROM src.alerts WHERE transaction_id IN "
                "(SELECT transaction_id FROM src.transactions WHERE rowid > ? AND rowid <= ?) "
                "ORDER BY alert_id", [last, upto])
            if node.total_changes > changes:  # each new alert's outbox row, as the scorer does
                node.execute("INSERT INTO alert_outbox (alert_id) SELECT alert_id FROM alerts "
                             "WHERE alert_id > ?", [before])
            node.execute(
                "INSERT OR IGNORE INTO main.shadow_scores SELECT * FROM src.shadow_scores "
                "WHERE transaction_id IN (SELECT transaction_id FROM src.transactions "
                "WHERE rowid > ? AND rowid <= ?)", [last, upto])
            node.execute("INSERT OR IGNORE INTO main.dead_letters SELECT * FROM src.dead_letters "
                         "WHERE stream_seq > ? AND stream_seq <= ?", [last_dead, dead_upto])
            node.execute(
                "INSERT INTO gathered (source, last_rowid, last_dead_seq) VALUES (?, ?, ?) "
                "ON CONFLICT (source) DO UPDATE SET last_rowid = excluded.last_rowid, "
                "last_dead_seq = excluded.last_dead_seq", [name, upto, dead_upto])
            node.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                node.execute("ROLLBACK")
            raise
    finally:
        node.execute("DETACH DATABASE src")
    if copied:
        log.info("partition.gathered", txn_id=None, source=name, transactions=copied,
                 upto_rowid=upto)
    return copied


def open_node(path: Path) -> sqlite3.Connection:
    """The node database (created and migrated if need be), on a connection that may attach
    a partition's database read-only (a URI) and whose transactions are explicit."""
    open_db(path).close()
    node = sqlite3.connect(path.resolve().as_uri(), uri=True, check_same_thread=False,
                           isolation_level=None)
    node.execute("PRAGMA busy_timeout = 5000")
    return node


def exclusive(path: Path) -> IO[str] | None:
    """An exclusive lock on ``path`` (an open file; closing it releases the lock), or None
    if another process holds it."""
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


async def gather_forever(settings: Settings, stop: asyncio.Event,
                         every: float = GATHER_SECONDS) -> None:
    """Gather every ``every`` seconds until ``stop`` (off the event loop), if this process
    is the data directory's gatherer; else wait for the one that is to go, and take over."""
    loop = asyncio.get_running_loop()
    lock: IO[str] | None = None
    node: sqlite3.Connection | None = None
    try:
        while not stop.is_set():
            if lock is None:
                lock = exclusive(settings.data_dir / "gather.lock")
                if lock is not None:
                    node = await loop.run_in_executor(None, open_node, settings.db_path)
                    log.info("gather.started", txn_id=None, data_dir=str(settings.data_dir))
            if node is not None:
                try:
                    await loop.run_in_executor(None, gather_once, node, settings.data_dir)
                except sqlite3.Error as exc:  # a busy node database: the next round tries
                    log.warning("gather.failed", txn_id=None, error=str(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
        if node is not None:  # what the partitions committed last, before leaving
            await loop.run_in_executor(None, gather_once, node, settings.data_dir)
    finally:
        if node is not None:
            node.close()
        if lock is not None:
            lock.close()
