"""``branchguard bench hub``: branches and a regional hub on loopback (issue 20).

Three branches, each the embedded single node (``branchguard run``) whose nats-server is a
leaf node of the hub, and the hub's nats-server with its analyst side (``branchguard hub
run``), every one a real process. The last branch dials the hub through a link that can be
cut (:class:`.link_cut.LinkProxy`).

1. **Steady.** After a warm-up (``WARMUP`` transactions per branch, until the hub has
   their alerts), each branch gets simulated transactions at ``rate`` tx/s for ``seconds``;
   each alert's latency from branch to hub is the time from its ``created_at`` at the branch
   to the hub's ``case.stored`` log line for it.
2. **Cut.** The last branch's link is cut for ``cut_seconds`` while every branch goes on at
   ``rate``; then restored. Reported: the alerts pending at the branch when the link
   returned, how long the link took to come back (the hub's ``/leafz``), and how long until
   the hub had every one of them.
3. **Exactly once.** The hub's alerts are every branch's, each once, under its branch.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats

from ..feed.terminal import to_message
from ..operations.cluster import free_port
from ..operations.hub import HubPlan, leafs_up, write_hub_config
from ..operations.node import nats_server_binary
from ..settings import Settings, load
from .link_cut import LinkProxy
from .partition_scorers import ScorerChild, read_only, wait_until
from .throughput import bench_transactions

START = datetime(2027, 1, 4, tzinfo=timezone.utc)
WARMUP = 20
"""Transactions per branch before the timed phases."""
BRANCH_ENV = {"BRANCHGUARD_EVENT_TIME_CHECK": "false", "BRANCHGUARD_ALERT_BUDGET": "false",
              "BRANCHGUARD_REPLICATE": "false", "BRANCHGUARD_RUN_API": "false",
              "BRANCHGUARD_NATS_PORT": "0", "BRANCHGUARD_LOG_LEVEL": "INFO"}
"""What every process of the bench (and tests/test_hub_cases.py) runs with: simulated
history (the event-time window off), no alert budget, no Litestream, no API."""


class HubServer:
    """The hub's nats-server, from the written ``hub.conf``, started and stopped by PID."""

    def __init__(self, conf: Path, log: Path) -> None:
        self.conf, self.log = conf, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([str(nats_server_binary()), "-c", str(self.conf)],
                                            stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def leafs(monitor_port: int) -> list[str]:
    """The branches whose leaf link is up, by the hub's ``/leafz`` (none while it cannot
    be read)."""
    try:
        return sorted(leafs_up(f"http://127.0.0.1:{monitor_port}"))
    except OSError:
        return []


def node_url(child: ScorerChild) -> str | None:
    """The nats-server URL a ``branchguard run`` node logged when it was ready."""
    return next((e["nats_url"] for e in child.events() if e.get("event") == "node.ready"),
                None)


def publish(url: str, branch: str, seed: int, start: int, count: int,
            rate: float = 0.0) -> list[str]:
    """Transactions ``start`` to ``start + count`` of ``seed``'s simulated stream, as a
    branch's terminals publish them (at ``rate`` tx/s; 0: at once); their ids."""
    txs = bench_transactions(seed, start + count, START)[start:]
    messages = [to_message(tx, branch) for tx in txs]

    async def main() -> None:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            began = time.monotonic()
            for i, m in enumerate(messages):
                if rate > 0:
                    await asyncio.sleep(max(0.0, began + i / rate - time.monotonic()))
                await js.publish(m.subject, m.data, headers={"Nats-Msg-Id": m.msg_id})
        finally:
            await nc.close()

    asyncio.run(main())
    return [tx.transaction_id for tx in txs]


def _query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    try:
        with read_only(db) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # not made or migrated yet: nothing there yet
        return []


def _publish_all(urls: dict[str, str], seeds: dict[str, int], start: int, count: int,
                 rate: float) -> None:
    """Every branch at ``rate`` at once, each from its own thread."""
    threads = [threading.Thread(target=publish, args=(urls[b], b, seeds[b], start, count,
                                                      rate)) for b in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class HubSite:
    """A hub and its branches on loopback, every one a real process: the hub's nats-server
    (``hub config``'s files), each branch the embedded node (``branchguard run``) as a leaf
    node, and the hub's analyst side (``branchguard hub run``); the last branch dials
    through a link that can be cut. :meth:`stop` stops every one by its PID."""

    def __init__(self, root: Path, branches: tuple[str, ...],
                 env: dict[str, str] | None = None) -> None:
        self.root, self.branches, self.cut = root, branches, branches[-1]
        env = {**BRANCH_ENV, **(env or {})}
        self.plan = HubPlan(host="127.0.0.1", client_port=free_port(),
                            leaf_port=free_port(), monitor_port=free_port(),
                            store_dir=root / "hub-store", branches=branches,
                            public_host="127.0.0.1")
        self.out = root / "hub"
        write_hub_config(load(None, env={}), self.out, self.plan)
        self.link = LinkProxy(self.plan.leaf_port)
        self.link.restore()
        config = self.out / "branches" / f"{self.cut}.toml"
        config.write_text(config.read_text().replace(f":{self.plan.leaf_port}\"",
                                                     f":{self.link.port}\""))
        self.server = HubServer(self.out / "hub.conf", root / "hub-server.log")
        self.server.start()
        self.nodes = {b: ScorerChild.start(b, {**env, "BRANCHGUARD_CONFIG": str(
            self.out / "branches" / f"{b}.toml"), "BRANCHGUARD_DATA_DIR": str(root / b)},
            root, command=("run",)) for b in branches}
        self.hub_dir = root / "hub-node"
        self.analyst = ScorerChild.start("hub-run", {**env, "BRANCHGUARD_CONFIG": str(
            self.out / "hub.toml"), "BRANCHGUARD_DATA_DIR": str(self.hub_dir)}, root,
            command=("hub", "run"))
        self.urls: dict[str, str] = {}

    @property
    def hub_db(self) -> Path:
        return self.hub_dir / "branchguard.db"

    def branch_db(self, branch: str) -> Path:
        return self.root / branch / "branchguard.db"

    def hub_settings(self) -> Settings:
        """The settings of the hub's own processes (``hub.toml``, the hub's data dir)."""
        return load(self.out / "hub.toml", env={}, data_dir=self.hub_dir)

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Every branch's node up and its leaf link connected."""
        if not wait_until(lambda: all(node_url(c) for c in self.nodes.values()), timeout):
            return False
        self.urls = {b: str(node_url(c)) for b, c in self.nodes.items()}
        return wait_until(lambda: sorted(leafs(self.plan.monitor_port))
                          == sorted(self.branches), 30)

    def branch_alerts(self, branch: str) -> dict[str, float]:
        """A branch's alerts: transaction id and when it was raised."""
        return {str(t): float(c) for t, c in _query(
            self.branch_db(branch), "SELECT transaction_id, created_at FROM alerts")}

    def hub_alerts(self) -> list[tuple[str, str]]:
        """The hub's alerts: transaction id and branch, as many rows as there are."""
        return [(str(t), str(b)) for t, b in _query(
            self.hub_db, "SELECT a.transaction_id, t.branch FROM alerts a "
                         "JOIN transactions t USING (transaction_id)")]

    def all_at_hub(self) -> bool:
        return len(self.hub_alerts()) == sum(len(self.branch_alerts(b))
                                             for b in self.branches)

    def stop(self) -> None:
        self.analyst.stop()
        for node in self.nodes.values():
            node.stop()
        self.server.stop()
        self.link.close()


def run_hub_bench(rate: float = 5.0, seconds: float = 30.0, cut_seconds: float = 60.0,
                  work_dir: Path | None = None) -> dict[str, Any]:
    """Run the three phases (see module doc); the report as a dict."""
    root = Path(work_dir or tempfile.mkdtemp(prefix="bg-bench-hub-"))
    root.mkdir(parents=True, exist_ok=True)
    branches = ("br1", "br2", "br3")
    seeds = {b: 31 + i for i, b in enumerate(branches)}
    site = HubSite(root, branches)
    cut = site.cut
    report: dict[str, Any] = {"branches": len(branches), "rate_per_branch": rate,
                              "seconds": seconds, "cut_seconds": cut_seconds,
                              "work_dir": str(root)}
    try:
        if not site.wait_ready():
            raise RuntimeError(f"the branches did not come up: see {root}")
        # Warm-up, not timed: the hub's sources of the branches' new streams start.
        _publish_all(site.urls, seeds, 0, WARMUP, 0.0)
        if not wait_until(lambda: all(site.branch_alerts(b) for b in branches)
                          and site.all_at_hub(), 60):
            raise RuntimeError(f"the hub did not get the warm-up's alerts: see {root}")
        warm = {t for b in branches for t in site.branch_alerts(b)}
        steady = int(rate * seconds)
        _publish_all(site.urls, seeds, WARMUP, steady, rate)
        wait_until(site.all_at_hub, 60)
        stored = {e["txn_id"]: _log_time(e) for e in site.analyst.events()
                  if e.get("event") == "case.stored"}
        latencies = sorted((stored[t] - created) * 1000 for b in branches
                           for t, created in site.branch_alerts(b).items()
                           if t in stored and t not in warm)
        report["steady"] = {"transactions": steady * len(branches),
                            "alerts": len(latencies), **_percentiles(latencies)}

        site.link.cut()
        cut_at = time.monotonic()
        _publish_all(site.urls, seeds, WARMUP + steady, int(rate * cut_seconds), rate)
        time.sleep(max(0.0, cut_at + cut_seconds - time.monotonic()))
        at_hub = {t for t, b in site.hub_alerts() if b == cut}
        pending = set(site.branch_alerts(cut)) - at_hub
        site.link.restore()
        restored = time.monotonic()
        wait_until(lambda: cut in leafs(site.plan.monitor_port), 30)
        link_back = time.monotonic() - restored
        caught = wait_until(lambda: set(site.branch_alerts(cut)) <= {
            t for t, b in site.hub_alerts() if b == cut}, 60)
        report["cut"] = {"branch": cut, "pending_alerts": len(pending),
                         "link_back_seconds": round(link_back, 2),
                         "caught_up_seconds": round(time.monotonic() - restored, 2)
                         if caught else None}
        wait_until(site.all_at_hub, 60)
        stored_all = site.hub_alerts()
        expected = {(t, b) for b in branches for t in site.branch_alerts(b)}
        report["exactly_once"] = {
            "alerts_at_branches": len(expected), "alerts_at_hub": len(stored_all),
            "missing": len(expected - set(stored_all)),
            "duplicated": len(stored_all) - len(set(stored_all)),
            "ok": set(stored_all) == expected and len(stored_all) == len(set(stored_all))}
    finally:
        site.stop()
    return report


def _log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 \
        else [values[0]] * 99
    return {"p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1),
            "max_ms": round(max(values), 1)}


def format_hub_report(report: dict[str, Any]) -> str:
    """The report as a person reads it."""
    s, c, e = report.get("steady", {}), report.get("cut", {}), report.get("exactly_once", {})
    return "\n".join([
        f"branches and a hub on loopback: {report['branches']} branches at "
        f"{report['rate_per_branch']} tx/s each",
        f"steady ({report['seconds']:.0f} s): {s.get('alerts')} alerts, branch -> hub "
        f"p50 {s.get('p50_ms')} ms, p99 {s.get('p99_ms')} ms, max {s.get('max_ms')} ms",
        f"link of {c.get('branch')} cut for {report['cut_seconds']:.0f} s: "
        f"{c.get('pending_alerts')} alerts pending; link back after "
        f"{c.get('link_back_seconds')} s; every one at the hub "
        f"{c.get('caught_up_seconds')} s after the link was restored (target <= 10 s)",
        f"exactly once: {e.get('alerts_at_hub')} at the hub of {e.get('alerts_at_branches')} "
        f"at the branches, {e.get('missing')} missing, {e.get('duplicated')} duplicated: "
        f"{'ok' if e.get('ok') else 'FAILED'}",
        f"(processes' logs and databases: {report['work_dir']})",
    ])
