"""Query parameters, read strictly: an unknown, repeated or malformed parameter is a 400
naming it, so a typo never silently widens a filter."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import msgspec
from starlette.datastructures import QueryParams

from .errors import ApiError

MAX_TEXT = 200


class Params:
    """The request's query parameters, checked against the names a route accepts."""

    def __init__(self, query: QueryParams, allowed: Iterable[str]) -> None:
        self.query = query
        allowed = set(allowed)
        for name in query.keys():
            if name not in allowed:
                raise ApiError(400, "unknown query parameter", name)
            if len(query.getlist(name)) > 1:
                raise ApiError(400, "given more than once", name)

    def text(self, name: str, max_length: int = MAX_TEXT) -> str | None:
        value = self.query.get(name)
        if value is None:
            return None
        if not value or len(value) > max_length or "\x00" in value:
            raise ApiError(400, f"must be 1 to {max_length} characters", name)
        return value

    def choices(self, name: str, allowed: Iterable[str]) -> list[str]:
        """A comma-separated subset of ``allowed`` (empty when absent)."""
        raw = self.text(name)
        if raw is None:
            return []
        allowed = tuple(allowed)
        values = [v.strip() for v in raw.split(",")]
        for v in values:
            if v not in allowed:
                raise ApiError(400, f"{v!r} is not one of {', '.join(allowed)}", name)
        return values

    def choice(self, name: str, allowed: Iterable[str], default: str | None = None
               ) -> str | None:
        values = self.choices(name, allowed)
        if len(values) > 1:
            raise ApiError(400, "takes one value", name)
        return values[0] if values else default

    def number(self, name: str, low: float, high: float) -> float | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ApiError(400, "must be a number", name) from None
        if not (low <= value <= high) or math.isnan(value):
            raise ApiError(400, f"must be between {low} and {high}", name)
        return value

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, "must be a whole number", name) from None
        if not low <= value <= high:
            raise ApiError(400, f"must be between {low} and {high}", name)
        return value

    def boolean(self, name: str) -> bool:
        raw = self.text(name)
        if raw is None:
            return False
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ApiError(400, "must be true or false", name)
        return raw.lower() in ("true", "1")

    def time(self, name: str) -> float | None:
        """Seconds since the Unix epoch, given as a number or an ISO-8601 timestamp (UTC
        when it has no offset)."""
        raw = self.text(name)
        if raw is None:
            return None
        return parse_time(raw, name)

    def time_range(self, column: str) -> tuple[list[str], list[float]]:
        """SQL conditions and arguments for ``since <= column < until``."""
        where: list[str] = []
        args: list[float] = []
        for name, op in (("since", ">="), ("until", "<")):
            value = self.time(name)
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(value)
        return where, args

    def cursor(self, name: str = "cursor") -> list[Any] | None:
        """[sort, sort value, alert_id] from a cursor :func:`encode_cursor` made."""
        raw = self.text(name, max_length=500)
        if raw is None:
            return None
        try:
            value = msgspec.json.decode(base64.urlsafe_b64decode(raw.encode() + b"=="))
        except (binascii.Error, msgspec.DecodeError, ValueError):
            raise ApiError(400, "not a cursor this API gave out", name) from None
        if not (isinstance(value, list) and len(value) == 3 and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[1:])
                and isinstance(value[0], str)):
            raise ApiError(400, "not a cursor this API gave out", name)
        return value


def encode_cursor(values: list[object]) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(values)).decode().rstrip("=")


def parse_time(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        try:
            stamp = datetime.fromisoformat(raw)
        except ValueError:
            raise ApiError(400, "must be seconds since the epoch or an ISO-8601 time",
                           name) from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        try:
            return stamp.timestamp()
        except (OverflowError, OSError, ValueError):
            raise ApiError(400, "time out of range", name) from None
    if not -1e11 < value < 1e11:
        raise ApiError(400, "time out of range", name)
    return value
