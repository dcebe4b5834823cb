"""A partition's database moves with its lease (issue 19): replicated by Litestream while
it is held, restored from that replica by the next owner when another machine wrote it last.

Partitioned scorers on several machines each keep a partition's database under their own
``data_dir`` (``partitions/p<p>/branchguard.db``). When a partition changes hands between
machines, the new owner's copy is stale or absent. So:

- **Every store has an id** (:func:`store_id`, kept in ``<data_dir>/partitions/store-id``),
  and the ``BG_PARTITIONS`` bucket (a JetStream KV, no TTL) records, for each partition,
  which store opened it last and under which lease token (:class:`Writers`). An owner
  writes that record when it opens the partition, after taking its lease and before its
  first commit.
- **Opening** (:func:`restore_if_behind`): if the record names another store, the
  partition's replica is restored beside the local copy and replaces it when its
  checkpoint is ahead (or there is no local copy). The replica may lag the last commits by
  ``replica_sync_interval_seconds``: the new owner replays those from ``TX`` after the
  restored checkpoint, and adopts the verdicts already published for them, exactly as a
  restart does. If the record names this store, the local copy is the newest (Litestream
  only ever lags it) and nothing is restored.
- **While held**, one ``litestream replicate`` per partition copies the database to
  :func:`partition_replica` (``partition_replica_url`` with ``{partition}`` replaced; one
  object-store bucket per database on NATS, since Litestream's NATS replica ignores a
  path). It stops when the partition is handed off or lost.

Restoring and starting Litestream run on worker threads, never on the event loop, so a
lease's renewal never waits behind them (lease.py).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from .. import logs
from ..errors import StoreError
from ..settings import Settings
from .replication import restore

log = logs.get("appliance.partition_state")

BUCKET = "BG_PARTITIONS"


def partition_replica(settings: Settings, partition: int) -> str:
    """The replica URL of partition ``partition``'s database: ``partition_replica_url`` with
    ``{partition}`` replaced, or, unset, ``<data_dir>/replica/partitions/p<p>`` on this
    machine (a guard against a corrupt file, which moves nothing between machines)."""
    template = settings.partition_replica_url
    if template:  # as written, or as a path's as_uri() spells it
        return template.replace("{partition}", str(partition)).replace(
            "%7Bpartition%7D", str(partition))
    return (settings.data_dir / "replica" / "partitions" / f"p{partition}").resolve().as_uri()


def store_id(data_dir: Path) -> str:
    """This store's id: made once, kept in ``<data_dir>/partitions/store-id``."""
    path = data_dir / "partitions" / "store-id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(8) + "\n")
        tmp.replace(path)
    return path.read_text().strip()


@dataclass(frozen=True)
class LastWriter:
    """Who opened a partition last: a store id and that tenure's lease token."""

    store: str
    token: int


class Writers:
    """The ``BG_PARTITIONS`` bucket: the store that last opened each partition."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> Writers:
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=BUCKET, history=1, replicas=replicas,
                description="Branchguard: the store that last opened each partition "
                            "(appliance/operations/partition_state.py)"))
        return cls(kv)

    async def last(self, partition: int) -> LastWriter | None:
        try:
            entry = await self._kv.get(f"p{partition}")
        except KeyNotFoundError:
            return None
        body = json.loads(entry.value or b"{}")
        return LastWriter(store=str(body.get("store", "")), token=int(body.get("token", 0)))

    async def record(self, partition: int, store: str, token: int) -> None:
        await self._kv.put(f"p{partition}", json.dumps({"store": store, "token": token}).encode())


def checkpoint_of(db: Path, consumer: str) -> int:
    """The stream sequence a database's checkpoint records for ``consumer`` (0: none)."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT stream_seq FROM checkpoints WHERE consumer = ?",
                           (consumer,)).fetchone()
    except sqlite3.OperationalError:  # no checkpoints table yet: nothing committed
        return 0
    finally:
        conn.close()
    return int(row[0]) if row else 0


def restore_if_behind(settings: Settings, replica: str, partition: int
                      ) -> dict[str, Any] | None:
    """Restore ``replica`` beside the partition's database (``settings`` are the
    partition's) and put it in place if its checkpoint is ahead of the local copy's, or
    there is none. Returns what was restored, or None when the local copy was kept (or the
    replica is empty or unreachable: logged, and the partition opens on its local copy and
    replays the rest of ``TX``). Blocking: call it from a worker thread."""
    db = settings.db_path
    local = checkpoint_of(db, settings.consumer)
    beside = db.with_name(db.name + ".restoring")
    try:
        report = restore(_with_replica(settings, replica), beside, force=True)
    except StoreError as exc:
        log.warning("partition.restore_failed", txn_id=None, partition=partition, replica=replica,
                    error=str(exc), local_checkpoint=local)
        _remove(beside)
        return None
    restored = checkpoint_of(beside, settings.consumer)
    if restored <= local and db.exists():
        log.info("partition.replica_behind", txn_id=None, partition=partition, replica=replica,
                 local_checkpoint=local, replica_checkpoint=restored)
        _remove(beside)
        return None
    for suffix in ("-wal", "-shm"):  # the old copy's, which would be replayed onto the new
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    shutil.rmtree(db.parent / f".{db.name}-litestream", ignore_errors=True)
    beside.replace(db)
    _remove(beside)
    log.info("partition.restored", txn_id=None, partition=partition, replica=replica,
             local_checkpoint=local,
             checkpoint=restored, seconds=report["seconds"],
             transactions=report["transactions"])
    return {**report, "checkpoint": restored, "local_checkpoint": local}


def _with_replica(settings: Settings, replica: str) -> Settings:
    return dataclasses.replace(settings, replica_url=replica)


def _remove(db: Path) -> None:
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    shutil.rmtree(db.parent / f".{db.name}-litestream", ignore_errors=True)
