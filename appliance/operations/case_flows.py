"""Cases up to where they are worked, casework back down (issues 19 and 20), over JetStream.

Where transactions are scored and where cases are worked may be different machines: on a
site of several scorer machines (issue 19) each gathers only the partitions it scored into
its own node database, and the site's analysts work on one **analyst host**; between
branches and a regional hub (issue 20) each branch scores its own transactions, and the
region's analysts work at the hub. Both use the same two flows (the events are
casework/case_events.py):

- **up**, stream ``CASES``: each scoring place sends every alert its node database gets as a
  raised case (``cases.<branch>``, ``Nats-Msg-Id`` ``raised:<branch>:<transaction id>``),
  in alert order, and records how far once JetStream has stored it. The analyst place
  follows ``CASES`` with a durable consumer and stores each case with its rows and an outbox
  row (its dispatcher delivers it), acking after the commit.
- **down**, stream ``CASEWORK``: the analyst place sends the labels its dispositions make
  (``casework.<branch>.label``) and its list changes (``casework.all.list``); each scoring
  place follows what concerns its branch and applies it to its node database, where the
  partitions' scorers read labels and lists.

Exactly once, whatever fails: a sender stores its cursor only after JetStream acked the
event, so a crash sends again at most what was not recorded, which the stream's duplicate
window drops (``Nats-Msg-Id``) and the receiving side would ignore anyway (each event is
applied idempotently, keyed by transaction id or origin). A follower acks after its commit.

At a hub, ``CASES`` is a stream sourcing every branch's ``CASES`` through the leaf links
(operations/hub.py), and each branch's ``CASEWORK`` sources the hub's part for it; the
processes here are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from .. import logs
from ..casework.branch_links import record as record_links
from ..casework.case_events import (Raised, Worked, apply_raised, apply_stats, apply_worked,
                                    cursor, decode_raised, decode_stats, decode_worked,
                                    MINUTE_GRACE_SECONDS, encode, minutes_since, raised_since, set_cursor,
                                    worked_since)
from ..nats_auth import client_options
from ..scoring.ingest import connect
from ..scoring.streams import during_election
from ..errors import ModelError, SettingsError
from ..learning.promotion import promote
from ..scoring.explain import Explainer
from ..scoring.registry import Registry
from ..settings import Settings
from .gather import exclusive, open_node
from .hub import (HUB_DOMAIN, LINK_SECONDS, branch_source, ensure_downlink,
                  ensure_hub_stream, ensure_uplink, link_readings)
from .partition_state import store_id

log = logs.get("appliance.case_flows")

CASES = "CASES"
CASEWORK = "CASEWORK"
DUPLICATE_WINDOW_SECONDS = 3600.0
"""A case sent twice within this is stored once in the stream (and, later, still applied
once: applying is idempotent)."""
POLL_SECONDS = 0.5
MAX_MODEL_BYTES = 900_000
"""A model sent down is one message: under the hub's 1 MB ``max_payload``."""
SEND_POLL_SECONDS = 0.1
MINUTES_SECONDS = 5.0
"""How often a branch looks for minutes that are over, to send their statistics."""
"""How often a sender looks for new alerts or casework when it found none: two small
indexed reads, and the most it adds to an alert's way to where it is worked."""
ACK_WAIT_SECONDS = 5.0
BATCH = 100
"""Events a follower applies in one transaction, at most."""
MORE_SECONDS = 0.02
"""How long a follower waits for more once it has one: short, since a batch's fetch waits
out its whole timeout unless the batch fills."""
_T = TypeVar("_T")


def origin_of(settings: Settings) -> str:
    """This place's name in the events it sends: ``hub`` at the hub, a branch's JetStream
    domain, else the store id of a machine of a site."""
    if settings.hub_branches:
        return HUB_DOMAIN
    return settings.jetstream_domain or store_id(settings.data_dir)


def cases_subject(branch: str) -> str:
    return f"cases.{branch}"


def casework_subject(event: Worked) -> str:
    if event.kind == "label":
        return f"casework.{event.branch}.label"
    return "casework.all.model" if event.kind == "model" else "casework.all.list"


def stream_config(name: str, settings: Settings) -> StreamConfig:
    """A flow's stream at this place. A branch of a hub also sources its part of the hub's
    ``CASEWORK`` into its own (operations/hub.py)."""
    subjects = ["cases.>"] if name == CASES else ["casework.>"]
    sources = ([branch_source(settings.jetstream_domain, CASEWORK)]
               if name == CASEWORK and settings.hub_url and settings.jetstream_domain
               else None)
    return StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE,
                        num_replicas=settings.stream_replicas, sources=sources,
                        duplicate_window=DUPLICATE_WINDOW_SECONDS)


async def ensure_stream(js: JetStreamContext, name: str, settings: Settings) -> None:
    """Create stream ``name`` (``CASES`` or ``CASEWORK``) if it is not there."""
    try:
        await during_election(lambda: js.stream_info(name), "stream_info")
    except NotFoundError:
        await during_election(lambda: js.add_stream(stream_config(name, settings)),
                              "add_stream")
        log.info("stream.created", stream=name)


async def _in_db(work: Callable[[sqlite3.Connection], _T], conn: sqlite3.Connection,
                 write: bool) -> _T:
    """``work(conn)`` on a worker thread, in one transaction (a write's IMMEDIATE)."""
    def run() -> _T:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # (a failed COMMIT leaves it open)
                conn.execute("ROLLBACK")
            raise
        return result
    return await asyncio.get_running_loop().run_in_executor(None, run)


async def _every(stop: asyncio.Event, step: Callable[[], Awaitable[int]], what: str,
                 pause: float = POLL_SECONDS) -> None:
    """Run ``step`` until ``stop``; wait ``pause`` after a step that did nothing (0 for a
    follower, whose fetch is its wait), and ``POLL_SECONDS`` at least after a failure
    (logged; the next step tries again)."""
    while not stop.is_set():
        try:
            done = await step()
            wait = pause
        except Exception as exc:  # a busy database, a server away, a stream not made yet
            log.warning(f"{what}.failed", txn_id=None, error=f"{type(exc).__name__}: {exc}")
            done, wait = 0, max(pause, POLL_SECONDS)
        if not done and wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)


# --- senders ----------------------------------------------------------------------------

async def send_raised(js: JetStreamContext, conn: sqlite3.Connection, origin: str,
                      explainer: Explainer) -> int:
    """Send the alerts after this database's ``raised`` cursor up to ``CASES``, each with
    its explanation made here by ``explainer``; returns how many were sent."""
    after = await _in_db(lambda c: cursor(c, "raised"), conn, write=False)

    def read(c: sqlite3.Connection) -> list[tuple[int, Raised]]:
        return [(alert_id, msgspec.structs.replace(
                    event, explanation=explainer.of(c, event.alert["transaction_id"])))
                for alert_id, event in raised_since(c, after, origin)]
    events = await _in_db(read, conn, write=False)
    for alert_id, event in events:
        await during_election(lambda: js.publish(
            cases_subject(event.branch), encode(event), stream=CASES,
            headers={"Nats-Msg-Id": f"raised:{event.branch}:"
                                    f"{event.alert['transaction_id']}"}), "publish")
        log.info("case.sent", txn_id=event.alert["transaction_id"], alert_id=alert_id,
                 branch=event.branch)
    if events:
        last = events[-1][0]
        await _in_db(lambda c: set_cursor(c, "raised", last), conn, write=True)
    return len(events)


async def send_worked(js: JetStreamContext, conn: sqlite3.Connection, origin: str,
                      registry: Registry) -> int:
    """Send the labels, list changes and model promotions after this database's ``worked``
    cursor down to ``CASEWORK`` (a model with its card and ONNX file from ``registry``);
    returns how many audit entries were read."""
    after = await _in_db(lambda c: cursor(c, "worked"), conn, write=False)
    last, events = await _in_db(lambda c: worked_since(c, after, origin), conn, write=False)
    for event in events:
        if event.kind == "model":
            event = with_model_files(event, registry)
        await during_election(lambda: js.publish(
            casework_subject(event), encode(event), stream=CASEWORK,
            headers={"Nats-Msg-Id": f"worked:{origin}:{event.seq}"}), "publish")
        log.info("casework.sent", txn_id=event.transaction_id, kind=event.kind,
                 branch=event.branch, seq=event.seq)
    if last > after:
        await _in_db(lambda c: set_cursor(c, "worked", last), conn, write=True)
    return last - after


def with_model_files(event: Worked, registry: Registry) -> Worked:
    """A promotion with its model's card and ONNX file, as the registry holds them (the
    card's sha256 is checked again where it lands)."""
    version = str(event.version)
    onnx = (registry.locate(version) / f"{version}.onnx").read_bytes()
    if len(onnx) > MAX_MODEL_BYTES:
        raise ModelError("a model too large to send down", field="version", value=version,
                         hint=f"{len(onnx)} bytes; the hub's max_payload is 1 MB")
    card = {**registry.card(version), "stage": "candidate"}
    return msgspec.structs.replace(event, card=card, onnx=onnx)


def adopt_model(conn: sqlite3.Connection, registry: Registry, event: Worked) -> str:
    """Register the promoted model here (its ONNX file checked against its card's sha256)
    unless it is already, and promote it, audited as ``<origin>/<actor>``."""
    version = str(event.version)
    if registry.production() == version:
        return "unchanged"
    if event.card is None or event.onnx is None:
        return "incomplete"
    try:
        if version not in registry.versions():
            registry.root.mkdir(parents=True, exist_ok=True)
            incoming = registry.root / f".{version}.incoming"
            incoming.write_bytes(event.onnx)
            try:
                registry.register(incoming, event.card)
            finally:
                incoming.unlink(missing_ok=True)
        promote(conn, registry, version, f"{event.origin}/{event.actor}",
                f"promoted at {event.origin}: {event.reason or 'no reason given'}")
    except ModelError as exc:  # a file that is not its card's: never in production here
        return f"refused: {exc}"
    return "promoted"


async def send_minutes(js: JetStreamContext, conn: sqlite3.Connection, origin: str,
                       branch: str) -> int:
    """Send the statistics of every minute that is over since the ``minutes`` cursor up to
    ``CASES`` (``cases.<branch>.stats``); returns how many were sent."""
    after = await _in_db(lambda c: cursor(c, "minutes"), conn, write=False)
    now = time.time()
    if not after:  # a branch's first: from the minute it starts sending
        after = int(now) // 60 - 1
        await _in_db(lambda c: set_cursor(c, "minutes", after), conn, write=True)
    minutes = await _in_db(lambda c: minutes_since(c, after, now, origin, branch), conn,
                           write=False)
    for stats in minutes:
        await during_election(lambda: js.publish(
            f"{cases_subject(branch)}.stats", encode(stats), stream=CASES,
            headers={"Nats-Msg-Id": f"stats:{branch}:{stats.minute}"}), "publish")
    last = int(now - MINUTE_GRACE_SECONDS) // 60 - 1  # every minute over, empty or not
    if last > after:
        await _in_db(lambda c: set_cursor(c, "minutes", last), conn, write=True)
    return 0  # then wait: once every MINUTES_SECONDS


# --- followers --------------------------------------------------------------------------

Applied = Callable[[], None]
"""What to log once an applied event is committed."""


class Follower:
    """A durable pull consumer on a flow's stream, applying what it delivers to the node
    database in one transaction per batch, each message acked after the commit. What
    a follower that died had not acked is delivered again after ``ACK_WAIT_SECONDS`` to the
    next one: applying is idempotent, so a short wait costs nothing."""

    def __init__(self, js: JetStreamContext, stream: str, durable: str,
                 filters: Sequence[str], conn: sqlite3.Connection,
                 apply: Callable[[sqlite3.Connection, Msg], Applied | None],
                 replicas: int) -> None:
        self.js, self.stream, self.durable, self.filters = js, stream, durable, list(filters)
        self.conn, self.apply, self.replicas = conn, apply, replicas
        self.sub: JetStreamContext.PullSubscription | None = None

    async def _subscription(self) -> JetStreamContext.PullSubscription:
        if self.sub is None:
            config = ConsumerConfig(durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT,
                                    deliver_policy=DeliverPolicy.ALL,
                                    ack_wait=ACK_WAIT_SECONDS, num_replicas=self.replicas,
                                    filter_subjects=self.filters or None)
            try:
                await self.js.consumer_info(self.stream, self.durable)
            except NotFoundError:
                await self.js.add_consumer(self.stream, config)
            self.sub = await self.js.pull_subscribe_bind(self.durable, self.stream)
        return self.sub

    async def step(self) -> int:
        sub = await self._subscription()
        try:  # the first as soon as there is one (nats-py's fetch of a batch waits for the
            msgs = await sub.fetch(1, timeout=POLL_SECONDS)  # whole batch till its timeout)
        except (NatsTimeout, asyncio.TimeoutError):
            return 0
        except Exception:
            self.sub = None  # bind again (the consumer may be gone with its stream)
            raise
        with contextlib.suppress(NatsTimeout, asyncio.TimeoutError):  # and what else is there
            msgs += await sub.fetch(BATCH - 1, timeout=MORE_SECONDS)

        def apply_all(conn: sqlite3.Connection) -> list[Applied]:
            return [done for msg in msgs if (done := self.apply(conn, msg)) is not None]
        for done in await _in_db(apply_all, self.conn, write=True):
            done()
        for msg in msgs:  # each its own: an ack of all would take along what another
            await msg.ack()  # follower (one that died) was given and never stored
        return len(msgs)


def _apply_case(outbox: bool) -> Callable[[sqlite3.Connection, Msg], Applied | None]:
    def apply(conn: sqlite3.Connection, msg: Msg) -> Applied | None:
        if msg.subject.endswith(".stats"):  # a branch's minute
            apply_stats(conn, decode_stats(msg.data))
            return None
        event: Raised = decode_raised(msg.data)
        if not apply_raised(conn, event, outbox):
            return None
        return lambda: log.info("case.stored", txn_id=event.alert["transaction_id"],
                                branch=event.branch, origin=event.origin)
    return apply


def _apply_casework(origin: str, registry: Registry
                    ) -> Callable[[sqlite3.Connection, Msg], Applied | None]:
    def apply(conn: sqlite3.Connection, msg: Msg) -> Applied | None:
        event: Worked = decode_worked(msg.data)
        if event.origin == origin:
            return None  # made here
        done = (adopt_model(conn, registry, event) if event.kind == "model"
                else apply_worked(conn, event))
        return lambda: log.info("casework.applied", txn_id=event.transaction_id,
                                kind=event.kind, origin=event.origin, seq=event.seq,
                                result=done)
    return apply


# --- the two sides ----------------------------------------------------------------------

async def scoring_side(nc: Client, settings: Settings, stop: asyncio.Event) -> None:
    """Where transactions are scored: send the node database's new alerts up, and apply the
    labels and list changes that come down for this branch, until ``stop``. One process per
    data directory does (an exclusive lock on ``<data_dir>/case_flows.lock``); the others
    wait to take over."""
    lock = None
    while lock is None:
        lock = exclusive(settings.data_dir / "case_flows.lock")
        if lock is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return
    with lock:
        await _scoring_side(nc, settings, stop)


async def _scoring_side(nc: Client, settings: Settings, stop: asyncio.Event) -> None:
    js = nc.jetstream(timeout=5.0)
    origin = origin_of(settings)
    for name in (CASES, CASEWORK):
        await ensure_stream(js, name, settings)
    if settings.hub_url and settings.jetstream_domain:  # what the hub sources from here
        await ensure_uplink(js, settings.jetstream_domain, CASES)
    sender, receiver = open_node(settings.db_path), open_node(settings.db_path)
    follower = Follower(js, CASEWORK, f"casework-{store_id(settings.data_dir)}",
                        [f"casework.{settings.branch}.>", "casework.all.>"], receiver,
                        _apply_casework(origin, Registry.of(settings)),
                        settings.stream_replicas)
    log.info("case_flows.started", txn_id=None, side="scoring", origin=origin)
    explainer = Explainer(Registry.of(settings))
    flows = [_every(stop, lambda: send_raised(js, sender, origin, explainer), "case.send",
                    pause=SEND_POLL_SECONDS),
             _every(stop, follower.step, "casework.follow", pause=0)]
    counter = open_node(settings.db_path)  # each sender its own: one transaction at a time
    if settings.hub_url:  # a branch of a hub: its minutes too
        flows.append(_every(stop, lambda: send_minutes(js, counter, origin, settings.branch),
                            "stats.send", pause=MINUTES_SECONDS))
    try:
        await asyncio.gather(*flows)
    finally:
        for conn in (sender, receiver, counter):
            conn.close()


async def analyst_side(nc: Client, settings: Settings, stop: asyncio.Event,
                       stream: str = CASES) -> None:
    """Where cases are worked: store every case that comes up (with its outbox row), and send
    this place's labels and list changes down, until ``stop``."""
    js = nc.jetstream(timeout=5.0)
    origin = origin_of(settings)
    for name in (stream, CASEWORK):
        await ensure_stream(js, name, settings)
    sender, receiver = open_node(settings.db_path), open_node(settings.db_path)
    registry = Registry.of(settings)
    follower = Follower(js, stream, f"cases-{store_id(settings.data_dir)}", [], receiver,
                        _apply_case(outbox=True), settings.stream_replicas)
    log.info("case_flows.started", txn_id=None, side="analyst", origin=origin, stream=stream)
    try:
        await asyncio.gather(
            _every(stop, follower.step, "case.follow", pause=0),
            _every(stop, lambda: send_worked(js, sender, origin, registry), "casework.send",
                   pause=SEND_POLL_SECONDS))
    finally:
        sender.close()
        receiver.close()



async def hub_streams(js: JetStreamContext, settings: Settings) -> None:
    """At the hub: ``CASES`` sourcing every branch's (each subject under its branch), and
    ``CASEWORK`` with each branch's downlink."""
    await ensure_hub_stream(js, CASES, CASES, settings.hub_branches)
    await ensure_stream(js, CASEWORK, settings)
    for branch in settings.hub_branches:
        await ensure_downlink(js, branch, CASEWORK)


async def watch_links(nc: Client, settings: Settings, stop: asyncio.Event) -> None:
    """At the hub: every ``LINK_SECONDS``, each branch's link into the hub's database
    (casework/branch_links.py), logging each link that comes up or goes down."""
    conn = open_node(settings.db_path)
    seen: dict[str, bool] = {}

    async def look() -> int:
        readings = await link_readings(nc, settings, CASES)
        await _in_db(lambda c: record_links(c, readings, time.time()), conn, write=True)
        for r in readings:
            if seen.get(r.branch) != r.connected:
                (log.info if r.connected else log.warning)(
                    "branch.link_up" if r.connected else "branch.link_down", txn_id=None,
                    branch=r.branch, lag=r.lag)
                seen[r.branch] = r.connected
        return 0  # then wait: a look every LINK_SECONDS
    try:
        await _every(stop, look, "branch.links", pause=LINK_SECONDS)
    finally:
        conn.close()


async def run_analyst(settings: Settings) -> int:
    """``branchguard cluster analyst`` and ``branchguard hub run``: the analyst side
    (:func:`analyst_side`) at ``nats_url`` until SIGINT/SIGTERM. At a hub
    (``hub_branches``), ``CASES`` first sources every branch's, and ``CASEWORK`` gets a
    durable consumer per branch for its part. Returns the exit code."""
    from .runner import close  # (runner runs this module's scoring side at a branch)

    if settings.nats_url is None:
        raise SettingsError("the analyst side follows the cases of a cluster or a hub",
                            field="nats_url", value=None,
                            hint="set nats_url to the cluster's servers, or the hub's")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await connect(str(settings.nats_url), "branchguard-analyst", **client_options(settings))
    try:
        if settings.hub_branches:
            await hub_streams(nc.jetstream(timeout=5.0), settings)
            watching = asyncio.create_task(watch_links(nc, settings, stop))
        await analyst_side(nc, settings, stop)
        if settings.hub_branches:
            await watching
    except Exception:
        log.error("case_flows.failed", exc_info=True, txn_id=None)
        return 1
    finally:
        await close(nc)
    return 0
