"""``branchguard bench``: measure a real node on this machine.

It starts a throwaway embedded nats-server and the scorer as its own process (exactly what
``branchguard run`` runs), then drives it from a separate load-generator process
(``branchguard bench-load``) that publishes like terminals do and subscribes to the verdicts:

- full speed: N transactions as fast as JetStream acks them; sustained tx/s is N over the time
  from the first publish to the last verdict (so every transaction was stored, its verdict
  published and its message acked along the way);
- fixed offered rates: publish-to-verdict latency p50/p95/p99 measured on one clock (the load
  generator's) from just before publish to the verdict's arrival;
- peak memory of the scorer (VmHWM);
- restart: with ``restart_rows`` more transactions stored, the time from starting the scorer
  to the verdict of a new transaction;
- the pass-through (``baseline=True``, the default): the same phases against a consumer
  that does only the message path (pull, one verdict per transaction, confirm, ack) with no
  validation, features, model or database: the ceiling this machine, nats-server and nats-py
  put on any scorer, measured in the same run;
- in every phase: the CPU each process spent per transaction (the consumer, its children
  such as Litestream, nats-server, the load generator) and the consumer's largest
  event-loop stall (:mod:`appliance.operations.looplag`, read back from its log).

:mod:`.report` turns the phases into one table with issue 16's targets beside the figures.
"""

from __future__ import annotations

import asyncio
from collections import deque
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import nats
import numpy as np
from nats.aio.msg import Msg

from ..alerts.metrics import figures
from ..alerts.outbox import UNROUTED, Outbox
from ..feed.simulate import simulate
from ..feed.terminal import population, publish_messages, to_message
from ..operations.looplag import LoopLag, read_windows, worst
from ..operations.node import EmbeddedNats
from ..scoring.features import FEATURES_VERSION, FeatureState, feature_state
from ..scoring.ingest import Delivery, Outgoing, Publisher, Puller, Ticket, ack_batch, connect
from ..scoring.streams import ensure_streams, reset_consumer
from ..scoring.model import Model, feature_matrix
from ..scoring.rules import RULES_VERSION
from ..scoring.score import judge
from ..settings import Settings, load, nats_servers
from ..store import Scored, Store
from ..transaction import Transaction, terminal_subject
from ..verdict import Verdict
from .proc import CpuMeter, cpu_seconds, peak_rss_mib
from .report import kept_up, table, targets

EVENT_RATE = 50.0
"""Event-time rate of the generated load: what a busy branch sees; publish rate is separate."""
LAG_WINDOW_SECONDS = 1.0
"""The consumers' loop-lag windows: a phase's stall is the worst window overlapping it."""


class _VerdictId(msgspec.Struct):
    transaction_id: str


def bench_transactions(seed: int, count: int, start: datetime) -> list[Transaction]:
    """The benchmark's simulated stream: ``count`` transactions of ``seed`` from ``start``
    at :data:`EVENT_RATE` (history to the scorer, which runs with the event-time check off)."""
    accounts, terminals = population(EVENT_RATE)
    return [item.tx for item in itertools.islice(
        simulate(seed, start=start, rate=EVENT_RATE, diurnal=False, accounts=accounts,
                 terminals=terminals), count)]


async def generate_load(url: str, count: int, rate: float | None, seed: int,
                        timeout: float = 300.0) -> dict[str, Any]:
    """The load generator: publish ``count`` transactions (at ``rate``/s, or full speed),
    wait for their verdicts, and report throughput and latency percentiles, the phase's
    first publish and last verdict (``started_at``, ``ended_at``, epoch seconds) and its own
    CPU seconds in between.

    Messages are generated and encoded before the clock starts (terminals are other
    machines). Verdicts are received in this same process: a second receiving process was
    tried and made every figure worse, since the two cores are the bottleneck.
    """
    start = datetime(2026, 1, 5, tzinfo=timezone.utc) + timedelta(days=seed % 1000)
    messages = [to_message(tx, "BR001") for tx in bench_transactions(seed, count, start)]
    sent_ns: dict[str, int] = {}
    latencies: list[float] = []
    decoder = msgspec.json.Decoder(_VerdictId)
    done = asyncio.Event()
    last_ns = 0

    async def on_verdict(msg: Msg) -> None:
        nonlocal last_ns
        now = time.time_ns()
        sent = sent_ns.pop(decoder.decode(msg.data).transaction_id, None)
        if sent is not None:
            latencies.append((now - sent) / 1e6)
            last_ns = now
            if len(latencies) >= count:
                done.set()

    def on_publish(msg_id: str, t_ns: int) -> None:
        sent_ns[msg_id] = t_ns

    servers = nats_servers(url)  # one server, or a cluster's
    sub_nc = await nats.connect(servers, name="bench-verdicts", pending_size=64 << 20)
    pub_nc = await nats.connect(servers, name="bench-terminals", pending_size=64 << 20)
    js = sub_nc.jetstream()
    baseline = (await js.stream_info("VERDICTS")).state.messages
    if rate:  # latency: every verdict, on this process's clock
        await sub_nc.subscribe("verdict.>", cb=on_verdict, pending_msgs_limit=-1,
                               pending_bytes_limit=-1)
        await sub_nc.flush()
    cpu_started = time.process_time()
    first_ns = time.time_ns()
    confirmed = await publish_messages(pub_nc, messages, rate=rate,
                                       on_publish=on_publish if rate else None)
    published_ns = time.time_ns()
    verdicts = 0
    if rate:
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            pass
        verdicts = len(latencies)
    else:  # throughput: the load generator only watches the VERDICTS stream fill up
        deadline = time.monotonic() + timeout
        while verdicts < count and time.monotonic() < deadline:
            verdicts = (await js.stream_info("VERDICTS")).state.messages - baseline
            last_ns = time.time_ns()
            await asyncio.sleep(0.01)
    cpu = time.process_time() - cpu_started
    await pub_nc.drain()
    await sub_nc.drain()
    lat = np.array(latencies)
    elapsed = max((last_ns or time.time_ns()) - first_ns, 1) / 1e9
    return {
        "offered_rate": rate or "full speed",
        "published": confirmed,
        "verdicts": verdicts,
        "seconds": round(elapsed, 3),
        "publish_seconds": round((published_ns - first_ns) / 1e9, 3),
        "published_tx_per_second": round(confirmed / max(published_ns - first_ns, 1) * 1e9, 1),
        "tx_per_second": round(verdicts / elapsed, 1),
        "started_at": first_ns / 1e9,
        "ended_at": (last_ns or time.time_ns()) / 1e9,
        "load_generator_cpu_seconds": round(cpu, 4),
        # none at full speed: that phase measures throughput only (and valid JSON has no NaN)
        "latency_ms": ({"p50": round(float(np.percentile(lat, 50)), 3),
                        "p95": round(float(np.percentile(lat, 95)), 3),
                        "p99": round(float(np.percentile(lat, 99)), 3),
                        "max": round(float(np.max(lat)), 3)} if latencies else
                       {"p50": None, "p95": None, "p99": None, "max": None}),
    }


def scored_history(settings: Settings, model: Model, state: FeatureState, rows: int,
                   seed: int) -> Iterator[list[tuple[Transaction, tuple[float, ...], Verdict]]]:
    """``rows`` transactions of the benchmark's simulated branch (dated from 2025-06-02),
    each scored as the scorer scores it (features in order from ``state``, ``model``'s risk
    for a chunk at once, the rules), in chunks of 5,000: (transaction, features, verdict)."""
    accounts, terminals = population(EVENT_RATE)
    stream = simulate(seed, start=datetime(2025, 6, 2, tzinfo=timezone.utc), rate=EVENT_RATE,
                      count=rows, diurnal=False, accounts=accounts, terminals=terminals)
    while chunk := [item.tx for item in itertools.islice(stream, 5000)]:
        feats = [state.observe(tx) for tx in chunk]
        risks = model.risks(feature_matrix(feats))
        yield [(tx, f, judge(tx, f, float(r), model.version, RULES_VERSION, settings))
               for tx, f, r in zip(chunk, feats, risks)]


def bulk_load(settings: Settings, rows: int, seed: int = 99) -> float:
    """Store ``rows`` scored historical transactions through the scorer's own stages (no
    NATS); returns seconds taken. Used to build a large database for the restart figure."""
    started = time.monotonic()
    store = Store.open(settings.db_path)
    model = Model.load(settings.models_dir, settings.model_version)
    try:
        for chunk in scored_history(settings, model, feature_state(store.reader), rows, seed):
            store.save_batch([Scored(tx, settings.branch, 0, f, FEATURES_VERSION, v)
                              for tx, f, v in chunk], [], "bulk-load", 0)
    finally:
        store.close()
    return time.monotonic() - started


async def passthrough(url: str, settings: Settings) -> None:
    """The baseline consumer: the scorer's message path (the same :class:`Puller`,
    :class:`Publisher` and acks) with every stage in between removed. Runs until killed;
    logs its event loop's lag as the scorer does in the benchmark."""
    lag = LoopLag(LAG_WINDOW_SECONDS)
    lag.start()
    nc = await connect(url, "bench-passthrough")
    js = nc.jetstream()
    await ensure_streams(js, settings)
    await reset_consumer(js, settings, 0)
    puller, verdicts = Puller(nc, settings), Publisher(nc)
    await verdicts.start()
    await puller.start()
    decode = msgspec.json.Decoder(_VerdictId).decode
    encode = msgspec.json.Encoder().encode
    pending: deque[tuple[list[Delivery], Ticket]] = deque()
    while True:
        batch = await puller.take(timeout=0.05 if pending else 1.0)
        out = []
        for d in batch:
            tid = decode(d.data).transaction_id
            terminal = terminal_subject(d.subject).split(".")[2]  # stored partitioned or not
            out.append(Outgoing(f"verdict.BR001.{terminal}",
                                encode({"transaction_id": tid}), tid))
        if batch:  # verdicts out at once, acks in order once confirmed: as the scorer does
            pending.append((batch, await verdicts.publish_many(out)))
        while pending and pending[0][1].done.done():
            done, ticket = pending.popleft()
            if await verdicts.confirm(ticket.items, timeout=10.0, ticket=ticket):
                await ack_batch(nc, done)


class ScorerProcess:
    """The scorer as a child process, as `branchguard run --nats-url` starts it (or, for the
    baseline, the pass-through consumer), logging its loop lag every second; ``extra_env``
    adds settings (a cluster's ``BRANCHGUARD_STREAM_REPLICAS``)."""

    def __init__(self, data_dir: Path, url: str, baseline: bool = False,
                 replicate: bool = True, fixed_thresholds: bool = False,
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = "pass-through" if baseline else "scorer"
        self.log_path = data_dir / "scorer.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        command = (["bench-passthrough", "--url", url] if baseline else
                   ["run", "--quiet", "--data-dir", str(data_dir), "--nats-url", url])
        # its simulated streams are dated 2025-2026 (see bench_transactions): history, loaded
        # with the event-time window off (docs/transactions.md)
        env = {**os.environ, "BRANCHGUARD_LOG_LEVEL": "INFO", "BRANCHGUARD_RUN_API": "false",
               "BRANCHGUARD_LOOP_LAG_WINDOW_SECONDS": str(LAG_WINDOW_SECONDS),
               "BRANCHGUARD_EVENT_TIME_CHECK": "false"}
        if not replicate:
            env["BRANCHGUARD_REPLICATE"] = "false"
        if fixed_thresholds:  # alerts at the old fixed thresholds, not the budget's few
            env["BRANCHGUARD_ALERT_BUDGET"] = "false"
        env.update(extra_env or {})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance", *command], stdout=log,
                stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.process.pid)

    def loop_lag(self, start: float, end: float, timeout: float = 5.0
                 ) -> dict[str, float | int | None]:
        """The largest stall and worst window p99 of this process's event loop between
        ``start`` and ``end`` (epoch seconds), once the window holding ``end`` is logged."""
        deadline = time.monotonic() + timeout
        windows = read_windows(self.log_path)
        while (not windows or windows[-1].ended_at < end) and time.monotonic() < deadline:
            time.sleep(0.1)
            windows = read_windows(self.log_path)
        return worst(windows, start, end)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_load(url: str, count: int, rate: float | None, seed: int) -> dict[str, Any]:
    """One phase of the load generator, as its own process (``branchguard bench-load``;
    ``url`` may name several servers): its report (see :func:`generate_load`)."""
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "bench-load", "--url", url, "--count", str(count),
         "--rate", str(rate or 0), "--seed", str(seed)],
        check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


async def wait_consumer(url: str, timeout: float = 60.0) -> None:
    """Return once the scorer (or the pass-through) has created its durable consumer."""
    nc = await nats.connect(nats_servers(url))
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                await js.consumer_info("TX", "scorer")
                return
            except Exception:
                await asyncio.sleep(0.05)
        raise TimeoutError("scorer did not create its consumer")
    finally:
        await nc.drain()


def measured_phase(consumer: ScorerProcess, others: dict[str, int],
              phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a phase and add what it cost each process in CPU µs per transaction (see
    :class:`CpuMeter`; the load generator measures itself, from its first publish to its
    last verdict) and the consumer's largest event-loop stall during it."""
    meter = CpuMeter(consumer.process.pid, consumer.name, others)
    result = phase()
    verdicts = max(1, int(result["verdicts"]))
    result["cpu_us_per_tx"] = {**meter.per_transaction(verdicts), "load-generator": round(
        result.pop("load_generator_cpu_seconds") * 1e6 / verdicts)}
    result.setdefault("consumer", consumer.name)
    result["loop_lag_ms"] = consumer.loop_lag(result["started_at"], result["ended_at"])
    return result


def _fixed_rates(consumer: ScorerProcess, others: dict[str, int], url: str, rates: list[float],
                 rate_seconds: float) -> list[dict[str, Any]]:
    """One phase per offered rate, each ``rate_seconds`` long, and whether it kept up."""
    results = []
    for i, rate in enumerate(rates):
        count = int(rate * rate_seconds)
        result = measured_phase(consumer, others, partial(run_load, url, count, rate, 3 + i))
        result["kept_up"] = kept_up(result, rate, count)
        results.append(result)
    return results


def _run_baseline(root: Path, count: int, rates: list[float], rate_seconds: float,
                  sync_policy: str) -> list[dict[str, Any]]:
    """The same phases through the pass-through consumer, on a nats-server of its own."""
    server = EmbeddedNats(load(None, env={}, data_dir=root / "baseline-nats", nats_port=0,
                               sync_policy=sync_policy))
    url = server.start()
    others = {"nats-server": server.process.pid if server.process is not None else 0}
    consumer = ScorerProcess(root / "baseline", url, baseline=True)
    try:
        asyncio.run(wait_consumer(url))
        run_load(url, 2000, None, seed=1)
        results = [measured_phase(consumer, others, lambda: run_load(url, count, None, seed=2))]
        results += _fixed_rates(consumer, others, url, rates, rate_seconds)
    finally:
        consumer.stop()
        server.stop()
    return results


def dead_smtp_url() -> str:
    """An Apprise mailto:// URL for a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (f"mailto://127.0.0.1:{port}?from=bench@branch.example&to=nobody@branch.example"
            "&mode=insecure")


_STORED = "SELECT count(*) FROM transactions"


def _alerts_phase(settings: Settings, url: str, count: int, alerts_to: str, seed: int
                  ) -> dict[str, Any]:
    """issue 6: the full-speed load again, with the alert dispatcher (its own process, as
    ``branchguard run`` starts it) delivering every severity to ``alerts_to``."""
    env = {**os.environ, "BRANCHGUARD_LOG_LEVEL": "WARNING"}
    env.update({f"BRANCHGUARD_ALERTS_{s}": alerts_to for s in ("CRITICAL", "HIGH", "WARNING")})
    log_path = settings.data_dir / "dispatcher.log"
    with log_path.open("ab") as log:
        dispatcher = subprocess.Popen(
            [sys.executable, "-m", "appliance", "alerts", "run", "--data-dir",
             str(settings.data_dir)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while _unrouted(settings) and time.monotonic() < deadline:  # started, backlog routed
            if dispatcher.poll() is not None:
                raise RuntimeError(f"dispatcher exited: see {log_path}")
            time.sleep(0.1)
        stored = _scalar(settings, _STORED)
        before = cpu_seconds(dispatcher.pid)  # started, imports done, backlog routed
        result = run_load(url, count, None, seed=seed)
        # the phase's alerts reach the outbox with their commit, which follows the verdicts
        # by up to the writer's gathering (scoring/commit.py): the dispatcher's part of the
        # phase ends once it has routed them
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                _scalar(settings, _STORED) < stored + int(result["verdicts"])
                or _unrouted(settings)):
            time.sleep(0.05)
        result["consumer"] = "+alerts"
        result["alerts_to"] = alerts_to.split("://")[0] + "://..."
        result["dispatcher_peak_rss_mib"] = peak_rss_mib(dispatcher.pid)
        result["dispatcher_cpu_seconds"] = round(cpu_seconds(dispatcher.pid) - before, 2)
        outbox = Outbox(settings.db_path)
        try:
            result["alert_metrics"] = figures(outbox.counts())
        finally:
            outbox.close()
    finally:
        dispatcher.send_signal(signal.SIGTERM)
        try:
            dispatcher.wait(30)
        except subprocess.TimeoutExpired:
            dispatcher.kill()
            dispatcher.wait()
    return result


def alerts_comparison(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Each dispatcher phase against the mean of the plain full-speed phases just before and
    after it (throughput drifts as the database grows, so only neighbours compare), and the
    mean of those differences; with the scorer's CPU per transaction, which does not depend
    on how busy the machine is."""
    full = [p for p in phases if p["offered_rate"] == "full speed"
            and p["consumer"] in ("scorer", "+alerts")]
    rounds = []
    for k, phase in enumerate(full):
        if phase["consumer"] != "+alerts" or not 0 < k < len(full) - 1:
            continue
        before, after = full[k - 1], full[k + 1]
        plain = (before["tx_per_second"] + after["tx_per_second"]) / 2
        plain_cpu = (before["cpu_us_per_tx"]["scorer"] + after["cpu_us_per_tx"]["scorer"]) / 2
        rounds.append({"with_dispatcher_tx_per_second": round(phase["tx_per_second"]),
                       "plain_tx_per_second": round(plain),
                       "difference_percent": round(
                           100 * (phase["tx_per_second"] - plain) / plain, 1),
                       "with_dispatcher_scorer_cpu_us": phase["cpu_us_per_tx"]["scorer"],
                       "plain_scorer_cpu_us": round(plain_cpu)})
    mean = (sum(r["difference_percent"] for r in rounds) / len(rounds) if rounds
            else float("nan"))
    return {"rounds": rounds, "mean_difference_percent": round(mean, 1)}


def _scalar(settings: Settings, sql: str) -> int:
    conn = sqlite3.connect(settings.db_path)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def _unrouted(settings: Settings) -> int:
    return _scalar(settings, UNROUTED)


def run_bench(count: int, rates: list[float], rate_seconds: float, restart_rows: int,
              sync_policy: str, baseline: bool = True, alerts_to: str | None = None,
              alert_rounds: int = 1, replicate: bool = True) -> dict[str, Any]:
    """Run every phase on a throwaway node (Litestream replicating unless ``replicate`` is
    False), and first on the pass-through consumer unless ``baseline`` is False; return the
    figures, the table of both consumers side by side and the targets (see :mod:`.report`).
    With ``alerts_to`` (an Apprise URL) the node alerts at the fixed thresholds (its cold
    alert budget would raise almost nothing to deliver), and its full-speed phase is followed by
    ``alert_rounds`` pairs of a phase with the alert dispatcher delivering to it (see
    :func:`dead_smtp_url`) and a plain one, so every dispatcher phase has a plain phase on
    either side (see :func:`alerts_comparison`)."""
    root = Path(tempfile.mkdtemp(prefix="branchguard-bench-"))
    settings = load(None, env={}, data_dir=root / "node", nats_port=0,
                    sync_policy=sync_policy)
    server = EmbeddedNats(load(None, env={}, data_dir=root / "nats", nats_port=0,
                               sync_policy=sync_policy))
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "replicate": replicate,
                              "sync_policy": sync_policy, "phases": []}
    try:
        if baseline:
            report["phases"].extend(_run_baseline(root, count, rates, rate_seconds,
                                                  sync_policy))
        url = server.start()
        others = {"nats-server": server.process.pid if server.process is not None else 0}
        # the alerts phases measure delivering alerts: a new node's alert budget is cold and
        # raises almost none, so with alerts_to the node alerts at the fixed thresholds
        scorer = ScorerProcess(settings.data_dir, url, replicate=replicate,
                         fixed_thresholds=alerts_to is not None)
        try:
            asyncio.run(wait_consumer(url))
            run_load(url, 2000, None, seed=1)  # warm-up: imports, caches, first pages
            phases = report["phases"]
            phases.append(measured_phase(scorer, others, lambda: run_load(url, count, None, seed=2)))
            if alerts_to:
                target = alerts_to
                for i in range(alert_rounds):  # a plain phase on either side of each
                    phases.append(measured_phase(scorer, others, partial(
                        _alerts_phase, settings, url, count, target, 90 + 2 * i)))
                    phases.append(measured_phase(scorer, others, partial(
                        run_load, url, count, None, 91 + 2 * i)))
                report["alerts_comparison"] = alerts_comparison(phases)
            phases += _fixed_rates(scorer, others, url, rates, rate_seconds)
            report["scorer_peak_rss_mib"] = scorer.peak_rss_mib()
            scorer.stop()
            if restart_rows:
                loaded = bulk_load(settings, restart_rows)
                stored = Store.open(settings.db_path)
                total = stored.counts()["transactions"]
                stored.close()
                scorer = ScorerProcess(settings.data_dir, url, replicate=replicate)
                first = run_load(url, 1, None, seed=50)
                report["restart"] = {
                    "stored_transactions": total,
                    "bulk_load_seconds": round(loaded, 1),
                    "seconds_to_first_verdict": round(time.monotonic() - scorer.started, 2),
                    "verdicts": first["verdicts"],
                }
                report["restart"]["scorer_peak_rss_mib"] = scorer.peak_rss_mib()
        finally:
            scorer.stop()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    report["table"] = table(report["phases"])
    report["targets"] = targets(report["table"], report.get("restart"))
    return report
