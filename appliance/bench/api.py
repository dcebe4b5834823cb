"""``branchguard bench api``: the analyst API's latency on a node-sized database.

It builds (or reuses) a database of ``transactions`` scored transactions through the
scorer's own stages (bench.bulk_load), keeps ``alerts`` of their alerts (a real branch's
alert rate is well below the simulator's), starts the real server (``branchguard serve``) as
a child process, and drives it from a separate load-generator process
(``branchguard bench-api-load``, aiohttp with ``concurrency`` requests in flight):

Each phase runs at each ``concurrency`` (requests in flight): 1 shows the latency of one
request on an idle server; more show queueing once the two cores are busy.

- cached: one alert-list query asked again and again (every answer after the first is a
  cache hit while nothing changes);
- uncached: every request a different filter (a ``min_risk`` never asked before), so each is
  a cache miss that runs the count and the page query.

With ``flood`` (``--wrong-secret-flood N``), each phase runs twice, idle and beside a
flood of wrong secrets from N more clients (flood.py) with the bench key's own id, and the
report gives how much slower the valid requests got and what the flood was answered. The
server keeps its default limits on key checks (the request rate limits are lifted, so that
every flood request reaches the key checks and the valid load is not refused by them).

Latency is measured by the load generator from just before sending to the end of the
response body, so it includes HTTP and the event loop, on the same two cores as the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from ..casework import keys
from .flood import Flood
from ..change import connect_writer
from ..operations.child import terminate
from ..settings import load
from ..store import open_db
from .throughput import bulk_load

_LISTENING = re.compile(r'"event":"api.listening".*?"port":(\d+)')


def build_database(data_dir: Path, transactions: int, alerts: int) -> dict[str, int]:
    """A database with ``transactions`` rows and at most ``alerts`` alerts (reused when the
    directory already holds at least that many transactions)."""
    settings = load(None, env={}, data_dir=data_dir)
    db = open_db(settings.db_path)
    have = db.execute("SELECT count(*) FROM transactions").fetchone()[0]
    db.close()
    if have < transactions:
        bulk_load(settings, transactions - have)
    conn = sqlite3.connect(settings.db_path)
    try:
        # Keep a spread of alerts across the whole history, as a branch would have.
        conn.execute("DELETE FROM alerts WHERE alert_id NOT IN (SELECT alert_id FROM alerts "
                     "ORDER BY (alert_id * 2654435761) % 4294967296 LIMIT ?)", (alerts,))
        conn.commit()
        counts = {"transactions": conn.execute("SELECT count(*) FROM transactions").fetchone()[0],
                  "alerts": conn.execute("SELECT count(*) FROM alerts").fetchone()[0]}
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return counts


class _Server:
    """``branchguard serve`` on a free port, as a child process."""

    def __init__(self, data_dir: Path) -> None:
        self.log_path = data_dir / "api.log"
        env = {**os.environ, "BRANCHGUARD_DATA_DIR": str(data_dir), "BRANCHGUARD_API_PORT": "0",
               "BRANCHGUARD_API_RATE_PER_SECOND": "1000000",
               "BRANCHGUARD_API_RATE_BURST": "1000000", "BRANCHGUARD_LOG_LEVEL": "INFO"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "appliance", "serve"],
                                            stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_path.read_text())
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("serve did not start listening in 60 s")

    def stop(self) -> None:
        terminate(self.process, 30)


async def generate_api_load(url: str, key: str, mode: str, requests: int,
                            concurrency: int, seed: int = 7) -> dict[str, Any]:
    """The load generator: ``requests`` GETs of the alert list, ``concurrency`` at a time
    over keep-alive connections (aiohttp); latency percentiles in ms and the statuses seen.
    ``seed`` picks the uncached filters: a phase that must miss the cache needs one no
    phase before it used."""
    rng = random.Random(seed)
    paths = (["/api/v1/alerts?status=NEW&limit=50"] * requests if mode == "cached" else
             [f"/api/v1/alerts?min_risk={rng.uniform(0.0, 0.95):.9f}&limit=50"
              f"&sort={rng.choice(['-created_at', '-risk'])}" for _ in range(requests)])
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    pending = iter(paths)
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(paths[0]) as first:  # warm-up (cached: fills the cache)
            await first.read()

        async def worker() -> None:
            for path in pending:
                started = time.perf_counter()
                async with session.get(path) as response:
                    await response.read()
                latencies.append((time.perf_counter() - started) * 1000)
                statuses[response.status] = statuses.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies)
    return {"mode": mode, "requests": len(latencies), "concurrency": concurrency,
            "statuses": {str(k): v for k, v in statuses.items()},
            "requests_per_second": round(len(latencies) / elapsed, 1),
            "latency_ms": {q: round(float(np.percentile(lat, n)), 3)
                           for q, n in (("p50", 50), ("p95", 95), ("p99", 99))}}


def run_api_bench(transactions: int, alerts: int, requests: int, concurrency: list[int],
                  data_dir: Path | None = None, flood: int = 0) -> dict[str, Any]:
    """Build or reuse the database, start the server, run both load phases (each idle and
    beside a wrong-secret flood of ``flood`` clients, when ``flood``); the figures."""
    root = data_dir or Path(tempfile.mkdtemp(prefix="branchguard-bench-api-"))
    built_at = time.monotonic()
    counts = build_database(root, transactions, alerts)
    build_seconds = round(time.monotonic() - built_at, 1)
    settings = load(None, env={}, data_dir=root)
    key_id, key = keys.create(connect_writer(settings.db_path), "bench", "viewer", "bench")
    server = _Server(root)
    phases: list[dict[str, Any]] = []

    def measure(mode: str, in_flight: int) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "appliance", "bench-api-load", "--url", server.url,
             "--key", key, "--mode", mode, "--requests", str(requests),
             "--concurrency", str(in_flight), "--seed", str(7 + len(phases))],
            check=True, capture_output=True, text=True, env={**os.environ})
        phase: dict[str, Any] = json.loads(out.stdout)
        return phase

    try:
        for in_flight in concurrency:
            for mode in ("cached", "uncached"):
                phases.append({**measure(mode, in_flight), "flood": None})
                if flood:
                    flooding = Flood(server.url, key_id, flood)
                    try:
                        time.sleep(0.5)  # the flood in full swing before measuring
                        measured = measure(mode, in_flight)
                    finally:
                        answered = flooding.stop()
                    phases.append({**measured, "flood": answered})
    finally:
        server.stop()
    return {"database": {**counts, "dir": str(root), "build_seconds": build_seconds},
            "phases": phases}


def format_api_report(report: dict[str, Any]) -> str:
    db = report["database"]
    lines = [f"database: {db['transactions']} transactions, {db['alerts']} alerts "
             f"({db['dir']}, built/reused in {db['build_seconds']} s)",
             f"{'alert list':>12} {'requests':>9} {'in flight':>9} {'req/s':>8} {'p50 ms':>8} "
             f"{'p95 ms':>8} {'p99 ms':>8}  statuses"]
    idle: dict[tuple[str, int], float] = {}
    for p in report["phases"]:
        lat = p["latency_ms"]
        flood = p.get("flood")
        name = p["mode"] if flood is None else f"+flood {flood['clients']}"
        lines.append(f"{name:>12} {p['requests']:>9} {p['concurrency']:>9} "
                     f"{p['requests_per_second']:>8.0f} {lat['p50']:>8.2f} {lat['p95']:>8.2f} "
                     f"{lat['p99']:>8.2f}  {p['statuses']}")
        if flood is None:
            idle[(p["mode"], p["concurrency"])] = lat["p50"]
            continue
        ratio = lat["p50"] / idle[(p["mode"], p["concurrency"])]
        lines.append(f"{'':>12} valid p50 {ratio:.2f}x idle (target <= 2x); the flood: "
                     f"{flood['requests']} requests, {flood['requests_per_second']:.0f}/s, "
                     f"statuses {flood['statuses']}")
    return "\n".join(lines)
