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
from typing import NamedTuple
from datetime import datetime, timezone
from pathlib import Path

from nats.aio.client import Client

from ..nats_auth import client_options
from ..scoring.ingest import Outgoing, Publisher, Ticket, connect
from ..settings import Settings
from ..transaction import Transaction, encode, subject_for
from .replay import replay_csv, write_labels
from .simulate import Labelled, simulate


class Message(NamedTuple):
    """One transaction as it goes on the wire."""

    subject: str
    data: bytes
    msg_id: str
    event_time: float
    """The transaction's timestamp, seconds since the epoch (for real-time pacing)."""


def to_message(tx: Transaction, branch: str) -> Message:
    return Message(subject_for(branch, tx), encode(tx), tx.transaction_id,
                   tx.timestamp.timestamp())


async def publish(nc: Client, items: Iterable[Transaction], *, branch: str,
                  rate: float | None = None, realtime: bool = False,
                  stop: asyncio.Event | None = None) -> int:
    """Publish transactions as a terminal does; see :func:`publish_messages`."""
    return await publish_messages(nc, (to_message(tx, branch) for tx in items), rate=rate,
                                  realtime=realtime, stop=stop)


async def publish_messages(nc: Client, messages: Iterable[Message], *,
                           rate: float | None = None, realtime: bool = False,
                           stop: asyncio.Event | None = None, chunk: int = 256,
                           on_publish: Callable[[str, int], None] | None = None) -> int:
    """Publish ``messages`` until exhausted or ``stop`` is set; returns how many JetStream
    confirmed. Pacing: ``realtime`` publishes each one when the wall clock reaches its event
    time (a backlog in the past goes at once); else ``rate`` per second; else as fast as acks
    allow. Messages that are due together go out together, up to ``chunk`` in one write;
    each is confirmed by its own ack (see :class:`Publisher`).

    ``on_publish(msg_id, time_ns)`` is called just before each publish (the benchmark's
    clock).
    """
    publisher = Publisher(nc, max_in_flight=20000)
    await publisher.start()
    started = time.monotonic()
    sent = 0
    tickets: list[Ticket] = []
    due: list[Outgoing] = []

    async def flush() -> None:
        if due:
            tickets.append(await publisher.publish_many(list(due)))
            due.clear()

    try:
        for message in messages:
            if stop is not None and stop.is_set():
                break
            delay = 0.0
            if realtime:
                delay = message.event_time - time.time()
            elif rate:
                delay = started + sent / rate - time.monotonic()
            if delay > 0.001 or len(due) >= chunk:
                await flush()
                await asyncio.sleep(delay if delay > 0.001 else 0)  # sleep(0): let acks in
            if on_publish is not None:
                on_publish(message.msg_id, time.time_ns())
            due.append(Outgoing(message.subject, message.data, message.msg_id))
            sent += 1
        await flush()
        confirmed = 0
        for ticket in tickets:
            confirmed += len(ticket.items) - len(await ticket.missing(timeout=30.0))
        return confirmed
    finally:
        await publisher.stop()


def population(rate: float) -> tuple[int, int]:
    """Accounts and terminals for a simulated stream of ``rate`` tx/s, so that each account
    transacts about every 200 s and each terminal every 20 s whatever the rate: the scale
    the shipped model was trained at (``branchguard train``: 2 tx/s, 400 accounts)."""
    return max(1, int(rate * 200)), max(20, int(rate * 20))


async def publish_simulation(settings: Settings, *, count: int | None, rate: float | None,
                             seed: int, csv_path: Path | None = None,
                             labels_path: Path | None = None) -> int:
    """Publish the simulator's stream (or a replayed CSV) to the node's NATS; optionally
    write the ground-truth labels to ``labels_path``. Returns the confirmed count."""
    url = settings.nats_url or f"nats://127.0.0.1:{settings.nats_port}"
    if csv_path is not None:
        items: Iterable[Labelled] = replay_csv(csv_path, branch=settings.branch)
    else:
        # a branch's population, whatever the publishing rate: at a high rate more accounts
        # would only mean every transaction meets a stranger
        accounts, terminals = population(min(rate or 50.0, 50.0))
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

    nc = await connect(url, "branchguard-simulate", **client_options(settings))
    try:
        confirmed = await publish(nc, (keep(i) for i in items), branch=settings.branch,
                                  rate=rate)
    finally:
        await nc.drain()
    if labels_path is not None:
        write_labels(labelled, labels_path)
    return confirmed
