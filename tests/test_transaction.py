"""The wire contract: what parses, what is refused (and why), and that parse never raises."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.transaction import (CHANNELS, CONTRACT_VERSION, MAX_MESSAGE_BYTES, Malformed,
                                   Transaction, branch_of, encode, parse, subject_for)

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
optional_text = st.none() | st.text(min_size=1, max_size=64)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def transactions(draw: st.DrawFn) -> Transaction:
    tz = draw(offsets)
    naive = draw(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)))
    amount = draw(st.floats(min_value=0, max_value=1e9, exclude_min=True, exclude_max=True,
                            allow_nan=False, allow_infinity=False))
    return Transaction(
        transaction_id=draw(identifiers), account_id=draw(identifiers), amount=amount,
        currency=draw(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3)),
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
