"""Structured logs: one JSON object per line on stderr, one line per event.

Every line has ``ts``, ``level``, ``logger``, ``event`` (a constant, dotted name such as
``tx.dead_lettered``) and ``txn_id`` (null when the event is not about one transaction), plus
the event's own fields. Messages are constants; values go in fields, so lines can be grepped
and parsed.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "txn_id": None,
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode()


class EventLogger:
    """A thin wrapper so call sites read ``log.info("tx.dead_lettered", txn_id=..., reason=...)``."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any],
             exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc_info=exc_info)


def get(name: str) -> EventLogger:
    return EventLogger(name)


def configure(level: str = "INFO") -> None:
    """Send every ``appliance`` logger to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("appliance")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
