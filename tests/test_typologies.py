"""The six typologies: each fires on a crafted stream, in plain words with its numbers, and
not on the near miss; trails rebuilt from the database answer as the live ones do."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from collections.abc import Sequence
from pathlib import Path

import pytest

from appliance.scoring.features import FEATURES_VERSION, FeatureState, feature_state
from appliance.scoring.rulebook import SHIPPED_RULES, load
from appliance.scoring.rules import HARD_REASONS, Hit
from appliance.scoring.score import judge
from appliance.scoring.typologies import Typologies, TypologyState, km_between
from appliance.settings import Settings
from appliance.store import Scored, Store
from appliance.transaction import Transaction
from tests.support import make_transactions

BOOK = load(SHIPPED_RULES)
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
PLACES = {"HEL": (60.1699, 24.9384), "TKU": (60.4518, 22.2666), "ESP": (60.2055, 24.6559),
          "ATM1": (60.17, 24.94), "ATM2": (60.18, 24.95), "ATM3": (60.19, 24.96)}


class Stream:
    """Features and typology state as the scorer keeps them, fed one transaction at a time."""

    def __init__(self) -> None:
        self.features = FeatureState()
        self.state = TypologyState(BOOK, PLACES, "EUR")
        self.i = 0

    def feed(self, seconds: float, amount: float = 20.0, terminal: str = "HEL",
             channel: str = "POS", decision: str = "approve", account: str = "A1"
             ) -> list[Hit]:
        self.i += 1
        tx = Transaction(transaction_id=f"t{self.i}", account_id=account, amount=amount,
                         currency="EUR", timestamp=T0 + timedelta(seconds=seconds),
                         terminal_id=terminal, channel=channel)  # type: ignore[arg-type]
        f = self.features.observe(tx)
        hits = list(self.state.check(tx, f))
        self.state.add(tx.account_id, tx.terminal_id, tx.timestamp.timestamp(),
                       round(tx.amount * 1000), tx.channel, decision)
        return hits

    def history(self, n: int, amount: float = 20.0, terminal: str = "HEL",
                start: float = -30 * 86400.0) -> None:
        """``n`` quiet transactions, one every 6 hours, ending before ``start`` + n * 6 h."""
        for k in range(n):
            assert self.feed(start + k * 21600.0, amount, terminal) == []


def codes(hits: Sequence[Hit]) -> list[str]:
    return [h.reason for h in hits]


def test_every_typology_hit_is_hard_and_named_in_hard_reasons() -> None:
    assert {"velocity_burst", "card_testing", "amount_spike", "impossible_travel",
            "atm_cashout", "new_terminal_large", "high_value"} == HARD_REASONS


def test_velocity_burst_fires_at_count_within_seconds_and_not_just_outside() -> None:
    near = Stream()
    near.history(10)
    # 6 transactions over exactly 60 s: the first falls out of the window (t - 60, t]
    assert all(codes(near.feed(12.0 * k)) == [] for k in range(6))
    s = Stream()
    s.history(10)
    results = [codes(s.feed(10.0 * k)) for k in range(6)]
    assert results == [[]] * 5 + [["velocity_burst"]]
    hit = s.feed(55.0)[0]
    assert hit.hard and hit.risk == BOOK.velocity_burst.risk
    assert hit.detail == ("7 transactions from this account within 60 s (threshold: 6 within "
                          "60 s)")


def test_card_testing_small_amounts() -> None:
    near = Stream()
    near.history(10)
    amounts = [1.0, 2.0, 5.01, 3.0, 4.0]  # one of the five is not small
    assert all(near.feed(60.0 * k, a) == [] for k, a in enumerate(amounts))
    s = Stream()
    s.history(10)
    out = [codes(s.feed(60.0 * k, a)) for k, a in enumerate([1.0, 2.0, 5.0, 3.0, 4.0])]
    assert out == [[]] * 4 + [["card_testing"]]
    (hit,) = s.feed(300.0, 1.5)
    assert "6 small amounts of at most 5.00 EUR within 10 min" in hit.detail
    assert "1.50 EUR" in hit.detail and "(threshold: 5)" in hit.detail


def test_card_testing_declines() -> None:
    near = Stream()
    near.history(10)
    for k in range(2):
        near.feed(60.0 * k, 40.0, decision="decline")
    assert near.feed(180.0, 40.0) == []
    s = Stream()
    s.history(10)
    for k in range(3):
        assert s.feed(60.0 * k, 40.0, decision="decline") == []
    (hit,) = s.feed(180.0, 40.0)
    assert hit.reason == "card_testing"
    assert hit.detail == ("3 earlier transactions of this account declined within 10 min "
                          "(threshold: 3)")
    assert s.feed(180.0 + 600.0, 40.0) == []  # the first decline is out of the window


def test_amount_spike_against_the_accounts_own_maximum() -> None:
    near = Stream()
    near.history(9, 50.0)
    near.feed(-3600.0, 100.0)  # the account's largest: 100, with 10 earlier transactions
    assert near.feed(0.0, 299.99) == []
    s = Stream()
    s.history(9, 50.0)
    s.feed(-3600.0, 100.0)
    (hit,) = s.feed(0.0, 300.0)
    assert hit.reason == "amount_spike"
    assert hit.detail == ("amount 300.00 EUR is 3.0x the largest this account paid before "
                          "(100.00 EUR, over 10 earlier transactions; threshold: 3x)")
    young = Stream()
    young.history(8, 50.0)
    young.feed(-3600.0, 100.0)  # only 9 earlier transactions: too little history
    assert young.feed(0.0, 1000.0) == []


def test_impossible_travel_between_placed_terminals() -> None:
    km = km_between(*PLACES["HEL"], *PLACES["TKU"])
    assert 150 < km < 170
    s = Stream()
    s.history(10)
    s.feed(0.0)                                        # Helsinki
    s.feed(60.0, terminal="WEB", channel="ONLINE")     # online: no place, skipped
    assert s.feed(15 * 60.0, terminal="TKU") == []     # 640 km/h: possible
    (hit,) = s.feed(20 * 60.0, terminal="HEL")         # back in 5 minutes: 1,900 km/h
    assert hit.reason == "impossible_travel"
    assert hit.detail.startswith(f"{km:,.0f} km from terminal TKU to terminal HEL in 5 min:")
    assert "(threshold: 900 km/h)" in hit.detail
    near = Stream()
    near.history(10)
    near.feed(0.0, terminal="HEL")
    assert near.feed(30.0, terminal="ESP") == []        # 16 km in 30 s: under min_km


def test_atm_cashout_across_different_atms() -> None:
    near = Stream()
    near.history(10, 150.0)
    for k, atm in enumerate(["ATM1", "ATM2", "ATM1", "ATM2"]):
        assert near.feed(600.0 * k, 200.0, atm, "ATM") == []
    late = Stream()
    late.history(10, 150.0)
    for k, atm in enumerate(["ATM1", "ATM2", "ATM3"]):  # the third after the hour
        assert late.feed(1801.0 * k, 200.0, atm, "ATM") == []
    s = Stream()
    s.history(10, 150.0)
    s.feed(0.0, 200.0, "ATM1", "ATM")
    s.feed(900.0, 200.0, "ATM2", "ATM")
    hits = s.feed(1800.0, 200.0, "ATM3", "ATM")
    assert codes(hits) == ["atm_cashout"]
    assert hits[0].detail == ("cash at 3 different ATMs within 1 h: ATM3 after ATM1, ATM2 "
                              "(threshold: 3)")


def test_new_terminal_large() -> None:
    s = Stream()
    s.history(10, 20.0)
    # (amount_spike fires too on these: 15x and 20x the account's largest)
    assert "new_terminal_large" not in codes(s.feed(0.0, 299.0, "ESP"))  # under the floor
    assert "new_terminal_large" not in codes(s.feed(60.0, 400.0, "HEL"))  # a known terminal
    hits = s.feed(120.0, 400.0, "TKU")
    assert "new_terminal_large" in codes(hits)
    hit = next(h for h in hits if h.reason == "new_terminal_large")
    assert hit.detail.startswith("first use of terminal TKU by this account, amount 400.00 EUR")
    assert "its median; threshold: 5x and at least 300.00 EUR" in hit.detail


def test_a_new_accounts_first_payment_matches_nothing() -> None:
    s = Stream()
    assert s.feed(0.0, 2000.0, "TKU", "ATM") == []


def test_disabled_typology_does_not_fire(tmp_path: Path) -> None:
    text = SHIPPED_RULES.read_text().replace("[velocity_burst]\n", "[velocity_burst]\n#\n")
    text = text.replace("enabled = true\ncount = 6", "enabled = false\ncount = 6")
    path = tmp_path / "r.toml"
    path.write_text(text)
    book = load(path)
    assert not book.velocity_burst.enabled
    state, feats = TypologyState(book), FeatureState()
    out = []
    for k in range(8):
        tx = Transaction(transaction_id=f"x{k}", account_id="A", amount=20.0, currency="EUR",
                         timestamp=T0 + timedelta(seconds=k), terminal_id="HEL", channel="POS")
        out += state.check(tx, feats.observe(tx))
        state.add("A", "HEL", tx.timestamp.timestamp(), 20000, "POS", "approve")
    assert out == []


def test_hits_raise_the_verdicts_risk_and_name_their_reason() -> None:
    s = Stream()
    s.history(10)
    for k in range(5):
        s.feed(10.0 * k)
    tx = Transaction(transaction_id="z", account_id="A1", amount=20.0, currency="EUR",
                     timestamp=T0 + timedelta(seconds=50), terminal_id="HEL", channel="POS")
    f = s.features.observe(tx)
    hits = s.state.check(tx, f)
    plain = judge(tx, f, 0.1, "m", BOOK.version, Settings())
    v = judge(tx, f, 0.1, "m", BOOK.version, Settings(), typology=hits)
    assert v.reasons == plain.reasons + ["velocity_burst"]
    assert v.details[-1] == hits[0].detail
    assert v.risk == pytest.approx(1 - 0.9 * (1 - BOOK.velocity_burst.risk), abs=1e-6)


def test_rebuilt_trails_equal_the_live_ones(tmp_path: Path) -> None:
    """The scorer's state after a restart (last day of rows, largest amounts from the feature
    state) is the state it had built live."""
    txs = [item.tx for item in make_transactions(3000, seed=5, rate=0.5)]
    # each account's largest amount three days before the rest: beyond the day of rows the
    # rebuild reads, so it comes from the feature state
    first = txs[0].timestamp - timedelta(days=3)
    accounts = sorted({tx.account_id for tx in txs})
    txs = [Transaction(transaction_id=f"old-{k}", account_id=a, amount=4000.0 + k,
                       currency="EUR", timestamp=first + timedelta(seconds=k),
                       terminal_id=txs[0].terminal_id, channel="POS")
           for k, a in enumerate(accounts)] + txs
    settings = Settings(data_dir=tmp_path)
    store = Store.open(tmp_path / "branchguard.db")
    try:
        store.reader.conn.executemany(
            "INSERT INTO terminals (terminal_id, name, branch, latitude, longitude, "
            "updated_at) VALUES (?, ?, 'BR001', ?, ?, 0)",
            [(t, t, 60.0 + i / 10, 24.0 + i / 10, ) for i, t in
             enumerate(sorted({tx.terminal_id for tx in txs})[::2])])
        store.reader.conn.commit()
        live = Typologies(store.reader.conn, settings)
        live.refresh_if_due()
        assert live.places.places
        features = FeatureState()
        scored = []
        for i, tx in enumerate(txs):
            f = features.observe(tx)
            risk = 0.95 if i % 97 == 0 else 0.1  # some declines
            v = live.decided(tx, judge(tx, f, risk, "m", live.version, settings,
                                       typology=live.check(tx, f)))
            scored.append(Scored(tx, "BR001", i + 1, f, FEATURES_VERSION, v))
        assert any(s.verdict.decision == "decline" for s in scored)
        store.save_batch(scored, [], "scorer", len(scored))
        rebuilt = Typologies(store.reader.conn, settings)
        rebuilt.rebuild(store.reader.conn, feature_state(store.reader))
        now = max(tx.timestamp.timestamp() for tx in txs)
        assert rebuilt.state.snapshot(now) == live.state.snapshot(now)
        assert any(v[4] is not None for v in live.state.snapshot(now).values())
        assert live.state.trails[accounts[1]].max_milli == 4_001_000
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "branchguard.db")
    assert conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0] == len(txs)
    conn.close()


def test_an_alert_message_says_each_typology_in_plain_words_with_its_numbers() -> None:
    from appliance.alerts.messages import AlertView, single

    s = Stream()
    s.history(10, 150.0)
    s.feed(0.0, 200.0, "ATM1", "ATM")
    s.feed(900.0, 200.0, "ATM2", "ATM")
    hits = s.feed(1800.0, 200.0, "ATM3", "ATM")
    alert = AlertView(7, "HIGH", 0.9, 0.0, 1_780_000_000.0, "A1", "ATM3", "BR001", 200.0, "EUR",
                      [h.reason for h in hits], [h.detail for h in hits], "review", "ATM",
                      None, None)
    body = single(alert, "http://console").body
    assert ("- Cash-out across several ATMs: cash at 3 different ATMs within 1 h: ATM3 after "
            "ATM1, ATM2 (threshold: 3)") in body


def test_a_changed_rules_file_is_used_from_the_next_batch_and_a_bad_one_is_not(
        tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(SHIPPED_RULES.read_text())
    rules = Typologies(None, Settings(data_dir=tmp_path, rules_file=path))
    assert rules.version == "rules-v2"
    path.write_text(SHIPPED_RULES.read_text().replace("count = 6", "count = 0"))
    rules._next_check = 0.0
    rules.refresh_if_due()
    assert rules.version == "rules-v2"  # refused: the rules in force stay
    path.write_text(SHIPPED_RULES.read_text().replace('"rules-v2"', '"rules-v3"')
                    .replace("count = 6", "count = 2"))
    rules._next_check = 0.0
    rules.refresh_if_due()
    assert rules.version == "rules-v3"
    # the state judges with the new parameters: two transactions within 60 s are a burst
    feats = FeatureState()
    out = []
    for k in range(2):
        tx = Transaction(transaction_id=f"r{k}", account_id="A", amount=20.0, currency="EUR",
                         timestamp=T0 + timedelta(seconds=k), terminal_id="HEL", channel="POS")
        f = feats.observe(tx)
        hits = rules.check(tx, f)
        out.append(codes(hits))
        rules.decided(tx, judge(tx, f, 0.0, "m", rules.version, Settings(), typology=hits))
    assert out == [[], ["velocity_burst"]]
