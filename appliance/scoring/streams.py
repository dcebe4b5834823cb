"""JetStream's streams and the scorer's consumer: what they are, and how they are made.

Streams (created or updated idempotently at start, :func:`ensure_streams`):
- ``TX`` on ``tx.>``: what terminals publish; file storage; duplicate window drops re-sends
  with the same ``Nats-Msg-Id``; limits retention for ``tx_max_age_days``, so a node restored from
  an older database copy can replay what it has not stored yet. With ``partitions`` above 1 it
  stores ``tx.<b>.<t>.<a>`` as ``txp.<p>.<b>.<t>.<a>`` (partitions.py), a count fixed at
  creation.
- ``VERDICTS`` on ``verdict.<branch>.<terminal>``: one verdict per transaction, ``Nats-Msg-Id``
  = transaction id, so a re-published verdict is dropped inside the duplicate window.
- ``TX_DLQ`` on ``dlq.tx``: each rejected message, body unchanged, reason in headers.
- ``TERM`` on ``term.<p>.<tx_seq>``, only with ``partitions`` above 1: the terminal stage's
  windows for each TX message (terminal_stage.py), ``Nats-Msg-Id`` ``term-<tx_seq>``; same
  age and replicas as ``TX``.

The consumer is durable, pull, ack policy ``all`` (one ack per batch). It is re-created at
every start from the database checkpoint (the last stream sequence whose outcome is
committed, :func:`reset_consumer`), so after a crash the scorer sees the unfinished messages
again *in stream order* rather than after a redelivery timeout and behind newer ones: that
is what makes feature state after a crash exactly the state without one. The consumer
therefore belongs to exactly one scorer.

On a cluster every JetStream API call here is retried while a leader is elected
(:func:`during_election`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy,
                         StorageType, StreamConfig, SubjectTransform)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from .. import logs
from ..errors import StreamError
from ..settings import Settings
from .partitions import check_partition_set, filter_subjects, stream_partitions, transform

TX_STREAM = "TX"
VERDICT_STREAM = "VERDICTS"
DLQ_STREAM = "TX_DLQ"
DLQ_SUBJECT = "dlq.tx"
TERM_STREAM = "TERM"
TERM_SUBJECTS = "term.>"
MAX_ACK_PENDING = 20000

log = logs.get("appliance.streams")

ELECTION_SECONDS = 30.0
"""How long a JetStream API call is retried while the cluster has no leader for it."""
API_TIMEOUT_SECONDS = 1.0
"""The wait for one answer of the JetStream API (nats-py's default is 5 s). A call that gets
none is tried again by :func:`during_election`, so while a cluster elects a leader the
scorer asks every second rather than every five; a server that answers at all answers in
milliseconds."""
_T = TypeVar("_T")
_TRANSIENT = (10008, 10005)
"""JetStream API errors that pass: "temporarily unavailable" (10008), and "no suitable peers
for placement" (10005), which a cluster that has just started answers to an R3 stream until
every server has been heard from (it failed a node's first start in the test suite)."""


async def during_election(call: Callable[[], Awaitable[_T]], what: str) -> _T:
    """``call()``, retried for up to :data:`ELECTION_SECONDS` while JetStream cannot answer
    (a timeout, no responders, 503, "temporarily unavailable" (10008), or "no suitable peers
    for placement" (10005), while a new cluster forms): on a cluster,
    after the server leading a stream or consumer dies, its API is silent until a new
    leader is elected (seconds), and a freshly created R3 consumer may answer 503 first.
    Each call retried must be idempotent. On a single server the first try answers."""
    deadline = time.monotonic() + ELECTION_SECONDS
    tries = 0
    while True:
        try:
            return await call()
        except (NatsTimeoutError, NoRespondersError, ServiceUnavailableError, APIError) as exc:
            if isinstance(exc, APIError) and not isinstance(exc, ServiceUnavailableError) \
                    and exc.err_code not in _TRANSIENT:
                raise
            if time.monotonic() > deadline:
                raise
            if tries == 0:
                log.warning("jetstream.unavailable", txn_id=None, call=what,
                            error=f"{type(exc).__name__}: {exc}",
                            hint="a cluster electing a leader; retrying")
            tries += 1
            await asyncio.sleep(min(1.0, 0.1 * tries))


def stream_configs(settings: Settings) -> list[StreamConfig]:
    day = 86400.0
    window = settings.duplicate_window_seconds
    return [
        StreamConfig(name=TX_STREAM, subjects=[settings.tx_subjects], storage=StorageType.FILE,
                     retention=RetentionPolicy.LIMITS, duplicate_window=window,
                     max_age=settings.tx_max_age_days * day, max_msg_size=1 << 20,
                     subject_transform=transform(settings.partitions),
                     num_replicas=settings.stream_replicas),
        StreamConfig(name=VERDICT_STREAM, subjects=["verdict.>"], storage=StorageType.FILE,
                     retention=RetentionPolicy.LIMITS, duplicate_window=window,
                     max_age=settings.tx_max_age_days * day,
                     num_replicas=settings.stream_replicas),
        StreamConfig(name=DLQ_STREAM, subjects=[DLQ_SUBJECT], storage=StorageType.FILE,
                     retention=RetentionPolicy.LIMITS, duplicate_window=window,
                     max_age=30 * day, max_msg_size=2 << 20,
                     num_replicas=settings.stream_replicas),
        *([StreamConfig(name=TERM_STREAM, subjects=[TERM_SUBJECTS], storage=StorageType.FILE,
                        retention=RetentionPolicy.LIMITS, duplicate_window=window,
                        max_age=settings.tx_max_age_days * day,
                        num_replicas=settings.stream_replicas)]
          if settings.partitions > 1 else []),
    ]


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create the streams (three; ``TERM`` too with partitions), or bring their
    configuration up to date; but never change the TX stream's partition count
    (:class:`StreamError`): the same account would map to another partition, and its state
    to another owner, from one message to the next."""
    for config in stream_configs(settings):
        name = config.name or ""
        try:
            info = await during_election(lambda: js.stream_info(name), "stream_info")
        except NotFoundError:
            await during_election(lambda: js.add_stream(config), "add_stream")
            log.info("stream.created", stream=config.name, partitions=(
                settings.partitions if config.name == TX_STREAM else None))
        else:
            if config.name == TX_STREAM:
                check_partitions(info.config.subject_transform, settings)
            if differs(info.config, config):  # an update is one more round through the leader
                await during_election(lambda: js.update_stream(config), "update_stream")


_COMPARED = ("subjects", "storage", "retention", "duplicate_window", "max_age", "max_msg_size",
             "num_replicas", "subject_transform")
"""What :func:`stream_configs` sets: the fields an existing stream is compared on."""


def differs(existing: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether a stream configured as ``existing`` (as the server reports it, defaults filled
    in) needs an update to be ``wanted``: only the fields :func:`stream_configs` sets count,
    and times to the millisecond (the server keeps nanoseconds)."""
    for name in _COMPARED:
        have, want = getattr(existing, name), getattr(wanted, name)
        if isinstance(want, float) and isinstance(have, (int, float)):
            if abs(have - want) > 1e-3:
                return True
        elif name == "num_replicas" and (have or 1) == (want or 1):
            continue
        elif have != want:
            return True
    return False


def check_partitions(existing: SubjectTransform | None, settings: Settings) -> None:
    """Raise :class:`StreamError` unless a TX stream with subject transform ``existing`` has
    the partition count ``settings`` ask for."""
    found = stream_partitions(existing)
    if found != settings.partitions:
        have = (f"{found} partition(s)" if found is not None else
                f"a subject transform that is not Branchguard's ({existing})")
        raise StreamError(
            f"the TX stream was created with {have}; the partition count is fixed at "
            "creation", field="partitions", value=settings.partitions,
            hint=f"set partitions = {found} as the stream has it" if found is not None else
            "remove the stream's subject transform, or use another NATS account")


@dataclass(frozen=True)
class ConsumerStart:
    ack_floor: int
    """Highest stream sequence acked (everything at or below it is acked) before this start."""
    start_seq: int
    """First stream sequence the re-created consumer delivers."""


async def consumer_names(js: JetStreamContext, stream: str) -> list[str]:
    """Every consumer's name on ``stream``, from the JetStream API's ``CONSUMER.NAMES``,
    which the stream's leader answers from its own state. ``consumers_info``
    (``CONSUMER.LIST``) gathers every consumer's state from its own leader, and timed out
    at 1 s, more than once in a row, while a scorer's failover created several R3 consumers
    at once. nats-py 2.16 has no call for it, hence its request helper."""
    names: list[str] = []
    while True:
        response = await js._api_request(  # noqa: SLF001 - no public call for NAMES
            f"{js._prefix}.CONSUMER.NAMES.{stream}",  # noqa: SLF001
            json.dumps({"offset": len(names)}).encode(), timeout=js._timeout)  # noqa: SLF001
        page = [str(n) for n in response.get("consumers") or []]
        names += page
        if not page or len(names) >= int(response.get("total") or 0):
            return names


async def reset_consumer(js: JetStreamContext, settings: Settings, checkpoint: int,
                         owned: Collection[int] | None = None, durable: str | None = None
                         ) -> ConsumerStart:
    """Re-create the scorer's durable consumer to deliver from ``checkpoint + 1``, on the
    partitions ``owned`` (default: all of them; with ``partitions = 1`` the consumer filters on
    ``tx_subjects`` exactly as before partitions existed).

    ``durable`` names the consumer (default ``settings.consumer``). A partition's owner names
    it after its lease's token, ``<consumer>-<token>`` (operations/partitioned.py), and this
    deletes every other ``<consumer>-*``: an owner that lost the partition then acks into a
    consumer that no longer exists, never into its successor's."""
    name = durable or settings.consumer
    ack_floor = 0
    stale = [name]
    if durable is not None and durable != settings.consumer:
        names = await during_election(lambda: consumer_names(js, TX_STREAM), "consumer_names")
        stale += [n for n in names if n != name and n.startswith(settings.consumer + "-")]
    for old in stale:
        try:
            info = await during_election(lambda: js.consumer_info(TX_STREAM, old),
                                         "consumer_info")
            if old == name:
                ack_floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
            await during_election(lambda: js.delete_consumer(TX_STREAM, old),
                                  "delete_consumer")
        except NotFoundError:
            pass
    start = checkpoint + 1
    n = settings.partitions
    chosen = check_partition_set(range(n) if owned is None else owned, n)
    subjects = filter_subjects(chosen, n) if n > 1 else None
    config = ConsumerConfig(
        durable_name=name, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start, ack_policy=AckPolicy.ALL, max_deliver=settings.max_deliver,
        ack_wait=settings.ack_wait_seconds, max_ack_pending=MAX_ACK_PENDING,
        filter_subject=None if subjects else settings.tx_subjects,
        filter_subjects=subjects, max_waiting=64)
    await during_election(lambda: js.add_consumer(TX_STREAM, config), "add_consumer")
    log.info("consumer.reset", consumer=name, start_seq=start, ack_floor=ack_floor,
             filter_subjects=subjects, deleted=stale[1:])
    return ConsumerStart(ack_floor=ack_floor, start_seq=start)


async def published_verdicts(js: JetStreamContext, after_seq: int | None) -> dict[str, bytes]:
    """The verdicts in ``VERDICTS`` after stream sequence ``after_seq``, by transaction id
    (their JSON, as published): what a restart adopts for transactions it replays, so a
    published verdict stays the verdict of record. ``after_seq`` None reads nothing (a node
    older than issue 16 published only what it had committed)."""
    if after_seq is None:
        return {}
    try:
        state = (await during_election(lambda: js.stream_info(VERDICT_STREAM),
                                       "stream_info")).state
    except NotFoundError:
        return {}
    last = state.last_seq or 0
    if last == after_seq:
        return {}
    start = after_seq + 1 if last > after_seq else max(1, state.first_seq or 1)  # a new stream
    out: dict[str, bytes] = {}
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    sub = await during_election(lambda: js.subscribe(  # an ephemeral consumer: retry is safe
        "verdict.>", stream=VERDICT_STREAM, ordered_consumer=True, config=config), "subscribe")
    try:
        seq = start - 1
        while seq < last:
            msg = await sub.next_msg(timeout=5.0)
            seq = msg.metadata.sequence.stream
            msg_id = (msg.headers or {}).get("Nats-Msg-Id")
            if msg_id:
                out[msg_id] = msg.data
    finally:
        await sub.unsubscribe()
    return out
