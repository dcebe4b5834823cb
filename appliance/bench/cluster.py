"""``branchguard bench cluster``: the scorer on a real 3-server JetStream cluster (R3 streams,
:mod:`appliance.operations.loopback_cluster`), on this machine's loopback.

This first version runs ONE scorer (``branchguard run``, with ``nats_url`` naming the three
servers and ``stream_replicas = 3``): per-partition scorers do not exist yet (issue 19), so
it measures what the cluster costs and how a scorer rides out the loss of the server leading
``TX``, not how scorers scale. Two phases:

- **steady**: ``count`` transactions at full speed from the load generator
  (``branchguard bench-load``, as ``branchguard bench`` runs it): tx/s, and the CPU µs per
  transaction of each process (the scorer, its Litestream, each nats-server by name, the
  load generator) from :mod:`.proc`;
- **failover**, ``runs`` times, each on a cluster and scorer of its own (the first one after
  the steady phase): transactions published at ``rate``/s for ``seconds``, as terminals do
  (each retried under its own ``Nats-Msg-Id`` until acked), with the server leading ``TX``
  SIGKILLed half-way. It reports the seconds from the kill to the first publish accepted
  again and to the scorer's first commit of a transaction accepted after the kill (its
  SQLite checkpoint reaching that transaction's stream sequence), how many transactions
  had to be re-sent, and the loss/duplicate check of :mod:`.delivery`.

Every process is stopped by its PID at the end, whatever happened.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats
import numpy as np
from nats.errors import Error as NatsError

from ..feed.terminal import Message, to_message
from ..operations.cluster import REPLICAS
from ..operations.loopback_cluster import LoopbackCluster, start_loopback_cluster
from ..scoring.streams import TX_STREAM, VERDICT_STREAM
from ..settings import nats_servers
from .delivery import check_delivery, checkpoint, quiet_errors, stored_ids, stream_ids
from .proc import children, process_name
from .throughput import ScorerProcess, bench_transactions, measured_phase, run_load, wait_consumer

SCORERS = 1
NOTE = ("one scorer: per-partition scorers do not exist yet (issue 19), so these figures "
        "are the cluster's cost and failover under today's single scorer")
PUBLISHERS = 64
"""Transactions in flight at once in the failover phase, like 64 terminals each publishing
one at a time: enough for the backlog of an election to go out at once when it ends. Those
in flight when the leader dies are the ones re-sent; the others wait their turn (counted as
held back when acked more than :data:`ACK_TIMEOUT` after they were due)."""
RETRY_SECONDS = 0.1
"""A terminal's pause before re-sending a publish that failed or was not acked in time."""
ACK_TIMEOUT = 1.0
GIVE_UP_SECONDS = 60.0
"""A transaction not acked this long after its first try counts as not published."""


@dataclass
class _Sent:
    """One transaction of the failover phase, once acked."""

    msg_id: str
    tried_at: float
    """When the try that was acked started (monotonic seconds)."""
    acked_at: float
    seq: int
    retries: int
    due: float
    """When its schedule said to publish it."""


@dataclass
class _Watch:
    """The scorer's checkpoint over time, read from its SQLite database by a thread."""

    db: Path
    changes: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last = -1
        while not self.stop.is_set():
            seq = checkpoint(self.db)
            if seq != last:
                self.changes.append((time.monotonic(), seq))
                last = seq
            time.sleep(0.02)

    def first_reaching(self, seq: int, after: float) -> float | None:
        return next((t for t, s in self.changes if t >= after and s >= seq), None)


def _start(root: Path, replicate: bool) -> tuple[LoopbackCluster, ScorerProcess]:
    """A fresh cluster and a scorer on it, its consumer created."""
    cluster = start_loopback_cluster(root)
    scorer: ScorerProcess | None = None
    try:
        scorer = ScorerProcess(root / "node", cluster.url, replicate=replicate,
                               extra_env={"BRANCHGUARD_STREAM_REPLICAS": str(REPLICAS)})
        asyncio.run(wait_consumer(cluster.url, 120))
    except BaseException:
        if scorer is not None:
            scorer.stop()
        cluster.stop()
        raise
    return cluster, scorer


def steady_phase(cluster: LoopbackCluster, scorer: ScorerProcess, count: int,
                 warmup: int) -> dict[str, Any]:
    """``count`` transactions at full speed after ``warmup`` untimed ones: tx/s and each
    process's CPU µs per transaction (the nats-servers by name)."""
    if warmup:
        run_load(cluster.url, warmup, None, seed=1)  # imports, caches, first pages
    return measured_phase(scorer, cluster.pids, lambda: run_load(cluster.url, count, None, 2))


async def _publish_through_failover(cluster: LoopbackCluster, messages: list[Message],
                                    rate: float) -> dict[str, Any]:
    """Publish ``messages`` at ``rate``/s, each retried until acked; SIGKILL the server
    leading TX half-way. Returns the acks, the kill's time and what was not published."""
    nc = await nats.connect(nats_servers(cluster.url), reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1, connect_timeout=1, error_cb=quiet_errors)
    js = nc.jetstream()
    queue: asyncio.Queue[tuple[Message, float] | None] = asyncio.Queue()
    sent: list[_Sent] = []
    failed: list[str] = []

    async def terminal() -> None:
        while (item := await queue.get()) is not None:
            message, due = item
            retries = 0
            while True:
                tried = time.monotonic()
                try:
                    ack = await js.publish(message.subject, message.data, timeout=ACK_TIMEOUT,
                                           headers={"Nats-Msg-Id": message.msg_id})
                    sent.append(_Sent(message.msg_id, tried, time.monotonic(), ack.seq,
                                      retries, due))
                    break
                except (NatsError, TimeoutError):
                    retries += 1
                    if time.monotonic() - due > GIVE_UP_SECONDS:
                        failed.append(message.msg_id)
                        break
                    await asyncio.sleep(RETRY_SECONDS)

    workers = [asyncio.create_task(terminal()) for _ in range(PUBLISHERS)]
    killed, killed_at = "", 0.0
    try:
        started = time.monotonic()
        half = len(messages) // 2
        for i, message in enumerate(messages):
            due = started + i / rate
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if i == half:
                info = await js.stream_info(TX_STREAM)
                killed = str(info.cluster.leader) if info.cluster is not None else ""
                await asyncio.to_thread(cluster.kill, killed)
                killed_at = time.monotonic()  # reaped: nothing after this is its doing
            queue.put_nowait((message, max(due, time.monotonic())))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
        await nc.close()
    return {"sent": sent, "failed": failed, "killed": killed, "killed_at": killed_at}


def _wait_stored(watch: _Watch, seq: int, scorer: ScorerProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if watch.changes and watch.changes[-1][1] >= seq:
            return True
        if scorer.process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def failover_phase(cluster: LoopbackCluster, scorer: ScorerProcess, db: Path, rate: float,
                   seconds: float, seed: int) -> dict[str, Any]:
    """One failover run (see the module docstring) on a running cluster and scorer."""
    start = datetime(2027, 1, 4, tzinfo=timezone.utc)
    messages = [to_message(tx, "BR001")
                for tx in bench_transactions(seed, max(2, int(rate * seconds)), start)]
    watch = _Watch(db)
    watcher = threading.Thread(target=watch.run, daemon=True)
    watcher.start()
    try:
        out = asyncio.run(_publish_through_failover(cluster, messages, rate))
        sent: list[_Sent] = out["sent"]
        killed_at: float = out["killed_at"]
        after = [s for s in sent if s.tried_at >= killed_at]
        first = min(after, key=lambda s: s.acked_at) if after else None
        last_seq = max((s.seq for s in sent), default=0)
        all_stored = _wait_stored(watch, last_seq, scorer, 120.0)
    finally:
        watch.stop.set()
        watcher.join(5)
    commit_at = watch.first_reaching(first.seq, killed_at) if first is not None else None
    check = check_delivery([m.msg_id for m in messages], stream_ids(cluster.url, TX_STREAM),
                           stored_ids(db), stream_ids(cluster.url, VERDICT_STREAM))
    return {
        "killed": out["killed"],
        "published": len(messages),
        "acked": len(sent),
        "not_published": len(out["failed"]),
        "to_publish_seconds": None if first is None else round(first.acked_at - killed_at, 3),
        "to_commit_seconds": None if commit_at is None else round(commit_at - killed_at, 3),
        "retried": sum(1 for s in sent if s.retries),
        "retries": sum(s.retries for s in sent),
        "held_back": sum(1 for s in sent if s.acked_at - s.due > ACK_TIMEOUT),
        "all_stored": all_stored,
        "check": check.as_dict(),
    }


def spread(values: list[float | None]) -> dict[str, float | None]:
    """min, median, p95 (linear between ranks) and max of the values measured (None when a
    run measured nothing)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"min": None, "median": None, "p95": None, "max": None, "runs": 0}
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3),
            "p95": round(float(np.percentile(xs, 95)), 3), "max": round(max(xs), 3),
            "runs": len(xs)}


def run_cluster_bench(count: int, rate: float, seconds: float, runs: int = 1,
                      warmup: int = 2000, replicate: bool = True) -> dict[str, Any]:
    """The steady phase, then ``runs`` failover runs (each on a fresh cluster and scorer;
    the first on the steady phase's); the figures, each run's check and their spread."""
    root = Path(tempfile.mkdtemp(prefix="branchguard-bench-cluster-"))
    report: dict[str, Any] = {"scorers": SCORERS, "note": NOTE, "servers": 3,
                              "stream_replicas": REPLICAS, "replicate": replicate,
                              "count": count, "rate": rate, "seconds": seconds,
                              "failover": []}
    try:
        for run in range(max(1, runs)):
            run_root = root / f"run-{run + 1}"
            cluster, scorer = _start(run_root, replicate)
            try:
                if run == 0:
                    report["steady"] = steady_phase(cluster, scorer, count, warmup)
                report["failover"].append(failover_phase(
                    cluster, scorer, run_root / "node" / "branchguard.db", rate, seconds,
                    seed=1000 + run))
                report["failover"][-1]["pids"] = {  # all stopped below, each by its PID
                    "scorer": scorer.process.pid, **cluster.pids,
                    **{process_name(c): c for c in children(scorer.process.pid)}}
            finally:
                scorer.stop()
                cluster.stop()
            shutil.rmtree(run_root, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    runs_done = report["failover"]
    report["summary"] = {
        name: spread([r[name] for r in runs_done])
        for name in ("to_publish_seconds", "to_commit_seconds", "retried", "held_back")}
    report["lost"] = sum(r["check"]["lost"] + r["not_published"] for r in runs_done)
    report["duplicated"] = sum(r["check"]["duplicated"] for r in runs_done)
    return report


def format_cluster_report(report: dict[str, Any]) -> str:
    """The report as a person reads it."""
    steady = report["steady"]
    cpu = steady["cpu_us_per_tx"]
    lines = [f"3 nats-servers (R{report['stream_replicas']}) on loopback, {report['scorers']} "
             f"scorer, Litestream {'on' if report['replicate'] else 'off'}: {report['note']}",
             f"steady: {steady['verdicts']:,} transactions at full speed, "
             f"{steady['tx_per_second']:,.0f} tx/s",
             "  CPU µs/tx: " + " · ".join(f"{name} {us:.0f}" for name, us in cpu.items())
             + f" = {sum(cpu.values()):.0f}",
             f"failover: {report['rate']:g}/s for {report['seconds']:g} s, the TX leader "
             f"SIGKILLed half-way; {len(report['failover'])} run(s), each on a fresh cluster"]
    for i, r in enumerate(report["failover"], 1):
        c = r["check"]
        lines.append(
            f"  run {i}: killed {r['killed']}; publish accepted again after "
            f"{r['to_publish_seconds']} s, first commit after {r['to_commit_seconds']} s; "
            f"{r['retried']} of {r['published']} re-sent ({r['retries']} failed tries), "
            f"{r['held_back']} acked > {ACK_TIMEOUT:g} s late; "
            f"lost {c['lost'] + r['not_published']}, duplicated {c['duplicated']}")
    names = {"to_publish_seconds": "kill → publish accepted, s",
             "to_commit_seconds": "kill → first commit, s",
             "retried": "transactions re-sent",
             "held_back": f"acked > {ACK_TIMEOUT:g} s late"}
    for key, label in names.items():
        s = report["summary"][key]
        lines.append(f"  {label:<28} min {s['min']} · median {s['median']} · p95 {s['p95']} "
                     f"· max {s['max']}")
    lines.append(f"loss/duplicate check over every run: {report['lost']} lost, "
                 f"{report['duplicated']} duplicated "
                 f"({'OK' if report['lost'] == report['duplicated'] == 0 else 'FAILED'})")
    return "\n".join(lines)
