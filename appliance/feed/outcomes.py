"""What became of each transaction a feed published: stored (JetStream acknowledged it),
refused (JetStream answered with an error, or nobody answered), lost (no answer within the
acknowledgement timeout, as when the server dies with it in flight) or never sent.

Why one reply subject per message (``<inbox>.<n>``) rather than counting acks on one inbox:
acks arrive in publish order only while the connection lasts. Across a server crash and a
reconnect, the messages in flight at the crash are never answered, so counting would credit
later acks to them; with a subject each, every answer names the one message it is for, and
the report names exactly the transactions that are not known to be stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

NO_RESPONDERS = ("refused: no stream answered (503 no responders: JetStream is not ready or "
                 "has no stream on the subject)")


def no_ack(timeout: float) -> str:
    return (f"lost: no acknowledgement within {timeout:g} s (the connection to NATS was lost "
            "or its server restarted with it in flight; it may or may not be stored, and "
            "publishing it again is safe: a re-send gets its first verdict)")


def not_sent(why: str) -> str:
    return f"not sent: {why}"


@dataclass
class PublishReport:
    """The outcome of one feed: ``published`` were acknowledged by JetStream (``duplicates``
    of them were already in the stream); ``failed`` maps each transaction id that was not
    to why. ``stopped`` says why publishing ended early, if it did."""

    published: int = 0
    duplicates: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None

    @property
    def not_published(self) -> int:
        return len(self.failed)

    @property
    def offered(self) -> int:
        return self.published + self.not_published

    def reasons(self) -> list[tuple[str, int]]:
        """(reason, how many) for the transactions not published, most frequent first."""
        return Counter(self.failed.values()).most_common()

    def lines(self, examples: int = 5) -> list[str]:
        """The report as a person reads it."""
        out = [f"published {self.published} transactions"
               + (f" ({self.duplicates} of them already in the stream)" if self.duplicates
                  else "")]
        if self.failed:
            out.append(f"NOT published: {self.not_published} of {self.offered}")
            for reason, count in self.reasons():
                ids = [tid for tid, r in self.failed.items() if r == reason][:examples]
                more = ", ..." if count > len(ids) else ""
                out.append(f"  {count} {reason}: {', '.join(ids)}{more}")
        if self.stopped:
            out.append(f"stopped early: {self.stopped}")
        return out


class Outcomes:
    """Publishes to JetStream, each message with its own reply subject, and keeps what
    became of each one (see the module doc).

    A message not answered within ``ack_timeout`` seconds is written off as lost (a late
    answer still counts it). :attr:`stalled` turns true when messages were written off and
    nothing at all has been answered for ``ack_timeout``: the server is gone, and
    publishing more would only fill the client's buffer.
    """

    def __init__(self, nc: Client, ack_timeout: float = 30.0) -> None:
        self.nc = nc
        self.ack_timeout = ack_timeout
        self.inbox = nc.new_inbox()
        self.report = PublishReport()
        self._waiting: dict[int, str] = {}
        """Message number -> transaction id, published and not yet answered."""
        self._order: deque[tuple[int, float]] = deque()
        """(message number, monotonic time published), in publish order."""
        self._lost: dict[int, str] = {}
        self._next = 0
        self._last_answer = time.monotonic()
        self._progress = asyncio.Event()
        self._sub: Subscription | None = None
        self.stalled = False

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_answer,
                                            pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def stop(self) -> None:
        if self._sub is not None and not self.nc.is_closed:
            # reconnecting or closed: the subscription goes with the connection anyway
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
        self._sub = None

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish with ``Nats-Msg-Id: msg_id``; its answer is recorded when it comes.
        A message the client cannot take (connection closed, buffer full while it
        reconnects) is recorded as not sent."""
        n = self._next
        self._next += 1
        try:
            await self.nc.publish(subject, data, reply=f"{self.inbox}.{n}",
                                  headers={"Nats-Msg-Id": msg_id})
        except Exception as exc:  # noqa: BLE001 - ConnectionClosed, OutboundBufferLimit...
            self.report.failed[msg_id] = not_sent(f"{type(exc).__name__} {exc}".strip())
            if self.nc.is_closed:
                self.stalled = True
            return
        self._waiting[n] = msg_id
        self._order.append((n, time.monotonic()))

    def refuse(self, msg_ids: Iterable[str], why: str) -> None:
        """Record transactions that were never sent, and why."""
        for msg_id in msg_ids:
            self.report.failed[msg_id] = not_sent(why)

    def expire(self) -> None:
        """Write off what has waited longer than ``ack_timeout``; update :attr:`stalled`."""
        now = time.monotonic()
        cutoff = now - self.ack_timeout
        order, waiting = self._order, self._waiting
        expired = False
        while order and (order[0][0] not in waiting or order[0][1] < cutoff):
            n, _ = order.popleft()
            msg_id = waiting.pop(n, None)
            if msg_id is not None:
                self._lost[n] = msg_id
                self.report.failed[msg_id] = no_ack(self.ack_timeout)
                expired = True
        if expired and now - self._last_answer > self.ack_timeout:
            self.stalled = True

    async def room(self, max_in_flight: int) -> None:
        """Wait until fewer than ``max_in_flight`` are unanswered (or until stalled)."""
        while self.in_flight >= max_in_flight and not self.stalled:
            await self._wait_for_progress()
            self.expire()

    async def settle(self) -> None:
        """Wait until every message published is answered or written off."""
        self.expire()
        while self._waiting:
            await self._wait_for_progress()
            self.expire()

    async def _wait_for_progress(self) -> None:
        oldest = self._order[0][1] if self._order else time.monotonic()
        timeout = max(0.01, oldest + self.ack_timeout - time.monotonic())
        self._progress.clear()
        try:
            await asyncio.wait_for(self._progress.wait(), timeout)
        except TimeoutError:
            pass

    async def _on_answer(self, msg: Msg) -> None:
        try:
            n = int(msg.subject[len(self.inbox) + 1:])
        except ValueError:
            return
        msg_id = self._waiting.pop(n, None)
        if msg_id is None:
            msg_id = self._lost.pop(n, None)  # answered after it was written off
            if msg_id is None:
                return
            del self.report.failed[msg_id]
        self._last_answer = time.monotonic()
        self.stalled = False
        refusal = _refusal(msg)
        if refusal is None:
            self.report.published += 1
            if b'"duplicate"' in msg.data:
                self.report.duplicates += 1
        else:
            self.report.failed[msg_id] = refusal
        self._progress.set()


def _refusal(msg: Msg) -> str | None:
    """Why JetStream refused a message, from its answer; None when it was stored."""
    if msg.headers and msg.headers.get("Status") == "503":
        return NO_RESPONDERS
    if b'"error"' not in msg.data:
        return None
    try:
        error = json.loads(msg.data)["error"]
        return f"refused by JetStream: {error.get('description', error)}"
    except (ValueError, KeyError, TypeError):
        return f"refused by JetStream: {msg.data[:200]!r}"
