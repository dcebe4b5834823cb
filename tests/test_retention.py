"""Retention with a moved clock: every row in the right tier, nothing lost or duplicated,
checksums kept, held accounts never purged, erasure everywhere."""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import cli
from appliance.errors import ArchiveError, RetentionError
from appliance.operations import archive
from appliance.operations.archive import read_rows
from appliance.operations.retention import erase, hold, release, run_retention
from appliance.scoring.features import FEATURES_VERSION
from appliance.settings import Settings, load
from appliance.store import Scored, Store
from appliance.transaction import Transaction
from appliance.verdict import Verdict

NOW = datetime(2027, 6, 15, 12, 0, tzinfo=timezone.utc)
DAY = 86400.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Short tiers (30 days hot, 120 warm, 365 in all; the logic is the same at 90/365/7
    years) and a transaction a day for the last 500 days, 4 accounts, every third alerted."""
    settings = load(None, env={}, data_dir=tmp_path / "node", replicate=False, hot_days=30,
                    warm_days=120, cold_days=365)
    store = Store.open(settings.db_path)
    scored = []
    first = NOW - timedelta(days=500)
    for i in range(500):
        tid = f"t{i:05d}"
        alerted = i % 3 == 0
        tx = Transaction(transaction_id=tid, account_id=f"A{i % 4}", amount=10.0 + i,
                         currency="EUR", timestamp=first + timedelta(days=i, hours=i % 24),
                         terminal_id="T1", channel="POS", merchant_category="Grocery",
                         location="Espoo")
        verdict = Verdict(transaction_id=tid, risk=0.7 if alerted else 0.1,
                          severity="WARNING" if alerted else "INFO",
                          decision="review" if alerted else "approve",
                          reasons=["high_value"] if alerted else [], details=[],
                          model_risk=0.1, model_version="if-v1", rules_version="r1")
        scored.append(Scored(tx, "BR001", i + 1, (1.0, float(i)), FEATURES_VERSION, verdict))
    store.save_batch(scored, [], "scorer", len(scored))
    store.close()
    return settings


def _hot(settings: Settings) -> set[bytes]:
    conn = sqlite3.connect(settings.db_path)
    try:
        return {line for t in archive.MOVED_TABLES for line in read_rows(conn, "main", t)}
    finally:
        conn.close()


def _warm(settings: Settings) -> dict[str, set[bytes]]:
    out = {}
    for month in archive.warm_months(settings):
        conn = sqlite3.connect(archive.warm_path(settings, month))
        try:
            out[month] = {line for t in archive.MOVED_TABLES for line in read_rows(conn, "main", t)}
        finally:
            conn.close()
    return out


def _cold(settings: Settings) -> dict[str, set[bytes]]:
    return {m: set(archive.read_cold(settings, m) or []) for m in archive.cold_months(settings)}


def _ts(line: bytes) -> float:
    return float(json.loads(line)["row"]["ts"])


def _everything(settings: Settings) -> list[bytes]:
    lines = list(_hot(settings))
    for tier in (_warm(settings), _cold(settings)):
        for month_lines in tier.values():
            lines.extend(month_lines)
    return lines


def _check_tiers(settings: Settings, now: datetime, original: set[bytes], held: set[str]
                 ) -> None:
    hot_cut = (now - timedelta(days=settings.hot_days)).timestamp()
    warm_cut = (now - timedelta(days=settings.warm_days)).timestamp()
    cold_cut = (now - timedelta(days=settings.cold_days)).timestamp()
    assert all(_ts(line) >= hot_cut for line in _hot(settings))
    for month, lines in _warm(settings).items():
        assert archive.month_bounds(month)[1] > warm_cut, month
        assert all(_ts(line) < hot_cut and archive.month_of(_ts(line)) == month for line in lines)
    for month, lines in _cold(settings).items():
        start, end = archive.month_bounds(month)
        assert end <= warm_cut, month
        assert all(start <= _ts(line) < end for line in lines)
        if end <= cold_cut:  # past 7 years: only held accounts are left
            assert lines and {archive.row_account(line) for line in lines} <= held
    everything = _everything(settings)
    assert len(everything) == len(set(everything)), "a row is in two tiers"
    purged = {line for line in original if archive.month_bounds(
        archive.month_of(_ts(line)))[1] <= cold_cut and archive.row_account(line) not in held}
    assert set(everything) == original - purged  # every row kept is byte-for-byte the same


def test_rows_land_in_their_tier_as_the_clock_moves(settings: Settings) -> None:
    original = _hot(settings)
    hold(settings, "A1", "case 17", now=NOW)
    actions = run_retention(settings, now=NOW)
    assert {a.action for a in actions} >= {"hot->warm", "warm->cold", "purge"}
    _check_tiers(settings, NOW, original, held={"A1"})
    assert len(archive.warm_months(settings)) in (3, 4)  # 120 - 30 days, by month
    assert archive.cold_months(settings)[0] == "2026-02"  # held A1 rows from 500 days ago
    # The same clock again changes nothing.
    again = run_retention(settings, now=NOW)
    assert {a.action for a in again} <= {"keep-held"}
    # Move the clock: 100 days later, this run's warm months are cold.
    later = NOW + timedelta(days=100)
    run_retention(settings, now=later)
    _check_tiers(settings, later, original, held={"A1"})
    # Released: the next run purges A1's old rows too.
    assert release(settings, "A1")
    purged = [a for a in run_retention(settings, now=later) if a.action == "purge"]
    assert purged and all(a.held_rows == 0 for a in purged)
    _check_tiers(settings, later, original, held=set())


def test_cold_files_are_checksummed_and_a_corrupt_one_stops_the_run(settings: Settings
                                                                    ) -> None:
    run_retention(settings, now=NOW)
    month = archive.cold_months(settings)[-1]
    path = archive.cold_path(settings, month)
    manifest = json.loads(archive.manifest_path(settings, month).read_text())
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    lines = gzip.decompress(path.read_bytes()).splitlines()
    assert sum(manifest["rows"].values()) == len(lines) == len(set(lines))
    assert manifest["content_sha256"] == archive.digest(lines).sha256

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="^month: cannot read cold file"):
        archive.read_cold(settings, month, repair=True)
    with pytest.raises(ArchiveError):
        run_retention(settings, now=NOW + timedelta(days=1000))  # would purge: refuses


def test_an_interrupted_move_is_finished_by_the_next_run(settings: Settings) -> None:
    original = _hot(settings)
    # A crash after the copy into warm and before the delete: rows in both tiers.
    month = archive.month_of((NOW - timedelta(days=60)).timestamp())
    path = archive.warm_path(settings, month)
    Store.open(path).close()
    conn = sqlite3.connect(settings.db_path)
    conn.execute("ATTACH DATABASE ? AS warm", (str(path),))
    lo, hi = archive.month_bounds(month)
    for table in archive.MOVED_TABLES:
        key = "ts" if table == "transactions" else "(SELECT ts FROM transactions t WHERE " \
              "t.transaction_id = alerts.transaction_id)"
        conn.execute(f"INSERT INTO warm.{table} SELECT * FROM main.{table} "
                     f"WHERE {key} >= ? AND {key} < ?", (lo, hi))
    conn.commit()
    conn.close()
    # A crash between a cold file's rename and its manifest's: the manifest is stale.
    run_retention(settings, now=NOW - timedelta(days=30))
    stale = archive.cold_months(settings)[-1]
    archive.manifest_path(settings, stale).write_text('{"rows": {}}')
    run_retention(settings, now=NOW)
    _check_tiers(settings, NOW, original, held=set())
    archive.read_cold(settings, stale)  # manifest rewritten from the sound file


def test_dry_run_changes_nothing_and_lists_what_a_run_does(settings: Settings) -> None:
    run_retention(settings, now=NOW)
    later = NOW + timedelta(days=40)
    files = {p: p.read_bytes() for p in settings.archive_path.rglob("*") if p.is_file()}
    hot = _hot(settings)
    planned = run_retention(settings, now=later, dry_run=True)
    assert _hot(settings) == hot
    assert {p: p.read_bytes() for p in settings.archive_path.rglob("*") if p.is_file()} == files
    assert planned and planned == run_retention(settings, now=later)


def test_erasure_removes_an_account_everywhere_but_not_under_hold(settings: Settings) -> None:
    run_retention(settings, now=NOW)
    before = _everything(settings)
    hold(settings, "A3", "investigation")
    with pytest.raises(RetentionError, match="^account: account is on legal hold"):
        erase(settings, "A3")
    assert _everything(settings) == before
    report = erase(settings, "A2")
    mine = [line for line in before if archive.row_account(line) == "A2"]
    assert report["transactions"] + report["alerts"] == len(mine)
    assert {"hot"} | {f"warm {m}" for m in archive.warm_months(settings)} <= set(report["tiers"])
    assert any(k.startswith("cold ") for k in report["tiers"])
    assert sorted(_everything(settings)) == sorted(set(before) - set(mine))
    recorded = sqlite3.connect(settings.db_path).execute(
        "SELECT account_sha256, transactions FROM erasures").fetchall()
    assert recorded == [(hashlib.sha256(b"A2").hexdigest(),
                         sum(1 for line in mine if archive.row_table(line) == "transactions"))]


def test_cli_prints_the_plan_as_json_lines(settings: Settings) -> None:
    result = CliRunner().invoke(cli.cli, ["retention", "run", "--dry-run", "--data-dir",
                                          str(settings.data_dir), "--now", NOW.isoformat()])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines and all(line["dry_run"] for line in lines)
    assert {line["action"] for line in lines} >= {"hot->warm", "warm->cold"}
    bad = CliRunner().invoke(cli.cli, ["retention", "run", "--data-dir",
                                       str(settings.data_dir), "--now", "yesterday"])
    assert bad.exit_code == 2 and "now: not an ISO 8601 time" in bad.output


def test_erasure_also_removes_what_hangs_off_the_account(settings: Settings) -> None:
    """Notes, explanations, shadow scores, labels and alert deliveries of the account's
    transactions and alerts go with them; other accounts' stay."""
    conn = sqlite3.connect(settings.db_path, isolation_level=None)
    alerts = conn.execute("SELECT alert_id, transaction_id FROM alerts").fetchall()
    conn.executemany("INSERT INTO alert_notes (alert_id, at, author, text) VALUES (?, 0, 'a', "
                     "'called the customer')", [(a,) for a, _ in alerts])
    conn.executemany("INSERT INTO alert_explanations VALUES (?, '{}', 0)",
                     [(t,) for _, t in alerts])
    tids = [row[0] for row in conn.execute("SELECT transaction_id FROM transactions")]
    conn.executemany("INSERT INTO shadow_scores VALUES (?, 'x', 0.1, 0.1, 'approve')",
                     [(t,) for t in tids])
    conn.executemany("INSERT INTO labels (transaction_id, label, known_at, source, imported_at) "
                     "VALUES (?, 1, '2026-01-01T00:00:00Z', 'f', '2026-01-01T00:00:00Z')",
                     [(t,) for t in tids])
    conn.executemany(  # an analyst's correction of each label (m014) hangs off it too
        "INSERT INTO label_corrections (transaction_id, label_rowid, before_label, "
        "before_known_at, after_label, after_known_at, at, actor) "
        "SELECT transaction_id, rowid, 0, known_at, 1, known_at, known_at, 'sam' FROM labels "
        "WHERE transaction_id = ?", [(t,) for t in tids])

    def left(account: str) -> dict[str, int]:
        mine = "(SELECT transaction_id FROM transactions WHERE account_id = ?)"
        return {table: conn.execute(f"SELECT count(*) FROM {table} WHERE {key} IN "
                                    + (mine if key == "transaction_id" else
                                       f"(SELECT alert_id FROM alerts WHERE transaction_id "
                                       f"IN {mine})"), (account,)).fetchone()[0]
                for table, key in (("alert_notes", "alert_id"),
                                   ("alert_outbox", "alert_id"),
                                   ("alert_explanations", "transaction_id"),
                                   ("shadow_scores", "transaction_id"),
                                   ("labels", "transaction_id"),
                                   ("label_corrections", "transaction_id"))}

    a1_before = left("A1")
    assert all(a1_before.values())
    counted = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
               for table in a1_before}
    erase(settings, "A2")
    after = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
             for table in a1_before}
    assert left("A1") == a1_before  # another account's rows are untouched
    a2 = sum(1 for t in tids if int(t[1:]) % 4 == 2)
    a2_alerts = sum(1 for _, t in alerts if int(t[1:]) % 4 == 2)
    assert counted["shadow_scores"] - after["shadow_scores"] == a2
    assert counted["labels"] - after["labels"] == a2
    assert counted["label_corrections"] - after["label_corrections"] == a2
    for table in ("alert_notes", "alert_outbox", "alert_explanations"):
        assert counted[table] - after[table] == a2_alerts, table


def test_what_hangs_off_a_row_moves_to_warm_with_it(settings: Settings) -> None:
    conn = sqlite3.connect(settings.db_path, isolation_level=None)
    alerts = conn.execute("SELECT alert_id, transaction_id FROM alerts").fetchall()
    conn.executemany("INSERT INTO alert_notes (alert_id, at, author, text) VALUES (?, 0, 'a', "
                     "'note')", [(a,) for a, _ in alerts])
    conn.executemany("INSERT INTO alert_explanations VALUES (?, '{}', 0)",
                     [(t,) for _, t in alerts])
    conn.close()
    run_retention(settings, now=NOW)
    conn = sqlite3.connect(settings.db_path)
    hot_alerts = {a for (a,) in conn.execute("SELECT alert_id FROM alerts")}
    assert 0 < len(hot_alerts) < len(alerts)
    for table, key in (("alert_notes", "alert_id"), ("alert_outbox", "alert_id"),
                       ("alert_explanations", "transaction_id")):
        left = {k for (k,) in conn.execute(f"SELECT {key} FROM {table}")}
        owners = hot_alerts if key == "alert_id" else {
            t for (t,) in conn.execute("SELECT transaction_id FROM alerts")}
        assert left == owners, table  # none left behind for a moved alert
    moved_notes = 0
    for month in archive.warm_months(settings):
        warm = sqlite3.connect(archive.warm_path(settings, month))
        moved_notes += warm.execute("SELECT count(*) FROM alert_notes WHERE alert_id IN "
                                    "(SELECT alert_id FROM alerts)").fetchone()[0]
        warm.close()
    assert moved_notes > 0  # in the warm tier, beside their alerts
