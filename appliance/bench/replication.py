"""``branchguard bench replication``: how long a committed row waits to reach the replica.

A throwaway node database (the real schema, ``store.open_db``'s pragmas, the node's PASSIVE
checkpoints every second) is written at a steady rate while the real litestream replicates
it to a local folder. Every ``probe_seconds`` the replica is restored into a scratch file
(``litestream restore``, as an operator would) and the lag sample is the age of the oldest
commit the replica does not have yet (0 when it has them all). Each committed row records
its own commit time, so no clock is shared between processes but this one.

Litestream's log is read afterwards: more than one ``snapshot complete`` would mean the
node's checkpoints had broken litestream's WAL position and forced a fresh snapshot.
"""

from __future__ import annotations

import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..operations.replication import Litestream, litestream_env, litestream_binary
from ..settings import load
from ..store import Store


def measure_lag(seconds: float = 10.0, rate: float = 50.0, sync_interval: float = 1.0,
                probe_seconds: float = 0.25, rows_per_commit: int = 20) -> dict[str, Any]:
    """Commit ``rate`` times a second for ``seconds`` (``rows_per_commit`` rows each) and
    sample replication lag. Returns the percentiles in seconds and what was counted."""
    with tempfile.TemporaryDirectory(prefix="branchguard-lag-") as tmp:
        root = Path(tmp)
        settings = load(None, env={}, data_dir=root / "node",
                        replica_url=(root / "replica").as_uri(),
                        replica_sync_interval_seconds=sync_interval)
        store = Store.open(settings.db_path)
        replicator = Litestream(settings)
        replicator.start()
        commits: list[float] = []
        done = threading.Event()

        def write() -> None:
            seq = 0
            next_at = time.monotonic()
            while not done.is_set():
                with store.db.atomic():
                    now = time.time()
                    store.db.conn.executemany(
                        "INSERT INTO dead_letters (stream_seq, subject, reason, size, "
                        "received_at) VALUES (?, 'tx.lag', 'replication lag probe', 100, ?)",
                        [(seq * rows_per_commit + i, now) for i in range(rows_per_commit)])
                commits.append(now)
                seq += 1
                if seq % max(int(rate), 1) == 0:
                    store.checkpoint_wal()  # as the scorer does, about once a second
                next_at += 1.0 / rate
                time.sleep(max(0.0, next_at - time.monotonic()))

        writer = threading.Thread(target=write, name="lag-writer")
        samples: list[float] = []
        writer.start()
        try:
            deadline = time.monotonic() + seconds
            probe = root / "probe.db"
            while time.monotonic() < deadline:
                time.sleep(probe_seconds)
                observed = time.time()
                have = _replicated_commits(probe, settings.replica, rows_per_commit)
                if have < 0:
                    continue  # nothing replicated yet
                missing = commits[have:] if have < len(commits) else []
                samples.append(max(0.0, observed - missing[0]) if missing else 0.0)
        finally:
            done.set()
            writer.join()
            store.close()
            replicator.stop()
        snapshots = replicator.log_path.read_text().count('"snapshot complete"')
    lag = np.array(samples) if samples else np.zeros(1)
    return {"seconds": seconds, "commits_per_second": rate, "rows_per_commit": rows_per_commit,
            "sync_interval_seconds": sync_interval, "commits": len(commits),
            "probes": len(samples), "lag_p50_seconds": round(float(np.percentile(lag, 50)), 3),
            "lag_p95_seconds": round(float(np.percentile(lag, 95)), 3),
            "lag_max_seconds": round(float(lag.max()), 3), "snapshots": snapshots}


def _replicated_commits(probe: Path, replica: str, rows_per_commit: int) -> int:
    """How many commits the replica holds (-1 when it cannot be restored yet)."""
    result = subprocess.run(
        [str(litestream_binary()), "restore", "-force", "-o", str(probe), replica],
        capture_output=True, env=litestream_env(), check=False)
    if result.returncode != 0:
        return -1
    conn = sqlite3.connect(probe)
    try:
        row = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    except sqlite3.OperationalError:
        return -1  # the schema itself is not there yet
    finally:
        conn.close()
    return int(row[0]) // rows_per_commit


def format_lag(report: dict[str, Any]) -> str:
    return (f"replication lag over {report['probes']} probes ({report['commits']} commits at "
            f"{report['commits_per_second']:g}/s, sync interval "
            f"{report['sync_interval_seconds']:g} s): p50 {report['lag_p50_seconds']} s, "
            f"p95 {report['lag_p95_seconds']} s, max {report['lag_max_seconds']} s; "
            f"litestream snapshots: {report['snapshots']}")
