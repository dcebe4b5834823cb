"""Feature windows against a brute-force recomputation, and rebuilt state against live state."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.scoring.features import (FEATURES, HORIZON, INDEX, LARGE_MULTIPLE, VERSIONS, WINDOWS,
                                        FeatureState)
from appliance.transaction import MILLI, Transaction

BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
EDGES = [0, 1, 3599, 3600, 3601, 86399, 86400, 86401, 604799, 604800, 604801]


def tx(i: int, account: int, terminal: int, t: float, cents: int, location: str | None,
       category: str | None) -> Transaction:
    return Transaction(transaction_id=f"t{i}", account_id=f"A{account}", amount=cents / 100,
                       currency="EUR", timestamp=BASE + timedelta(seconds=t),
                       terminal_id=f"T{terminal}", channel="POS",
                       merchant_category=category, location=location)


events = st.lists(
    st.tuples(
        st.integers(0, 2), st.integers(0, 2),
        st.one_of(st.sampled_from(EDGES), st.integers(-300_000, 400_000),
                  st.sampled_from([-e for e in EDGES])),
        st.integers(1, 1_000_000),
        st.sampled_from([None, "Espoo", "Turku"]), st.sampled_from([None, "Fuel", "Gambling"]),
    ),
    min_size=1, max_size=60)


def window_stats(prior: list[Transaction], t: float, key: str, value: str) -> list[float]:
    """[count, sum] per window, by definition: earlier-processed events of the same entity
    with t - w < ts <= t, and no older than 7 days before the entity's newest earlier event."""
    same = [p for p in prior if getattr(p, key) == value]
    if not same:
        return [0.0, 0.0] * len(WINDOWS)
    floor = max(p.timestamp.timestamp() for p in same) - HORIZON
    out: list[float] = []
    for _, w in WINDOWS:
        hits = [p for p in same if t - w < p.timestamp.timestamp() <= t
                and p.timestamp.timestamp() > floor]
        out += [float(len(hits)), sum(round(p.amount * MILLI) for p in hits) / MILLI]
    return out


def brute_force(prior: list[Transaction], cur: Transaction) -> dict[str, float]:
    t = cur.timestamp.timestamp()
    mine = [p for p in prior if p.account_id == cur.account_id]
    n = len(mine)
    milli = [round(p.amount * MILLI) for p in mine]
    s, sq = sum(milli), sum(m * m for m in milli)
    mean = s / n / MILLI if n else cur.amount
    dev = cur.amount - mean if n else 0.0
    ratio = (cur.amount / mean if mean > 0 else 1.0) if n else 1.0
    z = 0.0
    if n >= 2:
        var = (sq - s * s / n) / (n - 1)
        std = math.sqrt(var) / MILLI if var > 0 else 0.0
        z = dev / std if std > 0 else 0.0
    newest = max([p.timestamp.timestamp() for p in mine] + [t])
    earlier = [p.timestamp.timestamp() for p in mine if p.timestamp.timestamp() <= t
               and p.timestamp.timestamp() > newest - HORIZON]
    since = min(t - max(earlier), HORIZON) if earlier else HORIZON
    acc = window_stats(prior, t, "account_id", cur.account_id)
    term = window_stats(prior, t, "terminal_id", cur.terminal_id)
    week = [round(p.amount * MILLI) for p in mine if t - 7 * 86400 < p.timestamp.timestamp() <= t
            and p.timestamp.timestamp() > newest - HORIZON]
    cur_milli = round(cur.amount * MILLI)
    median = sorted(milli)[n // 2] if n else 0  # the upper median
    typical = [1.0, 0.0, 0.0] if not median else [
        cur_milli / median, max(week) / median if week else 0.0,
        float(len([v for v in week if v >= LARGE_MULTIPLE * median]))]
    to_mean_7d = cur_milli * len(week) / sum(week) if week else 1.0
    values = [cur.amount, mean, dev, ratio, z, float(n), *acc, since,
              float(cur.timestamp.hour),
              float(cur.terminal_id not in {p.terminal_id for p in mine}),
              float(cur.location is not None and cur.location not in {p.location for p in mine}),
              float(cur.merchant_category is not None
                    and cur.merchant_category not in {p.merchant_category for p in mine}),
              *term, *typical, to_mean_7d]
    return dict(zip(FEATURES, values, strict=True))


def build(raw: list[tuple[int, int, int, int, str | None, str | None]]) -> list[Transaction]:
    t = 10 * 86400.0
    out = []
    for i, (account, terminal, delta, cents, location, category) in enumerate(raw):
        t = max(0.0, t + delta)
        out.append(tx(i, account, terminal, t, cents, location, category))
    return out


@settings(max_examples=150, deadline=None)
@given(events)
def test_observe_matches_brute_force(raw: list[tuple[int, int, int, int, str | None,
                                                     str | None]]) -> None:
    txs = build(raw)
    state = FeatureState()
    for i, cur in enumerate(txs):
        got = dict(zip(FEATURES, state.observe(cur)))
        assert got == brute_force(txs[:i], cur), f"transaction {i}"


@settings(max_examples=100, deadline=None)
@given(events)
def test_rebuilt_state_equals_live_state(raw: list[tuple[int, int, int, int, str | None,
                                                         str | None]]) -> None:
    txs = build(raw)
    live = FeatureState()
    for cur in txs:
        live.observe(cur)
    rows = sorted(((t.account_id, t.terminal_id, t.timestamp.timestamp(),
                    round(t.amount * MILLI), t.location, t.merchant_category, seq)
                   for seq, t in enumerate(txs)), key=lambda r: (r[2], r[6]))
    rebuilt = FeatureState.rebuild(r[:6] for r in rows)
    assert rebuilt.snapshot() == live.snapshot()
    # read in small chunks (codes and pairs then span chunks): the same state
    assert FeatureState.rebuild((r[:6] for r in rows), chunk=3).snapshot() == live.snapshot()
    # and both give the next transaction the same features
    probe = tx(999, 0, 1, txs[-1].timestamp.timestamp() + 60, 12345, "Espoo", "Fuel")
    assert rebuilt.observe(probe) == live.observe(probe)


def test_windows_are_exact_at_their_edges() -> None:
    state = FeatureState()
    state.observe(tx(0, 0, 0, 0, 1000, None, None))
    f = dict(zip(FEATURES, state.observe(tx(1, 0, 0, 3600, 2000, None, None))))
    assert f["account_count_1h"] == 0  # exactly one hour earlier is outside (t - w, t]
    assert f["account_count_24h"] == 1 and f["account_sum_24h"] == 10.0
    f = dict(zip(FEATURES, state.observe(tx(2, 0, 0, 3600, 500, None, None))))
    assert f["account_count_1h"] == 1 and f["account_sum_1h"] == 20.0  # same second: inside
    assert f["seconds_since_previous"] == 0.0


def test_long_in_order_stream_compacts_and_stays_exact() -> None:
    state = FeatureState()
    txs = [tx(i, 0, i % 2, i * 200.0, 100 + i % 7, None, None) for i in range(12000)]
    for cur in txs[:-1]:
        state.observe(cur)
    assert len(state.accounts["A0"].windows.ts) < 12000  # old events were dropped
    got = dict(zip(FEATURES, state.observe(txs[-1])))
    want = brute_force(txs[-1 - 3100:-1], txs[-1])  # 7 days at 200 s is 3024 events
    for name in FEATURES:
        if name.startswith(("account_count", "account_sum", "terminal_")):
            assert got[name] == want[name], name
    assert got["account_prior_count"] == 11999
    assert INDEX["account_prior_count"] == FEATURES.index("account_prior_count")


def test_typical_amount_features_follow_the_median_not_the_mean() -> None:
    # a card with steady 20.00 purchases, then three stolen-card purchases of 100.00
    state = FeatureState()
    day = 86400.0
    for i in range(9):
        state.observe(tx(i, 0, 0, i * day, 2000, None, None))
    for i in range(3):
        f = dict(zip(FEATURES, state.observe(tx(9 + i, 0, 0, 9 * day + i * 60, 10000, None,
                                                None))))
        assert f["amount_to_median_ratio"] == 5.0  # the median is still 20.00
        assert f["account_large_count_7d"] == i  # the earlier 100.00s of this week
        assert i == 0 or f["amount_to_mean_ratio"] < 5.0  # the mean moves towards the fraud
    assert f["account_max_7d_to_median"] == 5.0
    assert f["account_count_7d"] == 8  # days 3..8 and the two earlier 100.00s
    assert f["amount_to_mean_7d_ratio"] == 100 / ((6 * 20 + 2 * 100) / 8)


def test_older_feature_versions_are_prefixes_of_the_current_one() -> None:
    for names in VERSIONS.values():
        assert FEATURES[:len(names)] == names
    assert len(VERSIONS["features-v1"]) == 23
