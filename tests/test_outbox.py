"""The outbox is written with the alerts, in the same transaction: one row per alert, never
one without the other, never twice."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.store import Store

from .alerting import Spec, scored_batch, store_alerts, unrouted
from .support import query


def outbox_matches_alerts(db: Path) -> list[int]:
    alerts = [r[0] for r in query(db, "SELECT alert_id FROM alerts ORDER BY alert_id")]
    outbox = [r[0] for r in query(db, "SELECT alert_id FROM alert_outbox ORDER BY alert_id")]
    assert outbox == alerts
    return alerts


def test_one_outbox_row_per_alert_and_none_for_a_resend(tmp_path: Path) -> None:
    db = tmp_path / "branchguard.db"
    specs = [Spec("c1", "CRITICAL"), Spec("i1", "INFO"), Spec("h1", "HIGH"),
             Spec("w1", "WARNING")]
    store_alerts(db, specs)
    assert len(outbox_matches_alerts(db)) == 3  # INFO is approved: no alert
    store_alerts(db, specs)  # the same batch again (a replay after a crash)
    store_alerts(db, specs[2:] + [Spec("c2", "CRITICAL")], first_seq=3)  # overlapping
    assert len(outbox_matches_alerts(db)) == 4
    assert unrouted(db) == 4


def test_a_failed_batch_leaves_neither_alert_nor_outbox_row(tmp_path: Path) -> None:
    db = tmp_path / "branchguard.db"
    store_alerts(db, [Spec("c1", "CRITICAL")])
    store = Store.open(db)
    try:
        with pytest.raises(sqlite3.IntegrityError):  # the checkpoint, written last, fails
            store.save_batch(scored_batch([Spec("c2", "CRITICAL")], 5), [], "scorer",
                             None)  # type: ignore[arg-type]
    finally:
        store.close()
    assert len(outbox_matches_alerts(db)) == 1


def test_the_prometheus_registry_reads_the_figures_from_the_database(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from appliance.alerts import metrics as alert_metrics

    db = tmp_path / "branchguard.db"
    store_alerts(db, [Spec("c1", "CRITICAL"), Spec("h1", "HIGH", "A-2", "T2")])
    assert alert_metrics.register(db) is alert_metrics.register(db)  # once per database
    try:
        text = generate_latest(alert_metrics.REGISTRY).decode()
    finally:
        alert_metrics.unregister(db)
    assert "branchguard_alerts_sent" not in generate_latest(alert_metrics.REGISTRY).decode()
    assert "branchguard_alerts_sent_total 0.0" in text
    assert "branchguard_alerts_queue_depth 2.0" in text
    assert "# TYPE branchguard_alerts_failed_total counter" in text
    assert "branchguard_alerts_oldest_undelivered_seconds" in text


def test_a_message_carries_the_stored_explanation_in_plain_words(tmp_path: Path) -> None:
    """An alert stored before issue 16 has its explanation in alert_explanations."""
    from appliance.alerts.messages import single
    from appliance.alerts.outbox import Outbox, Route

    db = tmp_path / "branchguard.db"
    batch = scored_batch([Spec("c1", "CRITICAL"), Spec("c2", "CRITICAL")])
    store = Store.open(db)
    store.save_batch(batch, [], "scorer", 2)
    with store.db.conn:
        store.db.conn.execute(
            "INSERT INTO alert_explanations VALUES (?, ?, 0)", (batch[0].tx.transaction_id,
            '{"unusual": ["first use of this terminal"], "contributions": []}'))
    store.close()
    outbox = Outbox(db)
    try:
        outbox.route([Route("CRITICAL", "d1", False)], 60.0)
        explained, plain = outbox.pending("d1", False, None, 10)
    finally:
        outbox.close()
    assert explained.unusual == ["first use of this terminal"] and plain.unusual == []
    body = single(explained, "http://console").body
    assert "What was unusual:\n- first use of this terminal" in body
    assert "What was unusual:" not in single(plain, "http://console").body


def test_a_message_says_what_was_unusual_from_the_stored_features(tmp_path: Path) -> None:
    """Explanations are made when read (issue 16): the message's sentences come from the
    features stored with the row, not from anything the scorer wrote for the alert."""
    from appliance.alerts.messages import single
    from appliance.alerts.outbox import Outbox, Route
    from appliance.scoring.features import FEATURES, INDEX

    db = tmp_path / "branchguard.db"
    batch = scored_batch([Spec("c1", "CRITICAL"), Spec("c2", "CRITICAL")])
    usual = [1.0] * len(FEATURES)
    usual[INDEX["account_prior_count"]] = 10.0
    usual[INDEX["seconds_since_previous"]] = 86400.0
    usual[INDEX["account_count_1h"]] = 0.0
    for name in ("first_time_terminal", "first_time_location", "first_time_category"):
        usual[INDEX[name]] = 0.0
    new_terminal = list(usual)
    new_terminal[INDEX["first_time_terminal"]] = 1.0
    batch[0].features, batch[1].features = tuple(new_terminal), tuple(usual)
    store = Store.open(db)
    store.save_batch(batch, [], "scorer", 2)
    store.close()
    outbox = Outbox(db)
    try:
        outbox.route([Route("CRITICAL", "d1", False)], 60.0)
        explained, plain = outbox.pending("d1", False, None, 10)
    finally:
        outbox.close()
    assert explained.unusual == ["first use of this terminal"] and plain.unusual == []
    assert "What was unusual:\n- first use of this terminal" in single(
        explained, "http://console").body
