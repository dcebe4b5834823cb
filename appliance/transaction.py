"""The wire contract between terminals and the node (version 1).

A terminal publishes one JSON object per transaction on the subject
``tx.<branch>.<terminal>.<account>`` with the header ``Nats-Msg-Id: <transaction_id>``.
:func:`parse` turns the raw bytes into a :class:`Transaction` or, for anything that breaks the
contract, a :class:`Malformed` carrying the reason; it never raises, so one bad message can never
stop the consumer. ``docs/transactions.md`` is the human-readable version of this file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone, tzinfo
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import pycountry

from . import logs
from .errors import SettingsError

if TYPE_CHECKING:
    from .settings import Settings

CONTRACT_VERSION = 1
MAX_MESSAGE_BYTES = 8192
"""Messages larger than this are rejected as oversize before any parsing."""
MILLI = 1000
"""Amounts are stored (``amount_milli``) and summed in integer thousandths of a major unit, so a
sum does not depend on the order it was added in."""

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Identifiers double as subject tokens, so they may not hold ``.``, ``*``, ``>`` or spaces."""
_id_ok = re.compile(r"[A-Za-z0-9_-]+\Z").match  # lengths are checked by the decoder

Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
"""Length is checked while decoding; the character set right after (one regex is cheaper
than msgspec's per-field pattern check, and this runs for every transaction)."""


Channel = Literal["ATM", "POS", "ONLINE"]
CHANNELS: tuple[str, ...] = ("ATM", "POS", "ONLINE")


class Transaction(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One accepted transaction. ``amount`` is in major units of ``currency`` and > 0;
    ``timestamp`` always carries a UTC offset (RFC 3339)."""

    transaction_id: Identifier
    account_id: Identifier
    amount: Annotated[float, msgspec.Meta(gt=0, lt=1e9)]
    currency: Annotated[str, msgspec.Meta(min_length=3, max_length=3)]
    timestamp: Annotated[datetime, msgspec.Meta(tz=True)]
    terminal_id: Identifier
    channel: Channel
    merchant_category: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    location: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    version: int = CONTRACT_VERSION

    # Read by the store for every row; only a Converted transaction has them (see below).
    @property
    def sent_amount(self) -> float | None:
        """The amount as the terminal sent it, when the node converted it (else None)."""
        return None

    @property
    def sent_currency(self) -> str | None:
        """The currency the terminal sent, when the node converted the amount (else None)."""
        return None


class Converted(Transaction, frozen=True):
    """A transaction sent in another currency than the node's: ``amount`` and ``currency``
    are the node's (what rules, features and analysts judge), ``sent_amount`` and
    ``sent_currency`` what the terminal sent. Never decoded from the wire, so a terminal
    cannot claim a conversion."""

    sent_amount: float | None = None
    sent_currency: str | None = None


class Malformed(msgspec.Struct, frozen=True):
    """A message that broke the contract, with a one-line reason for the dead-letter stream."""

    reason: str
    subject: str
    data: bytes


_decoder = msgspec.json.Decoder(Transaction)
_encoder = msgspec.json.Encoder()


def require_identifier(value: str, field: str) -> None:
    """Raise SettingsError unless ``value`` is an identifier (a valid subject token)."""
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not _id_ok(value):
        raise SettingsError("not a valid identifier", field=field, value=value,
                            hint=f"identifiers must match {ID_PATTERN}")


def subject_for(branch: str, tx: Transaction) -> str:
    """The subject a terminal publishes ``tx`` on."""
    return f"tx.{branch}.{tx.terminal_id}.{tx.account_id}"


def branch_of(subject: str) -> str:
    """The branch token of a ``tx.<branch>.<terminal>.<account>`` subject, or of the
    ``txp.<p>.<branch>.<terminal>.<account>`` the TX stream stores it as when partitioned."""
    if subject.startswith("txp."):
        return subject.split(".", 3)[2]
    return subject.split(".", 2)[1]


# --- partitions (issue 19): the subject a partitioned TX stream stores ---------------------

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bits: the hash of nats-server's ``partition()`` subject-transform function
    (Go's ``hash/fnv.New32a``)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


@functools.lru_cache(maxsize=1 << 16)
def partition(account_id: str, partitions: int) -> int:
    """The partition (0..partitions-1) of ``account_id``: FNV-1a-32 of its UTF-8 bytes mod
    ``partitions``, exactly what nats-server's ``{{partition(N,3)}}`` writes into a stored
    subject (tests/test_partitions.py checks it against a real server). Cached: accounts
    recur, and the scorer checks every partitioned message's partition."""
    return fnv1a_32(account_id.encode()) % partitions


def terminal_subject(subject: str) -> str:
    """The subject a terminal published ``subject`` on: a stored
    ``txp.<p>.<branch>.<terminal>.<account>`` without its partition token, anything else
    unchanged. What a dead letter is re-submitted on (the server partitions it again)."""
    if subject.startswith("txp."):
        parts = subject.split(".", 2)
        if len(parts) == 3:
            return f"tx.{parts[2]}"
    return subject


@functools.cache
def iso_4217() -> frozenset[str]:
    """The ISO 4217 currency codes, from pycountry's copy of the standard (read once)."""
    return frozenset(c.alpha_3 for c in pycountry.currencies)


UNSAFE_TEXT = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""C0 and C1 control characters, DEL, the line and paragraph separators, and the
bidirectional marks, embeddings, overrides and isolates: in a place or category name they
only hide or reorder what an analyst reads (or break a log line)."""
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe_text(tx: Transaction) -> str | None:
    """The reason a free-text field is refused, or None. ``isprintable`` (C, fast) passes
    almost every real name; only text it objects to is searched for the characters above
    (it also objects to harmless ones such as a no-break space)."""
    category, location = tx.merchant_category, tx.location
    if ((category is None or category.isprintable())
            and (location is None or location.isprintable())):
        return None
    for name, value in (("merchant_category", category), ("location", location)):
        found = UNSAFE_TEXT.search(value) if value is not None else None
        if found is not None:
            char = found.group()
            kind = "a bidirectional control" if char in _BIDI else "a control character"
            return f"invalid: `{name}` holds {kind} (U+{ord(char):04X})"
    return None


_STRING_FIELDS = ("transaction_id", "account_id", "currency", "timestamp", "terminal_id",
                  "channel")
_REQUIRED_QUOTES = 4 * len(_STRING_FIELDS) + 2
"""Quotes of the required fields: key and value of each string, the key of ``amount``."""
_NAMES = frozenset(Transaction.__struct_fields__)


def _may_repeat_a_key(tx: Transaction, data: bytes) -> bool:
    """False only when no object in ``data`` can hold a key twice; cheap enough for every
    message (see docs/transactions.md for its cost), and :func:`_repeated_key` decides the
    rest exactly.

    Every key, and every string value, brings two quotes or more. Counting the quotes the
    decoded transaction needs (its required fields, and the optional text fields it has),
    any quote beyond them must belong to ``version``, to an optional field sent as null, or
    to a key the contract does not have (a repeat, an unknown or nested key): one more scan
    per such name tells which. A field's value spelling a field's name could pass for its
    key, so such a message always gets the exact check."""
    extra = data.count(b'"') - _REQUIRED_QUOTES
    category, location = tx.merchant_category, tx.location
    if category is not None:
        extra -= 4
    if location is not None:
        extra -= 4
    if extra == 0:  # nothing beyond the fields it has
        return False
    if extra < 0 or extra > 6 or extra & 1:
        return True
    if (tx.transaction_id in _NAMES or tx.account_id in _NAMES or tx.terminal_id in _NAMES
            or category in _NAMES or location in _NAMES):
        return True
    n = data.count(b'"version"')  # the usual case: terminals that send it
    extra -= 2 * n
    if category is None:
        extra -= 2 * (m := data.count(b'"merchant_category"'))
        n = max(n, m)
    if location is None:
        extra -= 2 * (m := data.count(b'"location"'))
        n = max(n, m)
    return n > 1 or extra != 0


class _Repeated(Exception):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Repeated(key)
        seen[key] = value
    return seen


def _repeated_key(data: bytes) -> str | None:
    """The first key an object in ``data`` (valid JSON) holds twice, or None. The standard
    library's parser, since msgspec keeps the last value silently; slow, so only run when
    :func:`_may_repeat_a_key` says so."""
    try:
        json.loads(data, object_pairs_hook=_no_repeats)
    except _Repeated as exc:
        return str(exc.args[0])
    except ValueError:  # msgspec accepted it; the two parsers disagree on an edge case
        return None
    return None


def parse(subject: str, data: bytes, partitions: int = 1) -> Transaction | Malformed:
    """Validate one message against the contract. Never raises.

    Besides the JSON body, the subject must be ``tx.<branch>.<terminal>.<account>`` (or, as
    a TX stream of ``partitions`` > 1 stores it, ``txp.<p>.<branch>.<terminal>.<account>``
    with ``p`` the account's :func:`partition`) and agree with the body's ``terminal_id`` and
    ``account_id``, so that partitioning by subject can never route a transaction to the
    wrong account's state. No key may appear twice in any
    object (a JSON decoder keeps one of them, and which one differs between decoders), the
    currency must be in ISO 4217, and the free-text fields may not hold control or
    bidirectional formatting characters. What depends on the node's settings (the event-time
    window, the currency's conversion) is :class:`Admission`'s.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        return Malformed(f"oversize: {len(data)} bytes > {MAX_MESSAGE_BYTES}", subject, data)
    try:
        tx = _decoder.decode(data)
        repeated = _repeated_key(data) if _may_repeat_a_key(tx, data) else None
    except msgspec.ValidationError as exc:
        return Malformed(f"invalid: {exc}", subject, data)
    except msgspec.DecodeError as exc:
        return Malformed(f"bad json: {exc}", subject, data)
    except RecursionError:  # junk nested a thousand deep: both decoders recurse
        return Malformed("bad json: nested too deeply", subject, data)
    if repeated is not None:
        return Malformed(f"invalid: duplicate key `{repeated[:64]}`", subject, data)
    if tx.version != CONTRACT_VERSION:
        return Malformed(f"unsupported contract version {tx.version}", subject, data)
    for name in ("transaction_id", "account_id", "terminal_id"):
        if not _id_ok(getattr(tx, name)):
            return Malformed(f"invalid: `{name}` must match {ID_PATTERN}", subject, data)
    if tx.currency not in iso_4217():
        return Malformed("invalid: `currency` must be an ISO 4217 code such as EUR", subject,
                         data)
    unsafe = _unsafe_text(tx)
    if unsafe is not None:
        return Malformed(unsafe, subject, data)
    tokens = subject.split(".")
    stored_partition = None
    if tokens[0] == "txp" and len(tokens) == 5:
        stored_partition = tokens[1]
        tokens = tokens[1:]
        tokens[0] = "tx"
    if (len(tokens) != 4 or tokens[0] != "tx" or not 0 < len(tokens[1]) <= 64
            or not _id_ok(tokens[1])):
        return Malformed("bad subject: expected tx.<branch>.<terminal>.<account>", subject, data)
    if tokens[2] != tx.terminal_id or tokens[3] != tx.account_id:
        return Malformed("subject does not match terminal_id/account_id in body", subject, data)
    if stored_partition is not None:
        expected = partition(tx.account_id, partitions)
        if stored_partition != str(expected):
            return Malformed(
                f"bad subject: partition {stored_partition[:16]} is not account "
                f"{tx.account_id}'s partition {expected} of {partitions} (was the TX stream "
                "re-created with another partition count?)", subject, data)
    return tx


# --- what the node accepts beyond the contract's shape (its settings decide) --------------

DAY = 86400.0


def check_event_time(tx: Transaction, now: float, max_lag: float, max_skew: float
                     ) -> str | None:
    """Why ``tx``'s event time is outside the window ``[now - max_lag, now + max_skew]``
    (seconds), or None when it is inside. ``now`` is when the node received it (epoch
    seconds). An event time from a clock that is years off would otherwise be stored and
    scored, blind every velocity window of its account and terminal, and sort first (or
    last) in every list for good."""
    ahead = tx.timestamp.timestamp() - now
    if ahead > max_skew:
        return (f"event time too far in the future: {tx.timestamp.isoformat()} is "
                f"{ahead:.0f} s ahead of the node's clock (max_clock_skew_seconds "
                f"{max_skew:g})")
    if -ahead > max_lag:
        return (f"event time too old: {tx.timestamp.isoformat()} is {-ahead / DAY:.1f} days "
                f"behind the node's clock (max_event_lag_days {max_lag / DAY:g})")
    return None


def convert(tx: Transaction, currency: str, rates: Mapping[str, float]
            ) -> Transaction | str:
    """``tx`` in the node's ``currency``: itself when it is in it already; a
    :class:`Converted` at ``rates[tx.currency]`` (rounded to the thousandth the store keeps)
    when a rate is configured; else the reason it is refused."""
    if tx.currency == currency:
        return tx
    rate = rates.get(tx.currency)
    if rate is None:
        return (f"currency not accepted: {tx.currency} (the node's currency is {currency}; "
                "add a rate to currency_rates to accept it)")
    amount = round(tx.amount * rate, 3)
    if not 0 < amount < 1e9:
        return (f"invalid: `amount` {tx.amount:g} {tx.currency} is {amount:g} {currency}, "
                "outside (0, 1e9)")
    return Converted(tx.transaction_id, tx.account_id, amount, currency, tx.timestamp,
                     tx.terminal_id, tx.channel, tx.merchant_category, tx.location,
                     tx.version, sent_amount=tx.amount, sent_currency=tx.currency)


class Admission:
    """The contract plus what the node's settings decide: the event-time window, measured
    against the time the node's TX stream stored the message (so a replay after a crash or
    a restore decides exactly as the first time did), and the currencies it accepts.
    ``max_lag`` None turns the window off, for loading history."""

    __slots__ = ("currency", "rates", "max_lag", "max_skew", "partitions", "_second",
                 "_bounds")

    def __init__(self, currency: str = "EUR", rates: Mapping[str, float] | None = None,
                 max_lag: float | None = 7 * DAY, max_skew: float = 300.0,
                 partitions: int = 1) -> None:
        self.currency = currency
        self.partitions = partitions
        self.rates: Mapping[str, float] = dict(rates or {})
        self.max_lag = max_lag
        self.max_skew = max_skew
        self._second = -1
        self._bounds: dict[tzinfo | None, tuple[datetime, datetime]] = {}

    @classmethod
    def of(cls, settings: Settings) -> Admission:
        """The admission ``settings`` ask for; says so at WARNING when the window is off,
        since everything then goes through, however wrong its clock."""
        if not settings.event_time_check:
            logs.get("appliance.transaction").warning(
                "admission.event_time_check_off", txn_id=None,
                hint="history is being loaded; turn event_time_check back on afterwards")
        return cls(settings.currency, settings.currency_rates,
                   settings.max_event_lag_days * DAY if settings.event_time_check else None,
                   settings.max_clock_skew_seconds, settings.partitions)

    def parse(self, subject: str, data: bytes, now: float) -> Transaction | Malformed:
        """:func:`parse`, then the window and the currency; ``now`` as in
        :func:`check_event_time`. Never raises."""
        tx = parse(subject, data, self.partitions)
        if isinstance(tx, Malformed):
            return tx
        lag = self.max_lag
        if lag is not None and not self._surely_inside(tx.timestamp, now, lag):
            late = check_event_time(tx, now, lag, self.max_skew)
            if late is not None:
                return Malformed(late, subject, data)
        if tx.currency == self.currency:
            return tx
        converted = convert(tx, self.currency, self.rates)
        return Malformed(converted, subject, data) if isinstance(converted, str) else converted

    def _surely_inside(self, stamp: datetime, now: float, lag: float) -> bool:
        """True only when ``stamp`` is inside the window for any ``now`` of the same whole
        second; False sends it to the exact :func:`check_event_time`. A cheap test: a
        datetime's ``timestamp()`` costs 0.2-0.7 µs, comparing two that share a tzinfo
        object (msgspec reuses one per offset) a few dozen ns, so the bounds are kept per
        second and per offset."""
        second = int(now)
        if second != self._second:
            self._second, self._bounds = second, {}
        zone = stamp.tzinfo
        bounds = self._bounds.get(zone)
        if bounds is None:
            try:
                bounds = (datetime.fromtimestamp(second + 1 - lag, zone),
                          datetime.fromtimestamp(second + self.max_skew, zone))
            except (ValueError, OverflowError, OSError):  # a window beyond year 1 or 9999
                return False
            self._bounds[zone] = bounds
        return bounds[0] <= stamp <= bounds[1]


_FIRST = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()
_LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
CALENDAR = (_FIRST + 86400.0, _LAST + 1 - 86400.0)
"""Epoch seconds [from, to) a datetime holds whatever its UTC offset: a stored event time
outside it (possible before the event-time window) cannot be made a Transaction again."""


def event_time_text(ts: float | None) -> str:
    """Epoch seconds as UTC text (``2026-03-02 09:15:00``), for people. Any stored value renders: a database written
    before the event-time window may hold times beyond what a datetime can hold (year 1 with
    a +14:00 offset, 9999 with -14:00), and those read as what they are."""
    if ts is None:
        return ""
    if not math.isfinite(ts):
        return f"not a time ({ts})"
    if ts < _FIRST:
        return f"before 0001-01-01 (epoch {ts:.0f} s)"
    if ts >= _LAST + 1:
        return f"after 9999-12-31 (epoch {ts:.0f} s)"
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(sep=" ")[:19]


def encode(tx: Transaction) -> bytes:
    """Serialise ``tx`` as a terminal would send it."""
    return _encoder.encode(tx)


def digest(tx: Transaction) -> bytes:
    """blake2b-128 of ``tx``'s canonical body: its fields re-encoded in contract order, so a
    re-send that differs only in key order or white space has the same digest, and one with
    another amount, time, account or place has another (stored as ``body_digest``)."""
    return hashlib.blake2b(_encoder.encode(tx), digest_size=16).digest()
