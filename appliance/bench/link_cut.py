"""A WAN link that can be cut: a TCP proxy on loopback between a branch's nats-server and
the hub's leafnode port, for ``branchguard bench hub`` and the hub's tests.

:meth:`LinkProxy.cut` closes the listening socket and every connection through it, as a
link going down does (the branch's leaf connection drops, and its redials are refused);
:meth:`LinkProxy.restore` listens again on the same port, so the branch's next redial gets
through. The proxy runs its own event loop on a thread, so it can be used from plain code.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from typing import Any

from ..operations.cluster import free_port


class LinkProxy:
    """Listens on ``127.0.0.1:<port>`` and forwards to ``127.0.0.1:<target_port>``."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"link-proxy-{self.port}")
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    def restore(self) -> None:
        """Listen (again)."""
        self._run(self._listen())

    def cut(self) -> None:
        """Stop listening and drop every connection through the link."""
        self._run(self._cut())

    def close(self) -> None:
        """Cut the link for good and stop the proxy's thread (again: nothing)."""
        if self._loop.is_closed():
            return
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(OSError):
                writer.close()
