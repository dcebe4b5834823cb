"""API errors: every refused request is a JSON object naming what was wrong.

``{"error": {"status": 400, "message": "...", "field": "min_risk"}}``; ``field`` is the query
parameter, body field or path parameter at fault, or null. Internal error text never leaves
the server (a 500 says only that it happened; the log has the rest).
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

_encode = msgspec.json.Encoder().encode


class ApiError(Exception):
    """A request the API refuses, with its HTTP status and the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.extra = extra or {}


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(_encode(content), status_code=status, headers=headers,
                    media_type="application/json")


def error_response(status: int, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None,
                   extra: dict[str, Any] | None = None) -> Response:
    body: dict[str, Any] = {"status": status, "message": message, "field": field}
    if extra:
        body.update(extra)
    return json_response({"error": body}, status, headers)


def from_api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.field, exc.headers, exc.extra)
