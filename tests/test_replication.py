"""Replication with the real litestream: lose the node's data directory, restore, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.operations.replication import litestream_binary, litestream_config, restore
from appliance.settings import load
from appliance.store import Store

from .support import decode, make_transactions, query, read_stream, send, stored_count, wait_until

Node = type


def _ids(db: Path) -> set[str]:
    return {row[0] for row in query(db, "SELECT transaction_id FROM transactions")}


def _rows(db: Path) -> list[tuple[object, ...]]:
    return query(db, "SELECT transaction_id, stream_seq, features, risk, severity, decision, "
                     "reasons FROM transactions ORDER BY stream_seq")


def test_the_litestream_binary_is_installed() -> None:
    result = subprocess.run([str(litestream_binary()), "version"], capture_output=True,
                            check=True)
    assert result.stdout.decode().startswith("0.5"), result.stdout


def test_config_names_the_database_and_the_replica(tmp_path: Path) -> None:
    settings = load(None, env={}, data_dir=tmp_path, replica_sync_interval_seconds=0.25)
    config = litestream_config(settings)
    db = config["dbs"][0]
    assert db["path"] == str((tmp_path / "branchguard.db").resolve())
    assert db["replica"]["url"] == (tmp_path / "replica").resolve().as_uri()
    assert db["monitor-interval"] == db["replica"]["sync-interval"] == "250ms"


def test_restore_refuses_to_overwrite_and_names_the_field(tmp_path: Path) -> None:
    target = tmp_path / "branchguard.db"
    target.write_bytes(b"")
    with pytest.raises(Exception, match="^to: a database exists"):
        restore(load(None, env={}, data_dir=tmp_path), target)
    with pytest.raises(Exception, match="replica_url: litestream restore failed"):
        restore(load(None, env={}, data_dir=tmp_path / "empty"), tmp_path / "new.db")


@pytest.mark.timeout(600)
def test_lose_the_data_directory_restore_and_resume_without_loss_or_realerting(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    txs = [item.tx for item in make_transactions(1500, seed=21, rate=20.0)]
    first, second, third = txs[:600], txs[600:1100], txs[1100:]
    replica = (tmp_path / "replica").as_uri()  # elsewhere: the data dir is about to go
    env = {"BRANCHGUARD_REPLICA_URL": replica,
           "BRANCHGUARD_REPLICA_SYNC_INTERVAL_SECONDS": "0.2"}
    data, db = tmp_path / "node", tmp_path / "node" / "branchguard.db"

    # A scorer that never loses anything, on its own consumer: the expected result.
    ref_db = tmp_path / "ref" / "branchguard.db"
    node_factory(tmp_path / "ref", nats_url, {"BRANCHGUARD_CONSUMER": "reference",
                                              "BRANCHGUARD_REPLICATE": "false"}).start()

    node = node_factory(data, nats_url, env).start()
    assert send(nats_url, first) == len(first)
    wait_until(lambda: stored_count(db) == len(first), message="first part stored")
    committed = _ids(db)
    time.sleep(1.5)  # several sync intervals: the replica's last sync is after these commits
    assert send(nats_url, second) == len(second)
    node.kill()  # a crash mid-stream (litestream is told to stop when the node dies) ...
    shutil.rmtree(data)  # ... and the box's disk is gone

    result = subprocess.run(
        [sys.executable, "-m", "appliance", "restore", "--data-dir", str(data)],
        capture_output=True, env={**os.environ, **env}, check=False)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["transactions"] >= len(first)
    assert committed <= _ids(db), "a transaction committed before the last sync was lost"
    assert report["checkpoints"]["scorer"] >= len(first)

    node = node_factory(data, nats_url, env).start()  # resumes from the restored checkpoint
    assert send(nats_url, third) == len(third)
    wait_until(lambda: stored_count(db) == len(txs), timeout=120, message="stream refilled")
    wait_until(lambda: stored_count(ref_db) == len(txs), timeout=120, message="reference")
    assert node.stop() == 0

    assert _ids(db) == {t.transaction_id for t in txs}
    assert _rows(db) == _rows(ref_db)  # same features and verdicts as if nothing happened
    one_alert_each = ("SELECT count(*), count(DISTINCT transaction_id) FROM alerts",)
    assert query(db, *one_alert_each) == query(ref_db, *one_alert_each)
    assert query(db, "SELECT count(*) FROM alerts")[0][0] == \
        query(db, "SELECT count(*) FROM transactions WHERE decision != 'approve'")[0][0]
    verdicts = read_stream(nats_url, "VERDICTS", expect=len(txs))
    assert len(verdicts) == len(txs)  # re-published verdicts were deduplicated
    assert {decode(m.data)["transaction_id"] for m in verdicts} == _ids(db)

    # Replication carried on after the restore: the replica now has every transaction.
    again = restore(load(None, env={}, replica_url=replica), tmp_path / "again.db")
    assert again["transactions"] == len(txs)
    assert _ids(tmp_path / "again.db") == _ids(db)


def test_replicate_command_runs_litestream_on_the_node_settings(tmp_path: Path) -> None:
    """``branchguard replicate`` (the systemd unit and the compose service) replicates the
    node database it finds through the same settings; a restore then has every row."""
    data = tmp_path / "node"
    replica = (tmp_path / "replica").as_uri()
    store_settings = load(None, env={}, data_dir=data, replica_url=replica)
    store = Store.open(store_settings.db_path)
    env = {**os.environ, "BRANCHGUARD_REPLICA_URL": replica,
           "BRANCHGUARD_REPLICA_SYNC_INTERVAL_SECONDS": "0.1"}
    process = subprocess.Popen([sys.executable, "-m", "appliance", "replicate", "--data-dir",
                                str(data)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        with store.db.atomic():
            store.db.conn.executemany(
                "INSERT INTO dead_letters (stream_seq, subject, reason, size, received_at) "
                "VALUES (?, 'tx.x', 'probe', 1, 0)", [(i,) for i in range(50)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probe = tmp_path / "probe.db"
            try:
                restore(store_settings, probe, force=True)
            except Exception:  # noqa: BLE001 - not replicated yet
                time.sleep(0.2)
                continue
            if query(probe, "SELECT count(*) FROM dead_letters")[0][0] == 50:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the replica never had the 50 rows")
    finally:
        process.terminate()
        process.wait(10)
        store.close()
    assert process.returncode == 0  # litestream itself stopped cleanly on SIGTERM


def test_a_replica_litestream_refuses_stops_the_node_with_its_reason(tmp_path: Path) -> None:
    """Litestream starts after the state rebuild (docs/operations.md); if it then fails, the
    node stops: exit code 2, the field and the log named, no traceback, nothing left running."""
    data = tmp_path / "node"
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--quiet", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "BRANCHGUARD_REPLICA_URL": "bogus://nowhere",
             "BRANCHGUARD_NATS_PORT": "0", "BRANCHGUARD_RUN_API": "false"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: replica_url: litestream exited" in result.stderr
    assert str(data / "litestream" / "litestream.log") in result.stderr
    assert "Traceback" not in result.stderr
    assert '"event":"node.stopped"' in result.stderr + result.stdout
    leftovers = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True)
    assert leftovers.stdout == "", leftovers.stdout
