"""The demo world: Handbook-style customers (activity in [0, 4] a day, amounts around their own
mean, terminals near home), fraud at the configured share, each typology's episodes shaped as
its name says, and chargeback-like label delays."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, timedelta

import numpy as np
import pytest

from appliance.feed.episodes import TYPOLOGIES
from appliance.feed.late_labels import (FRAUD_DELAY_DAYS, SETTLED_DAYS, late_label,
                                        parse_source)
from appliance.feed.simulate import Labelled
from appliance.feed.world import (AWAY_TOWNS, World, build_world, customers_for_rate,
                                  day_events, distance_km)

DAYS = 20
FIRST = date(2026, 3, 2)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(5, customers=600, fraud_share=0.02)


@pytest.fixture(scope="module")
def events(world: World) -> list[Labelled]:
    return [e for d in range(DAYS) for e in day_events(world, FIRST + timedelta(days=d))]


def _customer(world: World, account_id: str) -> int:
    return world.account_ids.index(account_id)


def test_customers_are_drawn_like_the_handbook(world: World, events: list[Labelled]) -> None:
    assert ((world.mean_daily >= 0) & (world.mean_daily <= 4)).all()
    assert ((world.mean_amount >= 5) & (world.mean_amount <= 100)).all()
    counts = np.zeros(world.customers)
    for e in events:
        if not e.fraud:
            counts[_customer(world, e.tx.account_id)] += 1
    rate = counts / DAYS
    # each customer's realised rate follows its own mean (the Handbook drops the ~3 % of
    # times drawn outside the day)
    assert 0.0 <= rate.mean() <= 4.0
    assert abs(rate.mean() - 0.97 * world.mean_daily.mean()) < 0.1
    assert np.corrcoef(rate, world.mean_daily)[0, 1] > 0.95
    assert rate[world.mean_daily < 0.2].mean() < 0.25


def test_amounts_are_around_each_customers_own_mean(world: World,
                                                    events: list[Labelled]) -> None:
    z = []
    for e in events:
        if not e.fraud and e.tx.channel != "ATM":
            c = _customer(world, e.tx.account_id)
            z.append((e.tx.amount - world.mean_amount[c]) / world.std_amount[c])
            assert e.tx.amount > 0
    assert abs(float(np.mean(z))) < 0.1 and 0.85 < float(np.std(z)) < 1.1
    atm = [e.tx.amount for e in events if not e.fraud and e.tx.channel == "ATM"]
    assert atm and all(a % 20 == 0 and a >= 20 for a in atm)


def test_customers_use_terminals_near_home_and_channels_of_the_contract(
        world: World, events: list[Labelled]) -> None:
    places = {tid: world.place[j] for j, tid in enumerate(world.terminal_ids)}
    kinds = {tid: world.channel[j] for j, tid in enumerate(world.terminal_ids)}
    near = 0
    for e in events:
        assert e.tx.channel in ("ATM", "POS", "ONLINE")
        if e.fraud or e.tx.channel == "ONLINE":
            continue
        home = world.home[_customer(world, e.tx.account_id)]
        km = float(distance_km(home, places[e.tx.terminal_id]))
        if km <= 3.0:
            near += 1
            continue
        # beyond the radius only when it held too few (3 shops, 1 ATM): then the nearest
        same = [t for t, k in kinds.items() if k == e.tx.channel]
        dists = sorted(float(distance_km(home, places[t])) for t in same)
        need = 3 if e.tx.channel == "POS" else 1
        assert sum(d <= 3.0 for d in dists) < need and km <= dists[need - 1] + 1e-9
    assert near > 0.3 * len(events)
    assert {e.tx.channel for e in events} == {"ATM", "POS", "ONLINE"}
    sites = world.sites()
    online = [s for s in sites if s[2] is None]
    assert online and all(s[3] is None for s in online)
    assert all(s[2] is not None for s in sites if "online" not in s[1])


def test_fraud_share_is_as_configured() -> None:
    w = build_world(9, customers=3000, fraud_share=0.003)
    items = [e for d in range(10) for e in day_events(w, FIRST + timedelta(days=d))]
    share = sum(e.fraud for e in items) / len(items)
    assert 0.0015 < share < 0.006, share
    assert {e.typology for e in items if e.fraud} == set(TYPOLOGIES)
    none = build_world(9, customers=300, fraud_share=0.0)
    assert not any(e.fraud for e in day_events(none, FIRST))


def test_days_are_deterministic_with_ids_that_say_nothing(world: World) -> None:
    one, two = day_events(world, FIRST), day_events(world, FIRST)
    assert one == two
    ids = [e.tx.transaction_id for e in one]
    assert len(set(ids)) == len(ids) and all(i.startswith("W5-20260302-") for i in ids)
    stamps = [e.tx.timestamp for e in one]
    assert stamps == sorted(stamps)
    assert customers_for_rate(0.25) == 10800


def _episodes(events: list[Labelled]) -> dict[str, list[Labelled]]:
    out: dict[str, list[Labelled]] = defaultdict(list)
    for e in events:
        if e.fraud:
            assert e.episode is not None and e.typology in TYPOLOGIES
            out[e.episode].append(e)
    return out


def test_each_typology_has_the_shape_it_names(world: World, events: list[Labelled]) -> None:
    places = {tid: world.place[j] for j, tid in enumerate(world.terminal_ids)}
    seen: dict[str, int] = defaultdict(int)
    for episode in _episodes(events).values():
        kind = episode[0].typology
        assert kind is not None
        seen[kind] += 1
        assert {e.typology for e in episode} == {kind}
        assert len({e.tx.account_id for e in episode}) == 1
        c = _customer(world, episode[0].tx.account_id)
        mean, std = world.mean_amount[c], world.std_amount[c]
        times = [e.tx.timestamp.timestamp() for e in episode]
        span = times[-1] - times[0]
        if kind == "velocity_burst":
            assert len(episode) >= 6 and span <= 6 * 60
        elif kind == "card_testing":
            assert len(episode) >= 8 and span <= 15 * 60
            assert len({e.tx.terminal_id for e in episode}) == 1
            assert episode[0].tx.channel == "ONLINE"
            assert all(e.tx.amount < 3 for e in episode)
        elif kind == "amount_spike":
            assert len(episode) == 1 and episode[0].tx.amount >= 4 * (mean + 3 * std) - 0.01
        elif kind == "impossible_travel":
            first, second = episode[0].tx, episode[1].tx
            km = float(distance_km(places[first.terminal_id], places[second.terminal_id]))
            hours = (second.timestamp - first.timestamp).total_seconds() / 3600
            assert km >= 140 and hours <= 41 / 60 and km / hours > 200
            assert second.location in AWAY_TOWNS
        elif kind == "atm_cashout":
            assert len(episode) >= 3 and span <= 6 * 15 * 60
            assert all(e.tx.channel == "ATM" and e.tx.amount >= 200 for e in episode)
            assert len({e.tx.terminal_id for e in episode}) == len(episode)
        elif kind == "new_terminal_large":
            s = int(world.usable_start[c])
            own = {world.terminal_ids[j]
                   for j in world.usable[s:s + int(world.usable_pos[c])].tolist()}
            assert len(episode) == 1 and episode[0].tx.terminal_id not in own
            assert episode[0].tx.amount >= 4 * mean - 0.01
    assert set(seen) == set(TYPOLOGIES), seen


def test_labels_arrive_like_chargebacks(world: World, events: list[Labelled]) -> None:
    delays: dict[str, set[float]] = defaultdict(set)
    for e in events[:20000]:
        lab = late_label(e)
        days = (lab.known - e.tx.timestamp.timestamp()) / 86400
        if e.fraud:
            assert FRAUD_DELAY_DAYS[0] <= days <= FRAUD_DELAY_DAYS[1]
            assert parse_source(lab.source) == (e.typology, e.episode)
            assert e.episode is not None
            delays[e.episode].add(round(days, 6))
        else:
            assert days == pytest.approx(SETTLED_DAYS) and parse_source(lab.source) is None
    assert delays and all(len(d) == 1 for d in delays.values())  # one delay per episode
