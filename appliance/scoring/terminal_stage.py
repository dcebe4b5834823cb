"""The terminal stage: every terminal's windows over the whole TX stream, for partitioned
scorers (issue 19).

A scorer of partition ``p`` sees only its own accounts' transactions, but the six terminal
window features (``terminal_count_1h`` .. ``terminal_sum_7d``) count every transaction at
the terminal, whichever account made it. This stage reads the whole ``TX`` stream once, in
stream order, decides for each message exactly what a single scorer decides (malformed: not
observed; an id seen before, with the same or another body: not observed; otherwise the
terminal's :class:`~appliance.scoring.features.Windows` observe it), and publishes one record
per TX message to ``TERM`` on ``term.<p>.<tx_seq>`` (``p`` the message's partition): the 6
ints :meth:`Windows.observe` returned, or ``null``. The scorer of ``p`` joins them by stream
sequence (terminal_feed.py). Its cost per transaction is one observation and one small
publish, whatever the number of scorers.

Crash-only, like the scorer: its own SQLite file (``<data_dir>/terminals/terminals.db``) keeps
the ids it observed (with body digest, terminal, event time, amount) and its checkpoint, both
committed in one transaction once ``TERM`` has confirmed the batch's records; then the batch
is acked on TX (ack policy ``all``). At start the windows are rebuilt from that table and the
durable consumer ``terminals`` is re-created from checkpoint + 1, so every record computed
again after a crash is the record published before it (same ``Nats-Msg-Id``: ``TERM``'s
duplicate window drops it; past the window a second copy is identical). It runs under the
lease ``stage.terminals``: a second copy stands by, and one that lost its lease writes
nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from .. import logs
from ..errors import FencedError, NodeError, SettingsError
from ..lease import Lease, Leases
from ..nats_auth import client_options
from ..settings import Settings
from ..store import setting_up, write_transaction
from ..transaction import MILLI, Admission, Malformed, digest
from .features import HORIZON, Windows, epoch
from .ingest import Delivery, Outgoing, Publisher, Puller, ack_batch, connect
from .streams import MAX_ACK_PENDING, TX_STREAM, during_election, ensure_streams

log = logs.get("appliance.terminal_stage")

STAGE_CONSUMER = "terminals"
"""The stage's durable consumer on ``TX`` (all subjects)."""
LEASE_KEY = "stage.terminals"
CONFIRM_TIMEOUT = 5.0
"""Seconds to wait for ``TERM``'s acks before publishing a batch's records again."""

Record = list[int] | None
"""One TX message's terminal windows before it ([count, sum_milli] for 1 h, 24 h, 7 d), or
None when the message is not observed (malformed, or a re-send)."""
encode_record = msgspec.json.Encoder().encode
decode_record = msgspec.json.Decoder(Record).decode
_encode_ids = msgspec.json.Encoder().encode


def record_subject(partition: int, tx_seq: int) -> str:
    return f"term.{partition}.{tx_seq}"


def partition_of(subject: str) -> int:
    """The partition a stored TX subject belongs to: ``p`` of ``txp.<p>.…``, else 0 (an
    unpartitioned stream, or what the subject transform left alone)."""
    if subject.startswith("txp."):
        return int(subject.split(".", 2)[1])
    return 0


def db_path(settings: Settings) -> Path:
    return settings.data_dir / "terminals" / "terminals.db"


migrations = Migrations("branchguard-terminals")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE observed (
            transaction_id TEXT PRIMARY KEY,
            body_digest BLOB NOT NULL,
            terminal_id TEXT NOT NULL,
            ts REAL NOT NULL,              -- event time, seconds since the Unix epoch
            amount_milli INTEGER NOT NULL,
            tx_seq INTEGER NOT NULL        -- TX stream sequence: ties in ts are in this order
        );
        CREATE INDEX observed_terminal_ts ON observed (terminal_id, ts);
        CREATE TABLE checkpoint (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            tx_seq INTEGER NOT NULL        -- every TX message up to here is recorded in TERM
        );
        """)


@migrations()
def m002_lease_token(db: Database) -> None:
    """The stage's lease token with its checkpoint: the fence of :meth:`Ledger.commit`."""
    db.execute("ALTER TABLE checkpoint ADD COLUMN lease_token INTEGER")


@dataclasses.dataclass(slots=True)
class Observation:
    """One transaction the stage observed: a row of ``observed``."""

    transaction_id: str
    body_digest: bytes
    terminal_id: str
    ts: float
    amount_milli: int
    tx_seq: int


class Ledger:
    """The stage's database: the ids observed and the checkpoint (one writer: the stage)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with setting_up(path):  # a reader (a test, a restart) may open it as it is made
            self.conn = sqlite3.connect(path, check_same_thread=False)  # claim: a thread
            self.db = Database(self.conn)
            self.db.execute("PRAGMA busy_timeout = 5000")
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous = NORMAL")
            migrations.apply(self.db)

    def checkpoint(self) -> int:
        row = self.conn.execute("SELECT tx_seq FROM checkpoint WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def digests(self, ids: Sequence[str]) -> dict[str, bytes]:
        """Body digests of those of ``ids`` already observed."""
        return dict(self.conn.execute(
            "SELECT transaction_id, body_digest FROM observed WHERE transaction_id IN "
            "(SELECT value FROM json_each(?))", [_encode_ids(list(ids)).decode()]).fetchall())

    def windows(self) -> dict[str, Windows]:
        """Every terminal's windows as observing the stored rows live left them: the events
        within 7 days of the terminal's newest, in (event time, stream order), settled."""
        out: dict[str, Windows] = {}
        rows = self.conn.execute(
            "SELECT o.terminal_id, o.ts, o.amount_milli FROM observed o JOIN "
            "(SELECT terminal_id, max(ts) AS newest FROM observed GROUP BY terminal_id) n "
            "ON o.terminal_id = n.terminal_id WHERE o.ts > n.newest - ? "
            "ORDER BY o.terminal_id, o.ts, o.tx_seq", [HORIZON])
        for terminal_id, ts, milli in rows:
            w = out.get(terminal_id)
            if w is None:
                w = out[terminal_id] = Windows()
            w.ts.append(ts)
            w.amounts.append(milli)
        for w in out.values():
            w.settle()
        return out

    def claim(self, lease_token: int) -> None:
        """A new tenure's token, written before the stage reads the ledger (as
        ``Store.claim`` does for a partition): a copy stopped in the middle of its commit
        and woken after this one read the ledger would otherwise commit ids this copy then
        takes for re-sends, leaving their terminals' windows short for good. Waits for a
        commit in progress; :class:`FencedError` if a later tenure already claimed it."""
        with write_transaction(self.conn) as conn:
            self._check_fence(lease_token)
            conn.execute("INSERT INTO checkpoint (id, tx_seq, lease_token) VALUES (1, 0, ?) "
                         "ON CONFLICT (id) DO UPDATE SET lease_token = excluded.lease_token",
                         [lease_token])

    def _check_fence(self, lease_token: int) -> None:
        row = self.conn.execute("SELECT lease_token FROM checkpoint WHERE id = 1").fetchone()
        if row is not None and row[0] is not None and int(row[0]) > lease_token:
            raise FencedError("a later copy of the terminal stage has claimed its ledger",
                              field="lease_token", value=lease_token,
                              hint=f"the ledger is now written under token {row[0]}; this "
                                   "copy lost its lease and must stop")

    def commit(self, observed: Sequence[Observation], tx_seq: int,
               lease_token: int | None = None) -> None:
        """The batch's observations and the checkpoint, all or nothing; with
        ``lease_token``, refused (:class:`FencedError`, nothing written) once a later tenure
        has claimed the ledger."""
        with write_transaction(self.conn):
            if lease_token is not None:
                self._check_fence(lease_token)
            self.conn.executemany(
                "INSERT INTO observed VALUES (?, ?, ?, ?, ?, ?)",
                [(o.transaction_id, o.body_digest, o.terminal_id, o.ts, o.amount_milli,
                  o.tx_seq) for o in observed])
            self.conn.execute("INSERT INTO checkpoint (id, tx_seq) VALUES (1, ?) "
                              "ON CONFLICT (id) DO UPDATE SET tx_seq = excluded.tx_seq",
                              [tx_seq])

    def close(self) -> None:
        self.conn.close()


@dataclasses.dataclass
class StageCounters:
    messages: int = 0
    observed: int = 0
    resent: int = 0
    """Ids seen before (same body or not): not observed, as the scorer does not score them."""
    malformed: int = 0


class TerminalStage:
    """Consumes all of ``TX`` in order and publishes each message's terminal windows to
    ``TERM``, until :meth:`stop` is called or its lease is lost."""

    def __init__(self, nc: Client, settings: Settings, lease: Lease | None) -> None:
        self.nc = nc
        self.settings = settings
        self.js: JetStreamContext = nc.jetstream(timeout=1.0)
        self.lease = lease
        """None only where nothing else can run the stage (a test, a benchmark)."""
        self.admission = Admission.of(settings)
        self.puller = Puller(nc, dataclasses.replace(settings, consumer=STAGE_CONSUMER))
        self.publisher = Publisher(nc)
        self.ledger = Ledger(db_path(settings))
        self.windows: dict[str, Windows] = {}
        self.counters = StageCounters()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._consumer_created: datetime | None = None

    async def prepare(self) -> int:
        """Streams, windows from the ledger, the consumer from checkpoint + 1; returns the
        checkpoint."""
        if self.settings.partitions < 2:
            raise SettingsError("the terminal stage serves partitioned scorers only",
                                field="partitions", value=self.settings.partitions,
                                hint="a single scorer keeps every terminal's windows itself; "
                                     "run the stage with partitions above 1")
        await ensure_streams(self.js, self.settings)
        started = time.monotonic()
        if self.lease is not None:  # before the ledger is read: see Ledger.claim
            await self._require_lease("claim the ledger")
            await asyncio.to_thread(self.ledger.claim, self.lease.token)
        self.windows = self.ledger.windows()
        checkpoint = self.ledger.checkpoint()
        self._consumer_created = await reset_stage_consumer(self.js, self.settings, checkpoint)
        if self.lease is not None:  # from now on, a lapse of the lease need not end the stage
            self.lease.witness = self._consumer_intact
        await self.publisher.start()
        await self.puller.start()
        log.info("terminal_stage.ready", txn_id=None, checkpoint=checkpoint,
                 terminals=len(self.windows), seconds=round(time.monotonic() - started, 3))
        self.ready.set()
        return checkpoint

    async def run(self) -> None:
        """Record until stopped. Crash-only: an error ends it, and the next start resumes
        from the checkpoint exactly."""
        await self.prepare()
        try:
            while not self._stopping.is_set():
                batch = await self.puller.take(timeout=0.25)
                if batch:
                    await self.process(batch)
        finally:
            for part in (self.puller, self.publisher):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(part.stop(), 2.0)
            self.ledger.close()
            log.info("terminal_stage.stopped", txn_id=None, **dataclasses.asdict(self.counters))

    def stop(self) -> None:
        self._stopping.set()

    def decide(self, batch: Sequence[Delivery]) -> tuple[list[Outgoing], list[Observation]]:
        """Each message's record, in order, observing the terminals' windows as the scorer's
        feature state would (pipeline.Scorer.process: parse, re-sends, observe)."""
        parsed = [self.admission.parse(d.subject, d.data, d.stored_ns / 1e9) for d in batch]
        ids = list({tx.transaction_id for tx in parsed if not isinstance(tx, Malformed)})
        seen: dict[str, bytes] = self.ledger.digests(ids) if ids else {}
        records: list[Outgoing] = []
        observed: list[Observation] = []
        windows, c = self.windows, self.counters
        for d, tx in zip(batch, parsed):
            record: Record = None
            if isinstance(tx, Malformed):
                c.malformed += 1
            elif tx.transaction_id in seen:
                c.resent += 1
            else:
                tid = tx.transaction_id
                h = digest(tx)
                seen[tid] = h
                t, milli = epoch(tx.timestamp), round(tx.amount * MILLI)
                w = windows.get(tx.terminal_id)
                if w is None:
                    w = windows[tx.terminal_id] = Windows()
                record = w.observe(t, milli)
                observed.append(Observation(tid, h, tx.terminal_id, t, milli, d.stream_seq))
            records.append(Outgoing(record_subject(partition_of(d.subject), d.stream_seq),
                                    encode_record(record), f"term-{d.stream_seq}"))
        c.messages += len(batch)
        c.observed += len(observed)
        return records, observed

    async def process(self, batch: list[Delivery]) -> None:
        """Decide, publish the records and wait for ``TERM`` to confirm them, commit, ack."""
        records, observed = self.decide(batch)
        await self._require_lease("publish")
        if not await self.publisher.confirm(records, CONFIRM_TIMEOUT, self._stopping.is_set):
            return  # stopping with the server away: the next start computes them again
        await self._require_lease("commit")
        self.ledger.commit(observed, batch[-1].stream_seq,
                           None if self.lease is None else self.lease.token)
        await ack_batch(self.nc, batch)

    async def _require_lease(self, before: str) -> None:
        """A lapse (an election) is waited out; a loss stops the stage (lease.py)."""
        if self.lease is not None and not await self.lease.wait_held(self._stopping.is_set):
            raise NodeError(f"the terminal stage's lease is lost; not going to {before}",
                            field="lease", value=LEASE_KEY,
                            hint="another copy holds it now; this one stops (crash-only)")


    async def _consumer_intact(self) -> bool:
        """The lease's witness: the stage's consumer is still the one this stage created.
        A later tenure deletes and re-creates it before it reads anything, so while it is
        ours, nobody else has published, committed or acked since we last did."""
        try:
            info = await self.js.consumer_info(TX_STREAM, STAGE_CONSUMER)
        except NotFoundError:
            return False
        return self._consumer_created is not None and info.created == self._consumer_created


async def reset_stage_consumer(js: JetStreamContext, settings: Settings, checkpoint: int
                               ) -> datetime:
    """Re-create the stage's durable consumer on the whole TX stream (``txp.>`` and what the
    transform left as ``tx.>``), delivering from ``checkpoint + 1`` in stream order (as
    streams.reset_consumer does for the scorer).

    No filter at all: measured with 20,000 transactions, a consumer filtering on the two
    subjects ``txp.>`` and ``tx.>`` was delivered about 800 tx/s by nats-server (its
    multi-filter path slows as the stream holds more subjects), against thousands without.

    Returns the consumer's creation time, as the server gives it: what identifies this
    stage's tenure of the consumer (:meth:`TerminalStage._consumer_intact`).
    """
    with contextlib.suppress(NotFoundError):
        await during_election(lambda: js.delete_consumer(TX_STREAM, STAGE_CONSUMER),
                              "delete_consumer")
    config = ConsumerConfig(
        durable_name=STAGE_CONSUMER, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=checkpoint + 1, ack_policy=AckPolicy.ALL,
        max_deliver=settings.max_deliver, ack_wait=settings.ack_wait_seconds,
        max_ack_pending=MAX_ACK_PENDING, max_waiting=64)
    info = await during_election(lambda: js.add_consumer(TX_STREAM, config), "add_consumer")
    log.info("consumer.reset", txn_id=None, consumer=STAGE_CONSUMER,
             start_seq=checkpoint + 1, filter_subjects=None)
    return info.created


async def serve(nc: Client, settings: Settings, stop: asyncio.Event,
                reconnected: asyncio.Event | None = None) -> None:
    """The stage under its lease: wait for the lease (standing by while another copy holds
    it), run until ``stop`` is set, then release it. A lost lease stops the stage at once
    and raises :class:`NodeError` (crash-only: the supervisor starts a copy that stands by).
    ``reconnected`` (set by the connection's reconnect callback): the stage asks for
    deliveries again (ingest.Puller.resume), or stops if it was still preparing."""
    leases = await Leases.open(nc.jetstream(), settings, replicas=settings.stream_replicas)
    stage: TerminalStage | None = None

    def lost(_lease: Lease, reason: str) -> None:
        if stage is not None:
            stage.stop()

    acquire = asyncio.create_task(leases.wait_acquire(LEASE_KEY, on_lost=lost))
    halt = asyncio.create_task(stop.wait())
    await asyncio.wait([acquire, halt], return_when=asyncio.FIRST_COMPLETED)
    if not acquire.done():
        acquire.cancel()
        return
    halt.cancel()
    lease = acquire.result()
    stage = TerminalStage(nc, settings, lease)
    watchers = [asyncio.create_task(_stop_when(stop, stage))]
    if reconnected is not None:
        reconnected.clear()
        watchers.append(asyncio.create_task(_resume_when(reconnected, stage)))
    try:
        await stage.run()
    finally:
        for watcher in watchers:
            watcher.cancel()
        if lease.lost:
            raise NodeError("the terminal stage's lease was lost", field="lease",
                            value=LEASE_KEY, hint=f"lost: {lease.lost_reason}; another copy "
                            "holds it now")
        await lease.release()


async def _stop_when(stop: asyncio.Event, stage: TerminalStage) -> None:
    await stop.wait()
    stage.stop()


async def _resume_when(reconnected: asyncio.Event, stage: TerminalStage) -> None:
    while True:
        await reconnected.wait()
        reconnected.clear()
        if not stage.ready.is_set():
            stage.stop()  # its consumer may be half made: the next start makes it again
            return
        await stage.puller.resume()
        log.info("terminal_stage.resumed", txn_id=None, reason="NATS reconnected")


async def run_terminal_stage(settings: Settings) -> None:
    """``branchguard stage terminals``: the stage on its own connection to the node's NATS,
    until SIGINT or SIGTERM."""
    if settings.nats_url is None:
        raise NodeError("the terminal stage needs the node's NATS server", field="nats_url",
                        value=None, hint="pass --nats-url (or set nats_url) to the server "
                        "the scorers use")
    nc = await connect(str(settings.nats_url), "branchguard-terminal-stage",
                       **client_options(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(nc, settings, stop)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5.0)
