"""Request heads (request line and headers) over :data:`MAX_HEAD_BYTES` refused with 431.

uvicorn's httptools parser buffers a request's headers without any limit: a client can send
a header of 100 MB and the server holds it all in memory before the app sees the request
(measured: 100 MB of RSS for one such request), which would make the body limit
(body_limit.py) pointless. :class:`HeadLimitedProtocol` is uvicorn's httptools protocol,
counting the bytes of a request's head before they reach the parser; past the limit it
answers ``431 Request Header Fields Too Large`` and closes the connection, without parsing
or keeping any more. (uvicorn's own limit, ``h11_max_incomplete_event_size``, applies only
to its slower pure-Python h11 parser.) It relies on uvicorn's ``HttpToolsProtocol`` methods
``data_received``, ``on_headers_complete`` and ``on_message_complete``;
tests/test_api_body_limit.py and tests/test_api_hostile.py check it against the real server.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 65536
"""Largest request head accepted: far above any browser's, proxy's or API client's (a few
KiB), far below what would cost the node memory."""
_MESSAGE = f"the request head is over the limit of {MAX_HEAD_BYTES} bytes".encode()
_REFUSAL = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_MESSAGE), _MESSAGE))


class HeadLimitedProtocol(HttpToolsProtocol):
    """Counts the bytes of each request head as they arrive, before the parser buffers
    them: up to the blank line that ends the head, or the whole chunk while it has not
    come yet. A head is what arrives from the end of one request (or the connection's
    start) to the end of the next one's headers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what comes next is the next request's head

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > MAX_HEAD_BYTES:
                self.transport.write(_REFUSAL)
                self.transport.close()
                return
        super().data_received(data)
