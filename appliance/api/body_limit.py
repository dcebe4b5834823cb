"""Request bodies above ``api_max_body_bytes`` refused with 413 before they are read.

An ASGI middleware around the whole app (the API and the console mounted on it). A request
that declares a larger ``Content-Length`` is answered at once, without calling the app and
before the client has sent any of the body. A body without one (chunked) is counted as it
arrives: the read that passes the limit raises :class:`BodyTooLarge`, an ``HTTPException``
413, so whatever reads it (our routes, NiceGUI's, socket.io's) stops there, and the answer
is a 413 as long as nothing of the response was sent yet. Either way the response says
``Connection: close``, so the server drops the rest of the body instead of reading it.
Console websocket messages are capped at the same size by uvicorn (``ws_max_size``).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

CLOSE = {"Connection": "close"}


class BodyTooLarge(HTTPException):
    """A request body over the limit (raised while it is being read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit), headers=CLOSE)


def too_large(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes (api_max_body_bytes)"


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            message = too_large(self.max_bytes) if status == 413 else "bad Content-Length"
            await error_response(status, message, "body", CLOSE)(scope, receive, send)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:
                raise
            await error_response(413, too_large(self.max_bytes), "body", CLOSE)(
                scope, receive, send)
