"""The wire contract between terminals and the node (version 1).

A terminal publishes one JSON object per transaction on the subject
``tx.<branch>.<terminal>.<account>`` with the header ``Nats-Msg-Id: <transaction_id>``.
:func:`parse` turns the raw bytes into a :class:`Transaction` or, for anything that breaks the
contract, a :class:`Malformed` carrying the reason; it never raises, so one bad message can never
stop the consumer. ``docs/transactions.md`` is the human-readable version of this file.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from .errors import SettingsError

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
    """The branch token of a ``tx.<branch>.<terminal>.<account>`` subject."""
    return subject.split(".", 2)[1]


def parse(subject: str, data: bytes) -> Transaction | Malformed:
    """Validate one message against the contract. Never raises.

    Besides the JSON body, the subject must be ``tx.<branch>.<terminal>.<account>`` and agree
    with the body's ``terminal_id`` and ``account_id``, so that partitioning by subject can
    never route a transaction to the wrong account's state.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        return Malformed(f"oversize: {len(data)} bytes > {MAX_MESSAGE_BYTES}", subject, data)
    try:
        tx = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        return Malformed(f"invalid: {exc}", subject, data)
    except msgspec.DecodeError as exc:
        return Malformed(f"bad json: {exc}", subject, data)
    if tx.version != CONTRACT_VERSION:
        return Malformed(f"unsupported contract version {tx.version}", subject, data)
    for name in ("transaction_id", "account_id", "terminal_id"):
        if not _id_ok(getattr(tx, name)):
            return Malformed(f"invalid: `{name}` must match {ID_PATTERN}", subject, data)
    if not tx.currency.isascii() or not tx.currency.isupper() or not tx.currency.isalpha():
        return Malformed("invalid: `currency` must be an ISO 4217 code such as EUR", subject,
                         data)
    tokens = subject.split(".")
    if (len(tokens) != 4 or tokens[0] != "tx" or not 0 < len(tokens[1]) <= 64
            or not _id_ok(tokens[1])):
        return Malformed("bad subject: expected tx.<branch>.<terminal>.<account>", subject, data)
    if tokens[2] != tx.terminal_id or tokens[3] != tx.account_id:
        return Malformed("subject does not match terminal_id/account_id in body", subject, data)
    return tx


def encode(tx: Transaction) -> bytes:
    """Serialise ``tx`` as a terminal would send it."""
    return _encoder.encode(tx)


def digest(tx: Transaction) -> bytes:
    """blake2b-128 of ``tx``'s canonical body: its fields re-encoded in contract order, so a
    re-send that differs only in key order or white space has the same digest, and one with
    another amount, time, account or place has another (stored as ``body_digest``)."""
    return hashlib.blake2b(_encoder.encode(tx), digest_size=16).digest()
