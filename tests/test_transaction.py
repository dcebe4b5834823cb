"""The wire contract: what parses, what is refused (and why), and that parse never raises."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.settings import load
from appliance.transaction import (CHANNELS, CONTRACT_VERSION, MAX_MESSAGE_BYTES,
                                   UNSAFE_TEXT, Admission, Converted, Malformed, Transaction,
                                   branch_of, check_event_time, encode, iso_4217, parse,
                                   subject_for)

SUBJECT = "tx.BR001.T0001.A0001"
VALID: dict[str, Any] = {
    "transaction_id": "tx-0001_a",
    "account_id": "A0001",
    "amount": 12.5,
    "currency": "EUR",
    "timestamp": "2026-03-02T09:15:30.250000+02:00",
    "terminal_id": "T0001",
    "channel": "POS",
}


def body(**changes: Any) -> bytes:
    """VALID with ``changes`` applied; a value of ``...`` removes the field."""
    data = {**VALID, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def malformed(subject: str, data: bytes) -> Malformed:
    result = parse(subject, data)
    assert isinstance(result, Malformed), f"accepted: {result!r}"
    assert result.subject == subject
    assert result.data == data
    return result


# --- accepted ---------------------------------------------------------------------------------


def test_valid_message_parses_with_every_field() -> None:
    tx = parse(SUBJECT, body())
    assert isinstance(tx, Transaction)
    assert tx.transaction_id == "tx-0001_a"
    assert tx.account_id == "A0001"
    assert tx.terminal_id == "T0001"
    assert tx.amount == 12.5
    assert tx.currency == "EUR"
    assert tx.channel == "POS"
    assert tx.version == CONTRACT_VERSION


def test_timestamp_is_tz_aware_and_keeps_its_offset() -> None:
    tx = parse(SUBJECT, body())
    assert isinstance(tx, Transaction)
    assert tx.timestamp.tzinfo is not None
    assert tx.timestamp.utcoffset() == timedelta(hours=2)
    assert tx.timestamp == datetime(2026, 3, 2, 7, 15, 30, 250000, tzinfo=timezone.utc)
    assert tx.timestamp.hour == 9  # local (terminal) time is preserved


def test_utc_z_suffix_is_accepted() -> None:
    tx = parse(SUBJECT, body(timestamp="2026-03-02T09:00:00Z"))
    assert isinstance(tx, Transaction)
    assert tx.timestamp.utcoffset() == timedelta(0)


def test_optional_fields_absent_are_none() -> None:
    tx = parse(SUBJECT, body())
    assert isinstance(tx, Transaction)
    assert tx.merchant_category is None
    assert tx.location is None


def test_optional_fields_present() -> None:
    tx = parse(SUBJECT, body(merchant_category="Gambling", location="Espoo"))
    assert isinstance(tx, Transaction)
    assert tx.merchant_category == "Gambling"
    assert tx.location == "Espoo"


def test_integer_amount_and_explicit_version_1_are_accepted() -> None:
    tx = parse(SUBJECT, body(amount=40, version=1))
    assert isinstance(tx, Transaction)
    assert tx.amount == 40.0


def test_unknown_extra_fields_are_ignored() -> None:
    assert isinstance(parse(SUBJECT, body(extra="whatever")), Transaction)


def test_amount_just_inside_bounds_is_accepted() -> None:
    assert isinstance(parse(SUBJECT, body(amount=0.01)), Transaction)
    assert isinstance(parse(SUBJECT, body(amount=999_999_999.99)), Transaction)


def test_ids_of_64_characters_are_accepted() -> None:
    tid = "x" * 64
    assert isinstance(parse(SUBJECT, body(transaction_id=tid)), Transaction)


@pytest.mark.parametrize("channel", CHANNELS)
def test_every_channel_is_accepted(channel: str) -> None:
    tx = parse(SUBJECT, body(channel=channel))
    assert isinstance(tx, Transaction) and tx.channel == channel


def test_message_of_exactly_max_bytes_is_not_oversize() -> None:
    data = body()
    data = data[:-1] + b" " * (MAX_MESSAGE_BYTES - len(data)) + b"}"
    assert len(data) == MAX_MESSAGE_BYTES
    assert isinstance(parse(SUBJECT, data), Transaction)


def test_subject_helpers() -> None:
    tx = parse(SUBJECT, body())
    assert isinstance(tx, Transaction)
    assert subject_for("BR001", tx) == SUBJECT
    assert branch_of(SUBJECT) == "BR001"


# --- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"{", b"{not json", b'{"amount": 1,}', b"\xff\xfe"])
def test_bad_json(data: bytes) -> None:
    assert malformed(SUBJECT, data).reason.startswith("bad json:")


@pytest.mark.parametrize("data", [b"[]", b"12", b'"text"', b"null"])
def test_json_that_is_not_an_object(data: bytes) -> None:
    assert malformed(SUBJECT, data).reason.startswith("invalid:")


@pytest.mark.parametrize("field", ["transaction_id", "account_id", "amount", "currency",
                                   "timestamp", "terminal_id", "channel"])
def test_missing_required_field(field: str) -> None:
    reason = malformed(SUBJECT, body(**{field: ...})).reason
    assert reason.startswith("invalid:")
    assert "missing required field" in reason
    assert f"`{field}`" in reason


@pytest.mark.parametrize(("field", "value"), [
    ("amount", "12.5"), ("amount", True), ("amount", None),
    ("transaction_id", 12), ("account_id", None), ("currency", 978),
    ("timestamp", 1772442000), ("channel", 1), ("version", "1"),
    ("merchant_category", 5), ("location", ["Espoo"]),
])
def test_wrong_type(field: str, value: Any) -> None:
    reason = malformed(SUBJECT, body(**{field: value})).reason
    assert reason.startswith("invalid:")
    assert f"$.{field}" in reason


@pytest.mark.parametrize("amount", [0, 0.0, -0.01, -5, 1e9, 1e9 + 1, 1e12])
def test_amount_out_of_range(amount: float) -> None:
    reason = malformed(SUBJECT, body(amount=amount)).reason
    assert reason.startswith("invalid:")
    assert "$.amount" in reason


def test_timestamp_without_offset() -> None:
    reason = malformed(SUBJECT, body(timestamp="2026-03-02T09:00:00")).reason
    assert reason.startswith("invalid:")
    assert "timezone" in reason
    assert "$.timestamp" in reason


@pytest.mark.parametrize("stamp", ["yesterday", "", "2026-13-02T09:00:00Z",
                                   "2026-03-02 nine o'clock", "2026-02-30T09:00:00+00:00"])
def test_garbage_timestamp(stamp: str) -> None:
    reason = malformed(SUBJECT, body(timestamp=stamp)).reason
    assert reason.startswith("invalid:")
    assert "$.timestamp" in reason


@pytest.mark.parametrize("channel", ["WEB", "pos", "", "ATM "])
def test_bad_channel(channel: str) -> None:
    reason = malformed(SUBJECT, body(channel=channel)).reason
    assert reason.startswith("invalid:")
    assert "$.channel" in reason


@pytest.mark.parametrize("currency", ["eur", "Eur", "E1R", "€UR", "ÄÖÜ"])
def test_currency_not_an_uppercase_ascii_code(currency: str) -> None:
    reason = malformed(SUBJECT, body(currency=currency)).reason
    assert reason == "invalid: `currency` must be an ISO 4217 code such as EUR"


@pytest.mark.parametrize("currency", ["EU", "EURO", ""])
def test_currency_of_wrong_length(currency: str) -> None:
    reason = malformed(SUBJECT, body(currency=currency)).reason
    assert reason.startswith("invalid:")
    assert "$.currency" in reason


@pytest.mark.parametrize("field", ["transaction_id", "account_id", "terminal_id"])
@pytest.mark.parametrize("bad", ["a.b", "a*", "a>", "a b", " a", "a\n", "é", "a/b"])
def test_identifier_with_forbidden_characters(field: str, bad: str) -> None:
    # keep the subject in step with the body so that only the identifier itself is wrong
    account = bad if field == "account_id" else VALID["account_id"]
    terminal = bad if field == "terminal_id" else VALID["terminal_id"]
    subject = f"tx.BR001.{terminal}.{account}"
    reason = malformed(subject, body(**{field: bad})).reason
    assert reason == f"invalid: `{field}` must match ^[A-Za-z0-9_-]{{1,64}}$"


@pytest.mark.parametrize("field", ["transaction_id", "account_id", "terminal_id"])
@pytest.mark.parametrize("bad", ["x" * 65, ""])
def test_identifier_of_bad_length(field: str, bad: str) -> None:
    reason = malformed(SUBJECT, body(**{field: bad})).reason
    assert reason.startswith("invalid:")
    assert f"$.{field}" in reason


@pytest.mark.parametrize("field", ["merchant_category", "location"])
def test_optional_text_of_bad_length(field: str) -> None:
    for bad in ("", "x" * 65):
        reason = malformed(SUBJECT, body(**{field: bad})).reason
        assert reason.startswith("invalid:") and f"$.{field}" in reason


@pytest.mark.parametrize("subject", [
    "tx.BR001.T0001",                # too few tokens
    "tx.BR001.T0001.A0001.extra",    # too many
    "tr.BR001.T0001.A0001",          # wrong prefix
    "TX.BR001.T0001.A0001",
    "tx..T0001.A0001",               # empty branch
    "tx.BR*.T0001.A0001",            # wildcard in branch
    "tx.BR 1.T0001.A0001",           # space in branch
    "tx." + "B" * 65 + ".T0001.A0001",
    "",
])
def test_bad_subject(subject: str) -> None:
    reason = malformed(subject, body()).reason
    assert reason == "bad subject: expected tx.<branch>.<terminal>.<account>"


def test_branch_token_with_trailing_newline_is_a_bad_subject() -> None:
    # ID_PATTERN ends in ``$``, which also matches just before a trailing newline, so the
    # branch token "BR001\n" must not slip through the subject check.
    reason = malformed("tx.BR001\n.T0001.A0001", body()).reason
    assert reason == "bad subject: expected tx.<branch>.<terminal>.<account>"


@pytest.mark.parametrize("subject", ["tx.BR001.T0002.A0001", "tx.BR001.T0001.A0002",
                                     "tx.BR001.A0001.T0001"])
def test_subject_body_mismatch(subject: str) -> None:
    reason = malformed(subject, body()).reason
    assert reason == "subject does not match terminal_id/account_id in body"


def test_oversize_is_refused_before_parsing() -> None:
    data = body()
    data = data[:-1] + b" " * (MAX_MESSAGE_BYTES + 1 - len(data)) + b"}"
    assert len(data) == MAX_MESSAGE_BYTES + 1
    reason = malformed(SUBJECT, data).reason
    assert reason == f"oversize: {MAX_MESSAGE_BYTES + 1} bytes > {MAX_MESSAGE_BYTES}"


def test_oversize_garbage_is_oversize_not_bad_json() -> None:
    assert malformed(SUBJECT, b"\x00" * 100_000).reason.startswith("oversize:")


@pytest.mark.parametrize("version", [0, 2, -1, 99])
def test_unsupported_version(version: int) -> None:
    assert malformed(SUBJECT, body(version=version)).reason == \
        f"unsupported contract version {version}"


# --- properties -------------------------------------------------------------------------------


def _check_never_raises(subject: str, data: bytes) -> None:
    result = parse(subject, data)
    assert isinstance(result, (Transaction, Malformed))
    if isinstance(result, Malformed):
        assert isinstance(result.reason, str) and result.reason
        assert result.subject == subject and result.data == data


@settings(max_examples=300, deadline=None)
@given(subject=st.text(max_size=40), data=st.binary(max_size=MAX_MESSAGE_BYTES + 64))
def test_parse_never_raises_on_random_bytes(subject: str, data: bytes) -> None:
    _check_never_raises(subject, data)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400))
def test_parse_never_raises_on_random_text(text: str) -> None:
    _check_never_raises(SUBJECT, text.encode("utf-8", "surrogatepass"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from([*VALID, "version", "merchant_category",
                                                "location"]), json_values, max_size=3))
def test_parse_never_raises_on_mutated_valid_messages(changes: dict[str, Any]) -> None:
    _check_never_raises(SUBJECT, body(**changes))


identifiers = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=64)
optional_text = st.none() | st.text(min_size=1, max_size=64).filter(
    lambda t: not UNSAFE_TEXT.search(t))
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def transactions(draw: st.DrawFn) -> Transaction:
    tz = draw(offsets)
    naive = draw(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)))
    amount = draw(st.floats(min_value=0, max_value=1e9, exclude_min=True, exclude_max=True,
                            allow_nan=False, allow_infinity=False))
    return Transaction(
        transaction_id=draw(identifiers), account_id=draw(identifiers), amount=amount,
        currency=draw(st.sampled_from(sorted(iso_4217()))),
        timestamp=naive.replace(tzinfo=tz), terminal_id=draw(identifiers),
        channel=draw(st.sampled_from(CHANNELS)), merchant_category=draw(optional_text),
        location=draw(optional_text))


@settings(max_examples=200, deadline=None)
@given(tx=transactions(), branch=identifiers)
def test_encode_parse_round_trip(tx: Transaction, branch: str) -> None:
    data = encode(tx)
    if len(data) > MAX_MESSAGE_BYTES:  # pragma: no cover - 64-char fields stay well below
        return
    back = parse(subject_for(branch, tx), data)
    assert isinstance(back, Transaction), back
    assert back == tx
    assert back.timestamp.utcoffset() == tx.timestamp.utcoffset()
    assert encode(back) == data


# --- issue 17: stricter input -----------------------------------------------------------------


@pytest.mark.parametrize("currency", ["XYZ", "EUX", "ABC", "QQQ"])
def test_currency_that_is_no_iso_4217_code_is_refused(currency: str) -> None:
    assert malformed(SUBJECT, body(currency=currency)).reason == \
        "invalid: `currency` must be an ISO 4217 code such as EUR"


@pytest.mark.parametrize("currency", ["EUR", "USD", "JPY", "SEK", "CHF", "KWD"])
def test_iso_4217_codes_are_accepted(currency: str) -> None:
    tx = parse(SUBJECT, body(currency=currency))
    assert isinstance(tx, Transaction) and tx.currency == currency


@pytest.mark.parametrize("field", ["location", "merchant_category"])
@pytest.mark.parametrize(("char", "kind"), [
    ("\x00", "a control character"), ("\x07", "a control character"),
    ("\x1b", "a control character"), ("\n", "a control character"),
    ("\x7f", "a control character"), ("\x85", "a control character"),
    ("\x9b", "a control character"), ("\u2028", "a control character"),
    ("\u202e", "a bidirectional control"), ("\u202a", "a bidirectional control"),
    ("\u2066", "a bidirectional control"), ("\u2069", "a bidirectional control"),
    ("\u200f", "a bidirectional control"), ("\u061c", "a bidirectional control"),
])
def test_control_and_bidi_characters_in_text_are_refused(field: str, char: str,
                                                         kind: str) -> None:
    reason = malformed(SUBJECT, body(**{field: f"Esp{char}oo"})).reason
    assert reason == f"invalid: `{field}` holds {kind} (U+{ord(char):04X})"


@pytest.mark.parametrize("text", ["Jyväskylä", "San José del Monte", "Zürich Hbf",
                                  "Москва", "東京", "café\u00a0bar", "O'Brien & Sons",
                                  "שלום", "مرحبا"])
def test_printable_text_in_any_script_is_accepted(text: str) -> None:
    tx = parse(SUBJECT, body(location=text, merchant_category=text))
    assert isinstance(tx, Transaction) and tx.location == text


def _spliced(fragment: str) -> bytes:
    """VALID with ``fragment`` (``"key": value``) added after its first field."""
    data = body().decode()
    return data.replace(", ", ", " + fragment + ", ", 1).encode()


@pytest.mark.parametrize("fragment", [
    '"amount": 8888.0',                        # a field of the contract, again
    '"account_id": "A0001"',                   # ...even with the same value
    '"\\u0061mount": 1.0',                    # ...spelt with an escape
    '"timestamp": "2099-01-01T00:00:00Z"',
    '"extra": 1, "extra": 2',                  # a field the node does not read
    '"nested": {"a": 1, "a": 2}',              # a repeat inside nested junk
])
def test_duplicate_keys_are_refused(fragment: str) -> None:
    reason = malformed(SUBJECT, _spliced(fragment)).reason
    assert reason.startswith("invalid: duplicate key `"), reason


@pytest.mark.parametrize("fragment", [
    '"nested": {"amount": 1}',                 # the same name in another object
    '"note": "amount"',                        # a field's name as a value
    '"list": ["amount", {"amount": 2}]',
    '"path": "C:\\\\temp"',                    # a backslash forces the exact check
])
def test_field_names_elsewhere_are_not_duplicates(fragment: str) -> None:
    tx = parse(SUBJECT, _spliced(fragment))
    assert isinstance(tx, Transaction), tx
    assert tx.amount == 12.5


def test_a_field_value_equal_to_a_field_name_is_not_a_duplicate() -> None:
    tx = parse(SUBJECT, body(location="amount", merchant_category="version"))
    assert isinstance(tx, Transaction) and tx.location == "amount"


_pair_keys = st.sampled_from([*VALID, "version", "location", "merchant_category", "x", "y",
                              "\\u0061mount", "amo\\u0075nt"])
_pair_values = st.sampled_from(['"A0001"', "12.5", "1", "null", '"version"', '"amount"',
                                '{"amount": 1}', '["x", "x"]', '"Espoo"'])


@settings(max_examples=500, deadline=None)
@given(extra=st.lists(st.tuples(_pair_keys, _pair_values), max_size=4),
       at=st.integers(0, len(VALID)))
def test_no_message_with_a_repeated_key_is_accepted(extra: list[tuple[str, str]],
                                                    at: int) -> None:
    pairs = [(json.dumps(k), json.dumps(v)) for k, v in VALID.items()]
    pairs[at:at] = [(f'"{k}"', v) for k, v in extra]
    data = ("{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}").encode()
    keys = [json.loads(k) for k, _ in pairs]
    result = parse(SUBJECT, data)
    if len(set(keys)) < len(keys):
        assert isinstance(result, Malformed), data
    elif all(k in ("x", "y") for k, _ in extra):  # only fields the node does not read
        assert isinstance(result, Transaction), (data, result)


# --- issue 17: what the node's settings decide: the event-time window and the currencies ------

NOW = datetime(2026, 3, 2, 7, 15, 30, 250000, tzinfo=timezone.utc).timestamp()
"""The VALID transaction's own time: it is exactly on time."""


def admitted(admission: Admission, now: float = NOW, **changes: Any) -> Transaction | Malformed:
    return admission.parse(SUBJECT, body(**changes), now)


@pytest.mark.parametrize(("offset", "accepted"), [
    (0.0, True), (300.0, True), (300.5, False), (-7 * 86400.0, True),
    (-7 * 86400.0 - 1, False), (-3 * 86400.0, True), (86400.0, False)])
def test_event_time_window_edges(offset: float, accepted: bool) -> None:
    """``offset`` is how far the event time is ahead of the node's clock."""
    result = admitted(Admission(), now=NOW - offset)
    assert isinstance(result, Transaction) is accepted, result


def test_an_event_time_ahead_of_the_window_has_its_own_reason() -> None:
    result = admitted(Admission(), timestamp="9999-12-31T23:59:59-14:00")
    assert isinstance(result, Malformed)
    assert result.reason.startswith("event time too far in the future: "
                                    "9999-12-31T23:59:59-14:00 is ")
    assert result.reason.endswith("s ahead of the node's clock (max_clock_skew_seconds 300)")


def test_an_event_time_behind_the_window_has_its_own_reason() -> None:
    result = admitted(Admission(), timestamp="0001-01-01T00:00:00+14:00")
    assert isinstance(result, Malformed)
    assert result.reason.startswith("event time too old: 0001-01-01T00:00:00+14:00 is ")
    assert result.reason.endswith("days behind the node's clock (max_event_lag_days 7)")


def test_check_event_time_alone() -> None:
    tx = parse(SUBJECT, body())
    assert isinstance(tx, Transaction)
    assert check_event_time(tx, NOW, 60.0, 10.0) is None
    assert (check_event_time(tx, NOW - 11, 60.0, 10.0) or "").startswith(
        "event time too far in the future")
    assert (check_event_time(tx, NOW + 61, 60.0, 10.0) or "").startswith("event time too old")


def test_with_the_window_off_history_goes_through() -> None:
    history = Admission(max_lag=None)
    for stamp in ("2018-04-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "2099-01-01T00:00:00Z"):
        assert isinstance(admitted(history, timestamp=stamp), Transaction)


def test_admission_of_settings_reads_the_window_and_says_when_it_is_off(
        caplog: pytest.LogCaptureFixture) -> None:
    on = Admission.of(load(None, env={"BRANCHGUARD_MAX_EVENT_LAG_DAYS": "2",
                                      "BRANCHGUARD_MAX_CLOCK_SKEW_SECONDS": "60"}))
    assert (on.max_lag, on.max_skew) == (2 * 86400.0, 60.0)
    assert "admission.event_time_check_off" not in caplog.text
    off = Admission.of(load(None, env={"BRANCHGUARD_EVENT_TIME_CHECK": "false"}))
    assert off.max_lag is None
    assert "admission.event_time_check_off" in caplog.text


def test_the_nodes_currency_passes_unchanged() -> None:
    result = admitted(Admission(currency="EUR", rates={"USD": 0.92}))
    assert type(result) is Transaction and result.amount == 12.5
    assert result.sent_amount is None and result.sent_currency is None


def test_another_currency_with_a_rate_is_converted_and_keeps_what_was_sent() -> None:
    result = admitted(Admission(currency="EUR", rates={"USD": 0.92}), amount=9000,
                      currency="USD")
    assert isinstance(result, Converted)
    assert (result.amount, result.currency) == (8280.0, "EUR")
    assert (result.sent_amount, result.sent_currency) == (9000.0, "USD")
    assert result.timestamp.utcoffset() == timedelta(hours=2)


def test_a_conversion_is_rounded_to_the_thousandth_the_store_keeps() -> None:
    result = admitted(Admission(currency="EUR", rates={"JPY": 0.00617}), amount=333,
                      currency="JPY")
    assert isinstance(result, Converted) and result.amount == 2.055


@pytest.mark.parametrize(("amount", "currency", "rates"), [
    (0.01, "IDR", {"IDR": 0.00006}),      # rounds to nothing
    (5e8, "KWD", {"KWD": 3.0}),           # beyond the largest amount
])
def test_a_conversion_out_of_range_is_refused(amount: float, currency: str,
                                              rates: dict[str, float]) -> None:
    result = admitted(Admission(currency="EUR", rates=rates), amount=amount, currency=currency)
    assert isinstance(result, Malformed)
    assert result.reason.startswith(f"invalid: `amount` {amount:g} {currency} is ")


def test_a_currency_without_a_rate_is_not_accepted() -> None:
    result = admitted(Admission(currency="EUR", rates={"USD": 0.92}), currency="JPY")
    assert isinstance(result, Malformed)
    assert result.reason == ("currency not accepted: JPY (the node's currency is EUR; add a "
                             "rate to currency_rates to accept it)")


def test_a_terminal_cannot_claim_a_conversion() -> None:
    tx = parse(SUBJECT, body(sent_amount=1.0, sent_currency="USD"))
    assert type(tx) is Transaction
    assert tx.sent_amount is None and tx.sent_currency is None


@pytest.mark.parametrize("depth", [1000, 3000])
@pytest.mark.parametrize(("open_", "close"), [("[", "]"), ('{"a":', "}")])
def test_deeply_nested_junk_is_refused_not_raised(depth: int, open_: str, close: str) -> None:
    """Nesting that exhausts the decoder's recursion once made parse raise RecursionError,
    which stopped the scorer on the same message at every restart (issue 17)."""
    inner = open_ * depth + ("1" if open_ != "[" else "") + close * depth
    data = body()[:-1] + f', "junk": {inner}}}'.encode()
    if len(data) > MAX_MESSAGE_BYTES:
        data = body()[:-1] + f', "junk": {"[" * 3000 + "]" * 3000}}}'.encode()
    assert malformed(SUBJECT, data).reason == "bad json: nested too deeply"


def test_nesting_within_reach_of_the_exact_duplicate_check_never_raises() -> None:
    for depth in range(900, 1000, 7):
        inner = '{"a":' * depth + "1" + "}" * depth
        data = body()[:-1] + f', "junk": {inner}}}'.encode()
        assert isinstance(parse(SUBJECT, data), (Transaction, Malformed))


@settings(max_examples=400, deadline=None)
@given(now=st.floats(1e9, 4e9), ahead=st.floats(-10 * 86400, 86400), tz=offsets,
       lag=st.sampled_from([1.0, 3600.0, 7 * 86400.0]), skew=st.sampled_from([0.0, 300.0]))
def test_the_windows_fast_path_decides_as_the_exact_check(now: float, ahead: float,
                                                           tz: timezone, lag: float,
                                                           skew: float) -> None:
    stamp = datetime.fromtimestamp(now + ahead, tz)
    data = body(timestamp=stamp.isoformat())
    exact = parse(SUBJECT, data)
    assert isinstance(exact, Transaction)
    admission = Admission(max_lag=lag, max_skew=skew)
    for at in (now, now + 0.5, now):  # the same second twice: its bounds are kept
        result = admission.parse(SUBJECT, data, at)
        assert isinstance(result, Transaction) == (
            check_event_time(exact, at, lag, skew) is None), (stamp, at, result)


def test_a_window_reaching_beyond_the_calendar_still_decides() -> None:
    admission = Admission(max_lag=1e13, max_skew=1e13)
    assert isinstance(admission.parse(SUBJECT, body(timestamp="0001-01-01T00:00:00+14:00"),
                                      NOW), Transaction)
