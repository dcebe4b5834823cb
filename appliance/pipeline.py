"""The scorer: the only code that knows the order of the stages.

For each batch pulled from the TX stream, in stream order:

1. parse each message against the contract; a bad one becomes a dead letter (published to
   ``TX_DLQ`` with its reason before anything is committed);
2. drop re-sends: ids already stored (or seen earlier in the batch) are not scored again,
   their stored verdict is re-published instead;
3. features, from state before each transaction; 4. model risk for the whole batch at once;
5. rules and verdict; 6. one database transaction for rows, alerts, dead letters and the
   checkpoint; 7. verdicts published to ``VERDICTS``; 8. acks, once JetStream has confirmed the
   verdicts.

A crash anywhere loses nothing: what is not committed is replayed from the checkpoint, and
feature state is rebuilt from the committed rows, so it is exactly what it would have been.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np
from nats.aio.client import Client

from . import logs
from .features import FeatureState
from .ingest import (DLQ_SUBJECT, Delivery, Publisher, Puller, ack_all, dlq_headers,
                     ensure_streams, nak_all, reset_consumer)
from .model import Model, feature_matrix
from .rules import RULES_VERSION
from .score import Verdict, judge
from .settings import Settings
from .store import DeadLetter, Scored, Store
from .transaction import Malformed, Transaction, branch_of, parse

log = logs.get("appliance.pipeline")
_encode = msgspec.json.Encoder().encode


@dataclass
class Counters:
    """Running totals since start, read by the summary line and the benchmark."""

    transactions: int = 0
    alerts: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    batches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    """Stream-stored to verdict-published latency of recent transactions (cleared by readers)."""


class Scorer:
    """Consumes TX, scores, stores and publishes verdicts until :meth:`stop` is called."""

    def __init__(self, nc: Client, store: Store, model: Model, settings: Settings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.store = store
        self.model = model
        self.settings = settings
        self.counters = Counters()
        self.state = FeatureState()
        self.puller = Puller(nc, settings)
        self.verdicts = Publisher(nc)
        self.dlq = Publisher(nc, max_in_flight=1000)
        self._stopping = asyncio.Event()
        self._acking: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()

    async def prepare(self) -> None:
        """Streams, state from the database, consumer from the checkpoint, lost verdicts."""
        await ensure_streams(self.js, self.settings)
        started = time.monotonic()
        self.state = self.store.feature_state()
        checkpoint = self.store.checkpoint(self.settings.consumer)
        log.info("state.rebuilt", accounts=len(self.state.accounts),
                 terminals=len(self.state.terminals), checkpoint=checkpoint,
                 seconds=round(time.monotonic() - started, 3))
        start = await reset_consumer(self.js, self.settings, checkpoint)
        await self.verdicts.start()
        await self.dlq.start()
        if start.ack_floor < checkpoint:
            # Committed but possibly never published (crash between commit and ack).
            again = self.store.verdicts_between(start.ack_floor, checkpoint)
            for branch, terminal, verdict in again:
                await self._publish_verdict(branch, terminal, verdict)
            ok = await self.verdicts.confirmed(self.verdicts.mark(), timeout=10.0)
            log.info("verdicts.republished", txn_id=None, count=len(again), confirmed=ok)
        await self.puller.start()
        self.ready.set()

    async def run(self) -> None:
        """Score until stopped; then finish the batch in hand and wait for its acks."""
        await self.prepare()
        while not self._stopping.is_set():
            batch = await self.puller.take(timeout=0.25)
            if batch:
                await self.process(batch)
        if self._acking:
            await asyncio.gather(*self._acking)
        await self.puller.stop()
        await self.verdicts.stop()
        await self.dlq.stop()

    def stop(self) -> None:
        self._stopping.set()

    async def process(self, batch: list[Delivery]) -> None:
        """Run one batch through every stage (see the module docstring)."""
        try:
            await self._process(batch)
        except Exception:
            log.error("batch.failed", exc_info=True, first_seq=batch[0].stream_seq,
                      size=len(batch))
            # Nothing of the batch is committed; the in-memory state may be ahead of the
            # database, so rebuild it, and let JetStream deliver the batch again.
            self.state = self.store.feature_state()
            await nak_all(self.nc, batch)

    async def _process(self, batch: list[Delivery]) -> None:
        settings = self.settings
        accepted: list[tuple[Delivery, Transaction]] = []
        dead: list[DeadLetter] = []
        dlq_failed, verdicts_failed = self.dlq.failed, self.verdicts.failed
        for d in batch:
            parsed = parse(d.subject, d.data)
            if isinstance(parsed, Malformed):
                dead.append(DeadLetter(d.stream_seq, d.subject, parsed.reason, len(d.data)))
                await self.dlq.publish(DLQ_SUBJECT, d.data, f"dlq-{d.stream_seq}",
                                       dlq_headers(parsed.reason, d))
                log.warning("tx.dead_lettered", txn_id=None, stream_seq=d.stream_seq,
                            subject=d.subject, reason=parsed.reason)
            else:
                accepted.append((d, parsed))
        if dead and not await self.dlq.confirmed((self.dlq.sent, dlq_failed), timeout=5.0):
            raise RuntimeError("dead-letter stream did not confirm; batch will be retried")

        stored = self.store.verdicts_for(tx.transaction_id for _, tx in accepted)
        fresh: list[tuple[Delivery, Transaction]] = []
        resent: list[tuple[Delivery, Transaction]] = []
        seen: set[str] = set()
        for d, tx in accepted:
            tid = tx.transaction_id
            if tid in stored or tid in seen:
                resent.append((d, tx))
            else:
                seen.add(tid)
                fresh.append((d, tx))

        observe = self.state.observe
        features = [observe(tx) for _, tx in fresh]
        risks = self.model.risks(feature_matrix(features)) if features else np.zeros(0)
        version = self.model.version
        scored = [
            Scored(tx, branch_of(d.subject), d.stream_seq, f,
                   judge(tx, f, float(r), version, RULES_VERSION, settings))
            for (d, tx), f, r in zip(fresh, features, risks)
        ]
        alerts = self.store.save_batch(scored, dead, settings.consumer, batch[-1].stream_seq)

        for s in scored:
            await self._publish_verdict(s.branch, s.tx.terminal_id, s.verdict)
            stored[s.tx.transaction_id] = s.verdict
        for d, tx in resent:  # a re-send gets the verdict of the transaction it repeats
            await self._publish_verdict(branch_of(d.subject), tx.terminal_id,
                                        stored[tx.transaction_id])
            log.info("tx.duplicate", txn_id=tx.transaction_id, stream_seq=d.stream_seq)
        mark = (self.verdicts.sent, verdicts_failed)

        now_ns = time.time_ns()
        c = self.counters
        c.transactions += len(scored)
        c.alerts += alerts
        c.dead_letters += len(dead)
        c.duplicates += len(resent)
        c.batches += 1
        c.latencies_ms.extend((now_ns - d.stored_ns) / 1e6 for d, _ in fresh)
        if len(c.latencies_ms) > 200000:
            del c.latencies_ms[:100000]

        task = asyncio.create_task(self._ack_when_confirmed(batch, mark))
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _publish_verdict(self, branch: str, terminal_id: str, verdict: Verdict) -> None:
        await self.verdicts.publish(f"verdict.{branch}.{terminal_id}", _encode(verdict),
                                    verdict.transaction_id)

    async def _ack_when_confirmed(self, batch: list[Delivery], mark: tuple[int, int]) -> None:
        if not await self.verdicts.confirmed(mark, timeout=self.settings.ack_wait_seconds / 2):
            # Left unacked: JetStream redelivers, the batch is recognised as stored, and its
            # verdicts are published again.
            log.warning("verdicts.unconfirmed", txn_id=None, first_seq=batch[0].stream_seq)
            return
        await ack_all(self.nc, batch)


def on_interval(seconds: float, fn: Callable[[], None]) -> asyncio.Task[None]:
    """Call ``fn`` every ``seconds`` until the task is cancelled."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(seconds)
            fn()

    return asyncio.create_task(loop())
