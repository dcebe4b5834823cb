"""The whole path with every part real: nats-server, the scorer process, SQLite files."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest

from appliance.scoring.features import FEATURES, feature_state
from appliance.store import Store, decode_features
from appliance.transaction import Transaction, encode, subject_for

from .support import (START, decode, make_transactions, query, read_stream, send, send_raw,
                      stored_count, wait_until)

Node = type  # the node_factory fixture yields a NodeProcess subclass


def tx(tid: str, account: str, amount: float, minutes: float, terminal: str = "T0001",
       category: str | None = "Grocery", location: str | None = "Espoo",
       channel: str = "POS") -> Transaction:
    return Transaction(transaction_id=tid, account_id=account, amount=amount, currency="EUR",
                       timestamp=START + timedelta(minutes=minutes), terminal_id=terminal,
                       channel=channel, merchant_category=category,  # type: ignore[arg-type]
                       location=location)


def crafted() -> list[Transaction]:
    """An account with a calm history, then one transaction per rule."""
    calm = [tx(f"calm-{i}", "A-CALM", 20.0 + i, minutes=i * 30) for i in range(8)]
    return calm + [
        tx("deviation", "A-CALM", 400.0, minutes=300),            # 400 >= 5 x mean(23.5)
        tx("high-value", "A-RICH", 7500.0, minutes=301, terminal="T0002"),
        tx("combo", "A-CALM", 30.0, minutes=302, category="Gambling", location="Tallinn"),
    ]


def test_whole_path_stores_scores_alerts_and_publishes_verdicts(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    node = node_factory(tmp_path / "node", nats_url, {}).start()
    background = [item.tx for item in make_transactions(200, seed=3)]
    special = crafted()
    assert send(nats_url, background + special) == len(background) + len(special)
    db = tmp_path / "node" / "branchguard.db"
    total = len(background) + len(special)
    wait_until(lambda: stored_count(db) == total, message="all stored")

    rows = {r[0]: r for r in query(db, "SELECT transaction_id, risk, severity, decision, "
                                       "reasons, features, model_version FROM transactions")}
    reasons = {tid: set(msgspec.json.decode(r[4])) for tid, r in rows.items()}
    assert "high_deviation" in reasons["deviation"]
    assert "high_value" in reasons["high-value"]
    assert rows["high-value"][2] in ("HIGH", "CRITICAL")  # amount >= 5000 is at least HIGH
    assert "suspicious_combo" in reasons["combo"]
    assert not reasons["calm-3"] & {"high_value", "high_deviation", "suspicious_combo"}
    for tid, (_, risk, severity, decision, _, features, model_version) in rows.items():
        assert 0.0 <= risk <= 1.0
        assert len(decode_features(features)) == len(FEATURES)
        assert model_version == "if-v1"
        assert decision == {"CRITICAL": "decline", "HIGH": "review", "WARNING": "review",
                            "INFO": "approve"}[severity]

    alerts = dict(query(db, "SELECT transaction_id, status FROM alerts"))
    not_approved = {tid for tid, r in rows.items() if r[3] != "approve"}
    assert set(alerts) == not_approved and set(alerts.values()) == {"NEW"}
    # high_value is a hard rule: it alerts whatever the budget; suspicious_combo and
    # high_deviation are soft (they fired, above, and add risk for the budget to rank), and
    # a new node's budget is cold: so they are not alerts here (tests/test_budget.py)
    assert "high-value" in alerts and not {"deviation", "combo"} & set(alerts)

    verdicts = [decode(m.data) for m in read_stream(nats_url, "VERDICTS", expect=total)]
    assert len(verdicts) == total
    by_id = {v["transaction_id"]: v for v in verdicts}
    assert set(by_id) == set(rows)
    for tid, v in by_id.items():
        assert v["risk"] == rows[tid][1] and v["severity"] == rows[tid][2]
        assert set(v["reasons"]) == reasons[tid]
    assert node.stop() == 0


def test_the_same_transaction_twice_is_stored_and_counted_once(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    node_factory(tmp_path / "node", nats_url, {}).start()
    db = tmp_path / "node" / "branchguard.db"
    first = tx("dup-1", "A-DUP", 50.0, minutes=0)
    # within the duplicate window: JetStream itself drops the re-send
    assert send(nats_url, [first, first]) == 2
    # a re-send after the window: a new message id, same transaction id
    assert send_raw(nats_url, [(subject_for("BR001", first), encode(first), "resend-1")])
    follow = tx("dup-2", "A-DUP", 60.0, minutes=5)
    send(nats_url, [follow])
    wait_until(lambda: stored_count(db) == 2, message="two transactions stored")
    tx_stream = read_stream(nats_url, "TX", expect=3)
    assert len(tx_stream) == 3  # the window dropped one, the late re-send got through
    wait_until(lambda: query(db, "SELECT count(*) FROM transactions")[0][0] == 2)
    assert query(db, "SELECT count(*) FROM transactions WHERE transaction_id = 'dup-1'")[0][0] == 1
    features = dict(zip(FEATURES, decode_features(query(
        db, "SELECT features FROM transactions WHERE transaction_id = 'dup-2'")[0][0])))
    assert features["account_prior_count"] == 1  # the re-send did not count as history
    assert features["account_sum_1h"] == 50.0
    verdicts = read_stream(nats_url, "VERDICTS", expect=2)
    assert sorted(decode(m.data)["transaction_id"] for m in verdicts) == ["dup-1", "dup-2"]



def test_a_reused_transaction_id_with_another_body_is_a_conflicting_resend(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    """Issue 17, item 2: the same transaction id with a different body (a new Nats-Msg-Id,
    amount 8888 instead of 42.50) is dead-lettered as a conflicting re-send with both
    digests and counted; the stored row is untouched. The same body again, even with its
    keys in another order, is an ordinary re-send and gets the verdict of record."""
    import json

    from appliance.transaction import digest

    node = node_factory(tmp_path / "node", nats_url, {}).start()
    db = tmp_path / "node" / "branchguard.db"
    first = tx("same-id", "A-CONF", 42.50, minutes=0)
    assert send(nats_url, [first]) == 1
    wait_until(lambda: stored_count(db) == 1)
    other = msgspec.structs.replace(first, amount=8888.0)
    reordered = json.dumps(dict(reversed(list(json.loads(encode(first)).items())))).encode()
    assert send_raw(nats_url, [(subject_for("BR001", first), encode(other), "resend-other"),
                               (subject_for("BR001", first), reordered, "resend-same")])
    wait_until(lambda: query(db, "SELECT count(*) FROM dead_letters")[0][0] == 1)
    [(reason,)] = query(db, "SELECT reason FROM dead_letters")
    assert reason.startswith("conflicting re-send")
    assert digest(first).hex() in reason and digest(other).hex() in reason
    assert query(db, "SELECT amount, body_digest FROM transactions") == [(42.5, digest(first))]
    dlq = read_stream(nats_url, "TX_DLQ", expect=1)
    assert [decode(m.data)["amount"] for m in dlq] == [8888.0]
    verdicts = [decode(m.data) for m in read_stream(nats_url, "VERDICTS", expect=2)]
    assert [v["transaction_id"] for v in verdicts] == ["same-id"]  # the re-send: same msg id
    wait_until(lambda: '"tx.conflicting_resend"' in node.log(), message="logged")
    line = next(json.loads(x) for x in node.log().splitlines() if "conflicting_resend" in x)
    assert line["level"] == "WARNING" and line["txn_id"] == "same-id"
    node.stop()
    stopped = next(json.loads(x) for x in node.log().splitlines() if '"node.stopped"' in x)
    assert (stopped["conflicts"], stopped["dead_letters"], stopped["duplicates"]) == (1, 1, 1)


BAD_INPUTS = [
    ("bad json", "tx.BR001.T1.A1", b"{not json", "bad json"),
    ("missing field", "tx.BR001.T1.A1",
     b'{"transaction_id":"m1","account_id":"A1","currency":"EUR","terminal_id":"T1",'
     b'"timestamp":"2026-03-02T09:00:00Z","channel":"POS"}', "missing required field `amount`"),
    ("wrong type", "tx.BR001.T1.A1",
     b'{"transaction_id":"w1","account_id":"A1","amount":"ten","currency":"EUR",'
     b'"terminal_id":"T1","timestamp":"2026-03-02T09:00:00Z","channel":"POS"}', "`$.amount`"),
    ("amount zero", "tx.BR001.T1.A1",
     b'{"transaction_id":"z1","account_id":"A1","amount":0,"currency":"EUR",'
     b'"terminal_id":"T1","timestamp":"2026-03-02T09:00:00Z","channel":"POS"}', "> 0"),
    ("negative amount", "tx.BR001.T1.A1",
     b'{"transaction_id":"n1","account_id":"A1","amount":-5,"currency":"EUR",'
     b'"terminal_id":"T1","timestamp":"2026-03-02T09:00:00Z","channel":"POS"}', "> 0"),
    ("bad timestamp", "tx.BR001.T1.A1",
     b'{"transaction_id":"t1","account_id":"A1","amount":5,"currency":"EUR",'
     b'"terminal_id":"T1","timestamp":"yesterday","channel":"POS"}', "`$.timestamp`"),
    ("no timezone", "tx.BR001.T1.A1",
     b'{"transaction_id":"t2","account_id":"A1","amount":5,"currency":"EUR",'
     b'"terminal_id":"T1","timestamp":"2026-03-02T09:00:00","channel":"POS"}', "timezone"),
    ("bad channel", "tx.BR001.T1.A1",
     b'{"transaction_id":"c1","account_id":"A1","amount":5,"currency":"EUR",'
     b'"terminal_id":"T1","timestamp":"2026-03-02T09:00:00Z","channel":"FAX"}', "`$.channel`"),
    ("subject mismatch", "tx.BR001.T9.A1",
     b'{"transaction_id":"s1","account_id":"A1","amount":5,"currency":"EUR",'
     b'"terminal_id":"T1","timestamp":"2026-03-02T09:00:00Z","channel":"POS"}',
     "subject does not match"),
    ("oversize", "tx.BR001.T1.A1", b'{"transaction_id":"o1","pad":"' + b"x" * 9000 + b'"}',
     "oversize"),
]


def test_bad_input_goes_to_the_dead_letter_stream_and_the_flow_goes_on(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    node = node_factory(tmp_path / "node", nats_url, {}).start()
    db = tmp_path / "node" / "branchguard.db"
    good_before, good_after = tx("good-1", "A1", 10.0, 0), tx("good-2", "A1", 12.0, 1)
    send(nats_url, [good_before])
    assert send_raw(nats_url, [(subject, data, f"bad-{i}")
                               for i, (_, subject, data, _) in enumerate(BAD_INPUTS)])
    send(nats_url, [good_after])
    wait_until(lambda: stored_count(db) == 2, message="good transactions stored")
    wait_until(lambda: query(db, "SELECT count(*) FROM dead_letters")[0][0] == len(BAD_INPUTS))

    dlq = read_stream(nats_url, "TX_DLQ", expect=len(BAD_INPUTS))
    assert len(dlq) == len(BAD_INPUTS)
    reasons = [m.headers["Branchguard-Reason"] for m in dlq]
    for (name, subject, data, expected), msg, reason in zip(BAD_INPUTS, dlq, reasons):
        assert expected in reason, f"{name}: {reason}"
        assert msg.data == data  # the original message, unchanged
        assert msg.headers["Branchguard-Subject"] == subject
    stored_reasons = [r[0] for r in query(db, "SELECT reason FROM dead_letters "
                                              "ORDER BY stream_seq")]
    for (name, _, _, expected), reason in zip(BAD_INPUTS, stored_reasons):
        assert expected in reason, f"{name}: {reason}"
    # nothing is left pending or waiting for redelivery
    node.stop()
    assert query(db, "SELECT count(*) FROM dead_letters")[0][0] == len(BAD_INPUTS)
    checkpoint = query(db, "SELECT stream_seq FROM checkpoints WHERE consumer = 'scorer'")
    assert checkpoint[0][0] == len(BAD_INPUTS) + 2


def _rows(db: Path) -> list[tuple[object, ...]]:
    return query(db, "SELECT transaction_id, stream_seq, features, model_risk, risk, severity, "
                     "decision, reasons FROM transactions ORDER BY stream_seq")


@pytest.mark.timeout(600)
def test_sigkill_mid_batch_loses_nothing_and_double_counts_nothing(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    txs = [item.tx for item in make_transactions(20000, seed=5, rate=50.0)]
    n = len(txs)
    # Reference: a scorer that never crashes, on its own consumer and database.
    ref = node_factory(tmp_path / "ref", nats_url, {"BRANCHGUARD_CONSUMER": "reference"})
    ref.start()  # (it creates the streams)
    assert send(nats_url, txs) == len(txs)
    ref_db = tmp_path / "ref" / "branchguard.db"
    wait_until(lambda: stored_count(ref_db) == n, timeout=300, message="reference done")
    ref.stop()

    db = tmp_path / "crash" / "branchguard.db"
    rng = random.Random(5)
    for _ in range(3):  # crash three times, each at a different point of the stream
        before = stored_count(db)
        node = node_factory(tmp_path / "crash", nats_url, {}).start()
        target = min(n - 1, before + rng.randint(1500, 5000))
        wait_until(lambda: stored_count(db) >= target, timeout=300, message="progress")
        node.kill()
    node = node_factory(tmp_path / "crash", nats_url, {}).start()
    wait_until(lambda: stored_count(db) == n, timeout=300, message="crashed scorer done")
    node.stop()

    assert _rows(db) == _rows(ref_db)  # same rows, same features, same verdicts
    assert query(db, "SELECT count(*), count(DISTINCT transaction_id) FROM alerts") == \
        query(ref_db, "SELECT count(*), count(DISTINCT transaction_id) FROM alerts")
    crashed, reference = Store.open(db), Store.open(ref_db)
    try:
        assert (feature_state(crashed.reader).snapshot()
                == feature_state(reference.reader).snapshot())
    finally:
        crashed.close()
        reference.close()
    verdicts = read_stream(nats_url, "VERDICTS", expect=n)
    assert {decode(m.data)["transaction_id"] for m in verdicts} == {t.transaction_id for t in txs}


def test_sigkill_between_publish_and_commit_keeps_the_published_verdicts(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    """Issue 16: verdicts are published before their batch is committed. Kill the node in
    between (the database's write lock held, as Litestream holds it while it checkpoints),
    then change what scoring reads (a deny entry on every one of those accounts) before the
    restart: each replayed transaction must keep the verdict already published, and
    VERDICTS must hold exactly one verdict per transaction."""
    import sqlite3

    from appliance.change import apply_change, connect_writer
    from appliance.scoring.lists import add_entry

    txs = [item.tx for item in make_transactions(800, seed=12, rate=20.0)]
    data = tmp_path / "node"
    db = data / "branchguard.db"
    node = node_factory(data, nats_url, {}).start()
    assert send(nats_url, txs[:500]) == 500
    wait_until(lambda: stored_count(db) == 500, message="first part stored")

    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # nobody else can commit now
    try:
        assert send(nats_url, txs[500:]) == 300
        wait_until(lambda: len(read_stream(nats_url, "VERDICTS")) >= 800, timeout=4,
                   message="verdicts published while the commit waits")
        assert stored_count(db) == 500
        node.kill()
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    published = {decode(m.data)["transaction_id"]: decode(m.data)
                 for m in read_stream(nats_url, "VERDICTS")}
    writer = connect_writer(db)
    for account in {tx.account_id for tx in txs[500:]}:
        apply_change(writer, lambda c, a=account: add_entry(
            c, "deny", "account", a, "test: changed after the crash", "user:test", None))
    writer.conn.close()

    node = node_factory(data, nats_url, {}).start()
    wait_until(lambda: stored_count(db) == 800, message="replayed")
    node.stop()
    stored = {r[0]: r[1:] for r in query(
        db, "SELECT transaction_id, decision, risk, reasons, model_version FROM transactions")}
    for tx in txs[500:]:
        v = published[tx.transaction_id]
        assert stored[tx.transaction_id] == (v["decision"], v["risk"],
                                             msgspec.json.encode(v["reasons"]).decode(),
                                             v["model_version"])
    verdicts = [decode(m.data)["transaction_id"] for m in read_stream(nats_url, "VERDICTS")]
    assert len(verdicts) == len(set(verdicts)) == 800
    # a deny entry declines: re-scored, these approvals would have changed
    assert any(published[t.transaction_id]["decision"] == "approve" for t in txs[500:])


def test_event_time_window_and_currencies_on_a_real_node(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    """Issue 17: with the window on (the default), an event time a clock got wrong is
    dead-lettered with its own reason, a late one inside the window is scored; USD is
    converted at the configured rate (the rules judge the converted amount, the row keeps
    what was sent), a currency with no rate is dead-lettered; the node keeps scoring."""
    node_factory(tmp_path / "node", nats_url, {
        "BRANCHGUARD_EVENT_TIME_CHECK": "true", "BRANCHGUARD_CURRENCY_RATES": "USD=0.92"
    }).start()
    db = tmp_path / "node" / "branchguard.db"
    now = datetime.now(timezone.utc)

    def at(tid: str, stamp: datetime, amount: float = 20.0, currency: str = "EUR",
           account: str = "A-CLOCK") -> Transaction:
        return Transaction(transaction_id=tid, account_id=account, amount=amount,
                           currency=currency, timestamp=stamp, terminal_id="T0001",
                           channel="POS", location="Espoo")

    far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14)))
    first = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
    bad = [at("future-9999", far), at("future-2099", datetime(2099, 1, 1, tzinfo=timezone.utc)),
           at("ahead-1h", now + timedelta(hours=1)), at("year-1", first),
           at("old-2018", datetime(2018, 4, 1, tzinfo=timezone.utc)),
           at("old-8d", now - timedelta(days=8)),
           at("yen", now, amount=5000, currency="JPY")]
    good = [at("late-3d", now - timedelta(days=3)), at("ahead-1min", now + timedelta(minutes=1)),
            at("usd", now, amount=9000, currency="USD", account="A-USD"),
            *(at(f"burst-{i}", now + timedelta(seconds=i - 30)) for i in range(15))]
    send(nats_url, [bad[0], good[0], *bad[1:], *good[1:]])
    wait_until(lambda: stored_count(db) == len(good), message="the good ones stored")
    wait_until(lambda: query(db, "SELECT count(*) FROM dead_letters")[0][0] == len(bad))

    reasons = {decode(m.data)["transaction_id"]: m.headers["Branchguard-Reason"]
               for m in read_stream(nats_url, "TX_DLQ", expect=len(bad))}
    for tid in ("future-9999", "future-2099", "ahead-1h"):
        assert reasons[tid].startswith("event time too far in the future: "), reasons[tid]
    for tid in ("year-1", "old-2018", "old-8d"):
        assert reasons[tid].startswith("event time too old: "), reasons[tid]
    assert reasons["yen"].startswith("currency not accepted: JPY")
    assert query(db, "SELECT count(*) FROM transactions WHERE transaction_id IN "
                     f"({', '.join('?' * len(bad))})", [t.transaction_id for t in bad]) == [(0,)]

    usd = query(db, "SELECT amount, amount_milli, currency, sent_amount, sent_currency, "
                    "reasons, details FROM transactions WHERE transaction_id = 'usd'")[0]
    assert usd[:5] == (8280.0, 8280000, "EUR", 9000.0, "USD")
    assert "high_value" in usd[5] and "amount 8280.00 >= 5000.00" in usd[6]
    assert query(db, "SELECT sent_amount, sent_currency FROM transactions "
                     "WHERE transaction_id = 'late-3d'") == [(None, None)]
    # the burst is seen as one: no far-future event blinded the account's velocity
    last = query(db, "SELECT features FROM transactions WHERE transaction_id = 'burst-14'")
    assert decode_features(last[0][0])[FEATURES.index("account_count_1h")] >= 14
