"""Request heads (request line and headers) over :data:`MAX_HEAD_BYTES` refused with 431.

uvicorn's httptools parser buffers a request's headers without any limit: a client can send
a header of 100 MB and the server holds it all in memory before the app sees the request
(measured: 100 MB of RSS for one such request), which would make the body limit
(body_limit.py) pointless. :class:`HeadLimitedProtocol` is uvicorn's httptools protocol,
counting the bytes that arrive while a request's head is still incomplete; past the limit it
answers ``431 Request Header Fields Too Large`` and closes the connection. (uvicorn's own
limit, ``h11_max_incomplete_event_size``, applies only to its slower pure-Python h11
parser.) It relies on uvicorn's ``HttpToolsProtocol`` hooks ``data_received``,
``on_message_begin`` and ``on_headers_complete``; tests/test_api_body_limit.py checks it
against the real server.
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
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the first request's head starts with the connection
        self._head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self.transport.write(_REFUSAL)
            self.transport.close()
