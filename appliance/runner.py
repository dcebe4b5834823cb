"""``branchguard run``: the embedded server, the scorer, the demo feed and the status line.

Ctrl-C (SIGINT) or SIGTERM stops the feed, lets the scorer finish and ack the batch in hand,
closes the database and stops nats-server: every process it started, cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TextIO

import numpy as np
from nats.aio.client import Client

from . import logs
from .child import terminate
from .ingest import connect
from .model import Model
from .node import EmbeddedNats, _die_with_parent
from .pipeline import Counters, Scorer
from .settings import Settings
from .simulate import simulate
from .store import Store
from .terminal import population, publish
from .transaction import Transaction

log = logs.get("appliance.runner")

DEMO_RATE = 50.0


class StatusLine:
    """One line, rewritten in place on a terminal: tx/s, alerts, p99 latency, dead letters."""

    def __init__(self, counters: Counters, out: TextIO = sys.stdout) -> None:
        self.counters = counters
        self.out = out
        self.last_time = time.monotonic()
        self.last_count = counters.transactions

    def render(self) -> str:
        c = self.counters
        now = time.monotonic()
        rate = (c.transactions - self.last_count) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_count = now, c.transactions
        lat, c.latencies_ms = c.latencies_ms, []
        p99 = f"{np.percentile(lat, 99):.1f} ms" if lat else "-"
        return (f"{rate:8.1f} tx/s | {c.transactions} scored | {c.alerts} alerts | "
                f"p99 {p99} | {c.dead_letters} dead-lettered | {c.duplicates} duplicates")

    def show(self) -> None:
        line = self.render()
        if self.out.isatty():
            self.out.write("\r\x1b[2K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()


def demo_stream(rate: float, branch: str, warmup_seconds: float = 1800.0
                ) -> Iterator[Transaction]:
    """The demo feed: the last ``warmup_seconds`` of simulated history (published at once,
    so accounts have a past), then live at ``rate`` tx/s. Fresh ids on every run."""
    start = datetime.now(timezone.utc) - timedelta(seconds=warmup_seconds)
    accounts, terminals = population(rate)
    for item in simulate(int(time.time()), start=start, rate=rate, branch=branch,
                         diurnal=False, accounts=accounts, terminals=terminals):
        yield item.tx


async def run_node(settings: Settings, demo: bool = False, demo_rate: float = DEMO_RATE,
                   status: bool = True) -> int:
    """Run the node until SIGINT/SIGTERM. Returns the process exit code."""
    model = Model.load(settings.models_dir, settings.model_version)  # fail before starting
    store = Store.open(settings.db_path)                                # anything
    embedded = EmbeddedNats(settings) if settings.nats_url is None else None
    try:
        url = embedded.start() if embedded is not None else str(settings.nats_url)
        nc = await connect(url, "branchguard-scorer")
    except BaseException:
        store.close()
        if embedded is not None:
            embedded.stop()
        raise
    feed_nc: Client | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scorer = Scorer(nc, store, model, settings)
    tasks: list[asyncio.Task[object]] = []
    api: subprocess.Popen[bytes] | None = None
    try:
        scoring = asyncio.create_task(scorer.run())
        ready = asyncio.create_task(scorer.ready.wait())
        await asyncio.wait([scoring, ready], return_when=asyncio.FIRST_COMPLETED)
        if scoring.done():
            scoring.result()  # raises what stopped it
        log.info("node.ready", txn_id=None, nats_url=url, db=str(settings.db_path),
                 model_version=model.version, demo=demo)
        api = start_api(dataclasses.replace(settings, nats_url=url))
        if demo:
            feed_nc = await connect(url, "branchguard-demo-feed")
            tasks.append(asyncio.create_task(
                publish(feed_nc, demo_stream(demo_rate, settings.branch),
                        branch=settings.branch, realtime=True, stop=stop)))
        if status:
            line = StatusLine(scorer.counters)
            tasks.append(asyncio.create_task(_every(settings.summary_interval_seconds,
                                                    line.show, stop)))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([scoring, stopping], return_when=asyncio.FIRST_COMPLETED)
        scorer.stop()
        stop.set()
        for task in tasks:
            await task
        await scoring
        return 0
    finally:
        stop_api(api)
        for task in tasks:
            task.cancel()
        if feed_nc is not None:
            await feed_nc.drain()
        await nc.drain()
        store.close()
        if embedded is not None:
            embedded.stop()
        if status:
            sys.stdout.write("\n")
        log.info("node.stopped", txn_id=None, scored=scorer.counters.transactions)


async def _every(seconds: float, fn: Callable[[], None], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            fn()


# --- the analyst API as a child process (issue 4) -------------------------------------------

def start_api(settings: Settings) -> subprocess.Popen[bytes] | None:
    """``branchguard serve`` as a child process with exactly these settings (passed as
    ``BRANCHGUARD_*`` variables), so its requests never compete with the scorer's event loop
    and the API stays up if the scorer restarts. None when ``run_api`` is off."""
    if not settings.run_api:
        return None
    env = dict(os.environ)
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        env[f"BRANCHGUARD_{field.name.upper()}"] = (
            "" if value is None else ",".join(value) if isinstance(value, tuple) else str(value))
    env.pop("BRANCHGUARD_CONFIG", None)  # every value is in the environment already
    # Like nats-server: dies with the node even if the node is SIGKILLed, and is kept out of
    # the terminal's process group, so the node stops it in order.
    return subprocess.Popen([sys.executable, "-m", "appliance", "serve"], env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)


def stop_api(process: subprocess.Popen[bytes] | None) -> None:
    terminate(process)
