"""Labels: import (all or nothing, idempotent, apart from transactions), and label features that
only ever see labels known at the transaction's time."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings as hsettings, strategies as st

from appliance import cli
from appliance.errors import BranchguardError
from appliance.audit import verify
from appliance.scoring.labels import (LABEL_FEATURES, LABEL_WINDOWS, LabelFeed, LabelState,
                                      import_labels, rfc3339, set_label, write_label_file)
from appliance.store import Store

from .support import query

DAY = 86400.0
T0 = 1_780_000_000.0


def reference(events: list[tuple[str, str, float, int]], account: str, terminal: str,
              t: float) -> tuple[float, ...]:
    """LABEL_FEATURES by brute force from the definition."""
    out: list[float] = []
    for entity, key in (("terminal", terminal), ("account", account)):
        for _, w in LABEL_WINDOWS:
            inside = [lab for a, term, known, lab in events
                      if (term if entity == "terminal" else a) == key and t - w < known <= t]
            frauds = sum(inside)
            out += (float(frauds), frauds / len(inside) if inside else 0.0)
    return tuple(out)


event = st.tuples(st.sampled_from(["A1", "A2"]), st.sampled_from(["T1", "T2", "T3"]),
                  st.floats(0, 40 * DAY), st.integers(0, 1))


@hsettings(max_examples=150, deadline=None)
@given(st.lists(event, max_size=40), st.floats(0, 45 * DAY), st.sampled_from(["A1", "A2"]),
       st.sampled_from(["T1", "T2", "T3"]))
def test_label_features_match_the_definition_in_any_arrival_order(
        events: list[tuple[str, str, float, int]], t: float, account: str,
        terminal: str) -> None:
    state = LabelState()
    for a, term, known, lab in events:
        state.add(a, term, T0 + known, lab)
    shifted = [(a, term, T0 + known, lab) for a, term, known, lab in events]
    got = state.features(account, terminal, T0 + t)
    assert len(got) == len(LABEL_FEATURES)
    assert got == pytest.approx(reference(shifted, account, terminal, T0 + t))


@hsettings(max_examples=100, deadline=None)
@given(st.lists(event, max_size=30), st.floats(0, 40 * DAY), st.floats(1e-3, 20 * DAY))
def test_a_label_known_after_the_transaction_never_changes_its_features(
        events: list[tuple[str, str, float, int]], t: float, later: float) -> None:
    state = LabelState()
    for a, term, known, lab in events:
        state.add(a, term, T0 + known, lab)
    before = state.features("A1", "T1", T0 + t)
    state.add("A1", "T1", T0 + t + later, 1)  # becomes known after the transaction
    assert state.features("A1", "T1", T0 + t) == before
    assert state.features("A1", "T1", T0 + t + later) != before or before[0] > 0


def store_rows(db: Path, rows: list[tuple[str, str, str, float]]) -> None:
    """Transactions stored the way the scorer stores them (only the columns that matter)."""
    store = Store.open(db)
    with store.db.atomic():
        for tid, account, terminal, ts in rows:
            store.db.execute(
                "INSERT INTO transactions (transaction_id, stream_seq, branch, account_id, "
                "terminal_id, amount, amount_milli, currency, ts, utc_offset, channel, features, "
                "features_version, model_risk, risk, severity, decision, reasons, details, "
                "model_version, rules_version, stored_at) VALUES (?, 1, 'BR001', ?, ?, 10, "
                "10000, 'EUR', ?, 0, 'POS', '[]', 'features-v1', 0, 0, 'INFO', 'approve', '[]', "
                "'[]', 'if-v1', 'rules-v1', 0)", [tid, account, terminal, ts])
    store.close()


def test_import_is_idempotent_and_never_touches_transaction_rows(tmp_path: Path) -> None:
    db = tmp_path / "branchguard.db"
    store_rows(db, [("tx1", "A1", "T1", T0), ("tx2", "A1", "T2", T0 + 60)])
    before = query(db, "SELECT * FROM transactions ORDER BY transaction_id")
    path = tmp_path / "labels.csv"
    write_label_file(path, [("tx1", 1, T0 + 7 * DAY), ("tx2", 0, T0 + 7 * DAY),
                            ("tx-unknown", 1, T0 + DAY)])
    first = import_labels(db, path)
    assert (first.rows, first.imported, first.frauds) == (3, 3, 2)
    again = import_labels(db, path)
    assert (again.imported, again.already_labelled) == (0, 3)
    assert query(db, "SELECT * FROM transactions ORDER BY transaction_id") == before
    rows = query(db, "SELECT transaction_id, label, known_at, source FROM labels "
                     "ORDER BY transaction_id")
    assert rows[0] == ("tx-unknown", 1, rfc3339(T0 + DAY), "file:labels.csv")
    assert rows[1][2].endswith("Z") and rows[1][1] == 1
    indexes = [r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type = 'index' "
                                       "AND tbl_name = 'labels'")]
    assert "labels_known_at" in indexes


@pytest.mark.parametrize("line, field", [
    ("tx1,2,2026-01-01T00:00:00Z", "label"),
    ("tx1,1,yesterday", "known_at"),
    (",1,2026-01-01T00:00:00Z", "transaction_id"),
])
def test_a_bad_row_names_its_field_and_imports_nothing(tmp_path: Path, line: str,
                                                       field: str) -> None:
    db = tmp_path / "branchguard.db"
    path = tmp_path / "bad.csv"
    path.write_text(f"transaction_id,label,known_at\nok1,1,2026-01-01T00:00:00Z\n{line}\n")
    with pytest.raises(BranchguardError) as info:
        import_labels(db, path)
    assert info.value.field == field and "line 3" in str(info.value)
    assert not db.exists() or query(db, "SELECT count(*) FROM labels") == [(0,)]


def test_feed_loads_new_labels_and_resolves_pending_ones(tmp_path: Path) -> None:
    db = tmp_path / "branchguard.db"
    store_rows(db, [("tx1", "A1", "T1", T0)])
    path = tmp_path / "labels.csv"
    write_label_file(path, [("tx1", 1, T0 + DAY), ("tx2", 1, T0 + DAY)])
    import_labels(db, path)
    store = Store.open(db)
    feed = LabelFeed(store.reader.conn)
    assert feed.refresh() == 1 and set(feed.pending) == {"tx2"}
    assert feed.state.features("A9", "T1", T0 + DAY)[:2] == (1.0, 1.0)
    store.close()
    store_rows(db, [("tx2", "A2", "T1", T0 + 5)])  # the transaction arrives after its label
    store = Store.open(db)
    feed.conn = store.reader.conn
    assert feed.refresh() == 1 and not feed.pending
    assert feed.state.features("A9", "T1", T0 + DAY)[:2] == (2.0, 1.0)
    assert feed.refresh() == 0
    store.close()


def _correct(db: Path, tid: str, label: int, typology: str | None, at: float) -> str:
    conn = sqlite3.connect(db)
    try:
        with conn:
            return set_label(conn, tid, label, typology, "user:sam", at)
    finally:
        conn.close()


def _features(feed: LabelFeed, pairs: list[tuple[str, str]]) -> list[tuple[float, ...]]:
    return [feed.state.features(a, t, T0 + d * DAY) for a, t in pairs for d in (1, 3, 9, 40)]


def test_a_corrected_label_replaces_the_old_one_in_the_scorers_feed(tmp_path: Path) -> None:
    """The feed reads labels by rowid and a correction keeps the rowid: without reading the
    corrections the old label would stay in the scorer's state for good. Whatever the
    order of reads and corrections, the feed ends as a fresh feed built from the table."""
    db = tmp_path / "branchguard.db"
    store_rows(db, [("tx1", "A1", "T1", T0), ("tx2", "A1", "T2", T0 + 60),
                    ("tx3", "A2", "T1", T0 + 120)])
    path = tmp_path / "labels.csv"
    write_label_file(path, [("tx1", 1, T0 + DAY), ("tx2", 1, T0 + DAY),
                            ("tx3", 0, T0 + DAY), ("tx4", 1, T0 + DAY)])
    import_labels(db, path)
    store = Store.open(db)
    feed = LabelFeed(store.reader.conn)
    assert feed.refresh(limit=2) == 2  # tx1 and tx2 read; tx3 and tx4 not yet
    assert feed.state.features("A1", "T9", T0 + 1.5 * DAY)[6:8] == (2.0, 1.0)

    # tx1, already read, is corrected: not fraud after all, known from day 2
    assert _correct(db, "tx1", 0, None, T0 + 2 * DAY) == "corrected"
    # tx3, not read yet, is corrected too: it will be read with its new values, once
    assert _correct(db, "tx3", 1, "card_testing", T0 + 2 * DAY) == "corrected"
    assert feed.refresh(limit=1) == 2  # tx1's correction and tx3 itself
    # the account's 7-day window on day 2.5 holds tx2 (1) and tx1's corrected label (0),
    # not also tx1's old one (which would make 2 frauds of 3)
    assert feed.state.features("A1", "T9", T0 + 2.5 * DAY)[8:10] == (1.0, 0.5)
    assert feed.refresh() == 0 and set(feed.pending) == {"tx4"}
    # a pending label (no transaction yet) corrected, then its transaction arrives
    assert _correct(db, "tx4", 0, None, T0 + 3 * DAY) == "corrected"
    assert feed.refresh() == 1 and feed.pending == {"tx4": (0, T0 + 3 * DAY)}
    store.close()
    store_rows(db, [("tx4", "A2", "T2", T0 + 180)])
    store = Store.open(db)
    feed.conn = store.reader.conn
    assert feed.refresh() == 1 and not feed.pending
    # the same label again changes nothing and makes no correction
    assert _correct(db, "tx2", 1, None, T0 + 5 * DAY) == "unchanged"
    assert feed.refresh() == 0

    fresh = LabelFeed(store.reader.conn)
    while fresh.refresh():
        pass
    pairs = [(a, t) for a in ("A1", "A2", "A9") for t in ("T1", "T2", "T9")]
    assert _features(feed, pairs) == _features(fresh, pairs)
    assert feed.state.count == fresh.state.count == 4
    store.close()
    rows = query(db, "SELECT transaction_id, label, typology, known_at FROM labels "
                     "ORDER BY transaction_id")
    assert rows == [("tx1", 0, None, rfc3339(T0 + 2 * DAY)),
                    ("tx2", 1, None, rfc3339(T0 + DAY)),
                    ("tx3", 1, "card_testing", rfc3339(T0 + 2 * DAY)),
                    ("tx4", 0, None, rfc3339(T0 + 3 * DAY))]
    trail = query(db, "SELECT actor, action, subject, before, after FROM audit_log "
                      "ORDER BY seq")
    assert [(a, act, subj) for a, act, subj, _, _ in trail] == [
        ("user:sam", "label.correct", f"transaction:{t}") for t in ("tx1", "tx3", "tx4")]
    assert json.loads(trail[0][3])["label"] == 1 and json.loads(trail[0][4]) == {
        "label": 0, "typology": None, "known_at": rfc3339(T0 + 2 * DAY),
        "source": "analyst:user:sam"}
    conn = sqlite3.connect(db)
    try:
        assert verify(conn).broken_seq is None
    finally:
        conn.close()


def test_an_import_never_replaces_a_label_and_takes_a_typology(tmp_path: Path) -> None:
    db = tmp_path / "branchguard.db"
    store_rows(db, [("tx1", "A1", "T1", T0)])
    assert _correct(db, "tx1", 0, None, T0 + DAY) == "added"
    path = tmp_path / "labels.csv"
    path.write_text("transaction_id,label,known_at,typology\n"
                    "tx1,1,2026-01-01T00:00:00Z,atm_cashout\ntx2,1,2026-01-01T00:00:00Z,"
                    "velocity_burst\ntx3,0,2026-01-01T00:00:00Z,\n")
    result = import_labels(db, path)
    assert (result.imported, result.already_labelled) == (2, 1)
    assert query(db, "SELECT transaction_id, label, typology FROM labels ORDER BY 1") == [
        ("tx1", 0, None), ("tx2", 1, "velocity_burst"), ("tx3", 0, None)]
    path.write_text("transaction_id,label,known_at,typology\n"
                    "tx5,0,2026-01-01T00:00:00Z,atm_cashout\n")
    with pytest.raises(BranchguardError) as info:
        import_labels(db, path)
    assert info.value.field == "typology"


def test_labels_import_cli(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("transaction_id,label,known_at,source\ntx1,1,2026-01-01T00:00:00+02:00,"
                    "chargeback\n")
    runner = CliRunner(env={"BRANCHGUARD_DATA_DIR": str(tmp_path / "node")})
    result = runner.invoke(cli.cli, ["labels", "import", str(path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported"] == 1
    assert query(tmp_path / "node" / "branchguard.db",
                 "SELECT known_at, source FROM labels") == [("2025-12-31T22:00:00.000000Z",
                                                             "chargeback")]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,fraud\n1,1\n")
    result = runner.invoke(cli.cli, ["labels", "import", str(bad)])
    assert result.exit_code == 2 and "header" in result.output
