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
import gc
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client

from .. import logs
from ..errors import BranchguardError
from ..settings import Settings
from ..store import DeadLetter, Scored, Store
from ..transaction import Malformed, Transaction, branch_of, parse
from ..verdict import Verdict
from .explain import ForestPaths, explain
from .features import FEATURES, FEATURES_VERSION, FeatureState, feature_state
from .ingest import (DLQ_SUBJECT, Delivery, Publisher, Puller, ack_batch, dlq_headers,
                     ensure_streams, reset_consumer)
from .labels import LabelFeed
from .lists import ListFilter
from .model import Model, feature_matrix
from .registry import Registry
from .rules import RULES_VERSION
from .score import judge

log = logs.get("appliance.pipeline")
WRITER_THREAD_MIN_BATCH = 200
"""Batches at least this large are committed on the writer thread, overlapping the next
batch's scoring; smaller ones (light load, where latency matters) commit inline."""
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

    def __init__(self, nc: Client, store: Store, model: Model, settings: Settings,
                 registry: Registry | None = None) -> None:
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
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._committing: asyncio.Future[None] | None = None
        self._in_flight: dict[str, Verdict | None] = {}
        """Transactions scored but not yet committed: re-sends of them are duplicates too."""
        self.ready = asyncio.Event()
        self.lists = ListFilter(store.reader.conn, settings.lists_refresh_seconds)
        """Allow/deny lists in memory (issue 4), re-read every lists_refresh_seconds."""
        self.registry = registry
        """When given, the production pointer is watched and a new model swapped in."""
        self.labels = LabelFeed(store.reader.conn)
        self.last_seq = 0
        """Stream sequence of the last batch handed to the store (the hot-swap point)."""
        self._paths: dict[str, ForestPaths | None] = {}
        self.shadow: Model | None = None
        """The registry's shadow model: scores the same batches, stored, never acted on."""

    async def prepare(self) -> None:
        """Streams, state from the database, consumer from the checkpoint, lost verdicts."""
        await ensure_streams(self.js, self.settings)
        started = time.monotonic()
        # The state is large and long-lived and holds no reference cycles: build it with the
        # cyclic collector off, then move it out of the collector's sight, and collect young
        # objects less often (the hot path allocates a lot but creates no cycles).
        gc.disable()
        try:
            self.state = feature_state(self.store.reader)
        finally:
            gc.enable()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)

        checkpoint = self.store.checkpoint(self.settings.consumer)
        self.last_seq = checkpoint
        self._paths[self.model.version] = ForestPaths.of(self.model)
        while self.labels.refresh():
            pass
        log.info("state.rebuilt", accounts=len(self.state.accounts),
                 terminals=len(self.state.terminals), checkpoint=checkpoint,
                 labels=self.labels.state.count,
                 seconds=round(time.monotonic() - started, 3))
        start = await reset_consumer(self.js, self.settings, checkpoint)
        await self.verdicts.start()
        await self.dlq.start()
        if start.ack_floor < checkpoint:
            # Committed but possibly never published (crash between commit and ack).
            again = self.store.verdicts_between(start.ack_floor, checkpoint)
            await self._publish_verdicts(again)
            ok = await self.verdicts.confirmed(self.verdicts.mark(), timeout=10.0)
            log.info("verdicts.republished", txn_id=None, count=len(again), confirmed=ok)
        await self.puller.start()
        self.ready.set()

    async def run(self) -> None:
        """Score until stopped; then finish the batches in hand and wait for their acks.

        Crash-only: an unexpected error ends ``run`` with that error and the node exits; at
        the next start the consumer replays from the checkpoint, in order, exactly as after a
        power cut. Nothing half-done is ever committed.
        """
        await self.prepare()
        checkpoints = asyncio.create_task(self._checkpoint_wal())
        watchers = [asyncio.create_task(self._every(self.settings.label_refresh_seconds,
                                                    self._refresh_labels))]
        if self.registry is not None:
            watchers.append(asyncio.create_task(self._every(self.settings.model_check_seconds,
                                                            self._check_model)))
        try:
            while not self._stopping.is_set():
                batch = await self.puller.take(timeout=0.25)
                if batch:
                    await self.process(batch)
            await self._settle()
            if self._acking:
                await asyncio.gather(*self._acking)
        finally:
            checkpoints.cancel()
            for watcher in watchers:
                watcher.cancel()
            self.writer.shutdown(wait=True)
            self.store.checkpoint_wal()
            await self.puller.stop()
            await self.verdicts.stop()
            await self.dlq.stop()

    def stop(self) -> None:
        self._stopping.set()

    async def _every(self, seconds: float, fn: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            await fn()

    async def _refresh_labels(self) -> None:
        """New labels into the label state (one query; at most 20,000 labels a call, so a
        large import is taken in over a few calls rather than in one long stall)."""
        added = self.labels.refresh(limit=20_000)
        if added:
            log.info("labels.loaded", txn_id=None, added=added, total=self.labels.state.count)

    async def _check_model(self) -> None:
        """Hot swap: when the production pointer names another model, load it off the event
        loop and switch between two batches. ``_score`` is synchronous, so every batch is
        scored by exactly one model, and every verdict names it."""
        if self.registry is None:  # only started with a registry (see run)
            return
        loop = asyncio.get_running_loop()
        try:
            shadow = await loop.run_in_executor(None, self.registry.shadow)
            if shadow is None:
                self.shadow = None
            elif self.shadow is None or self.shadow.version != shadow:
                self.shadow = await loop.run_in_executor(None, self.registry.load, shadow)
                log.info("model.shadowing", txn_id=None, version=shadow)
            version = await loop.run_in_executor(None, self.registry.production)
            if version == self.model.version:
                return
            model = await loop.run_in_executor(None, self.registry.load, version)
            self._paths[version] = await loop.run_in_executor(None, ForestPaths.of, model)
        except BranchguardError as exc:
            log.error("model.swap_failed", txn_id=None, error=str(exc),
                      serving=self.model.version)
            return
        previous, self.model = self.model.version, model
        log.info("model.swapped", txn_id=None, previous=previous, version=version,
                 after_stream_seq=self.last_seq)

    async def _checkpoint_wal(self, every: float = 1.0) -> None:
        """Keep the WAL short from a thread of its own, off the scoring path."""
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-checkpoint") as pool:
            while True:
                await asyncio.sleep(every)
                await loop.run_in_executor(pool, self.store.checkpoint_wal)

    async def process(self, batch: list[Delivery]) -> None:
        """Run one batch through every stage (see the module docstring).

        Stages 1-5 run here while the previous batch is still being committed by the writer
        thread (SQLite releases the GIL while it writes); at most one batch is in flight, and
        commits happen in stream order.
        """
        settings = self.settings
        accepted: list[tuple[Delivery, Transaction]] = []
        dead: list[DeadLetter] = []
        dlq_failed = self.dlq.failed
        for d in batch:
            parsed = parse(d.subject, d.data)
            if isinstance(parsed, Malformed):
                await self._reject(d, parsed.reason, dead)
            else:
                accepted.append((d, parsed))

        in_flight = self._in_flight
        known = self.store.verdicts_for(
            [tx.transaction_id for _, tx in accepted if tx.transaction_id not in in_flight])
        fresh: list[tuple[Delivery, Transaction]] = []
        resent: list[tuple[Delivery, Transaction]] = []
        for d, tx in accepted:
            tid = tx.transaction_id
            if tid in known or tid in in_flight:
                resent.append((d, tx))
                verdict = in_flight.get(tid)
                if verdict is not None:  # scored in an earlier batch, not yet committed
                    known[tid] = verdict
            else:
                in_flight[tid] = None  # claimed; its verdict follows below
                fresh.append((d, tx))

        try:
            scored = self._score(fresh)
        except Exception:
            scored = await self._score_one_by_one(fresh, dead)
        for s in scored:
            in_flight[s.tx.transaction_id] = s.verdict
        if dead and not await self.dlq.confirmed((self.dlq.sent, dlq_failed), timeout=5.0):
            raise RuntimeError("dead-letter stream did not confirm the batch's rejects")

        await self._settle()  # the previous batch is committed and published
        self.last_seq = batch[-1].stream_seq
        loop = asyncio.get_running_loop()
        if len(batch) >= WRITER_THREAD_MIN_BATCH:
            commit = loop.run_in_executor(self.writer, self.store.save_batch, scored, dead,
                                          settings.consumer, batch[-1].stream_seq)
        else:  # a small batch commits faster than a thread hand-off would take
            commit = loop.create_future()
            commit.set_result(self.store.save_batch(scored, dead, settings.consumer,
                                                    batch[-1].stream_seq))
        self._committing = asyncio.ensure_future(
            self._after_commit(commit, batch, scored, resent, known, len(dead)))

    def _score(self, fresh: list[tuple[Delivery, Transaction]]) -> list[Scored]:
        """Stages 3-5: features in order, model risk for all at once, rules and verdict."""
        observe = self.state.observe
        features = [observe(tx) for _, tx in fresh]
        model = self.model
        rows = features
        if model.uses_labels:
            known = self.labels.state.features
            rows = [f + known(tx.account_id, tx.terminal_id, tx.timestamp.timestamp())
                    for f, (_, tx) in zip(features, fresh)]
        risks = model.risks(feature_matrix(rows)) if features else ()
        version, settings = model.version, self.settings
        self.lists.refresh_if_due()
        listed, now = self.lists.apply, time.time()
        scored = [Scored(tx, branch_of(d.subject), d.stream_seq, f, FEATURES_VERSION,
                         listed(tx, judge(tx, f, float(r), version, RULES_VERSION, settings),
                                now))
                  for (d, tx), f, r in zip(fresh, features, risks)]
        alerted = [i for i, s in enumerate(scored) if s.verdict.decision != "approve"]
        if alerted:
            self._explain(model, scored, alerted, rows)
        if self.shadow is not None and scored:
            self._shadow(self.shadow, scored, rows)
        return scored

    def _shadow(self, shadow: Model, scored: list[Scored], rows: list[tuple[float, ...]]
                ) -> None:
        """The shadow model's verdicts for the same batch (one more ONNX call): kept with the
        rows for ``evaluate --compare``, never published, never alerted."""
        if shadow.uses_labels and len(rows[0]) == len(FEATURES):
            known = self.labels.state.features
            rows = [f + known(s.tx.account_id, s.tx.terminal_id, s.tx.timestamp.timestamp())
                    for f, s in zip(rows, scored)]
        risks = shadow.risks(feature_matrix(rows))
        version, settings = shadow.version, self.settings
        for s, r in zip(scored, risks):
            v = judge(s.tx, s.features, float(r), version, RULES_VERSION, settings)
            s.shadow = (version, v.model_risk, v.risk, v.decision)

    def _explain(self, model: Model, scored: list[Scored], alerted: list[int],
                 rows: list[tuple[float, ...]]) -> None:
        """Explanations for the alerts of a batch only (see explain.py)."""
        if model.version not in self._paths:  # read once per model, from its ONNX graph
            self._paths[model.version] = ForestPaths.of(model)
        paths = self._paths[model.version]
        known = self.labels.state.features
        picked = []
        for i in alerted:
            row, tx = rows[i], scored[i].tx
            if len(row) == len(FEATURES):
                row = row + known(tx.account_id, tx.terminal_id, tx.timestamp.timestamp())
            picked.append(row)
        explained = explain(model, paths, [scored[i].tx for i in alerted],
                            feature_matrix(picked), [scored[i].verdict for i in alerted])
        for i, e in zip(alerted, explained):
            scored[i].explanation = _encode(e).decode()

    async def _score_one_by_one(self, fresh: list[tuple[Delivery, Transaction]],
                                dead: list[DeadLetter]) -> list[Scored]:
        """After scoring a batch raised: score each transaction alone and dead-letter the
        ones that fail, so one poisonous transaction can never stop the node or come back
        forever. The feature state is rebuilt from the database (plus this batch's good
        transactions) after every failure, since the failure may have left it half-updated."""
        log.error("batch.scoring_failed", exc_info=True, txn_id=None,
                  first_seq=fresh[0][0].stream_seq if fresh else None)
        await self._settle()  # the database now holds everything before this batch
        self.state = feature_state(self.store.reader)
        good: list[Transaction] = []
        scored: list[Scored] = []
        for d, tx in fresh:
            try:
                scored.extend(self._score([(d, tx)]))
            except Exception as exc:
                self.state = feature_state(self.store.reader)
                for earlier in good:
                    self.state.observe(earlier)
                self._in_flight.pop(tx.transaction_id, None)
                await self._reject(d, f"scoring failed: {type(exc).__name__}: {exc}", dead)
            else:
                good.append(tx)
        return scored

    async def _reject(self, d: Delivery, reason: str, dead: list[DeadLetter]) -> None:
        """Dead-letter one message: to TX_DLQ now, to the database with the batch."""
        dead.append(DeadLetter(d.stream_seq, d.subject, reason, len(d.data), d.data))
        await self.dlq.publish(DLQ_SUBJECT, d.data, f"dlq-{d.stream_seq}",
                               dlq_headers(reason, d))
        log.warning("tx.dead_lettered", txn_id=None, stream_seq=d.stream_seq,
                    subject=d.subject, reason=reason)

    async def _settle(self) -> None:
        """Wait for the batch in flight (if any); re-raise what stopped it."""
        if self._committing is not None:
            committing, self._committing = self._committing, None
            await committing

    async def _after_commit(self, commit: asyncio.Future[int], batch: list[Delivery],
                            scored: list[Scored], resent: list[tuple[Delivery, Transaction]],
                            known: dict[str, Verdict], dead: int) -> None:
        """Stages 7-8 once the batch is durable: verdicts out, then acks when confirmed."""
        alerts = await commit
        in_flight = self._in_flight
        outgoing = [(s.branch, s.tx.terminal_id, s.verdict) for s in scored]
        for d, tx in resent:  # a re-send gets the verdict of the transaction it repeats
            tid = tx.transaction_id
            verdict = known.get(tid) or in_flight.get(tid)
            if verdict is not None:
                outgoing.append((branch_of(d.subject), tx.terminal_id, verdict))
            log.info("tx.duplicate", txn_id=tid, stream_seq=d.stream_seq)
        for s in scored:
            in_flight.pop(s.tx.transaction_id, None)  # committed: the database knows it now
        verdicts_failed = self.verdicts.failed
        await self._publish_verdicts(outgoing)
        mark = (self.verdicts.sent, verdicts_failed)

        now_ns = time.time_ns()
        c = self.counters
        c.transactions += len(scored)
        c.alerts += alerts
        c.dead_letters += dead
        c.duplicates += len(resent)
        c.batches += 1
        c.latencies_ms.extend((now_ns - d.stored_ns) / 1e6 for d in batch)
        if len(c.latencies_ms) > 200000:
            del c.latencies_ms[:100000]

        task = asyncio.create_task(self._ack_when_confirmed(batch, mark))
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _publish_verdicts(self, outgoing: list[tuple[str, str, Verdict]]) -> None:
        """Publish (branch, terminal, verdict) triples; only the last asks for an ack, which
        confirms the ones before it (see Publisher)."""
        publish = self.verdicts.publish
        last = len(outgoing) - 1
        for i, (branch, terminal_id, verdict) in enumerate(outgoing):
            await publish(f"verdict.{branch}.{terminal_id}", _encode(verdict),
                          verdict.transaction_id, confirm=i == last)

    async def _ack_when_confirmed(self, batch: list[Delivery], mark: tuple[int, int]) -> None:
        if not await self.verdicts.confirmed(mark, timeout=self.settings.ack_wait_seconds / 2):
            # Left unacked: JetStream redelivers, the batch is recognised as stored, and its
            # verdicts are published again.
            log.warning("verdicts.unconfirmed", txn_id=None, first_seq=batch[0].stream_seq)
            return
        await ack_batch(self.nc, batch)


