"""Request bodies: JSON objects decoded into typed structs; unknown fields, and a field
given twice (JSON allows it and the last would win; which one was meant cannot be known),
are refused, and every error names the field."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from .errors import ApiError

T = TypeVar("T")
Status = Literal["NEW", "INVESTIGATING", "CONFIRMED_FRAUD", "FALSE_POSITIVE"]
DispositionCode = Literal["confirmed_fraud", "customer_confirmed", "false_positive",
                          "duplicate", "other"]
"""casework/dispositions.CODES (a test checks they agree)."""
FraudType = Literal["velocity_burst", "card_testing", "amount_spike", "impossible_travel",
                    "atm_cashout", "new_terminal_large", "other"]
"""scoring/labels.FRAUD_TYPES (a test checks they agree)."""
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[^\x00]*$")]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4000, pattern=r"^[^\x00]*$")]
Version = Annotated[int, msgspec.Meta(ge=1, le=2**62)]
_AT = re.compile(r"at `\$\.([A-Za-z_]+)")
_MISSING = re.compile(r"missing required field `([A-Za-z_]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


class CaseChange(msgspec.Struct, forbid_unknown_fields=True):
    version: Version
    status: Status | None = None
    assignee: Name | None | msgspec.UnsetType = msgspec.UNSET
    """A name assigns; null unassigns; absent leaves the assignee as it is."""
    disposition: DispositionCode | None = None
    """Closes the case (its status follows from the code); on a closed case, re-disposes."""
    fraud_type: FraudType | None = None
    """With a fraud disposition only, and then required."""


class Note(msgspec.Struct, forbid_unknown_fields=True):
    text: Text


class Bulk(msgspec.Struct, forbid_unknown_fields=True):
    version: Version
    scope: Literal["account", "terminal"]
    status: Status | None = None
    assignee: Name | None = None
    disposition: DispositionCode | None = None
    fraud_type: FraudType | None = None


class ListEntry(msgspec.Struct, forbid_unknown_fields=True):
    list: Literal["allow", "deny"]
    kind: Literal["account", "terminal"]
    value: Name
    reason: Text
    expires_at: str | float | None = None
    """Seconds since the epoch or ISO-8601; null never expires."""


def decode(body: bytes, kind: type[T]) -> T:
    """``body`` as ``kind``, or a 400 naming the field that is wrong."""
    if not body.strip():
        raise ApiError(400, "expected a JSON object body", "body")
    try:
        decoded = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.search(text) or _MISSING.search(text) or _UNKNOWN.search(text)
        raise ApiError(400, text, match.group(1) if match else "body") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"not valid JSON: {exc}", "body") from None
    json.loads(body, object_pairs_hook=_no_key_twice)  # valid JSON: msgspec has read it
    return decoded


def _no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' hook for each object: a 400 naming a key given twice."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ApiError(400, f"`{key}` is given more than once", key)
        seen.add(key)
    return dict(pairs)
