"""The scorer: the only code that knows the order of the stages.

For each batch pulled from the TX stream, in stream order, on the event loop:

1. parse each message against the contract; a bad one becomes a dead letter (published to
   ``TX_DLQ`` with its reason, and confirmed, before its batch is committed);
2. re-sends: an id already stored (or scored earlier and not yet committed) is not scored
   again; an identical re-send gets the verdict of record again, a different body under
   the same id is dead-lettered as a conflicting re-send;
3. features, from state before each transaction; 4. model risk for the whole batch at once;
5. rules and verdict (or, for a transaction replayed after a crash whose verdict was already
   published, that verdict: see :meth:`Scorer.prepare`);
6. verdicts published to ``VERDICTS`` at once, each confirmed by its own ack;
7. the batch handed to the writer thread (commit.py), which commits groups of batches in
   stream order while the loop goes on;
8. acks, strictly in stream order, once the batch is committed *and* every one of its
   verdicts is confirmed (a refused or lost one is published again first).

The disk is never on the verdict's path: a Litestream checkpoint holding the write lock for
half a second delays acks, not verdicts. A crash anywhere loses nothing: what is not
committed is replayed from the checkpoint, feature state is rebuilt from the committed rows,
and a replayed transaction whose verdict was published before the crash gets that verdict
again, whatever changed in between (model, lists, labels, retention).

Explanations are not made here: the case file computes them from the stored features and
the model version when someone asks (casework/casefile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import sqlite3
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from sqlite_utils import Database

from .. import logs
from ..errors import BranchguardError, FencedError
from ..lease import Lease
from ..settings import Settings
from ..store import DeadLetter, Scored, Store
from ..transaction import Admission, Malformed, Transaction, branch_of, digest
from ..verdict import Verdict
from .batch import Deciders, score_batch
from .budget import Budget
from .budget import rebuild as budget_from_rows
from .commit import GroupCommit
from .features import FEATURES, FeatureState, feature_state
from .ingest import (Delivery, Outgoing, Publisher, Puller, Ticket, ack_batch, dlq_headers,
                     in_progress)
from .streams import (API_TIMEOUT_SECONDS, DLQ_SUBJECT, TX_STREAM, ensure_streams,
                      published_verdicts, reset_consumer)
from .terminal_feed import TerminalFeed
from .labels import LabelFeed
from .lists import ListFilter
from .model import Model, feature_matrix
from .registry import Registry
from .score import judge
from .typologies import Typologies

log = logs.get("appliance.pipeline")
MAX_BATCHES_IN_FLIGHT = 2048
"""Batches published but not yet acked; past this the loop waits (a stalled disk or server).
At 2,000 tx/s batches are a few messages each, and the writer gathers for 100 ms before
each commit (commit.py): a Litestream checkpoint holding the write lock for a few hundred ms
must not reach this and hold verdicts back. The consumer's ``MAX_ACK_PENDING`` bounds the
messages behind it in any case."""
CONFIRM_TIMEOUT = 5.0
"""Seconds to wait for a message's JetStream ack before publishing it again."""
_encode = msgspec.json.Encoder().encode
_decode_verdict = msgspec.json.Decoder(Verdict).decode


@dataclass
class Counters:
    """Running totals since start, read by the summary line and the benchmark."""

    transactions: int = 0
    alerts: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    conflicts: int = 0
    """Re-used transaction ids with another body (dead-lettered, counted in dead_letters)."""
    adopted: int = 0
    """Replayed transactions given the verdict already published before a crash."""
    terminal_disagreements: int = 0
    """Fresh transactions the terminal stage did not observe (scored on local windows)."""
    batches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    """Stream-stored to verdict-published latency of recent transactions (cleared by readers)."""


@dataclass(slots=True)
class InFlight:
    """A batch whose verdicts are out, waiting for its commit and confirmations to be acked."""

    deliveries: list[Delivery]
    verdicts: Ticket
    committed: asyncio.Future[int]
    floor: int
    """The VERDICTS sequence before this batch's verdicts: none of them is at or below it."""
    fresh: list[str]
    """Ids scored in this batch (claimed in ``Scorer._in_flight`` until committed)."""
    resent: int

    @property
    def last_seq(self) -> int:
        return self.deliveries[-1].stream_seq


class Scorer:
    """Consumes TX, scores, publishes verdicts and stores until :meth:`stop` is called."""

    def __init__(self, nc: Client, store: Store, model: Model, settings: Settings,
                 registry: Registry | None = None, owned: frozenset[int] | None = None,
                 lease: Lease | None = None, reference: Store | None = None,
                 terminal_feed: TerminalFeed | None = None) -> None:
        """``owned`` and ``lease``: a partition's scorer (issue 19, operations/partitioned.py)
        consumes only the partitions ``owned``, under ``lease``, which fences everything it
        writes: its verdicts and dead letters are published, its commits written and its
        acks sent only while the lease is held, each commit carries the lease's token (the
        store refuses an older one), and its consumer is named after the token, so a late
        ack from a lost tenure reaches no consumer. ``reference``: the node's database, where
        people keep what the scorer looks up (the allow and deny lists, the labels, the
        terminal directory), when ``store`` is a partition's own (default: ``store``).
        ``terminal_feed``: the terminal stage's windows for this partition (terminal_feed.py),
        so the terminal features are the whole stream's, not the partition's."""
        self.nc = nc
        self.js = nc.jetstream(timeout=API_TIMEOUT_SECONDS)  # every call retried: streams.py
        self.store = store
        self.model = model
        self.settings = settings
        self.admission = Admission.of(settings)  # issue 17: event-time window, currencies
        self.counters = Counters()
        self.state = FeatureState()
        self.owned = owned
        self.lease = lease
        self.durable = (settings.consumer if lease is None
                        else f"{settings.consumer}-{lease.token}")
        """The JetStream consumer's name; the checkpoint's stays ``settings.consumer``."""
        self.puller = Puller(nc, settings, durable=self.durable)
        self.verdicts = Publisher(nc)
        self.dlq = Publisher(nc, max_in_flight=1000)
        self.writer = GroupCommit(store, settings.consumer,
                                  restart_wal_every=None if settings.replicate else 1.0,
                                  lease=lease, busy_rows=max(1, settings.batch_size // 2))
        self._stopping = asyncio.Event()
        self._pending: deque[InFlight] = deque()
        self._progress = asyncio.Event()
        self._acker: asyncio.Task[None] | None = None
        self._in_flight: dict[str, tuple[Verdict, bytes] | None] = {}
        """Transactions scored but not yet committed: re-sends of them are duplicates too."""
        self._adopted: dict[str, bytes] = {}
        """Verdicts published before a crash for transactions not committed (see prepare)."""
        self.confirmed_upto = 0
        """TX stream sequence up to which every batch is committed, confirmed and acked."""
        self.ready = asyncio.Event()
        looked_up = (reference or store).reader.conn
        self.lists = ListFilter(looked_up, settings.lists_refresh_seconds)
        """Allow/deny lists in memory (issue 4), re-read every lists_refresh_seconds."""
        self.registry = registry
        """When given, the production pointer is watched and a new model swapped in."""
        self.labels = LabelFeed(looked_up)
        self.last_seq = 0
        """Stream sequence of the last batch scored (the hot-swap point)."""
        self.shadow: Model | None = None
        """The registry's shadow model: scores the same batches, stored, never acted on."""
        self.budget: Budget | None = None
        """The alert budget (issue 18): rebuilt from the stored rows at start (budget.py)."""
        self.rules = Typologies(looked_up, settings)
        """Typology rules (issue 18): the rules file in force, re-read when it changes."""
        self.terminal_feed = terminal_feed
        """A partition's scorer: every terminal's windows, from the terminal stage."""

    async def prepare(self) -> None:
        """Streams, state from the database, verdicts of record, consumer from the checkpoint.

        Two things a crash can leave, both bounded by what the checkpoint records:
        - verdicts published for transactions that were never committed: read back from
          ``VERDICTS`` (from ``verdict_seq``) and adopted when those transactions are
          replayed, so they keep the verdict already published;
        - committed transactions whose verdicts may never have reached ``VERDICTS`` (those
          after ``confirmed_seq``): published again unless ``VERDICTS`` holds them. The
          consumer's ack floor plays no part, so a new NATS store or a restored database
          does not re-publish every stored verdict.
        """
        if self.lease is None:  # a partition's process ensured them once, when it started
            await ensure_streams(self.js, self.settings)
        started = time.monotonic()
        if self.lease is not None:  # before any state is read: see Store.claim
            await self._fence("claim the partition")
            await asyncio.get_running_loop().run_in_executor(
                None, self.store.claim, self.settings.consumer, self.lease.token)
        budget = (asyncio.get_running_loop().run_in_executor(  # beside the state: SQLite
            None, budget_from_rows, self.store.path, self.settings)  # works off the GIL
            if self.settings.alert_budget else None)
        # Off the event loop: beside a partition's scorer run other partitions' and the
        # leases' renewals (operations/partitioned.py), which must not wait seconds for it.
        self.state = await asyncio.get_running_loop().run_in_executor(None, self._rebuild)
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)

        if budget is not None:
            self.budget = await budget
        marks = self.store.checkpoint_marks(self.settings.consumer)
        self.last_seq = self.confirmed_upto = marks.stream_seq
        while self.labels.refresh():
            pass
        published = await published_verdicts(self.js, marks.verdict_seq)
        stored = self.store.verdicts_for(published)
        self._adopted = {tid: data for tid, data in published.items() if tid not in stored}
        log.info("state.rebuilt", accounts=len(self.state.accounts),
                 terminals=len(self.state.terminals), checkpoint=marks.stream_seq,
                 labels=self.labels.state.count, adoptable=len(self._adopted),
                 seconds=round(time.monotonic() - started, 3))
        await self._fence("re-create the consumer")
        await reset_consumer(self.js, self.settings, marks.stream_seq, self.owned, self.durable)
        if self.lease is not None:  # from now on, a lapse of the lease need not end us
            self.lease.witness = self._consumer_intact
        await self.verdicts.start()
        await self.dlq.start()
        self.writer.start()
        if marks.confirmed_seq < marks.stream_seq:
            again = [Outgoing(f"verdict.{branch}.{terminal}", _encode(v), v.transaction_id)
                     for branch, terminal, v in self.store.verdicts_between(
                         marks.confirmed_seq, marks.stream_seq)
                     if v.transaction_id not in published]
            await self._fence("publish verdicts again")
            ok = await self.verdicts.confirm(again, CONFIRM_TIMEOUT, self._stopping.is_set)
            log.info("verdicts.republished", txn_id=None, count=len(again), confirmed=ok,
                     after_seq=marks.confirmed_seq, upto_seq=marks.stream_seq)
        await self.puller.start()
        self._acker = asyncio.create_task(self._ack_in_order())
        self.ready.set()

    async def run(self) -> None:
        """Score until stopped; then finish the batches in hand and wait for their acks.

        Crash-only: an unexpected error ends ``run`` with that error and the node exits; at
        the next start the consumer replays from the checkpoint, in order, exactly as after a
        power cut. Nothing half-done is ever committed.
        """
        await self.prepare()
        # With Litestream, PASSIVE checkpoints from a thread of their own keep its WAL short
        # (docs/operations.md); without it the writer thread checkpoints and restarts the
        # WAL itself (commit.py), and nothing else needs to.
        checkpoints = (asyncio.create_task(self._checkpoint_wal()) if self.settings.replicate
                       else None)
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
                if self._acker is not None and self._acker.done():
                    self._acker.result()  # re-raise what stopped it (a failed commit)
            if self.nc.is_connected:  # what has arrived is scored; nothing more is asked for
                await asyncio.wait_for(self.puller.stop(), 2.0)
                while batch := self.puller.in_hand():
                    await self.process(batch)
            self._progress.set()
            if self._acker is not None:
                await self._acker
        finally:
            if checkpoints is not None:
                checkpoints.cancel()
            for watcher in watchers:
                watcher.cancel()
            if self._acker is not None and not self._acker.done():
                self._acker.cancel()
            # the last word on what is published, so a clean restart re-publishes nothing
            self.writer.submit([], [], self.last_seq, self._pending[0].floor if self._pending
                               else self.verdicts.last_seq, self.confirmed_upto)
            await self.writer.stop()
            self.store.checkpoint_wal()
            parts: list[Puller | Publisher | TerminalFeed] = [self.puller, self.verdicts,
                                                              self.dlq]
            if self.terminal_feed is not None:
                parts.append(self.terminal_feed)
            for part in parts:  # NATS may be away: bounded
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(part.stop(), 2.0)

    def stop(self) -> None:
        self._stopping.set()
        self._progress.set()

    async def resume_pulls(self) -> None:
        """After a reconnect, ask for deliveries again without starting over (a partition's
        scorer, operations/partitioned.py): see :meth:`Puller.resume`."""
        await self.puller.resume()

    def _rebuild(self) -> FeatureState:
        """Feature state and typology trails from the committed rows. The state is large and
        long-lived and holds no reference cycles: it is built with the cyclic collector off,
        then moved out of its sight (``gc.freeze`` in :meth:`prepare`), and young objects
        are collected less often (the hot path allocates a lot but creates no cycles)."""
        gc.disable()
        try:
            state = feature_state(self.store.reader)
            self.rules.rebuild(self.store.reader.conn, state)
        finally:
            gc.enable()
        return state

    async def _fence(self, what: str) -> None:
        """Raise FencedError unless this scorer is unleased or its lease is held; while the
        lease has lapsed (no answer from the bucket, an election), wait for it to be held
        again (lease.py)."""
        lease = self.lease
        if lease is not None and not await lease.wait_held(self._stopping.is_set):
            raise FencedError(f"lost the partition's lease; will not {what}", field="lease",
                              value=lease.key, hint=lease.lost_reason or "ran out")

    async def _consumer_intact(self) -> bool:
        """The lease's witness: this tenure's consumer still exists. Every later tenure
        deletes it before it reads anything (streams.reset_consumer), so while it exists,
        nobody else has scored, committed or acked in this partition since we last did."""
        try:
            await self.js.consumer_info(TX_STREAM, self.durable, timeout=API_TIMEOUT_SECONDS)
        except NotFoundError:
            return False
        return True

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
        """Run one batch through every stage (see the module docstring). Returns once its
        verdicts are published; its commit and ack follow on their own."""
        while len(self._pending) >= MAX_BATCHES_IN_FLIGHT:
            self._progress.clear()
            await self._progress.wait()
            if self._acker is not None and self._acker.done():
                self._acker.result()
        dead: list[DeadLetter] = []
        rejects: list[Outgoing] = []
        accepted: list[tuple[Delivery, Transaction]] = []
        for d in batch:
            parsed = self.admission.parse(d.subject, d.data, d.stored_ns / 1e9)
            if isinstance(parsed, Malformed):
                self._reject(d, parsed.reason, dead, rejects)
            else:
                accepted.append((d, parsed))

        in_flight = self._in_flight
        known = self.store.stored_for(
            [tx.transaction_id for _, tx in accepted if tx.transaction_id not in in_flight])
        fresh: list[tuple[Delivery, Transaction]] = []
        digests: list[bytes] = []
        repeats: list[tuple[Delivery, Transaction]] = []
        for d, tx in accepted:
            tid = tx.transaction_id
            if tid in in_flight or tid in known:
                repeats.append((d, tx))  # answered once this batch's own are scored
                earlier = in_flight.get(tid)
                if earlier is not None:  # kept: its batch may commit (and leave in_flight)
                    known[tid] = earlier  # while this one waits for the terminal stage
            else:
                in_flight[tid] = None  # claimed: a second copy in this batch is a repeat
                fresh.append((d, tx))
                digests.append(digest(tx))

        terminals = await self._terminal_windows(fresh) if self.terminal_feed else None
        try:
            scored = self._score(fresh, digests, terminals)
        except Exception:
            scored = await self._score_one_by_one(fresh, digests, batch, dead, rejects,
                                                  terminals)
        if self.terminal_feed is not None:
            self.terminal_feed.forget_through(batch[-1].stream_seq)
        for s in scored:
            in_flight[s.tx.transaction_id] = (s.verdict, s.digest or b"")
        outgoing = [Outgoing(f"verdict.{s.branch}.{s.tx.terminal_id}", _encode(s.verdict),
                             s.tx.transaction_id) for s in scored]
        resent = 0
        for d, tx in repeats:
            tid = tx.transaction_id
            before = in_flight.get(tid) or known.get(tid)
            if before is None:  # its first copy, in this batch, was dead-lettered
                self._reject(d, f"re-send of transaction {tid}, whose first copy was "
                                "dead-lettered", dead, rejects)
                continue
            verdict, first = before
            received = digest(tx)
            if first and first != received:
                self.counters.conflicts += 1
                self._reject(d, f"conflicting re-send: transaction {tid} is stored with body "
                                f"digest {first.hex()}, this one has {received.hex()}",
                             dead, rejects)
                log.warning("tx.conflicting_resend", txn_id=tid, stream_seq=d.stream_seq,
                            stored_digest=first.hex(), received_digest=received.hex())
                continue
            resent += 1
            log.info("tx.duplicate", txn_id=tid, stream_seq=d.stream_seq)
            outgoing.append(Outgoing(f"verdict.{branch_of(d.subject)}.{tx.terminal_id}",
                                     _encode(verdict), tid))

        floor = self.verdicts.last_seq
        await self._fence("publish verdicts")
        ticket = await self.verdicts.publish_many(outgoing)
        now_ns = time.time_ns()
        c = self.counters
        c.latencies_ms.extend((now_ns - d.stored_ns) / 1e6 for d in batch)
        if len(c.latencies_ms) > 200000:
            del c.latencies_ms[:100000]
        if rejects:  # a dead letter is in TX_DLQ before its row says so
            await self._fence("publish dead letters")
            if not await self.dlq.confirm(rejects, CONFIRM_TIMEOUT, self._stopping.is_set):
                raise RuntimeError("dead-letter stream did not confirm the batch's rejects")

        self.last_seq = batch[-1].stream_seq
        verdict_seq = self._pending[0].floor if self._pending else floor
        committed = self.writer.submit(scored, dead, self.last_seq, verdict_seq,
                                       self.confirmed_upto)
        self._pending.append(InFlight(batch, ticket, committed, floor,
                                      [s.tx.transaction_id for s in scored], resent))
        c.transactions += len(scored)
        c.dead_letters += len(dead)
        c.duplicates += resent
        c.batches += 1
        self._progress.set()

    async def _ack_in_order(self) -> None:
        """Ack batches strictly in stream order, each once it is committed and every one of
        its verdicts is confirmed (see :meth:`Publisher.confirm`). Acking a later batch acks
        every earlier message too (ack policy ``all``), so none is ever acked over a gap."""
        pending, in_flight = self._pending, self._in_flight
        while True:
            while not pending:
                if self._stopping.is_set():
                    return
                self._progress.clear()
                await self._progress.wait()
            b = pending[0]
            self.counters.alerts += await b.committed
            for tid in b.fresh:  # committed: the database answers re-sends now
                in_flight.pop(tid, None)
            if not await self.verdicts.confirm(b.verdicts.items, CONFIRM_TIMEOUT,
                                               self._stopping.is_set, ticket=b.verdicts):
                log.warning("verdicts.unconfirmed_at_stop", txn_id=None,
                            first_seq=b.deliveries[0].stream_seq)
                return  # stopping with the server away: the next start re-publishes
            await self._fence("ack")
            await ack_batch(self.nc, b.deliveries)
            pending.popleft()
            self.confirmed_upto = b.last_seq
            self._progress.set()

    async def _terminal_windows(self, fresh: list[tuple[Delivery, Transaction]]
                                ) -> list[list[int] | None]:
        """The terminal stage's windows for ``fresh``; one the stage did not observe (it
        decided otherwise: a disagreement, logged and counted) is left to the local state."""
        feed = self.terminal_feed
        if feed is None or not fresh:
            return []
        if not feed.started:
            await feed.start(self.last_seq)  # the checkpoint, before the first batch
        windows = await feed.windows_for([d.stream_seq for d, _ in fresh])
        for (d, tx), w in zip(fresh, windows):
            if w is None:
                self.counters.terminal_disagreements += 1
                log.warning("terminal.disagree", txn_id=tx.transaction_id,
                            stream_seq=d.stream_seq, terminal_id=tx.terminal_id)
        return windows

    def _score(self, fresh: list[tuple[Delivery, Transaction]], digests: list[bytes],
               terminals: list[list[int] | None] | None = None) -> list[Scored]:
        """Stages 3-5 (batch.py): features in order, model risk for all at once, rules,
        budget, lists and verdict; then verdicts of record adopted, and the shadow model."""
        deciders = Deciders(self.state, self.model, self.settings, self.budget, self.lists,
                            self.rules,
                            self.labels.state.features if self.model.uses_labels else None)
        scored, rows = score_batch([(tx, branch_of(d.subject), d.stream_seq, h)
                                    for (d, tx), h in zip(fresh, digests)], deciders,
                                   terminals)
        if self._adopted:
            self._adopt(scored)
        if self.shadow is not None and scored:
            self._shadow(self.shadow, scored, rows)
        return scored

    def _adopt(self, scored: list[Scored]) -> None:
        """A replayed transaction whose verdict was published before a crash keeps it."""
        adopted = self._adopted
        for s in scored:
            data = adopted.pop(s.tx.transaction_id, None)
            if data is not None:
                verdict = _decode_verdict(data)
                if verdict != s.verdict:
                    log.info("verdict.adopted", txn_id=s.tx.transaction_id,
                             published=verdict.decision, rescored=s.verdict.decision)
                s.verdict = verdict
                self.counters.adopted += 1

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
            v = judge(s.tx, s.features, float(r), version, s.verdict.rules_version, settings)
            s.shadow = (version, v.model_risk, v.risk, v.decision)

    async def _score_one_by_one(self, fresh: list[tuple[Delivery, Transaction]],
                                digests: list[bytes], batch: list[Delivery],
                                dead: list[DeadLetter], rejects: list[Outgoing],
                                terminals: list[list[int] | None] | None = None
                                ) -> list[Scored]:
        """After scoring a batch raised: score each transaction alone and dead-letter the
        ones that fail, so one poisonous transaction can never stop the node or come back
        forever.

        The failure may have left the feature state half-updated, so it is rebuilt from the
        database once, off the event loop, after the batches before this one are committed
        (their acks keep flowing; this batch's deliveries are kept alive with +WPI). Then
        each transaction's account and terminal state is copied before it is scored and put
        back if it fails: a failing transaction leaves no trace in the state, exactly as if
        it had been rejected on arrival.
        """
        log.error("batch.scoring_failed", exc_info=True, txn_id=None,
                  first_seq=fresh[0][0].stream_seq if fresh else None)
        for b in list(self._pending):
            await b.committed
        loop = asyncio.get_running_loop()
        rebuild = loop.run_in_executor(None, _rebuild_state, str(self.store.path))
        while not rebuild.done():
            await in_progress(self.nc, batch)
            await asyncio.wait([rebuild], timeout=max(1.0, self.settings.ack_wait_seconds / 3))
        self.state = rebuild.result()
        self.rules.rebuild(self.store.reader.conn, self.state)
        if self.budget is not None:  # it may have counted part of the failed batch
            self.budget = await loop.run_in_executor(None, budget_from_rows,
                                                     self.store.path, self.settings)
        scored: list[Scored] = []
        state = self.state
        for i, ((d, tx), h) in enumerate(zip(fresh, digests)):
            account = copy.deepcopy(state.accounts.get(tx.account_id))
            terminal = copy.deepcopy(state.terminals.get(tx.terminal_id))
            try:
                scored.extend(self._score([(d, tx)], [h],
                                          None if terminals is None else terminals[i:i + 1]))
            except Exception as exc:
                if account is None:
                    state.accounts.pop(tx.account_id, None)
                else:
                    state.accounts[tx.account_id] = account
                if terminal is None:
                    state.terminals.pop(tx.terminal_id, None)
                else:
                    state.terminals[tx.terminal_id] = terminal
                self._in_flight.pop(tx.transaction_id, None)
                self._reject(d, f"scoring failed: {type(exc).__name__}: {exc}", dead, rejects)
        return scored

    def _reject(self, d: Delivery, reason: str, dead: list[DeadLetter],
                rejects: list[Outgoing]) -> None:
        """Dead-letter one message: to TX_DLQ (confirmed before the commit), to the database
        with the batch."""
        dead.append(DeadLetter(d.stream_seq, d.subject, reason, len(d.data), d.data))
        rejects.append(Outgoing(DLQ_SUBJECT, d.data, f"dlq-{d.stream_seq}",
                                dlq_headers(reason, d)))
        log.warning("tx.dead_lettered", txn_id=None, stream_seq=d.stream_seq,
                    subject=d.subject, reason=reason)


def _rebuild_state(path: str) -> FeatureState:
    """Feature state from the committed rows, on a connection of this thread's own."""
    conn = sqlite3.connect(path)
    try:
        return feature_state(Database(conn))
    finally:
        conn.close()
