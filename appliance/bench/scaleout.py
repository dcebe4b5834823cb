"""The scale-out drill (issue 19): partitioned scorers on a 3-server loopback cluster, through
a scorer's SIGKILL, a scorer added mid-run, a zombie (SIGSTOP past its leases' TTL, then
SIGCONT) and the SIGKILL of the server leading ``TX``; then every result compared with a
single scorer's over the very same stream.

The input (:func:`drill_messages`): seeded simulated transactions, as terminals send them,
with late events (some held back and sent thousands of places later), re-sends inside the
duplicate window (the same message twice at once: JetStream keeps one), re-sends outside it
(sent again at the end: stored twice, answered as re-sends), conflicting re-sends (an id
again with another amount: dead-lettered), and malformed messages (bad JSON on a terminal's
subject; a subject that is not four tokens, which the transform leaves to partition 0).

The reference is today's single scorer (:class:`~appliance.scoring.pipeline.Scorer`, one
consumer of every partition) over a copy of the cluster's ``TX`` stream, message for
message and in order, on a standalone server: the same messages, so any difference is the
partitioned scorers'. The event-time window is off (the stream is simulated history), so
the copy's later stored times change nothing.

Every process is stopped by its PID at the end, whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats
import numpy as np
from nats.errors import Error as NatsError

from ..feed.terminal import Message, to_message
from ..operations.loopback_cluster import LoopbackCluster, start_loopback_cluster
from ..operations.node import EmbeddedNats
from ..scoring.features import FEATURES
from ..scoring.pipeline import Scorer
from ..scoring.registry import Registry
from ..scoring.streams import TX_STREAM, VERDICT_STREAM, ensure_streams
from ..settings import load, nats_servers
from ..store import Store
from .delivery import quiet_errors
from .partition_scorers import (PARTITIONS, CommitWatch, ScorerChild, caught_up,
                                first_event, log_time, partition_db, read_only, scorer_env,
                                since, tx_leader, wait_until)
from .throughput import bench_transactions

DUPLICATE_WINDOW_SECONDS = 2.0
"""Short, so the drill's late re-sends fall outside it and are stored twice."""
ZOMBIE_SECONDS = 5.0
TERMINAL_FEATURES = tuple(i for i, name in enumerate(FEATURES) if name.startswith("terminal_"))
_SELECT_ROWS = ("SELECT transaction_id, features, risk, severity, decision, reasons, "
                "model_version, rules_version, model_risk FROM transactions")
COMPARED = ("risk", "severity", "decision", "reasons", "model_version", "rules_version",
            "model_risk")


def drill_env(cluster_url: str, data_dir: Path) -> dict[str, str]:
    """The settings every scorer of the drill runs with (environment variables): the
    benchmarks' (partition_scorers.scorer_env) with a short duplicate window."""
    return {**scorer_env(cluster_url, data_dir),
            "BRANCHGUARD_DUPLICATE_WINDOW_SECONDS": str(DUPLICATE_WINDOW_SECONDS)}


@dataclass
class DrillInput:
    """What the drill publishes, in order, and what it expects of it."""

    messages: list[Message]
    late_resends: list[Message]
    """Sent again at the very end, outside the duplicate window."""
    expected_ids: set[str]


def drill_messages(count: int, seed: int = 19) -> DrillInput:
    """``count`` seeded transactions with the awkward cases of the module docstring."""
    start = datetime(2026, 3, 2, tzinfo=timezone.utc)
    base = [to_message(tx, "BR001") for tx in bench_transactions(seed, count, start)]
    held = {i for i in range(100, count, 500)}  # late: sent 2,000 places later
    ordered: list[Message] = []
    later: dict[int, list[Message]] = {}
    for i, m in enumerate(base):
        if i in held:
            later.setdefault(min(i + 2000, count - 1), []).append(m)
            continue
        ordered.append(m)
        if i % 300 == 7:  # a re-send inside the window: the server keeps one
            ordered.append(m)
        if i % 1500 == 11:  # a conflicting re-send: the same id, another amount
            body = json.loads(m.data)
            body["amount"] = round(float(body["amount"]) + 1.0, 2)
            ordered.append(Message(m.subject, json.dumps(body).encode(), m.msg_id + "-x",
                                   m.event_time))
        if i % 2000 == 13:  # malformed: bad JSON, and a subject of three tokens
            ordered.append(Message(m.subject, b"{not json", f"bad-{i}", m.event_time))
            ordered.append(Message("tx.BR001.short", m.data, f"short-{i}", m.event_time))
        ordered.extend(later.pop(i, []))
    for rest in later.values():
        ordered.extend(rest)
    resends = [base[i] for i in range(50, count // 2, max(1, count // 40))]
    return DrillInput(ordered, resends, {m.msg_id for m in base})


PUBLISH_RATE = 500.0
"""Transactions a second the drill publishes: slow enough that its four events (each at a
tenth or more of the input) are seconds apart, each failover over before the next."""
IN_FLIGHT = 32
"""Publishes awaiting their acks at once, as that many terminals would send: in order on one
connection, so the stream keeps the input's order but for re-sent ones (the comparison does
not depend on it: the reference scores the stream as it was stored)."""


async def _publish(url: str, messages: list[Message], marks: dict[float, Any],
                   done_fraction: list[float]) -> int:
    """Publish ``messages``, up to :data:`IN_FLIGHT` at once, each retried under its own
    ``Nats-Msg-Id`` until acked (through a leader's death); run each mark's action when its
    fraction of the messages has been handed out."""
    nc = await nats.connect(nats_servers(url), reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1, connect_timeout=1, error_cb=quiet_errors)
    js = nc.jetstream()
    retries = [0]
    pending = sorted(marks.items())
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def send(m: Message) -> None:
        try:
            while True:
                try:
                    await js.publish(m.subject, m.data, timeout=1.0,
                                     headers={"Nats-Msg-Id": m.msg_id})
                    return
                except (NatsError, TimeoutError):
                    retries[0] += 1
                    await asyncio.sleep(0.1)
        finally:
            slots.release()

    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    try:
        for i, m in enumerate(messages):
            if (ahead := started + i / PUBLISH_RATE - time.monotonic()) > 0:
                await asyncio.sleep(ahead)
            done_fraction[0] = i / len(messages)
            while pending and done_fraction[0] >= pending[0][0]:
                _, action = pending.pop(0)
                await asyncio.to_thread(action)
            await slots.acquire()
            tasks.append(asyncio.create_task(send(m)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await nc.close()
    return retries[0]


async def _stream_messages(url: str, stream: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every message of ``stream``, in order: (subject, data, headers)."""
    nc = await nats.connect(nats_servers(url), error_cb=quiet_errors, connect_timeout=1)
    try:
        js = nc.jetstream(timeout=5.0)
        state = (await js.stream_info(stream)).state
        out: list[tuple[str, bytes, dict[str, str]]] = []
        if not state.messages:
            return out
        sub = await js.subscribe(">", stream=stream, ordered_consumer=True)
        seq = 0
        while seq < state.last_seq:
            msg = await sub.next_msg(timeout=10.0)
            seq = msg.metadata.sequence.stream
            out.append((msg.subject, msg.data, dict(msg.headers or {})))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def _as_published(subject: str) -> str:
    """A stored partitioned subject back as the terminal sent it."""
    tokens = subject.split(".")
    return ".".join(["tx", *tokens[2:]]) if tokens[0] == "txp" else subject


async def _reference(tx_messages: list[tuple[str, bytes, dict[str, str]]], root: Path
                     ) -> Path:
    """Today's single scorer over a copy of the stream: a standalone server, one Scorer of
    every message, in order. Returns its database."""
    server = EmbeddedNats(load(None, env={}, data_dir=root / "reference-nats", nats_port=0))
    url = server.start()
    settings = load(None, env={"BRANCHGUARD_EVENT_TIME_CHECK": "false",
                               "BRANCHGUARD_ALERT_BUDGET": "false",
                               "BRANCHGUARD_REPLICATE": "false"},
                    data_dir=root / "reference", nats_url=url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.open(settings.db_path)
    nc = await nats.connect(url)
    try:
        registry = Registry.of(settings)
        scorer = Scorer(nc, store, registry.load(registry.production()), settings)
        js = nc.jetstream()
        await ensure_streams(js, settings)
        for subject, data, _ in tx_messages:
            await js.publish(_as_published(subject), data)
        task = asyncio.create_task(scorer.run())
        deadline = time.monotonic() + 300
        while store.checkpoint(settings.consumer) < len(tx_messages):
            if task.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        scorer.stop()
        await asyncio.wait_for(task, 30)
    finally:
        await nc.close()
        store.close()
        server.stop()
    return settings.db_path


def _rows(db: Path) -> dict[str, dict[str, Any]]:
    conn = read_only(db)
    try:
        cur = conn.execute(_SELECT_ROWS)
        names = ["transaction_id", "features", *COMPARED]
        return {r[0]: dict(zip(names, r)) for r in cur}
    finally:
        conn.close()


def _dead(db: Path) -> Counter[str]:
    conn = read_only(db)
    try:
        return Counter(r[0].split(":")[0] for r in conn.execute("SELECT reason FROM dead_letters"))
    finally:
        conn.close()


def published_verdicts(verdicts: list[tuple[str, bytes, dict[str, str]]]
                       ) -> dict[str, dict[str, Any]]:
    """The first verdict ``VERDICTS`` holds for each transaction id (the verdict of record),
    as the columns :data:`COMPARED` name."""
    out: dict[str, dict[str, Any]] = {}
    for _, data, headers in verdicts:
        tid = headers.get("Nats-Msg-Id", "")
        if tid and tid not in out:
            v = json.loads(data)
            out[tid] = {k: v[k] for k in COMPARED}
    return out


def _differs(row: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The :data:`COMPARED` columns in which two verdicts differ, as (column, one, other);
    reasons compared as lists (a row stores them as JSON text, a published verdict not)."""
    def value(d: dict[str, Any], k: str) -> Any:
        return json.loads(d[k]) if k == "reasons" and isinstance(d[k], str) else d[k]
    return [(k, row[k], other[k]) for k in COMPARED if value(row, k) != value(other, k)]


def compare(reference: Path, data_dir: Path,
            published: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every partition's rows against the reference's: missing, stored twice, feature
    vectors (all of them, and without the terminal windows), verdicts, dead letters; and,
    with ``published`` (:func:`published_verdicts`), every stored row against the verdict
    of record ``VERDICTS`` holds for it."""
    ref = _rows(reference)
    seen: Counter[str] = Counter()
    ours: dict[str, dict[str, Any]] = {}
    dead: Counter[str] = Counter()
    for p in range(PARTITIONS):
        db = partition_db(data_dir, p)
        if db.exists():
            rows = _rows(db)
            seen.update(rows.keys())
            ours.update(rows)
            dead += _dead(db)
    features_differ = account_features_differ = verdicts_differ = 0
    examples: list[str] = []
    keep = [i for i in range(len(FEATURES)) if i not in TERMINAL_FEATURES]
    for tid, r in ref.items():
        o = ours.get(tid)
        if o is None:
            continue
        if o["features"] != r["features"]:
            features_differ += 1
            a = np.frombuffer(o["features"], dtype=np.float64)
            b = np.frombuffer(r["features"], dtype=np.float64)
            if len(a) != len(b) or not np.array_equal(a[keep], b[keep]):
                account_features_differ += 1
        differ = _differs(o, r)
        if differ:
            verdicts_differ += 1
            if len(examples) < 3:
                same = "same" if o["features"] == r["features"] else "other"
                examples.append(f"{tid} ({same} features): {differ}")
    unlike_published: list[str] = []
    for tid, o in ours.items():
        v = (published or {}).get(tid)
        differ = _differs(o, v) if v is not None else []
        if differ:
            unlike_published.append(f"{tid}: {differ}")
    return {"reference_rows": len(ref), "stored": len(ours),
            "missing": len(ref.keys() - ours.keys()),
            "unexpected": len(ours.keys() - ref.keys()),
            "stored_twice": sum(n - 1 for n in seen.values() if n > 1),
            "features_differ": features_differ,
            "features_differ_outside_terminal_windows": account_features_differ,
            "verdicts_differ": verdicts_differ, "verdict_examples": examples,
            "stored_unlike_published": len(unlike_published),
            "unlike_published_examples": unlike_published[:3],
            "dead_letters": dict(dead), "reference_dead_letters": dict(_dead(reference))}


def gathered(data_dir: Path) -> dict[str, int]:
    """What the node database holds once the scorers stopped (operations/gather.py), beside
    the partitions' own alerts."""
    out = {"transactions": 0, "alerts": 0, "outbox": 0, "partition_alerts": 0}
    node = data_dir / "branchguard.db"
    if node.exists():
        conn = read_only(node)
        try:
            for key, table in (("transactions", "transactions"), ("alerts", "alerts"),
                               ("outbox", "alert_outbox")):
                out[key] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
        finally:
            conn.close()
    for p in range(PARTITIONS):
        db = partition_db(data_dir, p)
        if db.exists():
            conn = read_only(db)
            try:
                out["partition_alerts"] += conn.execute("SELECT count(*) FROM alerts"
                                                        ).fetchone()[0]
            finally:
                conn.close()
    return out


def verdicts_of_record(tx_stream: list[tuple[str, bytes, dict[str, str]]],
                       verdicts: list[tuple[str, bytes, dict[str, str]]]) -> dict[str, int]:
    """Transaction ids with more than one distinct verdict in ``VERDICTS``."""
    by_id: dict[str, set[bytes]] = {}
    for _, data, headers in verdicts:
        tid = headers.get("Nats-Msg-Id", "")
        by_id.setdefault(tid, set()).add(data)
    return {"verdict_ids": len(by_id),
            "ids_with_two_verdicts": sum(1 for v in by_id.values() if len(v) > 1)}


def run_drill(root: Path, count: int = 30_000, seed: int = 19, scorers: int = 2,
              timeout: float = 300.0) -> dict[str, Any]:
    """The whole drill (module docstring). Returns its report; raises nothing it can
    report instead."""
    root.mkdir(parents=True, exist_ok=True)
    drill = drill_messages(count, seed)
    cluster: LoopbackCluster | None = None
    children: list[ScorerChild] = []
    watch: CommitWatch | None = None
    report: dict[str, Any] = {"count": count, "published_messages": len(drill.messages)}
    events: list[tuple[float, str, Any]] = []
    try:
        cluster = start_loopback_cluster(root / "cluster")
        data_dir = root / "data"
        env = drill_env(cluster.url, data_dir)
        children = [ScorerChild.start(f"scorer-{i + 1}", env, root) for i in range(scorers)]
        watch = CommitWatch(data_dir)
        watch.start()
        # balanced before the first transaction: each scorer holds its share
        wait_until(lambda: all(len(c.held()) == PARTITIONS // scorers for c in children), 60)
        state: dict[str, Any] = {}

        def kill_scorer() -> None:
            victim = children[0]
            state["killed_held"] = victim.held()
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            events.append((time.time(), "scorer_killed", sorted(state["killed_held"])))

        def add_scorer() -> None:
            children.append(ScorerChild.start(f"scorer-{len(children) + 1}", env, root))
            events.append((time.time(), "scorer_added", children[-1].name))

        def zombie() -> None:
            z = children[1]
            state["zombie_held"] = z.held()
            z.process.send_signal(signal.SIGSTOP)
            stopped = time.time()
            events.append((stopped, "zombie_stopped", sorted(state["zombie_held"])))

            def wake() -> None:
                time.sleep(ZOMBIE_SECONDS)
                z.process.send_signal(signal.SIGCONT)
                events.append((time.time(), "zombie_continued", z.name))
            threading.Thread(target=wake, daemon=True).start()

        running = cluster

        def kill_leader() -> None:
            leader = asyncio.run(tx_leader(running.url))
            running.kill(leader)
            events.append((time.time(), "tx_leader_killed", leader))

        marks = {0.40: kill_scorer, 0.50: add_scorer, 0.60: zombie, 0.70: kill_leader}
        progress = [0.0]
        started = time.monotonic()
        retries = asyncio.run(_publish(cluster.url, drill.messages, marks, progress))
        time.sleep(DUPLICATE_WINDOW_SECONDS + 0.5)  # the late re-sends: outside the window
        retries += asyncio.run(_publish(cluster.url, drill.late_resends, {}, [0.0]))
        report["publish_seconds"] = round(time.monotonic() - started, 1)
        report["publish_retries"] = retries
        tx = asyncio.run(_stream_messages(cluster.url, TX_STREAM))
        last_seq = len(tx)
        report["tx_stream_messages"] = last_seq
        subjects = [subject for subject, _, _ in tx]
        report["caught_up"] = wait_until(lambda: caught_up(data_dir, subjects), timeout)
        report["catch_up_seconds"] = round(time.monotonic() - started, 1)
        verdicts = asyncio.run(_stream_messages(cluster.url, VERDICT_STREAM))
        report.update(verdicts_of_record(tx, verdicts))
        for c in children:
            report.setdefault("exit_codes", {})[c.name] = c.stop()
        watch.halt.set()
        report["gathered"] = gathered(data_dir)
        report["failover"] = _failover(events, state, watch, children)
        report["zombie"] = _zombie(children[1], events)
        report["events"] = [(round(t, 3), what, detail) for t, what, detail in events]
        report["comparison"] = compare(asyncio.run(_reference(tx, root)), data_dir,
                                       published_verdicts(verdicts))
    finally:
        if watch is not None:
            watch.halt.set()
        for c in children:
            c.stop(grace=5.0)
        if cluster is not None:
            cluster.stop()
    return report


def _failover(events: list[tuple[float, str, Any]], state: dict[str, Any],
              watch: CommitWatch, children: list[ScorerChild]) -> dict[str, Any]:
    """Seconds from the scorer's SIGKILL to each orphaned partition's lease being taken,
    its opening, and its first commit; and from the leader's SIGKILL to each partition's
    first commit."""
    out: dict[str, Any] = {}
    killed = next((t for t, what, _ in events if what == "scorer_killed"), None)
    if killed is not None:
        per: dict[int, dict[str, float | None]] = {}
        logs = [e for c in children[1:] for e in c.events()]
        for p in state.get("killed_held", set()):
            taken = first_event(logs, "lease.acquired", killed, key=f"partition.{p}")
            opened = first_event(logs, "partition.open", killed, partition=p)
            commit = watch.first_commit_after(p, taken or killed)  # the new owner's
            per[p] = {"lease_taken": since(taken, killed), "open": since(opened, killed),
                      "first_commit": since(commit, killed)}
        out["scorer_kill"] = per
    leader = next((t for t, what, _ in events if what == "tx_leader_killed"), None)
    if leader is not None:
        out["leader_kill_first_commit"] = {
            p: since(watch.first_commit_after(p, leader), leader) for p in range(PARTITIONS)}
    return out


def _zombie(z: ScorerChild, events: list[tuple[float, str, Any]]) -> dict[str, Any]:
    """What the zombie did once it woke: the partitions it found lost, and any write it
    made under a lost tenure (commits refused by the fence count as refused, not written)."""
    woke = next((t for t, what, _ in events if what == "zombie_continued"), None)
    stopped: list[int] = next((d for _, what, d in events if what == "zombie_stopped"), [])
    after = [e for e in z.events() if woke is not None and
             log_time(e) >= woke - 1]
    lost = sorted({int(e["partition"]) for e in after  # lost, or let go without writing
                   if e.get("event") in ("partition.lost", "partition.fenced",
                                         "partition.handed_off")
                   and int(e["partition"]) in stopped})  # (not what it took on rejoining)
    return {"held_when_stopped": stopped, "found_lost": lost,
            "refused_commits": sum(1 for e in after if e.get("event") == "commit.fenced"),
            "commit_failures": sum(1 for e in after if e.get("event") == "commit.failed")}
