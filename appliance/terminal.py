"""Publishing transactions the way a terminal does: the contract's subject, ``Nats-Msg-Id``
set to the transaction id, and every publish confirmed by JetStream.

Used by the demo feed of ``branchguard run --demo``, by ``branchguard simulate`` and by the
benchmark's load generator. Pacing is by schedule, not by sleeping per message, so a fixed
offered rate is kept even when individual publishes are slow.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from nats.aio.client import Client

from .ingest import Publisher
from .settings import Settings
from .simulate import Labelled, replay_csv, simulate, write_labels
from .transaction import Transaction, encode, subject_for


async def publish(nc: Client, items: Iterable[Transaction], *, branch: str,
                  rate: float | None = None, realtime: bool = False,
                  stop: asyncio.Event | None = None, confirm_every: int = 1,
                  on_publish: Callable[[Transaction, int], None] | None = None) -> int:
    """Publish ``items`` until exhausted or ``stop`` is set; returns how many JetStream
    confirmed. Pacing: ``realtime`` publishes each transaction when the wall clock reaches its
    timestamp (a backlog in the past goes at once); else ``rate`` per second; else as fast as
    acks allow.

    ``confirm_every=k`` asks JetStream to ack only every k-th message (and the last): an ack
    confirms the messages published before it on this connection, and the load generator
    spends far less on acks. The count returned then only counts what was confirmed.

    ``on_publish(tx, time_ns)`` is called just before each publish (the benchmark's clock).
    """
    publisher = Publisher(nc, max_in_flight=20000)
    await publisher.start()
    started = time.monotonic()
    sent = 0
    failed_before = publisher.failed
    items = list(items) if confirm_every > 1 else items
    last = len(items) - 1 if isinstance(items, list) else -1
    try:
        for tx in items:
            if stop is not None and stop.is_set():
                break
            if realtime:
                delay = tx.timestamp.timestamp() - time.time()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            elif rate:
                delay = started + sent / rate - time.monotonic()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            if on_publish is not None:
                on_publish(tx, time.time_ns())
            confirm = confirm_every == 1 or sent % confirm_every == 0 or sent == last
            await publisher.publish(subject_for(branch, tx), encode(tx), tx.transaction_id,
                                    confirm=confirm)
            sent += 1
            if sent % 1000 == 0:
                await asyncio.sleep(0)  # let acks in
        ok = await publisher.confirmed((publisher.sent, failed_before), timeout=30.0)
        if confirm_every > 1:
            return sent if ok else 0
        return publisher.acked - (publisher.failed - failed_before)
    finally:
        await publisher.stop()


def population(rate: float) -> tuple[int, int]:
    """Accounts and terminals for a simulated stream of ``rate`` tx/s, so that each account
    transacts about every 200 s and each terminal every 20 s whatever the rate: the scale
    the shipped model was trained at (``branchguard train``: 2 tx/s, 400 accounts)."""
    return max(1, int(rate * 200)), max(20, int(rate * 20))


async def publish_raw(nc: Client, messages: Iterable[tuple[str, bytes, str]]) -> bool:
    """Publish pre-encoded (subject, data, msg_id) triples; True when all are confirmed.
    For tests and tools that need to send what no valid terminal would."""
    publisher = Publisher(nc)
    await publisher.start()
    try:
        failed = publisher.failed
        for subject, data, msg_id in messages:
            await publisher.publish(subject, data, msg_id)
        return await publisher.confirmed((publisher.sent, failed), timeout=30.0)
    finally:
        await publisher.stop()


async def publish_simulation(settings: Settings, *, count: int | None, rate: float | None,
                             seed: int, csv_path: Path | None = None,
                             labels_path: Path | None = None) -> int:
    """Publish the simulator's stream (or a replayed CSV) to the node's NATS; optionally
    write the ground-truth labels to ``labels_path``. Returns the confirmed count."""
    import nats

    url = settings.nats_url or f"nats://127.0.0.1:{settings.nats_port}"
    if csv_path is not None:
        items: Iterable[Labelled] = replay_csv(csv_path, branch=settings.branch)
    else:
        accounts, terminals = population(rate or 50.0)
        items = simulate(seed, start=datetime.now(timezone.utc), rate=rate or 50.0,
                         count=count, branch=settings.branch, accounts=accounts,
                         terminals=terminals)
    if count is not None:
        items = itertools.islice(items, count)
    labelled: list[Labelled] = []

    def keep(item: Labelled) -> Transaction:
        if labels_path is not None:
            labelled.append(item)
        return item.tx

    nc = await nats.connect(url, name="branchguard-simulate")
    try:
        confirmed = await publish(nc, (keep(i) for i in items), branch=settings.branch,
                                  rate=rate)
    finally:
        await nc.drain()
    if labels_path is not None:
        write_labels(labelled, labels_path)
    return confirmed
