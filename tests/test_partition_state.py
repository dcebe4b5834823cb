"""A partition's database moves with its lease (operations/partition_state.py): two
partitioned scorers with data directories of their own, as on two machines, sharing one
nats-server and one place for replicas; the real litestream binary replicates and restores.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import nats
import pytest

from appliance.bench.delivery import stored_ids
from appliance.bench.partition_scorers import (PARTITIONS, ScorerChild, caught_up, log_time,
                                               partition_db, scorer_env, tx_subjects,
                                               wait_until)
from appliance.bench.throughput import bench_transactions
from appliance.feed.terminal import to_message
from appliance.operations.node import EmbeddedNats
from appliance.operations.partition_state import checkpoint_of, restore_if_behind, store_id
from appliance.operations.partitioned import partition_settings
from appliance.operations.replication import Litestream
from appliance.settings import load
from appliance.store import Store

from .test_store import score_all
from .support import make_transactions


def publish(url: str, start: int, count: int) -> list[str]:
    """``count`` transactions as terminals publish them; returns their ids."""
    txs = bench_transactions(7, start + count, datetime(2027, 1, 4, tzinfo=timezone.utc))
    messages = [to_message(tx, "BR001") for tx in txs[start:]]

    async def main() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        try:
            for m in messages:
                await js.publish(m.subject, m.data, headers={"Nats-Msg-Id": m.msg_id})
        finally:
            await nc.close()

    asyncio.run(main())
    return [m.msg_id for m in messages]


def test_a_replica_ahead_of_the_local_copy_replaces_it_and_one_behind_does_not(
        tmp_path: Path) -> None:
    node = load(None, env={"BRANCHGUARD_PARTITIONS": "2"}, data_dir=tmp_path / "a",
                partition_replica_url=f"file://{tmp_path}/replicas/p{{partition}}")
    a = partition_settings(node, 1)
    assert a.replica == (tmp_path / "replicas" / "p1").as_uri()
    a.data_dir.mkdir(parents=True)
    store = Store.open(a.db_path)
    try:
        store.save_batch(score_all([item.tx for item in make_transactions(30)]), [],
                         a.consumer, 30, lease_token=3)
    finally:
        store.close()
    assert checkpoint_of(a.db_path, a.consumer) == 30
    replicator = Litestream(a)
    replicator.start()
    try:
        assert wait_until(lambda: any((tmp_path / "replicas" / "p1").rglob("*")), 30)
    finally:
        replicator.stop()
    b = partition_settings(load(None, env={"BRANCHGUARD_PARTITIONS": "2"},
                                data_dir=tmp_path / "b",
                                partition_replica_url=node.partition_replica_url), 1)
    b.data_dir.mkdir(parents=True)
    report = restore_if_behind(b, b.replica, 1)  # no local copy: the replica's is taken
    assert report is not None and report["checkpoint"] == 30 and report["transactions"] == 30
    assert checkpoint_of(b.db_path, b.consumer) == 30
    assert not list(b.data_dir.glob("*.restoring*"))
    assert restore_if_behind(a, a.replica, 1) is None  # not ahead of A's own copy: kept
    assert checkpoint_of(a.db_path, a.consumer) == 30
    assert store_id(node.data_dir) == store_id(node.data_dir) != store_id(tmp_path / "b")


@pytest.mark.timeout(300)
def test_a_partition_moved_to_another_machine_carries_on_from_its_restored_database(
        tmp_path: Path, nats_url: str) -> None:
    replicas = f"file://{tmp_path}/replicas/p{{partition}}"

    def env(data_dir: Path) -> dict[str, str]:
        return {**scorer_env(nats_url, data_dir), "BRANCHGUARD_STREAM_REPLICAS": "1",
                "BRANCHGUARD_REPLICATE": "true",
                "BRANCHGUARD_REPLICA_SYNC_INTERVAL_SECONDS": "0.2",
                "BRANCHGUARD_PARTITION_REPLICA_URL": replicas}

    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    a = ScorerChild.start("scorer-a", env(first), tmp_path)
    try:
        assert wait_until(lambda: len(a.opened()) == PARTITIONS, 60), a.log.read_text()[-3000:]
        ids = publish(nats_url, 0, 600)
        assert wait_until(lambda: caught_up(first, tx_subjects(nats_url)), 60)
    finally:
        assert a.stop() == 0  # a clean handoff: every partition released, litestream synced
    b = ScorerChild.start("scorer-b", env(second), tmp_path)
    try:
        assert wait_until(lambda: len(b.opened()) == PARTITIONS, 90), b.log.read_text()[-3000:]
        restored = {int(e["partition"]): e for e in b.events()
                    if e.get("event") == "partition.restored"}
        assert sorted(restored) == list(range(PARTITIONS)), b.log.read_text()[-3000:]
        opened = {int(e["partition"]): int(e["checkpoint"]) for e in b.events()
                  if e.get("event") == "partition.open"}
        for p in range(PARTITIONS):  # B opened each partition where A had left it
            assert opened[p] == restored[p]["checkpoint"] == checkpoint_of(
                partition_db(first, p), f"scorer-p{p}") > 0
        assert sum(int(e["transactions"]) for e in restored.values()) == 600
        ids += publish(nats_url, 600, 300)
        assert wait_until(lambda: caught_up(second, tx_subjects(nats_url)), 60)
    finally:
        assert b.stop() == 0
    stored = [i for p in range(PARTITIONS) for i in stored_ids(partition_db(second, p))]
    assert sorted(stored) == sorted(ids)  # every one, once, on B
    scored = sum(int(e.get("scored") or 0) for e in b.events()
                 if e.get("event") == "scorer.stopped")
    assert scored == 300  # B scored only what came after: A's 600 came with the databases
    with sqlite3.connect(partition_db(second, 0)) as conn:
        tokens = [row[0] for row in conn.execute("SELECT lease_token FROM checkpoints")]
    assert tokens and all(t is not None for t in tokens)


@pytest.mark.timeout(300)
def test_after_a_reconnect_each_partition_asks_again_and_loses_nothing(tmp_path: Path) -> None:
    # The scorer's server restarts under it (same store, same port): the pull requests it
    # had outstanding die with it. Each open partition asks for deliveries again
    # (partition.resumed) rather than re-creating its consumer, and every transaction
    # published before and after is stored once.
    server = EmbeddedNats(load(None, env={}, data_dir=tmp_path / "nats", nats_port=0))
    url = server.start()
    data = tmp_path / "data"
    env = {**scorer_env(url, data), "BRANCHGUARD_STREAM_REPLICAS": "1"}
    scorer = ScorerChild.start("scorer", env, tmp_path)
    try:
        assert wait_until(lambda: len(scorer.opened()) == PARTITIONS, 60)
        ids = publish(url, 0, 300)
        assert wait_until(lambda: caught_up(data, tx_subjects(url)), 60)
        server.stop()
        server.start()
        assert wait_until(lambda: sum(e.get("event") == "partition.resumed"
                                      for e in scorer.events()) == PARTITIONS, 30)
        ids += publish(url, 300, 300)
        assert wait_until(lambda: caught_up(data, tx_subjects(url)), 60)
    finally:
        assert scorer.stop() == 0
        server.stop()
    events = scorer.events()
    assert not [e for e in events if e.get("event") in ("partition.restarting",
                                                         "partition.opening")
                and log_time(e) > log_time(next(e for e in events
                                                if e.get("event") == "partition.resumed"))]
    stored = [i for p in range(PARTITIONS) for i in stored_ids(partition_db(data, p))]
    assert sorted(stored) == sorted(ids)
