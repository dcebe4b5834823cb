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
- baseline (``baseline=True``): the same full-speed load against a pass-through consumer that
  does only the message path (pull, one verdict per transaction, confirm, ack) with no
  validation, features, model or database: the ceiling this machine, nats-server and nats-py
  put on any scorer, measured in the same run.
"""

from __future__ import annotations

import asyncio
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
from pathlib import Path
from collections.abc import Callable
from typing import Any

import msgspec
import nats
import numpy as np
from nats.aio.msg import Msg

from ..alerts.metrics import figures
from ..alerts.outbox import UNROUTED, Outbox
from ..feed.simulate import simulate
from ..feed.terminal import population, publish_messages, to_message
from ..operations.node import EmbeddedNats
from ..scoring.features import FEATURES_VERSION, feature_state
from ..scoring.ingest import Publisher, Puller, ack_batch, connect, ensure_streams, reset_consumer
from ..scoring.model import Model, feature_matrix
from ..scoring.rules import RULES_VERSION
from ..scoring.score import judge
from ..settings import Settings, load
from ..store import Scored, Store
from ..transaction import Transaction

EVENT_RATE = 50.0
"""Event-time rate of the generated load: what a busy branch sees; publish rate is separate."""


class _VerdictId(msgspec.Struct):
    transaction_id: str


def _transactions(seed: int, count: int, start: datetime) -> list[Transaction]:
    accounts, terminals = population(EVENT_RATE)
    return [item.tx for item in itertools.islice(
        simulate(seed, start=start, rate=EVENT_RATE, diurnal=False, accounts=accounts,
                 terminals=terminals), count)]


async def generate_load(url: str, count: int, rate: float | None, seed: int,
                        timeout: float = 300.0) -> dict[str, Any]:
    """The load generator: publish ``count`` transactions (at ``rate``/s, or full speed),
    wait for their verdicts, and report throughput and latency percentiles.

    Messages are generated and encoded before the clock starts (terminals are other
    machines). Verdicts are received in this same process: a second receiving process was
    tried and made every figure worse, since the two cores are the bottleneck.
    """
    start = datetime(2026, 1, 5, tzinfo=timezone.utc) + timedelta(days=seed % 1000)
    messages = [to_message(tx, "BR001") for tx in _transactions(seed, count, start)]
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

    sub_nc = await nats.connect(url, name="bench-verdicts", pending_size=64 << 20)
    pub_nc = await nats.connect(url, name="bench-terminals", pending_size=64 << 20)
    js = sub_nc.jetstream()
    baseline = (await js.stream_info("VERDICTS")).state.messages
    if rate:  # latency: every verdict, on this process's clock
        await sub_nc.subscribe("verdict.>", cb=on_verdict, pending_msgs_limit=-1,
                               pending_bytes_limit=-1)
        await sub_nc.flush()
    first_ns = time.time_ns()
    confirmed = await publish_messages(pub_nc, messages, rate=rate,
                                       on_publish=on_publish if rate else None,
                                       confirm_every=1 if rate else 100)
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
    await pub_nc.drain()
    await sub_nc.drain()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    elapsed = max((last_ns or time.time_ns()) - first_ns, 1) / 1e9
    return {
        "offered_rate": rate or "full speed",
        "published": confirmed,
        "verdicts": verdicts,
        "seconds": round(elapsed, 3),
        "publish_seconds": round((published_ns - first_ns) / 1e9, 3),
        "tx_per_second": round(verdicts / elapsed, 1),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3),
                       "p95": round(float(np.percentile(lat, 95)), 3),
                       "p99": round(float(np.percentile(lat, 99)), 3),
                       "max": round(float(np.max(lat)), 3)},
    }


def bulk_load(settings: Settings, rows: int, seed: int = 99) -> float:
    """Store ``rows`` scored historical transactions through the scorer's own stages (no
    NATS); returns seconds taken. Used to build a large database for the restart figure."""
    started = time.monotonic()
    store = Store.open(settings.db_path)
    model = Model.load(settings.models_dir, settings.model_version)
    state = feature_state(store.reader)
    accounts, terminals = population(EVENT_RATE)
    stream = simulate(seed, start=datetime(2025, 6, 2, tzinfo=timezone.utc), rate=EVENT_RATE,
                      count=rows, diurnal=False, accounts=accounts, terminals=terminals)
    try:
        while True:
            chunk = [item.tx for item in itertools.islice(stream, 5000)]
            if not chunk:
                break
            feats = [state.observe(tx) for tx in chunk]
            risks = model.risks(feature_matrix(feats))
            scored = [Scored(tx, settings.branch, 0, f, FEATURES_VERSION,
                             judge(tx, f, float(r), model.version, RULES_VERSION, settings))
                      for tx, f, r in zip(chunk, feats, risks)]
            store.save_batch(scored, [], "bulk-load", 0)
    finally:
        store.close()
    return time.monotonic() - started


async def passthrough(url: str, settings: Settings) -> None:
    """The baseline consumer: the scorer's message path (the same :class:`Puller`,
    :class:`Publisher` and acks) with every stage in between removed. Runs until killed."""
    nc = await connect(url, "bench-passthrough")
    js = nc.jetstream()
    await ensure_streams(js, settings)
    await reset_consumer(js, settings, 0)
    puller, verdicts = Puller(nc, settings), Publisher(nc)
    await verdicts.start()
    await puller.start()
    decode = msgspec.json.Decoder(_VerdictId).decode
    encode = msgspec.json.Encoder().encode
    while True:
        batch = await puller.take(timeout=1.0)
        last = len(batch) - 1
        for i, d in enumerate(batch):
            tid = decode(d.data).transaction_id
            await verdicts.publish(f"verdict.BR001.{d.subject.split('.')[2]}",
                                   encode({"transaction_id": tid}), tid, confirm=i == last)
        if batch and await verdicts.confirmed(verdicts.mark(), timeout=10.0):
            await ack_batch(nc, batch)


class _Scorer:
    """The scorer as a child process, as `branchguard run --nats-url` starts it (or, for the
    baseline, the pass-through consumer)."""

    def __init__(self, data_dir: Path, url: str, baseline: bool = False) -> None:
        self.log_path = data_dir / "scorer.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        command = (["bench-passthrough", "--url", url] if baseline else
                   ["run", "--quiet", "--data-dir", str(data_dir), "--nats-url", url])
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance", *command], stdout=log,
                stderr=subprocess.STDOUT,
                # its simulated streams are dated 2025-2026 (see _transactions): history,
                # loaded with the event-time window off (docs/transactions.md)
                env={**os.environ, "BRANCHGUARD_LOG_LEVEL": "WARNING",
                     "BRANCHGUARD_RUN_API": "false", "BRANCHGUARD_EVENT_TIME_CHECK": "false"})
        self.started = time.monotonic()

    def peak_rss_mib(self) -> float:
        return _peak_rss_mib(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """Child processes of any of ``pid``'s threads (litestream is started from one)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return str(pid)


class CpuMeter:
    """CPU seconds spent during a phase by the scorer, each of its children (Litestream,
    the alert dispatcher) and nats-server, as microseconds per transaction. Unlike tx/s this
    hardly depends on what else the machine is doing, so two configurations can be compared
    on a busy machine too."""

    def __init__(self, scorer: int, others: dict[str, int]) -> None:
        self.scorer, self.others = scorer, others
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        seen = {"scorer": _cpu_seconds(self.scorer)}
        for child in _children(self.scorer):
            seen[_process_name(child)] = _cpu_seconds(child)
        for name, pid in self.others.items():
            seen[name] = _cpu_seconds(pid)
        return seen

    def per_transaction(self, transactions: int) -> dict[str, float]:
        end = self._read()
        return {name: round((end[name] - self.start.get(name, 0.0)) * 1e6 / max(1, transactions))
                for name in end}


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _run_load(url: str, count: int, rate: float | None, seed: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "bench-load", "--url", url, "--count", str(count),
         "--rate", str(rate or 0), "--seed", str(seed)],
        check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


async def _wait_consumer(url: str, timeout: float = 60.0) -> None:
    nc = await nats.connect(url)
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


def _run_baseline(root: Path, count: int, rates: list[float], rate_seconds: float,
                  sync_policy: str) -> list[dict[str, Any]]:
    """The same phases through the pass-through consumer, on a nats-server of its own."""
    server = EmbeddedNats(load(None, env={}, data_dir=root / "baseline-nats", nats_port=0,
                               sync_policy=sync_policy))
    url = server.start()
    consumer = _Scorer(root / "baseline", url, baseline=True)
    try:
        asyncio.run(_wait_consumer(url))
        _run_load(url, 2000, None, seed=1)
        results = [_run_load(url, count, None, seed=2)]
        for i, rate in enumerate(rates):
            results.append(_run_load(url, int(rate * rate_seconds), rate, seed=3 + i))
    finally:
        consumer.stop()
        server.stop()
    for result in results:
        result["consumer"] = "baseline"
    return results


def dead_smtp_url() -> str:
    """An Apprise mailto:// URL for a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (f"mailto://127.0.0.1:{port}?from=bench@branch.example&to=nobody@branch.example"
            "&mode=insecure")


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
        before = _cpu_seconds(dispatcher.pid)  # started, imports done, backlog routed
        result = _run_load(url, count, None, seed=seed)
        result["consumer"] = "+alerts"
        result["alerts_to"] = alerts_to.split("://")[0] + "://..."
        result["dispatcher_peak_rss_mib"] = _peak_rss_mib(dispatcher.pid)
        result["dispatcher_cpu_seconds"] = round(_cpu_seconds(dispatcher.pid) - before, 2)
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
            and p.get("consumer") in (None, "+alerts")]
    rounds = []
    for k, phase in enumerate(full):
        if phase.get("consumer") != "+alerts" or not 0 < k < len(full) - 1:
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


def _unrouted(settings: Settings) -> int:
    conn = sqlite3.connect(settings.db_path)
    try:
        return int(conn.execute(UNROUTED).fetchone()[0])
    finally:
        conn.close()


def _metered(scorer: int, others: dict[str, int]
             ) -> Callable[[Callable[[], dict[str, Any]]], dict[str, Any]]:
    """Run a phase and add its CPU microseconds per transaction (see :class:`CpuMeter`)."""
    def run(phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        meter = CpuMeter(scorer, others)
        result = phase()
        result["cpu_us_per_tx"] = meter.per_transaction(int(result["verdicts"]))
        return result
    return run


def run_bench(count: int, rates: list[float], rate_seconds: float, restart_rows: int,
              sync_policy: str, baseline: bool = False, alerts_to: str | None = None,
              alert_rounds: int = 1) -> dict[str, Any]:
    """Run every phase on a throwaway node; return the figures. With ``alerts_to`` (an
    Apprise URL) the full-speed phase is followed by ``alert_rounds`` pairs of a phase with
    the alert dispatcher delivering to it (see :func:`dead_smtp_url`) and a plain one, so
    every dispatcher phase has a plain phase on either side (see :func:`alerts_comparison`)."""
    root = Path(tempfile.mkdtemp(prefix="branchguard-bench-"))
    settings = load(None, env={}, data_dir=root / "node", nats_port=0,
                    sync_policy=sync_policy)
    server = EmbeddedNats(load(None, env={}, data_dir=root / "nats", nats_port=0,
                               sync_policy=sync_policy))
    url = server.start()
    nats_pid = server.process.pid if server.process is not None else 0
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()},
                              "sync_policy": sync_policy, "phases": []}
    if baseline:
        report["phases"].extend(_run_baseline(root, count, rates, rate_seconds, sync_policy))
    scorer = _Scorer(settings.data_dir, url)
    try:
        asyncio.run(_wait_consumer(url))
        _run_load(url, 2000, None, seed=1)  # warm-up: imports, caches, first pages
        metered = _metered(scorer.process.pid, {"nats-server": nats_pid})
        report["phases"].append(metered(lambda: _run_load(url, count, None, seed=2)))
        if alerts_to:
            target = alerts_to
            for i in range(alert_rounds):  # a plain phase on either side of each
                report["phases"].append(metered(
                    lambda: _alerts_phase(settings, url, count, target, seed=90 + 2 * i)))
                report["phases"].append(metered(
                    lambda: _run_load(url, count, None, seed=91 + 2 * i)))
            report["alerts_comparison"] = alerts_comparison(report["phases"])
        for i, rate in enumerate(rates):
            report["phases"].append(metered(
                lambda: _run_load(url, int(rate * rate_seconds), rate, seed=3 + i)))
        report["scorer_peak_rss_mib"] = scorer.peak_rss_mib()
        scorer.stop()
        if restart_rows:
            loaded = bulk_load(settings, restart_rows)
            stored = Store.open(settings.db_path)
            total = stored.counts()["transactions"]
            stored.close()
            scorer = _Scorer(settings.data_dir, url)
            first = _run_load(url, 1, None, seed=50)
            report["restart"] = {
                "stored_transactions": total,
                "bulk_load_seconds": round(loaded, 1),
                "seconds_to_first_verdict": round(time.monotonic() - scorer.started, 2),
                "verdicts": first["verdicts"],
            }
            report["restart"]["scorer_peak_rss_mib"] = scorer.peak_rss_mib()
    finally:
        scorer.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"sync_policy={report['sync_policy']}  cpus={report['machine']['cpus']}",
             f"{'consumer':>9} {'offered':>12} {'verdicts':>9} {'tx/s':>9} {'p50 ms':>8} {'p95 ms':>8} "
             f"{'p99 ms':>8} {'max ms':>8}"]
    for p in report["phases"]:
        lat = p["latency_ms"]
        offered = p["offered_rate"]
        lines.append(f"{p.get('consumer', 'scorer'):>9} {offered if isinstance(offered, str) else f'{offered:.0f}/s':>12} "
                     f"{p['verdicts']:>9} {p['tx_per_second']:>9.0f} {lat['p50']:>8.2f} "
                     f"{lat['p95']:>8.2f} {lat['p99']:>8.2f} {lat['max']:>8.2f}")
    for p in report["phases"]:
        if "cpu_us_per_tx" in p:
            cpu, offered = p["cpu_us_per_tx"], p["offered_rate"]
            where = offered if isinstance(offered, str) else f"{offered:.0f}/s"
            lines.append(f"CPU µs per transaction, {p.get('consumer', 'scorer')} at {where}: "
                         + ", ".join(f"{name} {us:.0f}" for name, us in cpu.items())
                         + f"; total {sum(cpu.values()):.0f}")
    for p in report["phases"]:
        if "alert_metrics" in p:
            m = p["alert_metrics"]
            lines.append(f"alerts to {p['alerts_to']}: {m['branchguard_alerts_queue_depth']} "
                         f"undelivered, {m['branchguard_alerts_retried']} failed attempts, "
                         f"{m['branchguard_alerts_sent']} sent; dispatcher CPU during the phase "
                         f"{p['dispatcher_cpu_seconds']} s, peak memory "
                         f"{p['dispatcher_peak_rss_mib']} MiB")
    if "alerts_comparison" in report:
        c = report["alerts_comparison"]
        for r in c["rounds"]:
            lines.append(f"with the dispatcher {r['with_dispatcher_tx_per_second']} tx/s "
                         f"(scorer {r['with_dispatcher_scorer_cpu_us']} µs/tx) against "
                         f"{r['plain_tx_per_second']} tx/s (scorer {r['plain_scorer_cpu_us']} "
                         f"µs/tx) on either side: {r['difference_percent']:+.1f} %")
        lines.append(f"mean difference: {c['mean_difference_percent']:+.1f} %")
    lines.append(f"scorer peak memory: {report.get('scorer_peak_rss_mib')} MiB")
    if "restart" in report:
        r = report["restart"]
        lines.append(f"restart with {r['stored_transactions']} stored transactions: first "
                     f"verdict after {r['seconds_to_first_verdict']} s "
                     f"(peak memory {r['scorer_peak_rss_mib']} MiB)")
    return "\n".join(lines)
