"""The raw message path (scoring/wire.py): the lean parser reads exactly what nats-py's own
parser reads, however the bytes are cut into reads, and raw handlers get every message of
their subscription intact from a real nats-server while the client's other subscriptions
work as before."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.protocol.parser import Parser

from appliance.scoring.wire import RawHandler, drop_raw, lean_parse, take_raw


RAW_SID = 7
"""The subscription the lean parser hands to a raw handler; others go to _process_msg."""

def frame(subject: str, sid: int, payload: bytes, reply: str = "",
          headers: bytes | None = None) -> bytes:
    """One MSG or HMSG frame as nats-server writes it."""
    args = f"{subject} {sid}" + (f" {reply}" if reply else "")
    if headers is None:
        return f"MSG {args} {len(payload)}\r\n".encode() + payload + b"\r\n"
    return (f"HMSG {args} {len(headers)} {len(headers) + len(payload)}\r\n".encode()
            + headers + payload + b"\r\n")


STREAM = b"".join([
    b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n",
    frame("tx.BR001.T1.A1", RAW_SID, b"hello", "$JS.ACK.TX.scorer.1.1.1.1700000000000000000.0"),
    frame("verdict.BR001.T1", RAW_SID, b"abc"),
    b"+OK\r\n",
    frame("tx.BR001.T2.A2", RAW_SID, b"world", "$JS.ACK.TX.scorer.1.2.2.1700000000000000001.0",
          b"NATS/1.0\r\nNats-Msg-Id: t-2\r\n\r\n"),
    b"PING\r\n",
    frame("_INBOX.abc", RAW_SID, b"", headers=b"NATS/1.0 408 Request Timeout\r\n\r\n"),
    frame("other.subject", 9, b"not for raw", "_INBOX.r.1"),  # another subscription
    frame("empty", RAW_SID, b""),
    frame("tricky", RAW_SID, frame("x", RAW_SID, b"ab")),  # a payload that looks like frames
    frame("hdr.only", 9, b"", headers=b"NATS/1.0\r\nA: b\r\n\r\n"),
    b"PONG\r\n",
    frame("last", RAW_SID, b"done", "_INBOX.q.2"),
])
BIG = frame("big", RAW_SID, bytes(range(256)) * 273 + b"\xff" * 112, "_INBOX.q.3") + b"PING\r\n"
"""A frame larger than nats-py's 64 KiB read, then a control line."""


class Recorder:
    """What a nats-py client would be told by its parser, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        self.events.append(("msg", sid, bytes(subject), bytes(reply), bytes(data),
                            None if headers is None else bytes(headers)))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info["server_id"]))

    async def _process_err(self, err: str) -> None:
        self.events.append(("err", err))


def read(chunks: list[bytes], lean: bool) -> list[tuple[Any, ...]]:
    return asyncio.run(read_async(chunks, lean))


async def read_async(chunks: list[bytes], lean: bool, lean_from: int = 0
                     ) -> list[tuple[Any, ...]]:
    """The events of reading ``chunks``, by nats-py's parser alone or by the lean parser
    from chunk ``lean_from`` on (installed into a running client, in the middle of a
    message)."""
    recorder = Recorder()
    parser = Parser(recorder)
    parse: Callable[[bytes], Awaitable[None]] = parser.parse
    if lean:
        def raw(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            recorder.events.append(("msg", RAW_SID, subject, reply, data, headers))
        handlers: dict[int, RawHandler] = {RAW_SID: raw}
        parse = lean_parse(parser, handlers, recorder._process_msg)

    for n, chunk in enumerate(chunks):
        await (parse if n >= lean_from else parser.parse)(chunk)
    return recorder.events


def test_the_lean_parser_reads_what_nats_py_reads_at_every_cut() -> None:
    expected = read([STREAM], lean=False)
    assert sum(1 for e in expected if e[0] == "msg") == 9  # the stream is what it says
    assert expected[-1] == ("msg", RAW_SID, b"last", b"_INBOX.q.2", b"done", None)

    async def every_cut() -> None:
        assert await read_async([STREAM], lean=True) == expected
        for cut in range(1, len(STREAM)):
            assert await read_async([STREAM[:cut], STREAM[cut:]], lean=True) == expected, cut
            assert await read_async([STREAM[:cut], STREAM[cut:]], lean=True, lean_from=1
                                    ) == expected, cut
        rng = random.Random(5)
        for _ in range(300):  # many small reads
            cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(2, 60)))
            chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)])]
            assert await read_async(chunks, lean=True) == expected
    asyncio.run(every_cut())


def test_the_lean_parser_reads_a_frame_longer_than_a_read() -> None:
    expected = read([BIG], lean=False)
    assert [e[0] for e in expected] == ["msg", "ping"] and len(expected[0][4]) == 70000

    async def cuts() -> None:
        for cut in [*range(1, 40), *range(40, len(BIG), 997), *range(len(BIG) - 10, len(BIG))]:
            assert await read_async([BIG[:cut], BIG[cut:]], lean=True) == expected, cut
        chunks = [BIG[i:i + 65536] for i in range(0, len(BIG), 65536)]
        assert await read_async(chunks, lean=True) == expected
    asyncio.run(cuts())


def test_the_lean_parser_leaves_a_bad_frame_to_nats_py() -> None:
    bad = b"MSG subject notanumber 5\r\nhello\r\n"
    errors = []
    for lean in (False, True):
        try:
            read([bad], lean=lean)
        except Exception as exc:  # noqa: BLE001 - the same error from both
            errors.append(type(exc).__name__)
    assert errors == ["ProtocolError", "ProtocolError"]


def test_raw_handlers_get_every_message_from_a_real_server(nats_url: str) -> None:
    """Payloads from empty to larger than one socket read, with and without headers, in
    order; a plain nats-py subscription on the same client still gets Msg objects with
    their headers; after drop_raw its subscription is served the nats-py way again."""
    sizes = [0, 1, 5, 100, 4095, 4096, 70_000, 200_000, 3]

    async def scenario() -> tuple[list[tuple[bytes, bytes, bytes | None]], list[Any], int]:
        nc = await nats.connect(nats_url)
        try:
            got: list[tuple[bytes, bytes, bytes | None]] = []
            plain: list[Any] = []
            async def keep(msg: Any) -> None:
                plain.append(msg)

            sub = await nc.subscribe("raw.>", cb=keep)  # its messages go to the raw handler
            take_raw(nc, sub._id, lambda s, r, d, h: got.append((s, d, h)))
            await nc.subscribe("plain.>", cb=keep)
            for n, size in enumerate(sizes):
                body = bytes([n % 256]) * size
                headers = {"Nats-Msg-Id": f"m-{n}"} if n % 2 else None
                await nc.publish(f"raw.{n}", body, headers=headers)
                await nc.publish(f"plain.{n}", body, headers=headers)
            await nc.flush()
            for _ in range(100):
                if len(got) == len(plain) == len(sizes):
                    break
                await asyncio.sleep(0.05)
            drop_raw(nc, sub._id)
            await nc.publish("raw.after", b"x")
            await nc.flush()
            for _ in range(100):
                if len(plain) > len(sizes):
                    break
                await asyncio.sleep(0.05)
            return got, plain, len(got)
        finally:
            await nc.close()

    got, plain, final = asyncio.run(scenario())
    assert [s for s, _, _ in got] == [f"raw.{n}".encode() for n in range(len(sizes))]
    assert [len(d) for _, d, _ in got] == sizes
    assert all(d == bytes([n % 256]) * len(d) for n, (_, d, _) in enumerate(got))
    assert [h is not None and b"Nats-Msg-Id: m-%d" % n in h for n, (_, _, h) in enumerate(got)
            ] == [bool(n % 2) for n in range(len(sizes))]
    # after drop_raw, raw.after reaches its subscription's own callback, the nats-py way
    assert [m.subject for m in plain] == [*(f"plain.{n}" for n in range(len(sizes))),
                                          "raw.after"]
    assert [m.headers for m in plain][1] == {"Nats-Msg-Id": "m-1"}
    assert final == len(sizes)  # nothing after drop_raw
