"""The scorer's side of the terminal stage: the records of one partition, by TX sequence.

A scorer of partition ``p`` reads ``term.<p>.>`` of ``TERM`` (terminal_stage.py) with an
ordered consumer, into a dict TX stream sequence → the terminal's windows (or None: the stage
did not observe that message). :meth:`TerminalFeed.windows_for` waits until a batch's are all
there; the scorer passes them to ``score_batch`` and frees them.

Where to start reading: every record the scorer still needs is for a TX message after its
checkpoint, and the stage publishes a record only after it has read that message, so after
that message was stored. The feed therefore starts at the first ``TERM`` record stored at
or after the time TX stored the first message after the checkpoint (less
:data:`CLOCK_MARGIN_SECONDS`, for two servers' clocks on a cluster), found by its sequence,
skips records at or below the checkpoint and keeps the first record of each sequence (a
re-published one is identical).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import NotFoundError

from .. import logs
from ..errors import StreamError
from .streams import TERM_STREAM, TX_STREAM, during_election
from .terminal_stage import Record, decode_record

log = logs.get("appliance.terminal_feed")

CLOCK_MARGIN_SECONDS = 5.0
"""Read ``TERM`` from this much before the first needed TX message's stored time."""
WAIT_SECONDS = 30.0
"""How long :meth:`TerminalFeed.windows_for` waits for the stage before giving up."""
STALL_SECONDS = 2.0
"""After this long with records missing and none arriving, the feed reads ``TERM`` again
from the first one missing: an ordered consumer can stall on a server's death (measured: a
partition waited out the whole 30 s after the ``TERM`` leader's SIGKILL)."""


class TerminalFeed:
    """The terminal stage's records for partition ``partition``, joined by TX sequence."""

    def __init__(self, js: JetStreamContext, partition: int,
                 wait_seconds: float = WAIT_SECONDS) -> None:
        self.js = js
        self.partition = partition
        self.wait_seconds = wait_seconds
        self.records: dict[int, Record] = {}
        self._order: deque[int] = deque()
        self._floor = 0
        self._arrived = asyncio.Event()
        self._sub: Subscription | None = None

    @property
    def started(self) -> bool:
        return self._sub is not None

    async def start(self, checkpoint: int) -> None:
        """Read records for TX sequences after ``checkpoint`` (see the module docstring)."""
        self._floor = checkpoint
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        term = (await during_election(lambda: self.js.stream_info(TERM_STREAM),
                                      "stream_info")).state
        last_term = term.last_seq or 0
        first = await self._stored(checkpoint + 1)
        if first is not None and first.time is not None:
            start = await self._term_seq_from(
                first.time - timedelta(seconds=CLOCK_MARGIN_SECONDS), term.first_seq or 1,
                last_term)
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=start)
        elif first is None and checkpoint > 0:
            # nothing after the checkpoint is in TX yet, so the stage has recorded nothing
            # the scorer needs before TERM's present end
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=last_term + 1)
        self._sub = await during_election(lambda: self.js.subscribe(
            f"term.{self.partition}.>", stream=TERM_STREAM, ordered_consumer=True,
            config=config, cb=self._on_msg), "subscribe")
        log.info("terminal_feed.started", txn_id=None, partition=self.partition,
                 checkpoint=checkpoint, deliver=str(config.deliver_policy),
                 start_time=str(config.opt_start_time), start_seq=config.opt_start_seq)

    async def _stored(self, seq: int, stream: str = TX_STREAM) -> RawStreamMsg | None:
        try:
            return await during_election(lambda: self.js.get_msg(stream, seq), "get_msg")
        except NotFoundError:
            return None

    async def _term_seq_from(self, when: datetime, first_seq: int, last_seq: int) -> int:
        """The first ``TERM`` sequence stored at or after ``when`` (``last_seq + 1`` if none):
        a binary search on stored times, which grow with the sequence (about 20 reads for a
        million records). The feed then starts by sequence, never by time: nats-py's ordered
        consumer, re-created after a missed heartbeat (a server's death), keeps a start time
        beside the sequence it resumes from, which the server refuses (error 10094), and the
        feed then stalled until :data:`STALL_SECONDS` passed. A record that cannot be read
        counts as late enough, so the search can only start earlier, which is safe: records
        at or below the floor, and second copies, are skipped."""
        lo, hi = max(first_seq, 1), max(last_seq + 1, 1)
        while lo < hi:
            mid = (lo + hi) // 2
            msg = await self._stored(mid, TERM_STREAM)
            if msg is None or msg.time is None or msg.time >= when:
                hi = mid
            else:
                lo = mid + 1
        return lo

    async def _on_msg(self, msg: Msg) -> None:
        seq = int(msg.subject.rsplit(".", 1)[1])
        if seq <= self._floor or seq in self.records:
            return
        self.records[seq] = decode_record(msg.data)
        self._order.append(seq)
        self._arrived.set()

    async def windows_for(self, seqs: Sequence[int]) -> list[Record]:
        """The records of TX sequences ``seqs``, once all have arrived; a
        :class:`StreamError` after ``wait_seconds`` without them (the stage is not running,
        or is far behind)."""
        records = self.records
        deadline = time.monotonic() + self.wait_seconds
        while True:
            missing = [s for s in seqs if s not in records]
            if not missing:
                return [records[s] for s in seqs]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("terminal_feed.timeout", txn_id=None, partition=self.partition,
                          missing=len(missing), first_missing=missing[0],
                          seconds=self.wait_seconds)
                raise StreamError(
                    f"no terminal windows from the terminal stage for TX sequence "
                    f"{missing[0]} ({len(missing)} missing) after {self.wait_seconds:g} s",
                    field="partitions", value=self.partition,
                    hint="is `branchguard stage terminals` running against this NATS?")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(remaining, STALL_SECONDS))
            except TimeoutError:
                if deadline - time.monotonic() > 0:
                    await self._resubscribe(missing[0] - 1)

    async def _resubscribe(self, after: int) -> None:
        """Read again from the record of TX sequence ``after + 1`` on (the records held are
        kept; one arriving twice is ignored)."""
        log.warning("terminal_feed.stalled", txn_id=None, partition=self.partition,
                    waiting_for=after + 1, hint="reading TERM again from there")
        await self.stop()
        await self.start(max(after, self._floor))

    def forget_through(self, seq: int) -> None:
        """Drop the records of TX sequences up to ``seq`` (the scorer is past them)."""
        self._floor = max(self._floor, seq)
        order, records = self._order, self.records
        while order and order[0] <= seq:
            records.pop(order.popleft(), None)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()
