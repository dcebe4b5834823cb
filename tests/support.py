"""Small helpers the tests share: publish like a terminal, read streams back, poll the DB."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from appliance.feed.simulate import Labelled, simulate
from appliance.feed.terminal import Message, population, publish, publish_messages
from appliance.scoring.features import FEATURES, FEATURES_VERSION
from appliance.store import Scored
from appliance.transaction import Transaction
from appliance.verdict import Verdict

START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
HISTORY = {"BRANCHGUARD_EVENT_TIME_CHECK": "false"}
"""The suite's simulated transactions are dated from START, long before the node's clock:
history, so the nodes the fixtures start (tests/conftest.py) load them the documented way
for history, with the event-time window off (docs/transactions.md). Tests of the window
pass ``BRANCHGUARD_EVENT_TIME_CHECK=true``."""


def make_transactions(n: int, seed: int = 11, rate: float = 5.0) -> list[Labelled]:
    accounts, terminals = population(rate)
    return list(itertools.islice(simulate(seed, start=START, rate=rate, diurnal=False,
                                          accounts=accounts, terminals=terminals), n))


def send(url: str, txs: Iterable[Transaction], branch: str = "BR001") -> int:
    async def go() -> int:
        nc = await nats.connect(url)
        try:
            return await publish(nc, list(txs), branch=branch)
        finally:
            await nc.drain()
    return asyncio.run(go())


def send_raw(url: str, messages: Iterable[tuple[str, bytes, str]]) -> bool:
    async def go() -> bool:
        nc = await nats.connect(url)
        try:
            sent = list(messages)
            return await publish_messages(
                nc, [Message(subject, data, msg_id, 0.0) for subject, data, msg_id in sent]
            ) == len(sent)
        finally:
            await nc.drain()
    return asyncio.run(go())


def read_stream(url: str, stream: str, expect: int | None = None,
                timeout: float = 10.0) -> list[Any]:
    """Every message in ``stream`` (waits up to ``timeout`` for ``expect`` of them)."""
    async def go() -> list[Any]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        out: list[Any] = []
        try:
            deadline = time.monotonic() + timeout
            while True:
                info = await js.stream_info(stream)
                if expect is None or info.state.messages >= expect or \
                        time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            sub = await js.pull_subscribe("", durable=None, stream=stream, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE))
            total = (await js.stream_info(stream)).state.messages
            while len(out) < total:
                out.extend(await sub.fetch(min(500, total - len(out)), timeout=5))
            return out
        finally:
            await nc.drain()
    return asyncio.run(go())


def decode(data: bytes) -> Any:
    return msgspec.json.decode(data)


def query(db: Path, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, list(params)).fetchall()
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0,
               message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except sqlite3.OperationalError:
            pass  # database not created yet
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {message}")


def stored_count(db: Path) -> int:
    if not db.exists():
        return 0
    return int(query(db, "SELECT count(*) FROM transactions")[0][0])


def publish_in_background(url: str, txs: list[Transaction], rate: float,
                          branch: str = "BR001") -> threading.Thread:
    """Publish ``txs`` at ``rate`` tx/s from a thread of its own (started; join it), so a
    test can act on a running node in the middle of a stream."""
    def feed() -> None:
        async def go() -> None:
            nc = await nats.connect(url)
            try:
                await publish(nc, txs, branch=branch, rate=rate)
            finally:
                await nc.drain()
        asyncio.run(go())

    thread = threading.Thread(target=feed)
    thread.start()
    return thread


def approved_rows(txs: Iterable[Transaction], first_seq: int) -> list[Scored]:
    """``txs`` as rows ready to store, numbered from ``first_seq``, each approved with
    placeholder features: for tests of the writer, where scoring plays no part."""
    return [Scored(tx, "BR001", first_seq + k, (1.0,) * len(FEATURES), FEATURES_VERSION,
                   Verdict(tx.transaction_id, 0.1, "INFO", "approve", [], [], 0.1, "m", "r"))
            for k, tx in enumerate(txs)]
