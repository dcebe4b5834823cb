"""Tests for the synthetic traffic generator and the CSV replay.

The generator feeds benchmarks and detection tests, so besides determinism these tests pin
the properties a detector could otherwise exploit by accident: labels must be recoverable
only from behaviour, never from formatting, ids or missing fields.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.errors import BranchguardError
from appliance.feed.replay import read_labels, replay_csv, sanitise_id, write_labels
from appliance.feed.simulate import TYPOLOGIES, TYPOLOGY_SHARES, Labelled, simulate
from appliance.transaction import ID_PATTERN, Transaction, encode, parse, subject_for

UTC = timezone.utc
START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
N = 50_000


@pytest.fixture(scope="module")
def stream() -> list[Labelled]:
    """50k transactions at the default benchmark rate, shared by the statistical tests."""
    return list(simulate(7, start=START, count=N))


def _key(item: Labelled) -> tuple[bytes, bool, str | None]:
    return encode(item.tx), item.fraud, item.typology


def _decimals(amount: float) -> int:
    text = f"{amount:.2f}".rstrip("0").rstrip(".")
    return len(text.split(".")[1]) if "." in text else 0


# --- generator: determinism and contract ---------------------------------------------------

def test_same_seed_same_stream_and_different_seed_differs() -> None:
    a = [_key(x) for x in simulate(11, start=START, count=3000)]
    b = [_key(x) for x in simulate(11, start=START, count=3000)]
    c = [_key(x) for x in simulate(12, start=START, count=3000)]
    assert a == b
    assert a != c
    assert sum(x != y for x, y in zip(a, c)) > 2900


def test_a_world_seed_keeps_the_population_and_changes_only_the_stream() -> None:
    a = simulate(11, start=START, count=3000)
    same_world = list(simulate(12, start=START, count=3000, world=11))
    assert [_key(x) for x in simulate(11, start=START, count=3000, world=11)] == \
        [_key(x) for x in a]  # world defaults to the seed
    assert same_world[0].tx.transaction_id == "S12-000000000"
    home = {(x.tx.terminal_id, x.tx.channel, x.tx.location)
            for x in simulate(11, start=START, count=20_000)}
    # every terminal of the seed-12 stream is where world 11 put it, in its channel
    assert {(x.tx.terminal_id, x.tx.channel, x.tx.location) for x in same_world} <= home
    assert [_key(x) for x in same_world] != [_key(x) for x in simulate(11, start=START,
                                                                        count=3000)]
    with pytest.raises(BranchguardError, match="world must be"):
        simulate(1, start=START, count=1, world=-1)


def test_every_transaction_honours_the_wire_contract(stream: list[Labelled]) -> None:
    for item in stream[:20_000]:
        parsed = parse(subject_for("BR001", item.tx), encode(item.tx))
        assert isinstance(parsed, Transaction), parsed
        assert parsed == item.tx


def test_ids_are_unique_and_follow_the_documented_patterns(stream: list[Labelled]) -> None:
    ids = [x.tx.transaction_id for x in stream]
    assert len(set(ids)) == len(ids)
    assert ids[:2] == ["S7-000000000", "S7-000000001"]
    for item in stream:
        assert re.fullmatch(r"S7-\d{9}", item.tx.transaction_id)
        assert re.fullmatch(r"A\d{6}", item.tx.account_id)
        assert re.fullmatch(r"T\d{4}", item.tx.terminal_id)
        assert item.tx.currency == "EUR"


def test_count_none_is_infinite_and_count_zero_is_empty() -> None:
    endless = simulate(1, start=START, rate=1000.0, accounts=50, terminals=20)
    assert sum(1 for _ in itertools.islice(endless, 10_000)) == 10_000
    assert list(simulate(1, start=START, count=0)) == []


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(BranchguardError, match="timezone"):
        simulate(start=datetime(2025, 1, 1), count=1)
    with pytest.raises(BranchguardError, match="identifier"):
        simulate(start=START, branch="BR.1", count=1)
    with pytest.raises(BranchguardError):
        simulate(start=START, rate=0.0, count=1)
    with pytest.raises(BranchguardError):
        simulate(start=START, fraud_rate=0.9, count=1)


# --- generator: timing -----------------------------------------------------------------------

def test_timestamps_start_at_start_never_decrease_and_average_one_over_rate(
        stream: list[Labelled]) -> None:
    stamps = [x.tx.timestamp for x in stream]
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    assert START <= stamps[0] < START + timedelta(seconds=1)
    assert all(ts.utcoffset() == timedelta(0) for ts in stamps[:100])
    # diurnal=False is a constant-rate Poisson stream: the mean gap is 1/rate on any window
    flat = [x.tx.timestamp for x in simulate(5, start=START, rate=20.0, count=N, diurnal=False)]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(flat)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20.0, rel=0.03)


def test_diurnal_stream_is_quiet_at_night_and_keeps_the_daily_mean_rate() -> None:
    rate = 0.25
    days = 4
    items = list(simulate(5, start=datetime(2025, 3, 3, tzinfo=UTC), rate=rate,
                          count=int(days * 86400 * rate)))
    stamps = [x.tx.timestamp for x in items]
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    span = (stamps[-1] - stamps[0]).total_seconds()
    assert span / (len(stamps) - 1) == pytest.approx(1 / rate, rel=0.05)
    night = sum(1 for ts in stamps if ts.hour < 6) / len(stamps)
    assert night < 0.08  # a flat stream would put 25% there
    assert sum(x.fraud for x in items) / len(items) == pytest.approx(0.01, rel=0.15)


def test_diurnal_follows_the_local_clock_of_start() -> None:
    helsinki = timezone(timedelta(hours=2))
    items = list(simulate(5, start=datetime(2025, 3, 3, tzinfo=helsinki), rate=0.25,
                          count=40_000))
    local_night = sum(1 for x in items if x.tx.timestamp.astimezone(helsinki).hour < 6)
    assert local_night / len(items) < 0.08
    assert items[0].tx.timestamp.tzinfo == UTC


# --- generator: fraud -----------------------------------------------------------------------

def test_fraud_share_and_every_typology_near_target() -> None:
    # Constant rate: with diurnal traffic the share drifts by hour of day (episodes triggered
    # in the busy evening still run at night), and only averages to fraud_rate over days.
    stream = list(simulate(7, start=START, count=N, diurnal=False))
    fraud = [x for x in stream if x.fraud]
    assert len(fraud) / N == pytest.approx(0.01, rel=0.15)
    counts = collections.Counter(x.typology for x in fraud)
    assert set(counts) == set(TYPOLOGIES)
    for name in TYPOLOGIES:
        assert counts[name] / N == pytest.approx(0.01 * TYPOLOGY_SHARES[name], rel=0.4), name
    assert all(x.typology is None for x in stream if not x.fraud)


def test_fraud_rate_is_a_parameter() -> None:
    assert not any(x.fraud for x in simulate(3, start=START, count=20_000, fraud_rate=0.0))
    high = list(simulate(3, start=START, count=20_000, fraud_rate=0.05, diurnal=False))
    assert sum(x.fraud for x in high) / len(high) == pytest.approx(0.05, rel=0.15)


def test_compromised_terminal_window_is_all_fraud(stream: list[Labelled]) -> None:
    by_terminal: dict[str, list[Labelled]] = collections.defaultdict(list)
    for item in stream:
        by_terminal[item.tx.terminal_id].append(item)
    skimmed = {t for t, items in by_terminal.items()
               if any(x.typology == "compromised_terminal" for x in items)}
    assert len(skimmed) >= 3
    for terminal in skimmed:
        items = by_terminal[terminal]
        hits = [x.tx.timestamp for x in items if x.typology == "compromised_terminal"]
        window = [x for x in items if min(hits) <= x.tx.timestamp <= max(hits)]
        assert all(x.fraud for x in window), terminal
        before = [x for x in items if x.tx.timestamp < min(hits)]
        assert not any(x.typology == "compromised_terminal" for x in before)
    # normal-looking amounts: the skimmer does not change what customers buy
    skim = sorted(x.tx.amount for x in stream if x.typology == "compromised_terminal")
    legit = sorted(x.tx.amount for x in stream if not x.fraud)
    assert len(skim) >= 30 and skim[-1] < 5000
    assert 0.5 < skim[len(skim) // 2] / legit[len(legit) // 2] < 2.0


def test_typologies_behave_as_described(stream: list[Labelled]) -> None:
    by_type: dict[str | None, list[Labelled]] = collections.defaultdict(list)
    for item in stream:
        by_type[item.typology].append(item)
    assert all(0.5 <= x.tx.amount <= 3.0 for x in by_type["card_testing"])
    testing_online = sum(x.tx.channel == "ONLINE" for x in by_type["card_testing"])
    assert testing_online / len(by_type["card_testing"]) > 0.5
    assert all(x.tx.merchant_category == "Gambling" for x in by_type["risky_category"])
    legit = sorted(x.tx.amount for x in by_type[None])
    stolen = sorted(x.tx.amount for x in by_type["stolen_card"])
    assert stolen[len(stolen) // 2] > 3 * legit[len(legit) // 2]
    # card testing bursts are fast: consecutive tests on one account within minutes
    per_account: dict[str, list[datetime]] = collections.defaultdict(list)
    for item in by_type["card_testing"]:
        per_account[item.tx.account_id].append(item.tx.timestamp)
    gaps = [(b - a).total_seconds() for ts in per_account.values()
            for a, b in itertools.pairwise(ts)]
    assert sorted(gaps)[len(gaps) // 2] < 120


# --- generator: no label leaks ---------------------------------------------------------------

def test_amounts_are_cents_for_everyone(stream: list[Labelled]) -> None:
    for item in stream:
        assert round(item.tx.amount, 2) == item.tx.amount
        assert _decimals(item.tx.amount) <= 2


def test_decimal_places_distribution_is_the_same_for_fraud_and_legit(
        stream: list[Labelled]) -> None:
    # ATMs pay out notes for everyone, so compare card payments, where cents are free
    shares: dict[bool, list[float]] = {}
    for label in (False, True):
        amounts = [x.tx.amount for x in stream
                   if x.fraud is label and x.tx.channel != "ATM"]
        counts = collections.Counter(_decimals(a) for a in amounts)
        shares[label] = [counts[d] / len(amounts) for d in (0, 1, 2)]
    for legit, fraud in zip(shares[False], shares[True]):
        assert fraud == pytest.approx(legit, abs=0.04)
    atm = [x.tx.amount for x in stream if x.tx.channel == "ATM"]
    assert all(a == int(a) for a in atm)


def test_fraud_and_legit_carry_the_same_fields(stream: list[Labelled]) -> None:
    keys = {label: {frozenset(json.loads(encode(x.tx))) for x in stream if x.fraud is label}
            for label in (False, True)}
    assert keys[False] == keys[True]
    assert len(keys[False]) == 1
    for item in stream[:2000]:
        body = json.loads(encode(item.tx))
        assert not {"fraud", "label", "typology", "is_fraud"} & set(body)


# --- labels file ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["labels.csv", "labels.csv.gz"])
def test_labels_file_round_trips(tmp_path: Path, name: str) -> None:
    items = list(simulate(2, start=START, count=5000, fraud_rate=0.05))
    path = tmp_path / name
    assert write_labels(items, path) == 5000
    labels = read_labels(path)
    assert labels == {x.tx.transaction_id: (x.fraud, x.typology) for x in items}
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        assert fh.readline().strip() == "transaction_id,label,typology"


# --- replay -----------------------------------------------------------------------------------

REFERENCE_CSV = """transaction_id,account_id,timestamp,amount,merchant_category,location,is_fraud
TRX_0000001,ACC_0190,2025-09-18 13:42:54,33.37,Gambling,Helsinki,0
TRX_0000002,ACC_0240,2025-10-11T02:10:39+03:00,87.123456789,Online Retail,Jyväskylä,1
TRX.3,ACC 0268,2025-10-08 11:13:38,263.06,Groceries,San José del Monte,0
TRX_0000004,ACC_0180,not-a-time,70.07,Groceries,Oulu,0
TRX_0000005,ACC_0180,2025-09-22 05:54:23,-5,Groceries,Oulu,0
TRX_0000006,ACC_0180,2025-09-22 05:54:23,12.5,Groceries,Oulu,maybe
TRX_0000007,,2025-09-22 05:54:23,12.5,Groceries,Oulu,0
TRX_0000008,ACC_0180,2025-09-22 05:54:23

TRX_0000009,ACC_0181,2025-09-21 05:54:23,9.99,,,0
"""

HANDBOOK_CSV = """TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_TIME_SECONDS,\
TX_TIME_DAYS,TX_FRAUD,TX_FRAUD_SCENARIO
441540,2018-05-17 00:00:17,383,3242,51.66,3974417,46,0,0
441541,2018-05-17 00:00:48,1986,5554,14.1,3974448,46,1,1
441542,2018-05-17 00:01:39,2755,3515,29.68,3974499,46,1,2
441543,2018-05-17 00:01:55,3991,4107,9.97,3974515,46,1,3
441544,2018-05-17 00:02:01,3991,4107,0.0,3974521,46,0,0
441545,2018-05-17 00:02:02,3991,4107,19.0,3974522,46,1,9
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _valid(item: Labelled) -> None:
    parsed = parse(subject_for("BR001", item.tx), encode(item.tx))
    assert isinstance(parsed, Transaction), parsed
    assert parsed == item.tx
    body = json.loads(encode(item.tx))
    assert not {"is_fraud", "TX_FRAUD", "TX_FRAUD_SCENARIO", "fraud", "label"} & set(body)


@pytest.mark.parametrize("name", ["ref.csv", "ref.csv.gz"])
def test_replay_reference_format(tmp_path: Path, name: str) -> None:
    with replay_csv(_write(tmp_path, name, REFERENCE_CSV)) as replay:
        items = list(replay)
    assert replay.format == "reference"
    assert [x.tx.transaction_id for x in items] == ["TRX_0000001", "TRX_0000002", "TRX_3",
                                                    "TRX_0000009"]
    for item in items:
        _valid(item)
        assert item.tx.channel == "POS" and item.tx.currency == "EUR"
    first, second, third, last = items
    assert first.tx == Transaction(
        transaction_id="TRX_0000001", account_id="ACC_0190", amount=33.37, currency="EUR",
        timestamp=datetime(2025, 9, 18, 13, 42, 54, tzinfo=UTC), terminal_id="T-Helsinki",
        channel="POS", merchant_category="Gambling", location="Helsinki")
    assert (first.fraud, first.typology) == (False, None)
    assert (second.fraud, second.typology) == (True, "reference")
    assert second.tx.amount == 87.12  # the reference data set's decimals leak, removed
    assert second.tx.timestamp == datetime(2025, 10, 10, 23, 10, 39, tzinfo=UTC)
    assert second.tx.terminal_id == "T-Jyvaskyla" and second.tx.location == "Jyväskylä"
    assert third.tx.account_id == "ACC_0268" and third.tx.terminal_id == "T-San-Jose-del-Monte"
    assert last.tx.terminal_id == "T-unknown" and last.tx.location is None
    assert last.tx.merchant_category is None
    assert replay.rows == 9 and replay.yielded == 4 and replay.skipped == 5
    assert replay.skip_reasons == {"timestamp": 1, "amount": 1, "is_fraud": 1,
                                   "account_id": 1, "columns": 1}


@pytest.mark.parametrize("name", ["hb.csv", "hb.csv.gz"])
def test_replay_handbook_format(tmp_path: Path, name: str) -> None:
    replay = replay_csv(_write(tmp_path, name, HANDBOOK_CSV))
    items = list(replay)
    assert replay.format == "handbook"
    assert replay.skipped == 1 and replay.skip_reasons == {"TX_AMOUNT": 1}
    for item in items:
        _valid(item)
    first = items[0].tx
    assert first == Transaction(
        transaction_id="H441540", account_id="C383", amount=51.66, currency="EUR",
        timestamp=datetime(2018, 5, 17, 0, 0, 17, tzinfo=UTC), terminal_id="T3242",
        channel="POS")
    assert [(x.fraud, x.typology) for x in items] == [
        (False, None), (True, "high_amount"), (True, "compromised_terminal"),
        (True, "compromised_customer"), (True, "unknown")]


def test_replay_accepts_reordered_columns_and_can_sort_by_time(tmp_path: Path) -> None:
    text = ("is_fraud,amount,timestamp,account_id,transaction_id,location,merchant_category,x\n"
            "0,10.00,2025-01-02 00:00:00,A1,B,Oulu,Fuel,junk\n"
            "1,20.00,2025-01-01 00:00:00,A1,A,Oulu,Fuel,junk\n")
    path = _write(tmp_path, "r.csv", text)
    assert [x.tx.transaction_id for x in replay_csv(path)] == ["B", "A"]
    ordered = list(replay_csv(path, sort_by_time=True))
    assert [(x.tx.transaction_id, x.fraud) for x in ordered] == [("A", True), ("B", False)]


def test_unknown_header_raises_with_supported_headers_in_the_hint(tmp_path: Path) -> None:
    path = _write(tmp_path, "x.csv", "id,when,how_much\n1,2025-01-01,3\n")
    with pytest.raises(BranchguardError) as info:
        replay_csv(path)
    assert info.value.field == "header"
    assert info.value.hint is not None
    assert "transaction_id,account_id,timestamp,amount" in info.value.hint
    assert "TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID" in info.value.hint
    with pytest.raises(BranchguardError, match="header"):
        replay_csv(_write(tmp_path, "empty.csv", ""))
    with pytest.raises(BranchguardError, match="cannot open"):
        replay_csv(tmp_path / "missing.csv")


def test_partially_read_replay_can_be_closed(tmp_path: Path) -> None:
    replay = replay_csv(_write(tmp_path, "hb.csv.gz", HANDBOOK_CSV))
    assert next(replay).tx.transaction_id == "H441540"
    replay.close()
    with pytest.raises(StopIteration):
        next(replay)


@given(st.text(max_size=100))
def test_sanitised_ids_always_fit_the_pattern(raw: str) -> None:
    result = sanitise_id(raw)
    if result is not None:
        assert re.fullmatch(ID_PATTERN, result)
    if re.fullmatch(ID_PATTERN, raw.strip()):
        assert result == raw.strip()
