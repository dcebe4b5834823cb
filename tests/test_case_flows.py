"""One view of a site scored on several machines (operations/case_flows.py): two
partitioned scorers with data directories of their own, as on two machines, and an analyst
host (``branchguard cluster analyst``), on a real nats-server, each a real process.

Every alert either machine raises reaches the analyst host once, with the rows its case is
read from; a disposition made there becomes a label on the scorer machines; a deny entry
added there is applied by both machines' scorers, and its removal too.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats
import pytest

from appliance.bench.partition_scorers import (PARTITIONS, ScorerChild, checkpoints,
                                               last_per_partition, partition_db, read_only,
                                               scorer_env, tx_subjects, wait_until)
from appliance.bench.throughput import bench_transactions
from appliance.casework.casefile import case_file, explainer_for
from appliance.casework.case_events import (MINUTE_GRACE_SECONDS, Raised, apply_raised,
                                             minutes_since)
from appliance.casework.cases import Change, change_case
from appliance.operations.case_flows import ACK_WAIT_SECONDS, CASES, Follower, ensure_stream
from appliance.settings import load
from appliance.scoring.lists import add_entry, remove_entry
from appliance.store import open_db
from appliance.transaction import partition

from .test_partition_state import publish

START = datetime(2027, 1, 4, tzinfo=timezone.utc)


def site_caught_up(url: str, *data_dirs: Path) -> bool:
    """Every partition's last message is committed on one machine or the other."""
    have: dict[int, int] = {}
    for d in data_dirs:
        for p, seq in checkpoints(d).items():
            have[p] = max(have.get(p, 0), seq)
    return all(have.get(p, 0) >= seq for p, seq in last_per_partition(tx_subjects(url)).items())


def scored_alerts(*data_dirs: Path) -> dict[str, tuple[Any, ...]]:
    """Every alert in the machines' partition databases, by transaction id: its severity,
    risk and reasons, with its transaction's stored features."""
    out: dict[str, tuple[Any, ...]] = {}
    for d in data_dirs:
        for p in range(PARTITIONS):
            db = partition_db(d, p)
            if not db.exists():
                continue
            with read_only(db) as conn:
                for tid, *row in conn.execute(
                        "SELECT a.transaction_id, a.severity, a.risk, a.reasons, t.features "
                        "FROM alerts a JOIN transactions t USING (transaction_id)"):
                    out[tid] = tuple(row)
    return out


def analyst_alerts(db: Path) -> list[tuple[Any, ...]]:
    with read_only(db) as conn:
        return conn.execute(
            "SELECT a.transaction_id, a.severity, a.risk, a.reasons, t.features FROM alerts a "
            "JOIN transactions t USING (transaction_id)").fetchall()


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    with read_only(db) as conn:
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return []


def write(db: Path, work: Any) -> Any:
    database = open_db(db)
    try:
        with database.conn:
            return work(database.conn)
    finally:
        database.close()


def test_a_case_applied_twice_is_stored_once(tmp_path: Path) -> None:
    db = tmp_path / "analyst.db"
    open_db(db).close()
    columns = ["transaction_id", "stream_seq", "branch", "account_id", "terminal_id",
               "amount", "amount_milli", "currency", "ts", "utc_offset", "channel",
               "merchant_category", "location", "features", "features_version",
               "model_risk", "risk", "severity", "decision", "reasons", "details",
               "model_version", "rules_version", "stored_at", "a_column_from_elsewhere"]

    def row(i: int) -> list[Any]:
        return [f"t{i}", i, "BR7", "acc", "term", 10.0 + i, 10000 + i, "EUR", 1000.0 + i, 0,
                "pos", None, None, "[]", "v1", 0.1, 0.9, "HIGH", "review", "[]", "[]", "m",
                "r", 2000.0, "dropped"]

    event = Raised(origin="a", branch="BR7", alert={
        "transaction_id": "t3", "created_at": 2000.0, "ts": 1003.0, "account_id": "acc",
        "terminal_id": "term", "severity": "HIGH", "risk": 0.9, "reasons": "[]",
        "updated_at": 2000.0}, columns=columns, rows=[row(3), row(2), row(1)])
    for _ in range(2):
        write(db, lambda conn: apply_raised(conn, event, outbox=True))
    assert query(db, "SELECT count(*) FROM alerts") == [(1,)]
    assert query(db, "SELECT count(*) FROM alert_outbox") == [(1,)]
    assert query(db, "SELECT transaction_id FROM transactions ORDER BY rowid") == [
        ("t1",), ("t2",), ("t3",)]  # oldest first, as they were scored


def test_minute_statistics_count_what_each_minute_stored(tmp_path: Path) -> None:
    db = tmp_path / "branch.db"
    open_db(db).close()
    columns = ("transaction_id", "stream_seq", "branch", "account_id", "terminal_id", "amount",
               "amount_milli", "currency", "ts", "utc_offset", "channel", "features",
               "features_version", "model_risk", "risk", "severity", "decision", "reasons",
               "details", "model_version", "rules_version", "stored_at")
    stored = [6000.0 + 7.3 * i for i in range(100)]  # minutes 100 to 112, in stored order

    def fill(conn: sqlite3.Connection) -> None:
        for i, at in enumerate(stored):
            decision = "decline" if i % 9 == 0 else "approve"
            conn.execute(f"INSERT INTO transactions ({', '.join(columns)}) VALUES "
                         f"({', '.join('?' * len(columns))})",
                         [f"t{i}", i, "br1", "a", "t", 1.0, 1000, "EUR", at, 0, "POS", "[]",
                          "v1", 0.1, 0.1, "HIGH" if i % 4 == 0 else "INFO", decision, "[]",
                          "[]", f"m{i // 50}", "r", at])
            if i % 4 == 0:
                conn.execute("INSERT INTO alerts (transaction_id, created_at, ts, account_id, "
                             "terminal_id, severity, risk, reasons, updated_at) VALUES "
                             "(?, ?, ?, 'a', 't', 'HIGH', 0.9, '[]', ?)", [f"t{i}", at, at, at])
        conn.execute("INSERT INTO dead_letters (stream_seq, subject, reason, size, "
                     "received_at) VALUES (1000, 'tx.x', 'malformed', 3, 6200.0)")
    write(db, fill)
    with sqlite3.connect(db) as conn:
        minutes = minutes_since(conn, 101, now=6000.0 + 7.3 * 99 + MINUTE_GRACE_SECONDS,
                                origin="br1", branch="br1")
    assert [m.minute for m in minutes] == list(range(102, 112))  # after 101, and over
    for m in minutes:
        mine = [i for i, at in enumerate(stored) if int(at // 60) == m.minute]
        assert m.transactions == len(mine)
        assert m.declined == sum(i % 9 == 0 for i in mine)
        assert m.alerts == m.high == sum(i % 4 == 0 for i in mine)
        assert m.model_version == max(f"m{i // 50}" for i in mine)
        assert m.dead_letters == (1 if m.minute == 103 else 0)


@pytest.mark.timeout(60)
def test_what_a_follower_took_and_died_with_is_delivered_again(tmp_path: Path,
                                                               nats_url: str) -> None:
    # Two followers on one durable (the analyst host killed and started again): what the
    # first was given and never stored comes to the second, however much the second acks.
    db = tmp_path / "seen.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE seen (body TEXT PRIMARY KEY)")

    def remember(conn: sqlite3.Connection, msg: Any) -> None:
        conn.execute("INSERT OR IGNORE INTO seen VALUES (?)", [msg.data.decode()])

    async def main() -> set[str]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await ensure_stream(js, CASES, load(None, env={}, data_dir=tmp_path))
        for i in range(10):
            await js.publish("cases.br1", f"m{i}".encode(), stream=CASES)
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        dying = Follower(js, CASES, "analyst", [], conn, remember, 1)
        taken = await (await dying._subscription()).fetch(4, timeout=5)  # and never acked
        assert len(taken) == 4
        for i in range(10, 15):
            await js.publish("cases.br1", f"m{i}".encode(), stream=CASES)
        follower = Follower(js, CASES, "analyst", [], conn, remember, 1)
        deadline = time.monotonic() + ACK_WAIT_SECONDS * 4
        while time.monotonic() < deadline and conn.execute(
                "SELECT count(*) FROM seen").fetchone()[0] < 15:
            await follower.step()
        seen = {r[0] for r in conn.execute("SELECT body FROM seen")}
        conn.close()
        await nc.close()
        return seen

    assert asyncio.run(main()) == {f"m{i}" for i in range(15)}


@pytest.mark.timeout(400)
def test_every_machines_cases_reach_the_analyst_host_and_casework_comes_back(
        tmp_path: Path, nats_url: str) -> None:
    def env(data_dir: Path) -> dict[str, str]:
        return {**scorer_env(nats_url, data_dir), "BRANCHGUARD_STREAM_REPLICAS": "1",
                "BRANCHGUARD_LISTS_REFRESH_SECONDS": "0.5", "BRANCHGUARD_CASE_FLOWS": "true"}

    first, second, analyst_dir = (tmp_path / "machine-a", tmp_path / "machine-b",
                                  tmp_path / "analyst")
    analyst_db = analyst_dir / "branchguard.db"
    a = ScorerChild.start("scorer-a", env(first), tmp_path)
    b = ScorerChild.start("scorer-b", env(second), tmp_path)
    analyst = ScorerChild.start("analyst", env(analyst_dir), tmp_path,
                                command=("cluster", "analyst"))
    try:
        assert wait_until(lambda: len(a.opened()) + len(b.opened()) == PARTITIONS, 90), (
            a.log.read_text()[-3000:] + b.log.read_text()[-3000:])
        assert a.opened() and b.opened()
        publish(nats_url, 0, 1500)
        assert wait_until(lambda: site_caught_up(nats_url, first, second), 90)
        scored = scored_alerts(first, second)
        assert len(scored) >= 20  # enough alerts, on both machines, to mean something
        assert {p for p in a.opened()} and any(
            query(partition_db(first, p), "SELECT 1 FROM alerts LIMIT 1") for p in a.opened())
        assert any(query(partition_db(second, p), "SELECT 1 FROM alerts LIMIT 1")
                   for p in b.opened())

        # The analyst host stops (killed) and starts again while the machines go on.
        analyst.process.send_signal(signal.SIGKILL)
        analyst.process.wait(10)
        publish(nats_url, 1500, 500)
        analyst = ScorerChild.start("analyst-2", env(analyst_dir), tmp_path,
                                    command=("cluster", "analyst"))
        assert wait_until(lambda: site_caught_up(nats_url, first, second), 90)
        scored = scored_alerts(first, second)
        assert wait_until(lambda: len(analyst_alerts(analyst_db)) >= len(scored), 60), (
            len(analyst_alerts(analyst_db)), len(scored), analyst.log.read_text()[-3000:])
        time.sleep(1.5)  # nothing more arrives: each alert is there once
        stored = analyst_alerts(analyst_db)
        assert sorted(r[0] for r in stored) == sorted(scored)
        assert {r[0]: tuple(r[1:]) for r in stored} == scored  # the same alert, same features
        assert query(analyst_db, "SELECT count(*) FROM alert_outbox") == [(len(scored),)]

        # The case file at the analyst host reads as where it was scored.
        with sqlite3.connect(analyst_db) as conn:
            alert_id, tid = conn.execute(
                "SELECT alert_id, transaction_id FROM alerts ORDER BY alert_id "
                "DESC LIMIT 1").fetchone()
            case = case_file(conn, alert_id)
        assert case is not None and case["transaction"]["transaction_id"] == tid
        with read_only(next(partition_db(d, p) for d in (first, second)
                            for p in range(PARTITIONS)
                            if query(partition_db(d, p), "SELECT 1 FROM alerts WHERE "
                                     "transaction_id = ?", tid))) as conn:
            here = case_file(conn, conn.execute("SELECT alert_id FROM alerts WHERE "
                                                "transaction_id = ?", [tid]).fetchone()[0],
                             explainer_for(load(None, env={}, data_dir=first)))
        assert here is not None
        assert case["features"] == here["features"]  # the same baseline, row for row
        assert case["explanation"] == here["explanation"] is not None  # made where scored
        assert query(analyst_db, "SELECT count(*) FROM alert_explanations") == [
            (len(scored),)]  # each case's, as it came
        ts = case["transaction"]["ts"]  # (the machine may since have more of the account)
        mine = [r for r in case["timeline"] if r["ts"] <= ts]
        theirs = [r for r in here["timeline"] if r["ts"] <= ts]
        assert mine and mine == theirs[-len(mine):]

        # A disposition at the analyst host becomes a label where the account is scored.
        def dispose(conn: sqlite3.Connection) -> None:
            version = conn.execute("SELECT version FROM alerts WHERE alert_id = ?",
                                   [alert_id]).fetchone()[0]
            change_case(conn, alert_id, Change(version=version, status="INVESTIGATING"),
                        "alice")
            change_case(conn, alert_id, Change(version=version + 1,
                                               disposition="confirmed_fraud",
                                               fraud_type="card_testing"), "alice")
        write(analyst_db, dispose)
        for d in (first, second):
            assert wait_until(lambda d=d: query(
                d / "branchguard.db", "SELECT label, typology, source FROM labels "
                "WHERE transaction_id = ?", tid), 30), analyst.log.read_text()[-3000:]
            [(label, typology, source)] = query(d / "branchguard.db", "SELECT label, "
                                                "typology, source FROM labels WHERE "
                                                "transaction_id = ?", tid)
            assert (label, typology) == (1, "card_testing")
            assert source.startswith("analyst:") and source.endswith("/alice")

        # A deny entry added there is applied by both machines' scorers.
        later = bench_transactions(7, 2300, START)[2000:]
        held = (a.opened(), b.opened())

        def on_both(terminal: str) -> bool:  # its transactions are scored on both machines
            owned = {partition(tx.account_id, PARTITIONS) for tx in later
                     if tx.terminal_id == terminal}
            return all(owned & h for h in held)
        terminal = next(t for t in sorted({tx.terminal_id for tx in later}) if on_both(t))
        entry = write(analyst_db, lambda conn: add_entry(conn, "deny", "terminal", terminal,
                                                         "skimmer found", "bob", None))
        for d in (first, second):
            assert wait_until(lambda d=d: query(
                d / "branchguard.db", "SELECT 1 FROM list_entries WHERE value = ? AND "
                "removed_at IS NULL AND origin IS NOT NULL", terminal), 30)
        time.sleep(1.5)  # the scorers re-read their lists every 0.5 s
        publish(nats_url, 2000, 300)
        assert wait_until(lambda: site_caught_up(nats_url, first, second), 60)
        at_terminal = [tx.transaction_id for tx in later if tx.terminal_id == terminal]
        declined = {d: [r for p in range(PARTITIONS) for r in query(
            partition_db(d, p), "SELECT transaction_id, decision, reasons FROM transactions "
            f"WHERE transaction_id IN ({', '.join('?' * len(at_terminal))})", *at_terminal)]
            for d in (first, second)}
        assert all(rows for rows in declined.values()), declined  # on both machines
        assert sorted(r[0] for rows in declined.values() for r in rows) == sorted(at_terminal)
        assert all(r[1] == "decline" and "deny_list" in json.loads(r[2])
                   for rows in declined.values() for r in rows)

        write(analyst_db, lambda conn: remove_entry(conn, entry["entry_id"], "bob"))
        for d in (first, second):
            assert wait_until(lambda d=d: query(
                d / "branchguard.db", "SELECT removed_by FROM list_entries WHERE value = ?",
                terminal) == [(f"{_origin(analyst_dir)}/bob",)], 30)
    finally:
        for child in (a, b, analyst):
            child.stop()


def _origin(data_dir: Path) -> str:
    return (data_dir / "partitions" / "store-id").read_text().strip()
