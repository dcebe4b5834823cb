"""JetStream plumbing: the streams, the scorer's consumer, and fast pulling and publishing.

Streams (created or updated idempotently at start):
- ``TX`` on ``tx.>``: what terminals publish; file storage; duplicate window drops re-sends
  with the same ``Nats-Msg-Id``; limits retention for ``tx_max_age_days``, so a node restored from
  an older database copy can replay what it has not stored yet.
- ``VERDICTS`` on ``verdict.<branch>.<terminal>``: one verdict per transaction, ``Nats-Msg-Id``
  = transaction id, so a re-published verdict is dropped inside the duplicate window.
- ``TX_DLQ`` on ``dlq.tx``: each rejected message, body unchanged, reason in headers.

The consumer is durable, pull, ack policy ``all`` (one ack per batch). It is re-created at every start from the
database checkpoint (the last stream sequence whose outcome is committed), so after a crash the
scorer sees the unfinished messages again *in stream order* rather than after a redelivery
timeout and behind newer ones: that is what makes feature state after a crash exactly the
state without one. The consumer therefore belongs to exactly one scorer.

nats-py's ``fetch()`` creates a task per message; :class:`Puller` instead keeps pull requests
outstanding on ``$JS.API.CONSUMER.MSG.NEXT`` and takes every delivery in one callback, and
:class:`Publisher` publishes with a reply inbox and counts acks in one callback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy,
                         StorageType, StreamConfig)
from nats.js.errors import NotFoundError

from .. import logs
from ..errors import NodeError
from ..settings import Settings

TX_STREAM = "TX"
VERDICT_STREAM = "VERDICTS"
DLQ_STREAM = "TX_DLQ"
DLQ_SUBJECT = "dlq.tx"
MAX_ACK_PENDING = 20000

log = logs.get("appliance.ingest")


async def connect(url: str, name: str, timeout: float = 10.0,
                  on_reconnected: Callable[[], None] | None = None, **options: Any) -> Client:
    """A NATS connection that, once up, keeps reconnecting (the node outlives server
    restarts), logging each disconnect as one line (a WARNING, or INFO for the close we
    asked for: a drain at a clean stop is no trouble), and calling ``on_reconnected`` each
    time it is back; but that gives up on the first connect after ``timeout`` seconds with a
    :class:`NodeError`, rather than hanging.

    Client-side subject validation is off: every subject the node publishes is built from
    identifiers the contract has already validated, and the check costs per message.
    """
    clients: list[Client] = []  # the one connection, once made

    async def on_error(exc: Exception) -> None:
        log.warning("nats.error", txn_id=None, url=url, error=f"{type(exc).__name__}: {exc}")

    async def on_disconnect() -> None:
        if clients and clients[0].is_closed:  # by our drain or close (a refusal: nats.error)
            log.info("nats.disconnected", txn_id=None, url=url, closed=True)
        else:
            log.warning("nats.disconnected", txn_id=None, url=url, closed=False)

    async def on_reconnect() -> None:
        log.info("nats.reconnected", txn_id=None, url=url)
        if on_reconnected is not None:
            on_reconnected()

    try:
        nc = await asyncio.wait_for(nats.connect(
            url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            connect_timeout=2, pending_size=64 * 1024 * 1024, skip_subject_validation=True,
            error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            **options),  # user, password, tls: nats_auth.client_options
            timeout)
    except (TimeoutError, OSError, NoServersError, ValueError) as exc:
        raise NodeError(f"cannot connect to NATS at {url}", field="nats_url", value=url,
                        hint="is the server running and the URL nats://host:port? "
                             "Without --nats-url, `branchguard run` embeds its own") from exc
    clients.append(nc)
    return nc


def stream_configs(settings: Settings) -> list[StreamConfig]:
    day = 86400.0
    window = settings.duplicate_window_seconds
    return [
        StreamConfig(name=TX_STREAM, subjects=[settings.tx_subjects], storage=StorageType.FILE,
                     retention=RetentionPolicy.LIMITS, duplicate_window=window,
                     max_age=settings.tx_max_age_days * day, max_msg_size=1 << 20),
        StreamConfig(name=VERDICT_STREAM, subjects=["verdict.>"], storage=StorageType.FILE,
                     retention=RetentionPolicy.LIMITS, duplicate_window=window,
                     max_age=settings.tx_max_age_days * day),
        StreamConfig(name=DLQ_STREAM, subjects=[DLQ_SUBJECT], storage=StorageType.FILE,
                     retention=RetentionPolicy.LIMITS, duplicate_window=window,
                     max_age=30 * day, max_msg_size=2 << 20),
    ]


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create the three streams, or bring their configuration up to date."""
    for config in stream_configs(settings):
        try:
            await js.stream_info(config.name or "")
        except NotFoundError:
            await js.add_stream(config)
            log.info("stream.created", stream=config.name)
        else:
            await js.update_stream(config)


@dataclass(frozen=True)
class ConsumerStart:
    ack_floor: int
    """Highest stream sequence acked (everything at or below it is acked) before this start."""
    start_seq: int
    """First stream sequence the re-created consumer delivers."""


async def reset_consumer(js: JetStreamContext, settings: Settings,
                         checkpoint: int) -> ConsumerStart:
    """Re-create the scorer's durable consumer to deliver from ``checkpoint + 1``."""
    ack_floor = 0
    try:
        info = await js.consumer_info(TX_STREAM, settings.consumer)
        ack_floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
        await js.delete_consumer(TX_STREAM, settings.consumer)
    except NotFoundError:
        pass
    start = checkpoint + 1
    await js.add_consumer(TX_STREAM, ConsumerConfig(
        durable_name=settings.consumer, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start, ack_policy=AckPolicy.ALL, max_deliver=settings.max_deliver,
        ack_wait=settings.ack_wait_seconds, max_ack_pending=MAX_ACK_PENDING,
        filter_subject=settings.tx_subjects, max_waiting=64))
    log.info("consumer.reset", consumer=settings.consumer, start_seq=start, ack_floor=ack_floor)
    return ConsumerStart(ack_floor=ack_floor, start_seq=start)


@dataclass(slots=True)  # not frozen: a frozen init costs 5x, and this is per message
class Delivery:
    """What the pipeline needs of one delivered message."""

    subject: str
    data: bytes
    reply: str
    stream_seq: int
    stored_ns: int
    """When JetStream stored the message (ns since the epoch): the start of its latency."""


def parse_ack_subject(reply: str) -> tuple[int, int]:
    """(stream_seq, stored_ns) from a ``$JS.ACK...`` reply subject. nats-py's
    ``Msg.metadata`` says the same, but builds dataclasses and a datetime per message; the
    pipeline needs two integers."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[7])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>...
    return int(tokens[7]), int(tokens[9])


class Puller:
    """A pull consumer driven by hand: requests stay outstanding and deliveries are buffered
    by one callback, so the pipeline takes whatever has arrived, up to a batch, at once."""

    def __init__(self, nc: Client, settings: Settings, expires_seconds: float = 5.0) -> None:
        self.nc = nc
        self.batch = settings.batch_size
        self.expires_ns = int(expires_seconds * 1e9)
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{TX_STREAM}.{settings.consumer}"
        self.inbox = nc.new_inbox()
        self.buffer: deque[Msg] = deque()
        self.arrived = asyncio.Event()
        self.outstanding = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_msg,
                                            pending_msgs_limit=-1, pending_bytes_limit=-1)
        await self._top_up()

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and "Status" in headers and not msg.data:
            status = headers["Status"]
            if status == "100":  # heartbeat
                return
            # 404/408/409: the request ended; what it still owed will not come.
            pending = headers.get("Nats-Pending-Messages")
            self.outstanding = max(0, self.outstanding - int(pending)) if pending else 0
            self.arrived.set()
            return
        self.outstanding -= 1
        self.buffer.append(msg)
        self.arrived.set()

    async def _top_up(self) -> None:
        while self.outstanding < self.batch * 2:
            payload = json.dumps({"batch": self.batch, "expires": self.expires_ns}).encode()
            await self.nc.publish(self.subject, payload, reply=self.inbox)
            self.outstanding += self.batch

    async def take(self, timeout: float) -> list[Delivery]:
        """Up to one batch of deliveries; waits at most ``timeout`` seconds for the first."""
        deadline = time.monotonic() + timeout
        while not self.buffer:
            await self._top_up()
            self.arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                return []
        out = []
        buffer = self.buffer
        for _ in range(min(self.batch, len(buffer))):
            msg = buffer.popleft()
            seq, stored_ns = parse_ack_subject(msg.reply)
            out.append(Delivery(msg.subject, msg.data, msg.reply, seq, stored_ns))
        await self._top_up()
        return out


class Publisher:
    """Publishes to JetStream with one reply inbox and one callback for all the acks.

    ``publish`` only buffers. To know that what was published so far is stored, take a
    :meth:`mark` and await :meth:`confirmed`: JetStream handles one connection's messages in
    order, so acks arrive in publish order and counting them is enough. With
    ``confirm=False`` a message asks for no ack at all; confirming a later message then
    confirms it too (used for verdicts: one ack per batch instead of one per verdict).
    """

    def __init__(self, nc: Client, max_in_flight: int = 10000) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.sent = 0
        """Messages published that asked for an ack."""
        self.acked = 0
        self.failed = 0
        self.max_in_flight = max_in_flight
        self._progress = asyncio.Event()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_ack,
                                            pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_ack(self, msg: Msg) -> None:
        if b'"error"' in msg.data or (msg.headers and msg.headers.get("Status") == "503"):
            self.failed += 1
        self.acked += 1
        self._progress.set()

    async def publish(self, subject: str, data: bytes, msg_id: str,
                      headers: dict[str, str] | None = None, confirm: bool = True) -> None:
        """Publish with ``Nats-Msg-Id: msg_id``; waits only when too many are unacked."""
        while self.sent - self.acked >= self.max_in_flight:
            self._progress.clear()
            await self._progress.wait()
        hdrs = {"Nats-Msg-Id": msg_id}
        if headers:
            hdrs.update(headers)
        if confirm:
            await self.nc.publish(subject, data, reply=self.inbox, headers=hdrs)
            self.sent += 1
        else:
            await self.nc.publish(subject, data, headers=hdrs)

    def mark(self) -> tuple[int, int]:
        """(published, failed) so far: pass it to :meth:`confirmed`."""
        return self.sent, self.failed

    async def confirmed(self, mark: tuple[int, int], timeout: float) -> bool:
        """True once everything published before ``mark`` is acked without error.

        False on an error or when ``timeout`` passes first; then the missing acks are written
        off (counted as acked), so one lost ack cannot hold up every later batch.
        """
        target, failed_before = mark
        deadline = time.monotonic() + timeout
        while self.acked < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.acked = target
                return False
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                pass
        return self.failed == failed_before


async def ack_batch(nc: Client, deliveries: Sequence[Delivery]) -> None:
    """Ack a batch with one message: the consumer's ack policy is ``all``, so acking the last
    delivery acks every one before it. That is exact here because one scorer owns the
    consumer and finishes batches in stream order."""
    if deliveries:
        await nc.publish(deliveries[-1].reply, b"+ACK")


def dlq_headers(reason: str, delivery: Delivery) -> dict[str, str]:
    """Headers carried by a dead-lettered message; header values cannot hold newlines."""
    return {
        "Branchguard-Reason": " ".join(reason.split())[:1000],
        "Branchguard-Subject": delivery.subject,
        "Branchguard-Stream-Seq": str(delivery.stream_seq),
    }
