"""Partitioned scorers (issue 19): leases fence every write, and the drill on a real 3-server
cluster (a scorer SIGKILLed, one added, a zombie, the TX leader SIGKILLed) stores exactly
what one scorer stores over the same stream."""

from __future__ import annotations

import json
import sqlite3
import sys
from array import array
from pathlib import Path

import pytest

from appliance.bench.scaleout import PARTITIONS, drill_messages, run_drill
from appliance.errors import FencedError
from appliance.operations.gather import gather_once, open_node
from appliance.operations.partitioned import fair_share, member_key, partition_settings
from appliance.scoring.rulebook import rules_path
from appliance.settings import load
from appliance.store import Store

from .support import make_transactions
from .test_store import score_all


def test_a_commit_under_an_older_tenure_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "p.db")
    try:
        first, second, third = score_all([item.tx for item in make_transactions(3)])
        store.save_batch([first], [], "scorer-p0", 1, lease_token=7)
        with pytest.raises(FencedError):
            store.save_batch([second], [], "scorer-p0", 2, lease_token=5)
        assert store.checkpoint_marks("scorer-p0").stream_seq == 1
        assert store.counts()["transactions"] == 1
        store.save_batch([third], [], "scorer-p0", 3, lease_token=9)  # a later tenure
        assert store.checkpoint_marks("scorer-p0").stream_seq == 3
        token = store.reader.execute("SELECT lease_token FROM checkpoints").fetchone()[0]
        assert token == 9
    finally:
        store.close()


def test_a_claim_fences_an_older_tenure_before_the_new_owner_reads_anything(
        tmp_path: Path) -> None:
    """An owner stopped in the middle of its commit (SIGSTOP) and woken after the next owner
    read the database must not commit: the next owner's state would lack those rows, and it
    would take their transactions for re-sends (Store.claim; seen once in the drill)."""
    zombie, successor = Store.open(tmp_path / "p.db"), Store.open(tmp_path / "p.db")
    try:
        first, second = score_all([item.tx for item in make_transactions(2)])
        zombie.save_batch([first], [], "scorer-p0", 1, lease_token=7)
        successor.claim("scorer-p0", 9)  # the next tenure, before it rebuilds its state
        assert successor.checkpoint_marks("scorer-p0").stream_seq == 1  # nothing moved
        with pytest.raises(FencedError):
            zombie.save_batch([second], [], "scorer-p0", 2, lease_token=7)
        assert successor.counts()["transactions"] == 1
        with pytest.raises(FencedError):
            zombie.claim("scorer-p0", 7)
        fresh = Store.open(tmp_path / "q.db")  # a partition never scored: the claim is its row
        fresh.claim("scorer-p1", 3)
        assert fresh.checkpoint_marks("scorer-p1").stream_seq == 0
        fresh.close()
    finally:
        zombie.close()
        successor.close()


def test_a_fenced_commit_holds_the_write_lock_from_its_fence_read_to_its_end(
        tmp_path: Path) -> None:
    """The fence is read inside the commit's transaction. Were that transaction to take the
    write lock only at its first write, a claim committed between the fence read and that
    write would make the write fail on a stale snapshot (a database error that stops the
    owner, instead of the fence's clear refusal). With the lock taken first (BEGIN
    IMMEDIATE), the claim has to wait for the commit."""
    owner, successor = Store.open(tmp_path / "p.db"), Store.open(tmp_path / "p.db")
    try:
        first, second = score_all([item.tx for item in make_transactions(2)])
        owner.save_batch([first], [], "scorer-p0", 1, lease_token=7)
        successor.db.conn.execute("PRAGMA busy_timeout = 0")
        read: list[str] = []
        refused: list[str] = []

        def claim_after_the_fence_read(statement: str) -> None:
            if read and not refused:  # the statement after the fence read: the first write
                try:
                    successor.claim("scorer-p0", 9)
                except sqlite3.OperationalError as exc:
                    refused.append(str(exc))
            if statement.startswith("SELECT lease_token FROM checkpoints"):
                read.append(statement)

        owner.db.conn.set_trace_callback(claim_after_the_fence_read)
        owner.save_batch([second], [], "scorer-p0", 2, lease_token=7)
        owner.db.conn.set_trace_callback(None)
        assert refused and "locked" in refused[0]  # the claim waited for the commit...
        assert owner.checkpoint_marks("scorer-p0").stream_seq == 2
        successor.db.conn.execute("PRAGMA busy_timeout = 5000")
        successor.claim("scorer-p0", 9)  # ...and, once it is in, fences the old tenure
        with pytest.raises(FencedError):
            owner.save_batch([], [], "scorer-p0", 3, lease_token=7)
    finally:
        owner.close()
        successor.close()


def test_each_partition_has_its_own_state_and_a_share_of_the_budget(tmp_path: Path) -> None:
    node = load(None, env={"BRANCHGUARD_PARTITIONS": "4"}, data_dir=tmp_path)
    p2 = partition_settings(node, 2)
    assert p2.db_path == tmp_path / "partitions" / "p2" / "branchguard.db"
    assert p2.consumer == "scorer-p2"
    assert p2.alert_budget_per_day == node.alert_budget_per_day / 4
    assert p2.rules_file == rules_path(node)  # the node's rules, not the partition's dir
    assert [fair_share(6, n) for n in (0, 1, 2, 3, 4, 6, 7)] == [6, 6, 3, 2, 2, 1, 1]
    assert member_key("host:1:ab") != member_key("host:2:ab")
    assert ":" not in member_key("host:1:ab")


def test_the_drill_input_holds_every_awkward_case() -> None:
    drill = drill_messages(4000)
    ids = [m.msg_id for m in drill.messages]
    assert len(set(ids) & drill.expected_ids) == 4000  # every transaction is sent
    assert len(ids) > len(set(ids))                       # re-sends inside the window
    assert any(i.endswith("-x") for i in ids)             # conflicting re-sends
    assert any(m.subject == "tx.BR001.short" for m in drill.messages)
    assert any(m.data == b"{not json" for m in drill.messages)
    newest, late = 0.0, 0
    for m in drill.messages:
        late += m.event_time < newest - 5  # sent after events seconds newer than it
        newest = max(newest, m.event_time)
    assert late >= 5
    assert drill.late_resends and all(m.msg_id in drill.expected_ids for m in drill.late_resends)


@pytest.mark.timeout(900)
def test_partitioned_scorers_store_what_one_scorer_stores_through_every_failure(
        tmp_path: Path) -> None:
    report = run_drill(tmp_path, count=30_000)
    sys.stderr.write(f"drill: publish {report['publish_seconds']} s, catch-up "
                     f"{report['catch_up_seconds']} s, failover {report['failover']}\n")
    assert report["caught_up"], report
    c = report["comparison"]
    assert c["reference_rows"] == 30_000, c
    assert c["missing"] == 0 and c["unexpected"] == 0 and c["stored_twice"] == 0, c
    shown = json.dumps(c)  # pytest cuts a long dict short; the examples say what differed
    assert c["features_differ"] == 0, shown  # every feature, the terminals' windows too
    assert c["verdicts_differ"] == 0, shown
    assert c["stored_unlike_published"] == 0, shown  # the row keeps the verdict of record
    assert c["dead_letters"] == c["reference_dead_letters"], c
    assert set(c["dead_letters"]) == {"bad json", "bad subject", "conflicting re-send"}, c
    assert report["ids_with_two_verdicts"] == 0, report
    zombie = report["zombie"]
    assert zombie["held_when_stopped"], zombie
    assert zombie["found_lost"] == zombie["held_when_stopped"], zombie
    assert zombie["commit_failures"] == 0, zombie
    orphaned = report["failover"]["scorer_kill"]
    assert orphaned and all(t["first_commit"] is not None for t in orphaned.values()), orphaned
    assert all(t is not None for t in report["failover"]["leader_kill_first_commit"].values())
    assert {name: code for name, code in report["exit_codes"].items()
            if name != "scorer-1"} == {f"scorer-{i}": 0 for i in range(2, 4)}, report
    assert len(report["exit_codes"]) == 3 and PARTITIONS == 6
    gathered = report["gathered"]  # what the node's API, console and dispatcher read
    assert gathered["transactions"] == 30_000, gathered
    assert gathered["alerts"] == gathered["partition_alerts"] == gathered["outbox"], gathered


def test_the_partitions_are_gathered_into_the_node_database_once(tmp_path: Path) -> None:
    txs = [item.tx for item in make_transactions(60)]
    scored = score_all(txs)  # a spread of risks: some alert
    for p, part in ((0, scored[:30]), (1, scored[30:45])):
        store = Store.open(tmp_path / "partitions" / f"p{p}" / "branchguard.db")
        store.save_batch(part, [], f"scorer-p{p}", part[-1].stream_seq, lease_token=3)
        store.close()
    node = open_node(tmp_path / "branchguard.db")
    try:
        assert gather_once(node, tmp_path) == 45
        assert gather_once(node, tmp_path) == 0  # copied once
        late = Store.open(tmp_path / "partitions" / "p1" / "branchguard.db")
        late.save_batch(scored[45:], [], "scorer-p1", scored[-1].stream_seq, lease_token=3)
        late.close()
        assert gather_once(node, tmp_path, limit=7) == 7  # in short steps
        while gather_once(node, tmp_path, limit=7):
            pass
        count = node.execute("SELECT count(*) FROM transactions").fetchone()[0]
        alerts = node.execute("SELECT count(*) FROM alerts").fetchone()[0]
        outbox = node.execute("SELECT count(*) FROM alert_outbox").fetchone()[0]
        features = dict(node.execute("SELECT transaction_id, features FROM transactions"))
    finally:
        node.close()
    expected_alerts = sum(1 for s in scored if s.verdict.decision != "approve")
    assert count == 60 and 0 < expected_alerts == alerts == outbox
    assert features[scored[50].tx.transaction_id] == array("d", scored[50].features).tobytes()
