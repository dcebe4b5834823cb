"""Partitioned scorers (issue 19): the partitions this process owns, one scorer each, each
held by a lease, rebalanced as scorer processes come and go.

``branchguard scorer`` runs one :class:`PartitionScorers` against a JetStream cluster whose
``TX`` stream is partitioned by account (``partitions`` N > 1, scoring/partitions.py). Any
number of such processes, on any machines, share the N partitions:

- **Members.** Each process holds a lease on ``member.<id>`` in ``BG_LEASES`` for as long as it
  runs; the live members' count sets each one's fair share, ``ceil(N / members)``.
- **Ownership.** A partition is scored only by the holder of its lease (``partition.<p>``,
  lease.py). Every ``lease_renew_seconds`` a process takes free partitions up to its share,
  starting from a place of its own in the ring so that joiners do not all reach for the
  same ones; above its share (a scorer has joined) it hands one off: its scorer stops
  cleanly (what it holds is scored, committed and acked) and the lease is released, so the
  next owner takes it at once, with no TTL to wait. A SIGKILLed owner's partitions come free
  when its leases run out (``lease_ttl_seconds``).
- **A partition's unit of state** is its own database (``<data_dir>/partitions/p<p>/``), its
  checkpoint there (consumer ``scorer-p<p>``) and its JetStream consumer, named after the
  lease's token (``scorer-p<p>-<token>``). A new owner opens it exactly as a node restarts
  (pipeline.Scorer.prepare): state rebuilt from the rows, the consumer re-created from the
  checkpoint, verdicts of record adopted, unconfirmed verdicts published again.
- **Fencing.** The lease fences everything the partition's scorer writes (see
  pipeline.Scorer): publishes, commits (carrying the token, which the store compares with
  the last one written) and acks (into its own tenure's consumer only). A scorer stopped
  past its lease's TTL (SIGSTOP, a long pause) finds it lost when it wakes and writes
  nothing more.

Renewal never waits behind recovery: each lease renews in its own task, and opening a
partition rebuilds its state on a worker thread (pipeline.Scorer.prepare). After a
reconnect a partition's scorer asks for deliveries again (ingest.Puller.resume); when a
delivery went missing (ingest.DeliveryGap) it starts afresh under the same lease, its
consumer re-created from the checkpoint, so nothing is ever acked unseen.

**Elections.** When a server dies, ``BG_LEASES`` may have no leader for longer than the
TTL. Nobody can take a lease then, so a lease that gets no answer *lapses* rather than ends
(lease.py): its partition's scorer writes nothing and waits, keeping its state and its
consumer, and when the bucket answers again it carries on, under a new token if the entry
expired meanwhile, provided its consumer still exists (the witness: every later tenure
deletes it first). A process back from a lapse takes no free partition for one TTL, so the
others back from the same lapse reclaim theirs first.

What is shared, not partitioned: the node's database (``<data_dir>/branchguard.db``) holds
what people keep for the scorer to look up (lists, labels, the terminal directory) and is
read by every partition's scorer; the alert budget is split evenly, ``alert_budget_per_day /
N`` per partition. Terminal features cut across account partitions: each partition's scorer
joins the terminal stage's windows (scoring/terminal_stage.py, terminal_feed.py), which one
of the scorer processes runs under its own lease (:func:`stand_by_for_terminal_stage`), so
every feature is the one a single scorer computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.errors import Error as NatsError

from .. import logs
from ..errors import FencedError, NodeError, SettingsError
from ..lease import Lease, Leases, nothing_to_witness, partition_key
from ..nats_auth import client_options
from ..scoring.ingest import DeliveryGap, connect
from ..scoring.model import Model
from ..scoring.pipeline import Counters, Scorer
from ..scoring.registry import Registry
from ..scoring.rulebook import rules_path
from ..scoring.streams import API_TIMEOUT_SECONDS, ensure_streams
from ..scoring.terminal_feed import TerminalFeed
from ..scoring.terminal_stage import serve as serve_terminal_stage
from ..settings import Settings
from ..store import Store
from .case_flows import scoring_side
from .gather import gather_forever
from .partition_state import Writers, partition_replica, restore_if_behind, store_id
from .replication import Litestream
from .runner import close

log = logs.get("appliance.partitioned")

MEMBER_PREFIX = "member."
HANDOFF_SECONDS = 10.0
"""How long a planned handoff lets the scorer finish what it holds before it is cancelled."""
CANCEL_SECONDS = 5.0
"""How long a cancelled scorer may take to close (its writer thread ends its commit)."""


def member_key(owner: str) -> str:
    """The lease key naming a live scorer process (owner ids hold ``:``, keys may not)."""
    return MEMBER_PREFIX + hashlib.sha256(owner.encode()).hexdigest()[:16]


def partition_settings(settings: Settings, partition: int) -> Settings:
    """The settings of one partition's scorer: its own data directory (database,
    checkpoint), its consumer, its replica (partition_state.py), its share of the alert
    budget, and the rules file the node reads (resolved from the node's data directory,
    not the partition's)."""
    return dataclasses.replace(
        settings, data_dir=settings.data_dir / "partitions" / f"p{partition}",
        consumer=f"scorer-p{partition}", rules_file=rules_path(settings),
        alert_budget_per_day=settings.alert_budget_per_day / settings.partitions,
        replica_url=partition_replica(settings, partition))


def fair_share(partitions: int, members: int) -> int:
    """How many partitions each of ``members`` live scorers should own."""
    return math.ceil(partitions / max(1, members))


@dataclass
class Owned:
    """A partition this process holds, and the scorer working it."""

    partition: int
    lease: Lease
    store: Store
    scorer: Scorer
    task: asyncio.Task[None]
    replicator: Litestream | None = None
    restart: asyncio.Event = field(default_factory=asyncio.Event)
    restart_reason: str = ""


class PartitionScorers:
    """This process's share of the partitions (see the module docstring)."""

    def __init__(self, nc: Client, settings: Settings, registry: Registry, model: Model,
                 reference: Store, reconnected: asyncio.Event | None = None) -> None:
        self.nc = nc
        self.reconnected = reconnected or asyncio.Event()
        """Set by the connection's reconnect callback: every partition starts afresh."""
        self.settings = settings
        self.registry = registry
        self.model = model
        self.reference = reference
        self.counters = Counters()
        """Totals over every partition this process has scored (the status line's)."""
        self.owned: dict[int, Owned] = {}
        self.leases: Leases | None = None
        self.writers: Writers | None = None
        self.store_id = store_id(settings.data_dir)
        self.member: Lease | None = None
        """This process's member lease: re-taken if lost (the others count it)."""
        self.members = 1
        self.ready = asyncio.Event()
        """Set once this process has joined (its member lease is held)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Join, then keep this process's share until ``stop``; then hand every partition
        off (scored, committed, acked, released) and leave."""
        s = self.settings
        js = self.nc.jetstream(timeout=max(1.0, s.lease_ttl_seconds))
        self.leases = leases = await Leases.open(js, s, replicas=s.stream_replicas)
        self.writers = await Writers.open(js, replicas=s.stream_replicas)
        self.member = await leases.wait_acquire(member_key(leases.owner),
                                                witness=nothing_to_witness)
        log.info("scorer.joined", txn_id=None, owner=leases.owner, partitions=s.partitions)
        self.ready.set()
        try:
            while not stop.is_set():
                if self.reconnected.is_set():
                    self.reconnected.clear()
                    await self.resume_all()
                try:
                    await self.balance()
                except (NatsError, asyncio.TimeoutError, OSError) as exc:
                    log.warning("partitions.balance_failed", txn_id=None,
                                error=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), s.lease_renew_seconds)
        finally:
            await asyncio.gather(*(self.hand_off(p) for p in list(self.owned)),
                                 return_exceptions=True)
            if self.member is not None:
                await self.member.release()
            log.info("scorer.left", txn_id=None, owner=leases.owner)

    async def balance(self) -> None:
        """One round: forget partitions whose scorer ended, then take or give one partition
        towards this process's fair share."""
        leases, writers = self.leases, self.writers
        if leases is None or writers is None:
            return
        for p, owned in list(self.owned.items()):
            if owned.task.done():
                await self._forget(p, owned)
        if self.member is None or self.member.lost:  # a lapse past LAPSE_SECONDS: rejoin
            self.member = await leases.acquire(member_key(leases.owner),
                                               witness=nothing_to_witness)
        if self.member is None or not self.member.held:
            return  # lapsed (an election): nobody can take anything now
        if time.monotonic() - self.member.held_since < self.settings.lease_ttl_seconds:
            return  # just joined or back from a lapse: others back from the same lapse take
            # their partitions back first (lease.py), so none looks free that is not
        live = await leases.holders(MEMBER_PREFIX)
        members = max(1, len(live))
        share = fair_share(self.settings.partitions, members)
        if members != self.members:
            log.info("partitions.share", txn_id=None, members=members, share=share,
                     owned=sorted(self.owned))
        self.members = members
        if len(self.owned) > share:
            await self.hand_off(max(self.owned))
            return
        if len(self.owned) == share:
            return
        held = await leases.holders("partition.")
        for p in self._ring(leases.owner):
            if p in self.owned or partition_key(p) in held:
                continue
            lease = await leases.acquire(partition_key(p), on_lost=self._on_lost)
            if lease is not None:
                if not await self._take_state(p, lease, writers):
                    continue
                self._open(p, lease)
                if len(self.owned) >= share:
                    return

    def _ring(self, owner: str) -> list[int]:
        """Partitions in this process's order: from a place of its own, round the ring."""
        n = self.settings.partitions
        start = int(hashlib.sha256(owner.encode()).hexdigest(), 16) % n
        return [(start + i) % n for i in range(n)]

    async def _take_state(self, p: int, lease: Lease, writers: Writers) -> bool:
        """Before opening ``p`` under a lease just taken: if another store opened it last,
        restore its database from its replica when that is ahead (partition_state.py; on a
        worker thread), then record this store as the one that opened it. False (the lease
        released) when that fails or the lease was lost meanwhile."""
        ps = partition_settings(self.settings, p)
        ps.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            last = await writers.last(p)
            if ps.replicate and last is not None and last.store != self.store_id:
                await asyncio.get_running_loop().run_in_executor(
                    None, restore_if_behind, ps, ps.replica, p)
            if lease.held:
                if last is None or last.store != self.store_id:  # else: already says so
                    await writers.record(p, self.store_id, lease.token)
                return True
        except (NatsError, asyncio.TimeoutError, OSError) as exc:
            log.warning("partition.take_failed", txn_id=None, partition=p, token=lease.token,
                        error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(NatsError, asyncio.TimeoutError, OSError):
            await asyncio.wait_for(lease.release(), CANCEL_SECONDS)
        return False

    def _open(self, p: int, lease: Lease) -> None:
        """Start partition ``p``'s scorer under ``lease``: its store, its consumer, its
        state, as a node restart does (pipeline.Scorer.prepare), in a task of its own."""
        ps = partition_settings(self.settings, p)
        ps.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.open(ps.db_path)
        task = asyncio.create_task(self._score(p), name=f"partition-{p}")  # runs from the
        self.owned[p] = Owned(p, lease, store, self._scorer(p, store, lease), task)  # next turn
        if ps.replicate:  # beside the scorer, not before it: litestream picks up the WAL
            replicator = self.owned[p].replicator = Litestream(ps)
            asyncio.get_running_loop().run_in_executor(None, _start_replicating, replicator, p)
        log.info("partition.opening", txn_id=None, partition=p, token=lease.token,
                 owner=lease.owner)

    def _scorer(self, p: int, store: Store, lease: Lease) -> Scorer:
        feed = TerminalFeed(self.nc.jetstream(timeout=API_TIMEOUT_SECONDS), p)
        scorer = Scorer(self.nc, store, self.model, partition_settings(self.settings, p),
                        self.registry, owned=frozenset({p}), lease=lease,
                        reference=self.reference, terminal_feed=feed)
        scorer.counters = self.counters
        return scorer

    async def resume_all(self) -> None:
        """After a reconnect: each open partition's scorer asks for deliveries again
        (ingest.Puller.resume: a delivery lost with the server shows as a gap, and the
        scorer then starts afresh); one still opening starts afresh now."""
        for owned in list(self.owned.values()):
            if owned.scorer.ready.is_set() and not owned.task.done():
                try:
                    await owned.scorer.resume_pulls()
                    log.info("partition.resumed", txn_id=None, partition=owned.partition,
                             token=owned.lease.token, reason="NATS reconnected")
                    continue
                except (NatsError, OSError) as exc:
                    log.warning("partition.resume_failed", txn_id=None,
                                partition=owned.partition, error=f"{type(exc).__name__}: {exc}")
            owned.restart_reason = "NATS reconnected"
            owned.restart.set()

    async def _score(self, p: int) -> None:
        """Run the partition's scorer; start a fresh one when asked (:meth:`resume_all`) or
        when a delivery went missing (DeliveryGap); end on a fence, an error or a stop."""
        owned = self.owned[p]
        lease = owned.lease
        while True:
            scorer, started = owned.scorer, time.monotonic()
            run = asyncio.create_task(scorer.run())
            opened = asyncio.create_task(self._log_open(p, scorer, lease, started))
            asked = asyncio.create_task(owned.restart.wait())
            try:
                await asyncio.wait([run, asked], return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                run.cancel()
                await asyncio.wait([run])  # its commits whole or absent, its writer ended
                raise
            finally:
                opened.cancel()
                asked.cancel()
            if not run.done():  # a restart was asked for
                owned.restart.clear()
                reason = owned.restart_reason
                run.cancel()
                await asyncio.wait([run])
            else:
                error = None if run.cancelled() else run.exception()
                if error is None:
                    return  # stopped
                if isinstance(error, FencedError):
                    log.warning("partition.fenced", txn_id=None, partition=p,
                                token=lease.token, error=str(error))
                    return
                if not isinstance(error, DeliveryGap):
                    log.error("partition.failed", txn_id=None, partition=p, token=lease.token,
                              error=f"{type(error).__name__}: {error}")
                    return
                reason = "a delivery went missing (consumer.gap)"
            if lease.ended:
                return
            log.warning("partition.restarting", txn_id=None, partition=p, token=lease.token,
                        reason=reason, hint="a fresh consumer from the partition's checkpoint")
            owned.scorer = self._scorer(p, owned.store, lease)

    async def _log_open(self, p: int, scorer: Scorer, lease: Lease, started: float) -> None:
        await scorer.ready.wait()
        log.info("partition.open", txn_id=None, partition=p, token=lease.token,
                 checkpoint=scorer.confirmed_upto, seconds=round(time.monotonic() - started, 3))

    def _on_lost(self, lease: Lease, reason: str) -> None:
        """A lease lost (taken, expired): that partition's scorer stops at once. It is fenced
        anyway; cancelling it just ends what it was about to refuse to do."""
        for owned in self.owned.values():
            if owned.lease is lease:
                log.warning("partition.lost", txn_id=None, partition=owned.partition,
                            token=lease.token, reason=reason)
                owned.scorer.stop()
                owned.task.cancel()

    async def hand_off(self, p: int) -> None:
        """A planned handoff of ``p``: its scorer finishes what it holds (scored, committed,
        acked), then the lease is released so another process takes ``p`` at once."""
        owned = self.owned.get(p)
        if owned is None:
            return
        log.info("partition.handing_off", txn_id=None, partition=p, token=owned.lease.token)
        owned.scorer.stop()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(owned.task), HANDOFF_SECONDS)
        await self._forget(p, owned)
        log.info("partition.handed_off", txn_id=None, partition=p, token=owned.lease.token)

    async def _forget(self, p: int, owned: Owned) -> None:
        if not owned.task.done():
            owned.task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(owned.task, CANCEL_SECONDS)
        self.owned.pop(p, None)
        # off the event loop: a writer thread still finishing its commit holds the
        # connection, and closing it waits for that; litestream finishes its sync in hand
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, owned.store.close)
        if owned.replicator is not None:
            await loop.run_in_executor(None, owned.replicator.stop)
        with contextlib.suppress(NatsError, asyncio.TimeoutError, OSError):
            await asyncio.wait_for(owned.lease.release(), CANCEL_SECONDS)


def _start_replicating(replicator: Litestream, p: int) -> None:
    """Start a partition's litestream (a worker thread's job: it waits for litestream)."""
    try:
        replicator.start()
    except NodeError as exc:  # scoring goes on; the replica lags until the next owner's
        log.error("partition.replication_failed", txn_id=None, partition=p, error=str(exc))


async def stand_by_for_terminal_stage(nc: Client, settings: Settings, stop: asyncio.Event,
                                      reconnected: asyncio.Event | None = None) -> None:
    """Every scorer process stands by for the terminal stage (scoring/terminal_stage.py):
    one of them holds its lease and runs it, and when that one dies, another takes over, so
    a partitioned cluster needs no service of its own for it. A lost lease (a pause past
    the TTL) or a missing delivery stops the stage here: this process then stands by again,
    and a stage it starts resumes from its checkpoint. After a reconnect the stage asks for
    deliveries again (terminal_stage.serve)."""
    while not stop.is_set():
        try:
            await serve_terminal_stage(nc, settings, stop, reconnected)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("terminal_stage.stopped", txn_id=None,
                        error=f"{type(exc).__name__}: {exc}", hint="standing by again")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.lease_renew_seconds)


async def run_scorer(settings: Settings) -> int:
    """``branchguard scorer``: join the cluster at ``nats_url`` and score a share of the
    partitions until SIGINT/SIGTERM; then hand them off. Returns the exit code."""
    if settings.nats_url is None or settings.partitions < 2:
        raise SettingsError("a partitioned scorer joins a cluster's partitioned stream",
                            field="nats_url" if settings.nats_url is None else "partitions",
                            value=settings.nats_url if settings.nats_url is None
                            else settings.partitions,
                            hint="set nats_url to the cluster and partitions above 1 "
                                 "(branchguard run is the single node)")
    registry = Registry.of(settings)
    model = registry.load(registry.production())
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    reference = Store.open(settings.db_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Every partition's scorer, the stage and the gatherer hand SQLite work to threads:
    # room for all of them, so that none waits behind another's long commit.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="bg"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scorers_reconnected, stage_reconnected = asyncio.Event(), asyncio.Event()

    def reconnected() -> None:
        scorers_reconnected.set()
        stage_reconnected.set()

    nc = await connect(str(settings.nats_url), "branchguard-partitioned-scorer",
                       on_reconnected=reconnected, **client_options(settings))
    code = 0
    try:
        await ensure_streams(nc.jetstream(timeout=2.0), settings)
        scorers = PartitionScorers(nc, settings, registry, model, reference,
                                   scorers_reconnected)
        stage = asyncio.create_task(stand_by_for_terminal_stage(nc, settings, stop,
                                                                stage_reconnected))
        gathering = asyncio.create_task(gather_forever(settings, stop))
        flows = (asyncio.create_task(scoring_side(nc, settings, stop))
                 if settings.case_flows else None)
        await scorers.run(stop)
        await stage
        await gathering  # its last round copies what the handoffs committed
        if flows is not None:
            await flows
        c = scorers.counters
        log.info("scorer.stopped", txn_id=None, scored=c.transactions, alerts=c.alerts,
                 dead_letters=c.dead_letters, duplicates=c.duplicates, adopted=c.adopted)
    except Exception:
        log.error("scorer.failed", exc_info=True, txn_id=None)
        code = 1
    finally:
        await close(nc)
        reference.close()
    return code
