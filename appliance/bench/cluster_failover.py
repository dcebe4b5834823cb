"""``branchguard bench cluster``'s failover runs: partitioned scorers (:mod:`.partition_scorers`)
on a fresh 3-server loopback cluster, transactions published at a fixed rate as terminals
publish them (each retried under its own ``Nats-Msg-Id`` until acked), and half-way either

- **a scorer SIGKILLed** (:func:`scorer_kill_run`): of two scorers, the one NOT running the
  terminal stage (its log says which holds ``stage.terminals``), so what is timed is the
  partitions' failover alone. For each partition it held (orphaned), the seconds from the
  SIGKILL to the survivor's ``lease.acquired`` of it (the dead one's lease runs out after
  ``lease_ttl_seconds``), its ``partition.open`` (state rebuilt, consumer re-created from
  the checkpoint), and its first commit (the partition's checkpoint moving past where the
  dead one left it); and the transactions replayed: the partition's ``TX`` messages after
  its checkpoint at the kill (read from its database once the dead process was reaped) up
  to the stream's last sequence just after the kill. Those are the ones the dead scorer
  may have received (scored, perhaps published) and not committed, which the new owner
  receives and scores again; an upper bound, since a scorer behind by some messages had
  not received them yet;
- **the server leading ``TX`` SIGKILLed** (:func:`leader_kill_run`), two scorers: for each
  partition, the seconds from the SIGKILL to its checkpoint reaching the first transaction of
  that partition whose publish was tried after the kill; and to the first publish accepted
  again.

Each run ends with the loss/duplicate check (:mod:`.delivery`): every id published in
``TX`` once, stored once across the partitions' databases, one verdict in ``VERDICTS``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext

from ..errors import NodeError
from ..feed.terminal import Message, to_message
from ..operations.loopback_cluster import LoopbackCluster, start_loopback_cluster
from ..scoring.streams import TX_STREAM, VERDICT_STREAM
from ..settings import nats_servers
from .delivery import check_delivery, quiet_errors, stored_ids, stream_ids
from .partition_scorers import (PARTITIONS, stream_count, CommitWatch, ScorerChild, caught_up, checkpoints,
                                first_event, lease_taken, partition_db, partition_of,
                                scorer_env, since, tx_subjects, wait_until)
from .throughput import bench_transactions

PUBLISHERS = 64
"""Transactions in flight at once, like 64 terminals each publishing one at a time: enough
for the backlog of an election to go out at once when it ends."""
RETRY_SECONDS = 0.1
"""A terminal's pause before re-sending a publish that failed or was not acked in time."""
ACK_TIMEOUT = 1.0
GIVE_UP_SECONDS = 60.0
"""A transaction not acked this long after its first try counts as not published."""
START_SECONDS = 120.0
"""How long the scorers get to hold every partition and the terminal stage."""
CATCH_UP_SECONDS = 120.0


@dataclass
class Sent:
    """One transaction, once acked."""

    msg_id: str
    tried_at: float
    """When the try that was acked started (epoch seconds)."""
    acked_at: float
    seq: int
    retries: int
    due: float


@dataclass
class Scorers:
    """A fresh cluster and ``N`` partitioned scorers on it, each holding its fair share."""

    cluster: LoopbackCluster
    children: list[ScorerChild]
    data_dir: Path

    @property
    def pids(self) -> dict[str, int]:
        """Every process by name: the scorers and the servers."""
        return {**{c.name: c.process.pid for c in self.children}, **self.cluster.pids}

    def stop(self) -> None:
        """Every scorer (SIGTERM, a clean handoff) and server, each by its PID."""
        try:
            for child in self.children:
                child.stop(grace=10.0)
        finally:
            self.cluster.stop()


def start_scorers(root: Path, count: int) -> Scorers:
    """A fresh loopback cluster and ``count`` scorers; returns once every partition is open,
    each scorer holds its fair share and one of them runs the terminal stage. Raises
    :class:`NodeError` (with the scorers' log tails) when that does not happen in time."""
    cluster = start_loopback_cluster(root / "cluster")
    data_dir = root / "data"
    env = scorer_env(cluster.url, data_dir)
    scorers = Scorers(cluster, [], data_dir)
    try:
        for i in range(count):
            scorers.children.append(ScorerChild.start(f"scorer-{i + 1}", env, root))
        share = -(-PARTITIONS // count)

        def settled() -> bool:
            opened = [c.opened() for c in scorers.children]
            return (sum(len(o) for o in opened) == PARTITIONS
                    and all(len(o) <= share for o in opened)
                    and any(c.runs_terminal_stage() for c in scorers.children))
        if not wait_until(settled, START_SECONDS):
            tails = "".join(f"--- {c.name}\n{c.log.read_text(errors='replace')[-2000:]}\n"
                            for c in scorers.children)
            raise NodeError("the partitioned scorers did not open every partition",
                            field="scorers", value=count, hint=tails)
    except BaseException:
        scorers.stop()
        raise
    return scorers


Kill = Callable[[JetStreamContext], Awaitable[dict[str, Any]]]
"""What a run kills half-way; returns what it killed (``killed``) and when (``killed_at``)."""


async def publish_through(url: str, messages: list[Message], rate: float, kill: Kill
                          ) -> dict[str, Any]:
    """Publish ``messages`` at ``rate``/s, each retried until acked, and call ``kill``
    half-way. Returns the acks, what ``kill`` returned and what was not published."""
    nc = await nats.connect(nats_servers(url), reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1, connect_timeout=1, error_cb=quiet_errors)
    js = nc.jetstream()
    queue: asyncio.Queue[tuple[Message, float] | None] = asyncio.Queue()
    sent: list[Sent] = []
    failed: list[str] = []

    async def terminal() -> None:
        while (item := await queue.get()) is not None:
            message, due = item
            retries = 0
            while True:
                tried = time.time()
                try:
                    ack = await js.publish(message.subject, message.data, timeout=ACK_TIMEOUT,
                                           headers={"Nats-Msg-Id": message.msg_id})
                    sent.append(Sent(message.msg_id, tried, time.time(), ack.seq, retries, due))
                    break
                except (NatsError, TimeoutError):
                    retries += 1
                    if time.time() - due > GIVE_UP_SECONDS:
                        failed.append(message.msg_id)
                        break
                    await asyncio.sleep(RETRY_SECONDS)

    workers = [asyncio.create_task(terminal()) for _ in range(PUBLISHERS)]
    killed: dict[str, Any] = {}
    try:
        started = time.time()
        half = len(messages) // 2
        for i, message in enumerate(messages):
            due = started + i / rate
            if (delay := due - time.time()) > 0:
                await asyncio.sleep(delay)
            if i == half:
                killed = await kill(js)
            queue.put_nowait((message, max(due, time.time())))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
        await nc.close()
    return {"sent": sent, "failed": failed, **killed}


def _messages(rate: float, seconds: float, seed: int) -> list[Message]:
    start = datetime(2027, 1, 4, tzinfo=timezone.utc)
    return [to_message(tx, "BR001")
            for tx in bench_transactions(seed, max(2, int(rate * seconds)), start)]


def _settle(scorers: Scorers, messages: list[Message], out: dict[str, Any]
            ) -> tuple[list[str], dict[str, Any]]:
    """Wait for every partition to commit what ``TX`` holds; the run's common figures and
    its loss/duplicate check. Returns ``TX``'s subjects too."""
    url, data_dir = scorers.cluster.url, scorers.data_dir
    subjects = tx_subjects(url)
    # every partition committed what TX holds, and VERDICTS holds a verdict for each id (a
    # commit does not wait for its verdicts' confirmations, which an election delays)
    published = len({m.msg_id for m in messages})
    all_stored = wait_until(lambda: caught_up(data_dir, subjects) and
                            stream_count(url, VERDICT_STREAM) >= published, CATCH_UP_SECONDS)
    stored = [i for p in range(PARTITIONS) if partition_db(data_dir, p).exists()
              for i in stored_ids(partition_db(data_dir, p))]
    check = check_delivery([m.msg_id for m in messages], stream_ids(url, TX_STREAM), stored,
                           stream_ids(url, VERDICT_STREAM))
    sent: list[Sent] = out["sent"]
    return subjects, {
        "killed": out["killed"], "published": len(messages), "acked": len(sent),
        "not_published": len(out["failed"]), "retried": sum(1 for s in sent if s.retries),
        "all_stored": all_stored, "check": check.as_dict(), "pids": scorers.pids}


def scorer_kill_run(root: Path, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """One run of two scorers, the one without the terminal stage SIGKILLed half-way (see
    the module docstring for what is timed and counted)."""
    scorers = start_scorers(root, 2)
    watch = CommitWatch(scorers.data_dir)
    watch.start()
    messages = _messages(rate, seconds, seed)
    try:
        victim = next(c for c in scorers.children if not c.runs_terminal_stage())
        survivor = next(c for c in scorers.children if c is not victim)

        async def kill(js: JetStreamContext) -> dict[str, Any]:
            held = sorted(victim.held())
            await asyncio.to_thread(victim.process.send_signal, signal.SIGKILL)
            at = time.time()
            await asyncio.to_thread(victim.process.wait)
            last = (await js.stream_info(TX_STREAM)).state.last_seq
            return {"killed": victim.name, "killed_at": at, "held": held, "last_seq": last,
                    "checkpoints": checkpoints(scorers.data_dir)}

        out = asyncio.run(publish_through(scorers.cluster.url, messages, rate, kill))
        subjects, report = _settle(scorers, messages, out)
    finally:
        watch.halt.set()
        scorers.stop()
    killed_at, at_kill = out["killed_at"], out["checkpoints"]
    events = survivor.events()
    orphaned: dict[int, dict[str, float | int | None]] = {}
    for p in out["held"]:
        taken = lease_taken(events, p, killed_at)
        opened = first_event(events, "partition.open", killed_at, partition=p)
        commit = watch.first_reaching(p, at_kill[p] + 1, taken or killed_at)
        orphaned[p] = {
            "lease_taken": since(taken, killed_at), "open": since(opened, killed_at),
            "first_commit": since(commit, killed_at),
            "replayed": sum(1 for seq in range(at_kill[p] + 1, out["last_seq"] + 1)
                            if seq <= len(subjects) and partition_of(subjects[seq - 1]) == p)}
    return {**report, "terminal_stage": survivor.name, "orphaned": orphaned}


def leader_kill_run(root: Path, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """One run of two scorers, the server leading ``TX`` SIGKILLed half-way (see the module
    docstring)."""
    scorers = start_scorers(root, 2)
    watch = CommitWatch(scorers.data_dir)
    watch.start()
    messages = _messages(rate, seconds, seed)
    cluster = scorers.cluster
    try:
        async def kill(js: JetStreamContext) -> dict[str, Any]:
            info = await js.stream_info(TX_STREAM)
            leader = str(info.cluster.leader) if info.cluster is not None else ""
            await asyncio.to_thread(cluster.kill, leader)  # reaped: nothing later is its doing
            return {"killed": leader, "killed_at": time.time()}

        out = asyncio.run(publish_through(cluster.url, messages, rate, kill))
        subjects, report = _settle(scorers, messages, out)
    finally:
        watch.halt.set()
        scorers.stop()
    killed_at = out["killed_at"]
    after = sorted((s for s in out["sent"] if s.tried_at >= killed_at), key=lambda s: s.seq)
    first_acked = min((s.acked_at for s in after), default=None)
    first_seq: dict[int, int] = {}
    for s in after:
        if s.seq <= len(subjects):
            first_seq.setdefault(partition_of(subjects[s.seq - 1]), s.seq)
    commits = {p: since(watch.first_reaching(p, seq, killed_at), killed_at)
               for p, seq in sorted(first_seq.items())}
    return {**report, "to_publish_seconds": since(first_acked, killed_at),
            "first_commit": commits}
