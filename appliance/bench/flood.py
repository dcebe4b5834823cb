"""A wrong-secret flood for ``branchguard bench api --wrong-secret-flood N``.

``clients`` concurrent clients, each on its own keep-alive connection, send the alert-list
request as fast as the server answers, each time with a real key's id and a fresh random
secret (what an attacker who has read a key id in a log would send). It runs in its own
process (``branchguard bench-api-flood``) from the moment it prints ``started`` until it
is sent SIGTERM, and then prints the status codes it got, so the benchmark can measure valid
requests beside it and report what the flood was answered.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp

PATH = "/api/v1/alerts?status=NEW&limit=50"


async def wrong_secret_flood(url: str, key_id: str, clients: int,
                             started: Callable[[], None]) -> dict[str, Any]:
    """Flood ``url`` until SIGTERM (calling ``started`` once the clients are off); the
    statuses seen, requests and requests per second."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client() -> None:
            while not stop.is_set():
                headers = {"Authorization": f"Bearer bg_{key_id}_{secrets.token_urlsafe(32)}"}
                try:
                    async with session.get(PATH, headers=headers) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status = 0  # the connection failed: counted as 0
                statuses[status] = statuses.get(status, 0) + 1

        began = time.perf_counter()
        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        started()
        await stop.wait()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
    total = sum(statuses.values())
    return {"clients": clients, "requests": total, "seconds": round(elapsed, 2),
            "requests_per_second": round(total / elapsed, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


class Flood:
    """``branchguard bench-api-flood`` as a child process, from start to :meth:`stop`."""

    def __init__(self, url: str, key_id: str, clients: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "bench-api-flood", "--url", url,
             "--key-id", key_id, "--clients", str(clients)],
            stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if line.strip() != "started":
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"the flood did not start: {line!r}")

    def stop(self) -> dict[str, Any]:
        """Stop the flood; what it was answered."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=120)
        result: dict[str, Any] = json.loads(out)
        return result
