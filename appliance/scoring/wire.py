"""NATS messages read raw off the wire, for the subscriptions the hot path owns.

Every delivery of the scorer's pull consumer, and every JetStream ack of a verdict it
publishes, is a message on a subscription of the scorer's own: two per transaction. nats-py
reads each one with a regular expression, copies its arguments through a dict, and awaits a
coroutine that builds a ``Msg`` (with a dict of its headers) and puts it on a queue for a
callback task. :func:`take_raw` makes two shortcuts on one client, both measured (issue 16):

- ``Client._process_msg`` is wrapped, so a message of a subscription given a handler goes
  straight to it as bytes: no ``Msg``, no header dict, no task, no queue (13 -> 3 µs a
  delivery);
- the protocol parser's ``parse`` is wrapped by :func:`lean_parse`, which reads the ``MSG`` and
  ``HMSG`` lines at the front of the buffer with ``bytes.split`` instead of the regular
  expressions and calls a raw handler without a coroutine. Anything else (``PING``, ``INFO``,
  ``-ERR``, a message cut by the end of a read) is left to nats-py's own parser, exactly
  where it is, so the protocol is never read two ways.

Both rely on private parts of nats-py whose shape has not changed since 2.0 (``_ps.buf``,
``_ps.state``, ``_process_msg``); tests/test_wire.py reads the same byte streams through both
parsers, cut at every position, and fails if they ever disagree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client

RawHandler = Callable[[bytes, bytes, bytes, bytes | None], None]
"""(subject, reply, payload, raw headers or None): a message as the protocol parser read it."""
ProcessMsg = Callable[[int, bytes, bytes, bytes, bytes | None], Awaitable[None]]
"""nats-py's ``Client._process_msg``: (sid, subject, reply, payload, headers)."""

_AWAITING_CONTROL_LINE = 1
"""nats-py's parser state between two messages (nats.protocol.parser)."""


def take_raw(nc: Client, sid: int, handler: RawHandler) -> None:
    """Deliver subscription ``sid``'s messages to ``handler`` raw, straight from the protocol
    parser; the client's other subscriptions are served by nats-py as before."""
    handlers: dict[int, RawHandler] | None = getattr(nc, "_branchguard_raw", None)
    if handlers is None:
        handlers = {}
        original: ProcessMsg = nc._process_msg  # type: ignore[assignment]

        async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes,
                              headers: bytes | None) -> None:
            handler = handlers.get(sid)
            if handler is None:
                await original(sid, subject, reply, data, headers)
            else:
                handler(subject, reply, data, headers)

        nc._process_msg = process_msg  # type: ignore[method-assign]
        nc._ps.parse = lean_parse(nc._ps, handlers, process_msg)  # type: ignore[method-assign,assignment]
        nc._branchguard_raw = handlers  # type: ignore[attr-defined]
    handlers[sid] = handler


def drop_raw(nc: Client, sid: int) -> None:
    """Stop handing ``sid``'s messages to its raw handler (before unsubscribing)."""
    handlers: dict[int, RawHandler] | None = getattr(nc, "_branchguard_raw", None)
    if handlers is not None:
        handlers.pop(sid, None)


def lean_parse(parser: Any, handlers: dict[int, RawHandler], process_msg: ProcessMsg
               ) -> Callable[[bytes], Awaitable[None]]:
    """A ``parse`` for nats-py's ``parser`` that reads ``MSG`` and ``HMSG`` frames itself and
    gives nats-py's own ``parse`` everything else, one whole line (or the rest of one
    message) at a time, so the two never read the same bytes and neither is left behind.

    Frames: ``MSG <subject> <sid> [reply] <size>\\r\\n<payload>\\r\\n`` and
    ``HMSG <subject> <sid> [reply] <header size> <total size>\\r\\n<headers><payload>\\r\\n``.
    A frame cut by the end of a read waits in the buffer for the next one.
    """
    slow = parser.parse

    async def by_nats_py(buf: bytearray, n: int) -> bool:
        """nats-py's parser reads exactly the first ``n`` bytes of ``buf``. False when it
        reset itself meanwhile (a protocol error, a reconnect): the rest is void then."""
        rest = bytes(buf[n:])
        del buf[n:]
        await slow(b"")
        if parser.buf is not buf:
            return False
        buf.extend(rest)
        return True

    async def parse(data: bytes = b"") -> None:
        buf: bytearray = parser.buf
        buf.extend(data)
        get = handlers.get
        while buf:
            if parser.state != _AWAITING_CONTROL_LINE:  # inside a message nats-py began
                whole = parser.needed + 2
                if len(buf) < whole or not await by_nats_py(buf, whole):
                    return
                continue
            view = bytes(buf)  # one copy a read; each payload is then one slice of it
            pos, slow_to = 0, 0
            while True:
                end = view.find(b"\r\n", pos)
                if end < 0:
                    break  # the rest of the line is in a later read
                if view.startswith(b"MSG ", pos):
                    args, headed = view[pos + 4:end].split(), False
                elif view.startswith(b"HMSG ", pos):
                    args, headed = view[pos + 5:end].split(), True
                else:  # PING, PONG, INFO, +OK, -ERR, or something nats-py will refuse
                    slow_to = end + 2
                    break
                try:
                    size = int(args[-1])
                    head = int(args[-2]) if headed else 0
                    sid = int(args[1])
                    fields = len(args) - headed
                    if not 3 <= fields <= 4 or not 0 <= head <= size:
                        raise ValueError(args)
                except (ValueError, IndexError):  # nats-py says what is wrong with it
                    slow_to = end + 2
                    break
                start = end + 2
                stop = start + size
                if len(view) < stop + 2:
                    break  # the rest of the frame is in a later read
                reply = args[2] if fields == 4 else b""
                headers = view[start:start + head] if head else None
                payload = view[start + head:stop]
                pos = stop + 2
                handler = get(sid)
                if handler is None:
                    await process_msg(sid, args[0], reply, payload, headers)
                    if parser.buf is not buf:  # reset meanwhile: what is left is void
                        return
                else:
                    handler(args[0], reply, payload, headers)
            del buf[:pos]
            if not slow_to or not await by_nats_py(buf, slow_to - pos):
                return

    return parse
