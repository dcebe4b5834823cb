"""Receiving and sending on JetStream, fast: the node's connection, the scorer's pulls,
its publishes with their confirmations, and its acks (the streams and the consumer
themselves are streams.py's).

nats-py's ``fetch()`` creates a task per message; :class:`Puller` instead keeps pull requests
outstanding on ``$JS.API.CONSUMER.MSG.NEXT`` and takes every delivery in one callback, and
:class:`Publisher` publishes with a reply inbox and counts acks in one callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError, NoServersError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .. import logs
from ..errors import NodeError
from ..settings import Settings, nats_servers
from .streams import TX_STREAM
from .wire import drop_raw, take_raw

log = logs.get("appliance.ingest")

async def connect(url: str, name: str, timeout: float = 10.0,
                  on_reconnected: Callable[[], None] | None = None, **options: Any) -> Client:
    """A NATS connection that, once up, keeps reconnecting (the node outlives server
    restarts), logging each disconnect as one line (a WARNING, or INFO for the close we
    asked for: a drain at a clean stop is no trouble), and calling ``on_reconnected`` each
    time it is back; but that gives up on the first connect after ``timeout`` seconds with a
    :class:`NodeError`, rather than hanging.

    ``url`` may name several servers, comma-separated (a cluster's): the client connects to
    one of them and, when it goes, reconnects to another.

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
            nats_servers(url), name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
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


@dataclass(slots=True)  # not frozen: a frozen init costs 5x, and this is per message
class Delivery:
    """What the pipeline needs of one delivered message."""

    subject: str
    data: bytes
    reply: str
    stream_seq: int
    stored_ns: int
    """When JetStream stored the message (ns since the epoch): the start of its latency."""


def parse_ack_subject(reply: str) -> tuple[int, int, int]:
    """(stream_seq, stored_ns, consumer_seq) from a ``$JS.ACK...`` reply subject. nats-py's
    ``Msg.metadata`` says the same, but builds dataclasses and a datetime per message; the
    pipeline needs three integers."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[7]), int(tokens[6])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>...
    return int(tokens[7]), int(tokens[9]), int(tokens[8])


class DeliveryGap(NodeError):
    """The consumer's deliveries are not contiguous (a consumer sequence was skipped or
    repeated): one was lost on its way, with a server's death or a consumer leader's change.
    Acking past it would ack it unseen (ack policy ``all``), so the consumer is re-created
    from the checkpoint instead, as after a crash."""


async def _ignore(msg: Msg) -> None:  # the raw handler takes every message first
    return None


class Puller:
    """A pull consumer driven by hand: requests stay outstanding and deliveries are buffered
    raw by one handler (:func:`take_raw`), so the pipeline takes whatever has arrived, up to
    a batch, at once.

    Pull requests live on the server: when it restarts they are gone and no status message
    says so. Asked again blindly, a delivery lost with the server, followed by an ack of a
    later one (ack policy ``all``), would be acked unseen. So every delivery's consumer
    sequence must follow the last one's: past a gap, :meth:`take` raises
    :class:`DeliveryGap` and the owner starts over from its checkpoint. With that guard,
    :meth:`resume` may ask again after a reconnect (a partition's scorer does, where
    re-creating R3 consumers during an election costs seconds); the single node starts a
    fresh scorer, consumer and puller from the checkpoint instead (operations/scoring.py).
    """

    def __init__(self, nc: Client, settings: Settings, expires_seconds: float = 5.0,
                 durable: str | None = None) -> None:
        self.nc = nc
        self.batch = settings.batch_size
        self.expires_seconds = expires_seconds
        self.subject = (f"$JS.API.CONSUMER.MSG.NEXT.{TX_STREAM}."
                        f"{durable or settings.consumer}")
        self.inbox = nc.new_inbox()
        self.buffer: deque[tuple[bytes, bytes, bytes]] = deque()
        self.arrived = asyncio.Event()
        self.outstanding = 0
        self.next_cseq = 0
        """The consumer sequence the next delivery must have (0: any, before the first)."""
        self.gap: tuple[int, int] | None = None
        """(expected, received) consumer sequence once a delivery went missing."""
        self._heard = time.monotonic()
        """When the server last answered (a delivery or a status) or we last asked."""
        self._request = json.dumps({"batch": self.batch,
                                    "expires": int(expires_seconds * 1e9)}).encode()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=_ignore)
        take_raw(self.nc, self._sub._id, self._on_raw)
        await self._top_up()

    async def stop(self) -> None:
        if self._sub is not None:
            drop_raw(self.nc, self._sub._id)
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
            self._sub = None

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if headers and not data and headers[8:9] == b" ":  # "NATS/1.0 408 ...": a status
            self._heard = time.monotonic()  # deliveries count when taken, once per batch
            if headers[9:12] == b"100":  # heartbeat
                return
            # 404/408/409: the request ended; what it still owed will not come.
            at = headers.find(b"Nats-Pending-Messages:")
            if at >= 0:
                pending = int(headers[at + 22:headers.index(b"\r", at)])
                self.outstanding = max(0, self.outstanding - pending)
            else:
                self.outstanding = 0
            self.arrived.set()
            return
        self.outstanding -= 1
        self.buffer.append((subject, reply, data))
        self.arrived.set()

    async def _top_up(self) -> None:
        if self.outstanding and time.monotonic() - self._heard > self.expires_seconds + 2:
            # Every request lives ``expires_seconds`` and then ends with a status: silence
            # past that means they died with the server holding them (a consumer leader
            # SIGKILLed while this connection lived on). Ask again; the gap guard holds.
            log.warning("consumer.requests_lost", txn_id=None, outstanding=self.outstanding,
                        consumer=self.subject.rsplit(".", 1)[-1],
                        hint="no answer past the requests' expiry: asking again")
            self.outstanding = 0
        while self.outstanding < self.batch * 2:
            await self.nc.publish(self.subject, self._request, reply=self.inbox)
            self.outstanding += self.batch
            self._heard = time.monotonic()

    async def resume(self) -> None:
        """After a reconnect: forget the requests the old connection had outstanding (those
        on a dead server will never answer) and ask again. A delivery lost meanwhile shows as
        a gap in the consumer sequence, which :meth:`take` raises."""
        if self._sub is None:
            return
        self.outstanding = 0
        self.arrived.set()
        await self._top_up()

    async def take(self, timeout: float) -> list[Delivery]:
        """Up to one batch of deliveries; waits at most ``timeout`` seconds for the first."""
        if self.gap is not None:
            raise DeliveryGap("a delivery was lost: consumer sequence "
                              f"{self.gap[1]} came where {self.gap[0]} was due",
                              field="consumer", value=self.subject.rsplit(".", 1)[-1],
                              hint="the consumer is re-created from the checkpoint")
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
        out = self._from_buffer()
        await self._top_up()
        return out

    def in_hand(self) -> list[Delivery]:
        """Up to one batch of what has already arrived, asking for nothing more: for a stop,
        which scores the deliveries in hand rather than leave them to wait out ``ack_wait``
        at the next start."""
        return self._from_buffer()

    def _from_buffer(self) -> list[Delivery]:
        """Up to a batch of what has arrived, in order, as far as the consumer sequence is
        contiguous; past a gap, nothing more (the next take raises :class:`DeliveryGap`)."""
        if self.gap is not None:
            return []
        out = []
        buffer = self.buffer
        expected = self.next_cseq
        for _ in range(min(self.batch, len(buffer))):
            subject, raw_reply, data = buffer[0]
            reply = raw_reply.decode()
            seq, stored_ns, cseq = parse_ack_subject(reply)
            if expected and cseq != expected:
                self.gap = (expected, cseq)
                log.warning("consumer.gap", txn_id=None, expected=expected, got=cseq,
                            stream_seq=seq, consumer=self.subject.rsplit(".", 1)[-1])
                break
            buffer.popleft()
            expected = cseq + 1
            out.append(Delivery(subject.decode(), data, reply, seq, stored_ns))
        self.next_cseq = expected
        if out:
            self._heard = time.monotonic()
        return out


@dataclass(slots=True)
class Outgoing:
    """One message to publish to JetStream and have confirmed."""

    subject: str
    data: bytes
    msg_id: str
    headers: dict[str, str] | None = None


class Ticket:
    """The confirmations owed for one :meth:`Publisher.publish_many` call."""

    __slots__ = ("items", "waiting", "failed", "done")

    def __init__(self, items: Sequence[Outgoing]) -> None:
        self.items = items
        self.waiting: set[int] = set()
        """Indexes into ``items`` still without a JetStream ack."""
        self.failed: list[int] = []
        """Indexes JetStream refused (an error in its ack)."""
        self.done = asyncio.get_running_loop().create_future()

    def _settle(self) -> None:
        if not self.waiting and not self.done.done():
            self.done.set_result(None)

    async def missing(self, timeout: float) -> list[int]:
        """Indexes of ``items`` not confirmed within ``timeout`` seconds (refused or no ack
        at all), in order; empty when every one was stored."""
        if self.waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.done), timeout)
        return sorted([*self.failed, *self.waiting])


class Publisher:
    """Publishes to JetStream with pre-built frames and confirms every message by its own ack.

    Each message's reply subject is ``<inbox>.<n>``, so each ack says which message it
    confirms, and a message refused or lost (at a reconnect, say) is known by its number: the
    caller publishes exactly those again, under the same ``Nats-Msg-Id``, so the stream keeps
    one copy. A batch goes out as one buffer, one socket write (about 3 µs a message instead
    of nats-py's 8). Acks are read raw (:func:`take_raw`).
    """

    def __init__(self, nc: Client, max_in_flight: int = 20000) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self._prefix = len(self.inbox) + 1
        self._reply = self.inbox.encode() + b"."
        self._next = 0
        self._owed: dict[int, tuple[Ticket, int]] = {}
        self.max_in_flight = max_in_flight
        self.last_seq = 0
        """Highest stream sequence JetStream has acked (acks come in publish order)."""
        self._room = asyncio.Event()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox + ".*", cb=_ignore)
        take_raw(self.nc, self._sub._id, self._on_ack)

    async def stop(self) -> None:
        if self._sub is not None:
            drop_raw(self.nc, self._sub._id)
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
            self._sub = None

    @property
    def in_flight(self) -> int:
        return len(self._owed)

    def _on_ack(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        owed = self._owed.pop(int(subject[self._prefix:]), None)
        if owed is None:  # written off by a ticket that gave up on it: it will be re-sent
            return
        ticket, index = owed
        ticket.waiting.discard(index)
        if b'"error"' in data or (headers and headers[9:12] == b"503"):
            ticket.failed.append(index)
        else:
            at = data.find(b'"seq":')
            if at >= 0:
                end = at + 6
                while end < len(data) and 47 < data[end] < 58:
                    end += 1
                self.last_seq = max(self.last_seq, int(data[at + 6:end]))
        ticket._settle()
        if len(self._owed) < self.max_in_flight:
            self._room.set()

    async def publish_many(self, items: Sequence[Outgoing]) -> Ticket:
        """Publish ``items`` in order, in one write; the ticket says when JetStream has them.
        Waits first only while too many earlier messages are unconfirmed."""
        while len(self._owed) >= self.max_in_flight:
            self._room.clear()
            await self._room.wait()
        ticket = Ticket(items)
        if not items:
            ticket._settle()
            return ticket
        frames = []
        owed, n, reply = self._owed, self._next, self._reply
        for index, item in enumerate(items):
            head = b"NATS/1.0\r\nNats-Msg-Id: " + item.msg_id.encode() + b"\r\n"
            if item.headers:
                head += b"".join(f"{k}: {v}\r\n".encode() for k, v in item.headers.items())
            head += b"\r\n"
            frames.append(b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (
                item.subject.encode(), reply, n, len(head), len(head) + len(item.data), head,
                item.data))
            owed[n] = (ticket, index)
            ticket.waiting.add(index)
            n += 1
        self._next = n
        await self.nc._send_command(b"".join(frames))
        await self.nc._flush_pending()
        return ticket

    def forget(self, ticket: Ticket) -> None:
        """Stop waiting for ``ticket``'s missing acks (they will be published again)."""
        for number in [k for k, (t, _) in self._owed.items() if t is ticket]:
            del self._owed[number]
        self._room.set()

    async def confirm(self, items: Sequence[Outgoing], timeout: float,
                      stopping: Callable[[], bool] = lambda: False,
                      ticket: Ticket | None = None) -> bool:
        """Publish ``items`` (or wait on ``ticket`` for them) until JetStream has stored every
        one: what is refused or not acked within ``timeout`` is published again, under its
        own ``Nats-Msg-Id``. False only when ``stopping()`` says to give up first."""
        if ticket is None:
            ticket = await self.publish_many(items)
        rounds = 0
        while True:
            missing = await ticket.missing(timeout)
            if not missing:
                if rounds:
                    log.info("publish.confirmed_after_retry", txn_id=None, rounds=rounds,
                             first=ticket.items[0].msg_id)
                return True
            self.forget(ticket)
            if rounds % 20 == 0:  # one line, then one every 20 rounds while it lasts
                log.warning("publish.unconfirmed", txn_id=None, count=len(missing),
                            first=ticket.items[missing[0]].msg_id, rounds=rounds)
            if stopping():
                return False
            # a refusal comes back at once: wait before asking again (0.1 s doubling to 2 s)
            await asyncio.sleep(min(2.0, 0.1 * 2 ** min(rounds, 5)))
            rounds += 1
            ticket = await self.publish_many([ticket.items[i] for i in missing])


async def ack_batch(nc: Client, deliveries: Sequence[Delivery]) -> None:
    """Ack a batch with one message: the consumer's ack policy is ``all``, so acking the last
    delivery acks every one before it. That is exact only because batches are acked strictly
    in stream order, each once everything before it is done (see pipeline.py)."""
    if deliveries:
        await nc.publish(deliveries[-1].reply, b"+ACK")


async def in_progress(nc: Client, deliveries: Sequence[Delivery]) -> None:
    """Tell JetStream the deliveries are still being worked on (resets their ack timers)."""
    for d in deliveries:
        await nc.publish(d.reply, b"+WPI")


def dlq_headers(reason: str, delivery: Delivery) -> dict[str, str]:
    """Headers carried by a dead-lettered message; header values cannot hold newlines."""
    return {
        "Branchguard-Reason": " ".join(reason.split())[:1000],
        "Branchguard-Subject": delivery.subject,
        "Branchguard-Stream-Seq": str(delivery.stream_seq),
    }


