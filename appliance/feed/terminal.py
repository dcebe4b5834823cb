"""Publishing transactions the way a terminal does: the contract's subject, ``Nats-Msg-Id``
set to the transaction id, and every publish confirmed by JetStream.

Used by the demo feed of ``branchguard run --demo``, by ``branchguard simulate`` and by the
benchmark's load generator. Pacing is by schedule, not by sleeping per message, so a fixed
offered rate is kept even when individual publishes are slow. A simulated stream is never
stamped ahead of the clock: live streams are published when the clock reaches each event
time, and a backlog (``--rate 0``) is dated so that it ends before now.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple
from datetime import datetime, timedelta, timezone
from pathlib import Path

from nats.aio.client import Client
from nats.errors import ConnectionClosedError, ConnectionReconnectingError

from ..nats_auth import client_options
from ..scoring.ingest import Outgoing, Publisher, Ticket, connect
from ..settings import Settings
from ..transaction import Transaction, encode, subject_for
from .outcomes import Outcomes, PublishReport
from .replay import replay_csv, write_labels
from .simulate import Labelled, simulate, span_bound

SIMULATED_RATE = 50.0
"""Event-time rate (tx/s) of a simulated backlog published as fast as it goes (``--rate 0``)."""


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


async def _pace(message: Message, started: float, sent: int, rate: float | None,
                realtime: bool) -> None:
    """Wait until ``message`` is due: with ``realtime`` until the wall clock has reached its
    event time (never a moment before, so no event is published ahead of the clock), else
    until its place in a ``rate`` per second schedule."""
    if realtime:
        while (delay := message.event_time - time.time()) > 0:
            await asyncio.sleep(delay)
    elif rate:
        delay = started + sent / rate - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)


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
            due_in = (message.event_time - time.time() if realtime else
                      started + sent / rate - time.monotonic() if rate else 0.0)
            if due_in > 0.001 or (realtime and due_in > 0) or len(due) >= chunk:
                await flush()  # what is due goes out before we wait
                if due_in > 0:
                    await _pace(message, started, sent, rate, realtime)
                else:
                    await asyncio.sleep(0)  # let acks in
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


async def publish_reported(nc: Client, messages: Iterator[Message], *,
                           rate: float | None = None, realtime: bool = False,
                           ack_timeout: float = 30.0, max_in_flight: int = 20000,
                           finite: bool = True) -> PublishReport:
    """Publish ``messages`` as :func:`publish_messages` does, but answer for every one: the
    report says how many JetStream stored and, for each transaction it did not, why
    (outcomes.py). Publishing stops early when the server has answered nothing for
    ``ack_timeout`` seconds; the messages not yet sent are then recorded as not sent
    (read to the end when ``finite``; an endless stream is only said to have stopped)."""
    outcomes = Outcomes(nc, ack_timeout)
    await outcomes.start()
    started = time.monotonic()
    sent = 0
    try:
        for message in messages:
            await _pace(message, started, sent, rate, realtime)
            outcomes.expire()
            await outcomes.room(max_in_flight)
            if outcomes.stalled:
                why = (f"nothing acknowledged for {ack_timeout:g} s: the node's NATS is "
                       f"unreachable ({nc.connected_url.netloc if nc.connected_url else '?'})")
                outcomes.report.stopped = why
                outcomes.refuse([message.msg_id], why)
                if finite:
                    outcomes.refuse((m.msg_id for m in messages), why)
                break
            await outcomes.publish(message.subject, message.data, message.msg_id)
            sent += 1
            if sent % 1000 == 0:
                await asyncio.sleep(0)  # let acks in
        await outcomes.settle()
        return outcomes.report
    finally:
        await outcomes.stop()


async def close_quietly(nc: Client) -> None:
    """Drain ``nc`` if it is connected, else close it: a connection that is reconnecting to
    a server that died cannot drain, and waiting for it would never end (closing it then
    can only fail on the transport already lost, which is what closing wants anyway)."""
    try:
        await asyncio.wait_for(nc.drain(), 10.0)
    except (ConnectionReconnectingError, ConnectionClosedError, TimeoutError):
        with contextlib.suppress(OSError):
            await nc.close()


def simulated(seed: int, *, count: int | None, rate: float | None, branch: str,
              now: datetime | None = None) -> Iterator[Labelled]:
    """The simulator's stream as ``branchguard simulate`` publishes it, dated so that no
    event is ahead of the clock: at ``rate`` tx/s it starts now (and is published as the
    clock reaches each event); as fast as possible (``rate`` None) a finite ``count`` is a
    backlog at :data:`SIMULATED_RATE` that ends before ``now`` (:func:`span_bound`), and an
    endless one starts now and can only go as fast as the clock. Constant rate, not
    diurnal: the events follow the rate asked for, whatever the hour."""
    now = datetime.now(timezone.utc) if now is None else now
    event_rate = rate or SIMULATED_RATE
    start = now
    if rate is None and count is not None:
        start = now - timedelta(seconds=span_bound(count, event_rate))
    # a branch's population, whatever the publishing rate: at a high rate more accounts
    # would only mean every transaction meets a stranger
    accounts, terminals = population(min(event_rate, SIMULATED_RATE))
    return simulate(seed, start=start, rate=event_rate, count=count, branch=branch,
                    accounts=accounts, terminals=terminals, diurnal=False)


async def publish_simulation(settings: Settings, *, count: int | None, rate: float | None,
                             seed: int, csv_path: Path | None = None,
                             labels_path: Path | None = None,
                             ack_timeout: float = 30.0) -> PublishReport:
    """Publish the simulator's stream (or a replayed CSV) to the node's NATS; optionally
    write the ground-truth labels (of what was offered) to ``labels_path``. Returns what
    was published and what was not, and why (:func:`publish_reported`).

    A simulated stream is never stamped ahead of the clock (:func:`simulated`); a CSV keeps
    its own times, paced by ``rate``."""
    url = settings.nats_url or f"nats://127.0.0.1:{settings.nats_port}"
    if csv_path is not None:
        items: Iterable[Labelled] = replay_csv(csv_path, branch=settings.branch)
    else:
        items = simulated(seed, count=count, rate=rate, branch=settings.branch)
    if count is not None:
        items = itertools.islice(items, count)
    labelled: list[Labelled] = []

    def keep(item: Labelled) -> Message:
        if labels_path is not None:
            labelled.append(item)
        return to_message(item.tx, settings.branch)

    nc = await connect(url, "branchguard-simulate", **client_options(settings))
    try:
        report = await publish_reported(
            nc, (keep(i) for i in items), rate=None if csv_path is None else rate,
            realtime=csv_path is None, ack_timeout=ack_timeout,
            finite=count is not None or csv_path is not None)
    finally:
        await close_quietly(nc)
    if labels_path is not None:
        write_labels(labelled, labels_path)
    return report


def write_unpublished(report: PublishReport, path: Path) -> int:
    """Write ``transaction_id,reason`` for every transaction of ``report`` not published
    (to publish them again, or to look for them). Returns the number of rows."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("transaction_id", "reason"))
        writer.writerows(report.failed.items())
    return report.not_published
