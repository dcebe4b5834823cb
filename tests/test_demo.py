"""The demo's history, restart, late labels and evaluation: history loaded in-process gives
the scorer the state (and the verdicts) it would have had scoring those rows itself; a restart
stores nothing twice; labels arrive through ``labels import`` only once known; ``evaluate
--demo`` counts alerts, precision and episodes caught."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import cli
from appliance.bench.demo_evaluation import evaluate_demo, format_demo
from appliance.feed.history import load_history
from appliance.feed.late_labels import SOURCE_GENUINE, deliver
from appliance.feed.world import World, build_world, events_between
from appliance.operations.demo import (DEMO_MAX_KMH, DEMO_RULES_VERSION, DEMO_VELOCITY,
                                       deploy_demo_rules, prepare_demo)
from appliance.scoring.rulebook import SHIPPED_RULES, rules_path
from appliance.scoring.rulebook import deploy as rulebook_deploy
from appliance.scoring.rulebook import load as load_rules
from appliance.scoring.features import FeatureState, feature_state
from appliance.scoring.registry import Registry
from appliance.settings import Settings, load
from appliance.store import Scored, Store, decode_features
from appliance.verdict import Verdict
from tests.conftest import NodeProcess
from tests.support import query, send, stored_count, wait_until

NOW = datetime(2026, 3, 20, 12, 0, tzinfo=timezone.utc).timestamp()
DAY = 86400.0


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(3, customers=150, fraud_share=0.03)


def _settings(path: Path) -> Settings:
    return load(None, env={}, data_dir=path)


def _stored(db: Path) -> dict[str, tuple[bytes, str, float, str]]:
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in query(
        db, "SELECT transaction_id, features, decision, risk, reasons FROM transactions")}


def test_history_gives_the_state_and_verdicts_of_scoring_the_rows(
        world: World, tmp_path: Path, nats_url: str,
        node_factory: type[NodeProcess]) -> None:
    items = list(events_between(world, datetime.fromtimestamp(NOW - 6 * DAY, timezone.utc),
                                datetime.fromtimestamp(NOW - 3 * DAY, timezone.utc)))
    txs = [i.tx for i in items]
    assert 500 < len(txs) < 3000 and any(i.fraud for i in items)
    settings = _settings(tmp_path / "fast")
    store = Store.open(settings.db_path)
    try:
        registry = Registry.of(settings)
        result = load_history(store, registry.load(registry.production()), settings, txs,
                              chunk=400)
        assert result.rows == len(txs)
        observed = FeatureState()
        features = [observed.observe(tx) for tx in txs]
        assert feature_state(store.reader).snapshot() == observed.snapshot()
        rows = store.reader.execute("SELECT transaction_id, features FROM transactions "
                                    "ORDER BY rowid").fetchall()
        assert [r[0] for r in rows] == [tx.transaction_id for tx in txs]
        assert [tuple(decode_features(r[1])) for r in rows] == features
        assert store.counts()["alerts"] == 0  # history raises no alert...
        assert store.checkpoint(settings.consumer) == 0  # ...and moves no checkpoint
    finally:
        store.close()

    # the scorer, given the same transactions through NATS, stores the same features and
    # verdicts (the event-time window is off, as for any history: tests/support.HISTORY)
    node = node_factory(tmp_path / "scored", nats_url, {}).start()
    send(nats_url, txs)
    wait_until(lambda: stored_count(node.data_dir / "branchguard.db") == len(txs), 120,
               "the scorer to store the history")
    node.stop()
    fast, scored = _stored(settings.db_path), _stored(node.data_dir / "branchguard.db")
    assert fast == scored


def test_a_restart_keeps_its_history_and_stores_nothing_twice(world: World,
                                                              tmp_path: Path) -> None:
    settings = _settings(tmp_path / "node")
    store = Store.open(settings.db_path)
    registry = Registry.of(settings)
    model = registry.load(registry.production())
    try:
        first = prepare_demo(settings, store, model, world, history_days=4, now=NOW)
        expected = list(events_between(world, datetime.fromtimestamp(NOW - 4 * DAY, timezone.utc),
                                       datetime.fromtimestamp(NOW, timezone.utc)))
        assert first.history.rows == len(expected) > 500
        again = prepare_demo(settings, store, model, world, history_days=4, now=NOW)
        assert again.history.rows == 0  # a restart at once: nothing missed, nothing reloaded
        later = prepare_demo(settings, store, model, world, history_days=4, now=NOW + 7200)
        gap = list(events_between(world, datetime.fromtimestamp(NOW, timezone.utc),
                                  datetime.fromtimestamp(NOW + 7200, timezone.utc)))
        assert later.history.rows == len(gap) > 0  # only the two hours it was away
        ids = [r[0] for r in query(settings.db_path,
                                   "SELECT transaction_id FROM transactions ORDER BY ts")]
        assert ids == [i.tx.transaction_id for i in expected + gap]
        assert query(settings.db_path, "SELECT count(*) FROM terminals")[0][0] == len(
            world.terminal_ids)
        # the demo's rules, deployed once (audited), and the history scored with them
        book = load_rules(rules_path(settings))
        assert (book.version, book.velocity_burst.count, book.velocity_burst.seconds) == (
            DEMO_RULES_VERSION, *DEMO_VELOCITY)
        assert book.impossible_travel.max_kmh == DEMO_MAX_KMH
        assert book.card_testing == load_rules(SHIPPED_RULES).card_testing
        deploys = query(settings.db_path, "SELECT actor, subject FROM audit_log "
                                          "WHERE action = 'rules.deploy'")
        assert deploys == [("runner:demo", f"rules:{DEMO_RULES_VERSION}")]
        assert {r[0] for r in query(settings.db_path, "SELECT DISTINCT rules_version "
                                                      "FROM transactions")} == {DEMO_RULES_VERSION}
    finally:
        store.close()


def test_the_demo_keeps_rules_an_operator_deployed(world: World, tmp_path: Path) -> None:
    settings = _settings(tmp_path / "node")
    own = tmp_path / "own.toml"
    own.write_text(SHIPPED_RULES.read_text().replace('version = "rules-v2"',
                                                     'version = "rules-ours"'))
    rulebook_deploy(settings, own, "cli:tester")
    assert not deploy_demo_rules(settings)
    assert load_rules(rules_path(settings)).version == "rules-ours"


def test_late_labels_arrive_through_labels_import_once_known(world: World,
                                                             tmp_path: Path) -> None:
    settings = _settings(tmp_path / "node")
    store = Store.open(settings.db_path)
    registry = Registry.of(settings)
    try:
        prepare_demo(settings, store, registry.load(registry.production()), world,
                     history_days=14, now=NOW)
    finally:
        store.close()
    db = settings.db_path
    known = query(db, "SELECT max(known_at), count(*), sum(label) FROM labels")[0]
    assert known[0] <= datetime.fromtimestamp(NOW, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    assert known[1] > 0 and known[2] > 0
    # genuine labels only for what is 10 days old; frauds from 2 days
    newest_genuine = query(db, "SELECT max(t.ts) FROM labels l JOIN transactions t "
                               "USING (transaction_id) WHERE l.source = ?", [SOURCE_GENUINE])[0][0]
    assert newest_genuine <= NOW - 10 * DAY
    files = sorted((settings.data_dir / "demo-labels").glob("labels-*.csv.gz"))
    assert len(files) == 1
    # a day later, the labels that became known since arrive, and only those
    result = deliver(db, settings.data_dir / "demo-labels", world, NOW, NOW + DAY)
    assert result is not None and result.imported == result.rows > 0
    again = deliver(db, settings.data_dir / "demo-labels", world, NOW, NOW + DAY)
    assert again is not None and again.imported == 0  # idempotent, as labels import is
    sources = {r[0].split(":")[0] for r in query(db, "SELECT source FROM labels")}
    assert sources == {"demo-chargeback", "demo-settled"}
    # each fraud label names its typology in the labels table, as an analyst's close does
    typed = query(db, "SELECT label, typology, source FROM labels")
    assert all((typology is not None) == (label == 1) for label, typology, _ in typed)
    assert all(source.split(":")[1] == typology for label, typology, source in typed if label)


def _row(tid: str, ts: float, decision: str) -> Scored:
    from appliance.transaction import Transaction

    tx = Transaction(transaction_id=tid, account_id="A1", amount=10.0, currency="EUR",
                     timestamp=datetime.fromtimestamp(ts, timezone.utc), terminal_id="T1",
                     channel="POS")
    severity = "INFO" if decision == "approve" else "HIGH"
    return Scored(tx, "BR001", 0, (0.0,), "features-v2",
                  Verdict(tid, 0.5, severity, decision, [], [], 0.5, "m", "r"))


def test_evaluate_demo_counts_alerts_precision_and_episodes(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "node")
    store = Store.open(settings.db_path)
    t0 = NOW - 3 * DAY
    rows = [_row("a", t0, "review"), _row("b", t0 + 10, "review"),     # day 0: 2 alerts
            _row("c", t0 + 20, "approve"),
            _row("d", t0 + DAY, "decline"), _row("e", t0 + DAY + 5, "approve"),  # day 1
            _row("f", t0 + 2 * DAY, "approve"), _row("g", t0 + 3 * DAY, "review")]
    store.save_batch(rows, [], "scorer", 0, history=True)
    store.close()
    conn = sqlite3.connect(settings.db_path)
    labels = [("a", 1, "demo-chargeback:velocity_burst:E1"),   # caught
              ("b", 1, "demo-chargeback:velocity_burst:E1"),
              ("c", 1, "demo-chargeback:card_testing:E2"),     # missed
              ("e", 1, "demo-chargeback:card_testing:E3"),     # missed
              ("d", 0, "demo-settled"), ("f", 0, "demo-settled")]
    conn.executemany("INSERT INTO labels (transaction_id, label, known_at, source, imported_at) "
                     "VALUES (?, ?, '2026-03-20T00:00:00Z', ?, '2026-03-20T00:00:00Z')", labels)
    conn.commit()
    conn.close()
    result = evaluate_demo(settings.db_path, budget=2.0)
    assert result.transactions == 7 and result.alerts == 4
    assert result.days == pytest.approx(3.0, abs=1e-3)
    assert result.per_day == [2, 1, 0]
    assert (result.alerts_labelled, result.alerts_fraud) == (3, 2)  # g has no label yet
    assert result.precision == pytest.approx(2 / 3)
    catches = {c.typology: (c.caught, c.episodes) for c in result.catches}
    assert catches["velocity_burst"] == (1, 1) and catches["card_testing"] == (0, 2)
    assert catches["atm_cashout"] == (0, 0)
    assert (result.caught.caught, result.caught.episodes) == (1, 3)
    since = evaluate_demo(settings.db_path, budget=2.0, since=t0 + DAY)
    assert since.alerts == 2 and {c.typology: c.episodes for c in since.catches}[
        "velocity_burst"] == 0
    text = format_demo(result)
    assert "1.3 per day" in text and "66.7 %" in text and "velocity_burst" in text
    out = CliRunner().invoke(cli.cli, ["evaluate", "--demo", "--data-dir",
                                       str(settings.data_dir)])
    assert out.exit_code == 0, out.output
    assert "precision of alerts: 66.7 %" in out.output and "1 of     3" in out.output
