"""The data layer: idempotent batches, alerts, checkpoints, dead letters and the reads."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest

from appliance.scoring.features import FEATURES_VERSION, FeatureState, feature_state
from appliance.scoring.rules import RULES_VERSION
from appliance.scoring.score import judge
from appliance.settings import Settings
from appliance.store import DeadLetter, Scored, Store, decode_features
from appliance.transaction import Transaction
from appliance.verdict import Verdict
from tests.support import make_transactions, query

SETTINGS = Settings()
CONSUMER = "scorer"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "db" / "branchguard.db")
    try:
        yield s
    finally:
        s.close()


def fake_model_risk(i: int) -> float:
    """A deterministic spread of model risks, so every severity shows up."""
    return (0.05, 0.3, 0.55, 0.65, 0.75, 0.85, 0.95, 0.1, 0.2, 0.4)[i % 10]


def score_all(txs: Sequence[Transaction], state: FeatureState | None = None,
              first_seq: int = 1, branch: str = "BR001") -> list[Scored]:
    state = FeatureState() if state is None else state
    out = []
    for i, tx in enumerate(txs):
        f = state.observe(tx)
        v = judge(tx, f, fake_model_risk(i), "m-test", RULES_VERSION, SETTINGS)
        out.append(Scored(tx, branch, first_seq + i, f, FEATURES_VERSION, v))
    return out


@pytest.fixture(scope="module")
def simulated() -> list[Transaction]:
    return [item.tx for item in make_transactions(400)]


def alert_ids(store: Store) -> set[str]:
    return {r[0] for r in store.reader.execute("SELECT transaction_id FROM alerts")}


# --- idempotence and alerts -------------------------------------------------------------------


def test_save_batch_twice_stores_once_and_alerts_once(store: Store,
                                                      simulated: list[Transaction]) -> None:
    scored = score_all(simulated[:100])
    expected_alerts = sum(s.verdict.decision != "approve" for s in scored)
    assert 0 < expected_alerts < 100

    assert store.save_batch(scored, [], CONSUMER, 100) == expected_alerts
    assert store.save_batch(scored, [], CONSUMER, 100) == 0
    counts = store.counts()
    assert counts["transactions"] == 100
    assert counts["alerts"] == expected_alerts
    assert len(alert_ids(store)) == expected_alerts


def test_overlapping_batches_store_only_new_rows(store: Store,
                                                 simulated: list[Transaction]) -> None:
    scored = score_all(simulated[:60])
    first, second = scored[:40], scored[20:]
    created_first = store.save_batch(first, [], CONSUMER, 40)
    created_second = store.save_batch(second, [], CONSUMER, 60)
    assert created_first == sum(s.verdict.decision != "approve" for s in first)
    assert created_second == sum(s.verdict.decision != "approve" for s in scored[40:])
    assert store.counts()["transactions"] == 60


def test_duplicate_id_inside_one_batch_is_stored_once(store: Store,
                                                      simulated: list[Transaction]) -> None:
    (s,) = score_all(simulated[:1])
    s = Scored(s.tx, s.branch, s.stream_seq,
               s.features, s.features_version, msgspec.structs.replace(s.verdict, decision="review",
                                                   severity="WARNING"))
    assert store.save_batch([s, s], [], CONSUMER, 1) == 1
    assert store.counts()["transactions"] == 1
    assert store.counts()["alerts"] == 1


def test_alerts_only_for_decisions_other_than_approve(store: Store,
                                                      simulated: list[Transaction]) -> None:
    scored = score_all(simulated[:100])
    store.save_batch(scored, [], CONSUMER, 100)
    decisions = {s.tx.transaction_id: s.verdict.decision for s in scored}
    assert {"approve", "review", "decline"} <= set(decisions.values())
    assert alert_ids(store) == {tid for tid, d in decisions.items() if d != "approve"}


def test_alert_rows_copy_the_verdict(store: Store, simulated: list[Transaction]) -> None:
    scored = [s for s in score_all(simulated[:20]) if s.verdict.decision != "approve"]
    store.save_batch(scored, [], CONSUMER, 20)
    rows = {r[0]: r[1:] for r in store.reader.execute(
        "SELECT transaction_id, severity, risk, reasons, status, account_id, terminal_id, ts "
        "FROM alerts")}
    for s in scored:
        severity, risk, reasons, status, account, terminal, ts = rows[s.tx.transaction_id]
        assert (severity, risk, status) == (s.verdict.severity, s.verdict.risk, "NEW")
        assert msgspec.json.decode(reasons) == s.verdict.reasons
        assert (account, terminal) == (s.tx.account_id, s.tx.terminal_id)
        assert ts == s.tx.timestamp.timestamp()


def test_save_batch_is_atomic(store: Store, simulated: list[Transaction]) -> None:
    scored = score_all(simulated[:10])
    broken = DeadLetter(object(), "tx.x", "bad", 1)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.Error):
        store.save_batch(scored, [broken], CONSUMER, 10)
    assert store.counts() == {"transactions": 0, "alerts": 0, "dead_letters": 0,
                              "alerts_critical": 0, "alerts_high": 0, "alerts_warning": 0}
    assert store.checkpoint(CONSUMER) == 0
    # and the store is still usable afterwards
    store.save_batch(scored, [], CONSUMER, 10)
    assert store.counts()["transactions"] == 10


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_starts_at_zero(store: Store) -> None:
    assert store.checkpoint(CONSUMER) == 0


def test_checkpoint_advances_and_never_goes_backwards(store: Store,
                                                      simulated: list[Transaction]) -> None:
    store.save_batch([], [], CONSUMER, 10)
    assert store.checkpoint(CONSUMER) == 10
    store.save_batch(score_all(simulated[:5], first_seq=11), [], CONSUMER, 15)
    assert store.checkpoint(CONSUMER) == 15
    store.save_batch([], [], CONSUMER, 7)  # a replay of an older batch
    assert store.checkpoint(CONSUMER) == 15
    store.save_batch([], [], CONSUMER, 15)
    assert store.checkpoint(CONSUMER) == 15
    store.save_batch([], [], CONSUMER, 16)
    assert store.checkpoint(CONSUMER) == 16


def test_checkpoints_are_per_consumer(store: Store) -> None:
    store.save_batch([], [], "a", 5)
    store.save_batch([], [], "b", 9)
    store.save_batch([], [], "a", 3)
    assert (store.checkpoint("a"), store.checkpoint("b"), store.checkpoint("c")) == (5, 9, 0)


def test_everything_survives_reopening(tmp_path: Path, simulated: list[Transaction]) -> None:
    path = tmp_path / "node.db"
    scored = score_all(simulated[:30])
    first = Store.open(path)
    try:
        first.save_batch(scored, [DeadLetter(31, "tx.a.b.c", "bad json: x", 3)], CONSUMER, 31)
        before = first.counts()
    finally:
        first.close()
    second = Store.open(path)  # migrations are idempotent
    try:
        assert second.counts() == before
        assert second.checkpoint(CONSUMER) == 31
        assert second.verdicts_for([s.tx.transaction_id for s in scored]) == \
            {s.tx.transaction_id: s.verdict for s in scored}
    finally:
        second.close()
    assert query(path, "SELECT count(*) FROM transactions")[0][0] == 30


# --- dead letters -----------------------------------------------------------------------------


def test_dead_letters_are_stored_once_per_stream_seq(store: Store) -> None:
    dead = [DeadLetter(3, "tx.BR001.T1.A1", "bad json: eof", 12),
            DeadLetter(4, "tx.BR001.T1", "bad subject: expected ...", 300)]
    store.save_batch([], dead, CONSUMER, 4)
    store.save_batch([], dead, CONSUMER, 4)
    store.save_batch([], [DeadLetter(3, "tx.other", "other reason", 1)], CONSUMER, 4)
    assert store.counts()["dead_letters"] == 2
    rows = store.reader.execute(
        "SELECT stream_seq, subject, reason, size FROM dead_letters ORDER BY stream_seq"
    ).fetchall()
    assert rows == [(3, "tx.BR001.T1.A1", "bad json: eof", 12),
                    (4, "tx.BR001.T1", "bad subject: expected ...", 300)]


# --- reads ------------------------------------------------------------------------------------


def test_verdicts_for_returns_what_was_saved(store: Store, simulated: list[Transaction]) -> None:
    scored = score_all(simulated[:50])
    store.save_batch(scored, [], CONSUMER, 50)
    wanted = [s.tx.transaction_id for s in scored[::7]]
    got = store.verdicts_for([*wanted, "never-stored"])
    assert set(got) == set(wanted)
    for s in scored[::7]:
        v = got[s.tx.transaction_id]
        assert isinstance(v, Verdict)
        assert v == s.verdict
    assert store.verdicts_for([]) == {}
    assert store.verdicts_for(["never-stored"]) == {}


def test_verdicts_for_keeps_reasons_and_details(store: Store) -> None:
    t = Transaction("big-1", "A1", 9000.0, "EUR", datetime(2026, 3, 2, tzinfo=timezone.utc),
                    "T1", "ONLINE", merchant_category="Gambling", location="Tallinn")
    (s,) = score_all([t])
    assert "high_value" in s.verdict.reasons and "suspicious_combo" in s.verdict.reasons
    store.save_batch([s], [], CONSUMER, 1)
    stored = store.verdicts_for(["big-1"])["big-1"]
    assert stored.reasons == s.verdict.reasons
    assert stored.details == s.verdict.details
    assert stored == s.verdict


def test_first_stored_verdict_wins(store: Store, simulated: list[Transaction]) -> None:
    (s,) = score_all(simulated[:1])
    store.save_batch([s], [], CONSUMER, 1)
    other = msgspec.structs.replace(s.verdict, risk=0.99, severity="CRITICAL",
                                    decision="decline", model_version="m-other")
    store.save_batch([Scored(s.tx, s.branch, 2, s.features, s.features_version, other)], [],
                     CONSUMER, 2)
    assert store.verdicts_for([s.tx.transaction_id]) == {s.tx.transaction_id: s.verdict}


def test_verdicts_between_is_half_open_and_in_stream_order(store: Store,
                                                           simulated: list[Transaction]) -> None:
    scored = score_all(simulated[:20], first_seq=101, branch="BR007")  # seqs 101..120
    shuffled = list(scored)
    random.Random(3).shuffle(shuffled)
    store.save_batch(shuffled[:10], [], CONSUMER, 120)
    store.save_batch(shuffled[10:], [], CONSUMER, 120)

    got = store.verdicts_between(105, 110)
    assert [v.transaction_id for _, _, v in got] == \
        [s.tx.transaction_id for s in scored if 105 < s.stream_seq <= 110]
    assert len(got) == 5
    by_id = {s.tx.transaction_id: s for s in scored}
    for branch, terminal, v in got:
        assert branch == "BR007"
        assert terminal == by_id[v.transaction_id].tx.terminal_id
        assert v == by_id[v.transaction_id].verdict

    assert store.verdicts_between(110, 110) == []
    assert store.verdicts_between(120, 500) == []
    assert len(store.verdicts_between(0, 120)) == 20
    assert len(store.verdicts_between(100, 101)) == 1
    assert store.verdicts_between(0, 100) == []


def test_transaction_row(store: Store) -> None:
    stamp = datetime(2026, 3, 2, 11, 30, tzinfo=timezone(timedelta(hours=2)))
    t = Transaction("row-1", "A9", 12.345, "SEK", stamp, "T9", "ATM", location="Turku")
    (s,) = score_all([t])
    store.save_batch([s], [], CONSUMER, 1)
    row = store.transaction("row-1")
    assert row is not None
    assert row["amount"] == 12.345
    assert row["amount_milli"] == 12345
    assert row["currency"] == "SEK"
    assert row["ts"] == stamp.timestamp()
    assert row["utc_offset"] == 7200
    assert row["merchant_category"] is None and row["location"] == "Turku"
    assert tuple(decode_features(row["features"])) == s.features
    assert row["features_version"] == FEATURES_VERSION
    assert row["branch"] == "BR001" and row["stream_seq"] == 1
    assert store.transaction("nope") is None


def test_counts(store: Store, simulated: list[Transaction]) -> None:
    assert store.counts() == {"transactions": 0, "alerts": 0, "dead_letters": 0,
                              "alerts_critical": 0, "alerts_high": 0, "alerts_warning": 0}
    scored = score_all(simulated[:100])
    store.save_batch(scored, [DeadLetter(101, "tx.x", "bad json", 2),
                              DeadLetter(102, "tx.y", "oversize", 9000)], CONSUMER, 102)
    counts = store.counts()
    alerts = [s.verdict for s in scored if s.verdict.decision != "approve"]
    expected = {"transactions": 100, "alerts": len(alerts), "dead_letters": 2,
                "alerts_critical": 0, "alerts_high": 0, "alerts_warning": 0}
    for severity in {v.severity for v in alerts}:
        expected[f"alerts_{severity.lower()}"] = sum(v.severity == severity for v in alerts)
    assert counts == expected
    assert "alerts_info" not in counts


# --- feature state ----------------------------------------------------------------------------


def save_in_batches(store: Store, scored: list[Scored], size: int) -> None:
    for start in range(0, len(scored), size):
        chunk = scored[start:start + size]
        store.save_batch(chunk, [], CONSUMER, chunk[-1].stream_seq)


def test_feature_state_rebuilt_equals_live(store: Store, simulated: list[Transaction]) -> None:
    live = FeatureState()
    scored = score_all(simulated, live)
    save_in_batches(store, scored, 64)
    rebuilt = feature_state(store.reader)
    assert rebuilt.snapshot() == live.snapshot()
    # and it keeps computing the same features afterwards
    nxt = Transaction("next-1", simulated[0].account_id, 77.7, "EUR",
                      simulated[-1].timestamp + timedelta(seconds=1), simulated[0].terminal_id,
                      "POS", merchant_category="Fuel", location="Lahti")
    assert rebuilt.observe(nxt) == live.observe(nxt)


def test_feature_state_rebuilt_equals_live_with_late_and_tied_events(store: Store) -> None:
    rng = random.Random(5)
    base = datetime(2026, 3, 2, 12, tzinfo=timezone.utc)
    offsets = [rng.choice([0, 0, 60, 3600, -3600, -90_000, 86_400, -700_000, 30])
               + rng.randint(0, 3) * 3600 for _ in range(300)]
    txs = [Transaction(f"late-{i}", f"A{rng.randint(0, 4)}",
                       rng.randint(1, 500_000) / 100, "EUR", base + timedelta(seconds=o),
                       f"T{rng.randint(0, 3)}", "POS",
                       merchant_category=rng.choice([None, "Fuel", "Gambling"]),
                       location=rng.choice([None, "Espoo", "Turku", "Oulu"]))
           for i, o in enumerate(offsets)]
    live = FeatureState()
    scored = score_all(txs, live)
    save_in_batches(store, scored, 37)
    assert feature_state(store.reader).snapshot() == live.snapshot()


def test_feature_state_of_empty_store(store: Store) -> None:
    assert feature_state(store.reader).snapshot() == FeatureState().snapshot()


def test_feature_state_is_exact_when_squares_overflow_sqlite_integers(store: Store) -> None:
    base = datetime(2026, 3, 2, 12, tzinfo=timezone.utc)
    # 900 million in thousandths squared is ~8e23: SQLite turns that product into a REAL
    txs = [Transaction(f"big-{i}", "A-CORP", 900_000_000.0 - i * 0.01, "EUR",
                       base + timedelta(minutes=i), "T0", "POS") for i in range(12)]
    live = FeatureState()
    save_in_batches(store, score_all(txs, live), 5)
    rebuilt = feature_state(store.reader)
    assert rebuilt.snapshot() == live.snapshot()
    assert rebuilt.accounts["A-CORP"].sumsq_milli == live.accounts["A-CORP"].sumsq_milli
    assert isinstance(rebuilt.accounts["A-CORP"].sumsq_milli, int)
