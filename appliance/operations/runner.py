"""``branchguard run``: the embedded server, the scorer, the demo feed and the status line.

Ctrl-C (SIGINT) or SIGTERM stops the feed, lets the scorer finish and ack the batch in hand,
closes the database and stops nats-server: every process it started, cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from multiprocessing.process import BaseProcess
from typing import TextIO

import numpy as np
from nats.aio.client import Client

from .. import logs
from ..alerts import dispatch, routing
from ..feed.simulate import simulate
from ..feed.terminal import population, publish
from ..nats_auth import client_options
from ..scoring.ingest import connect
from ..scoring.pipeline import Counters, Scorer
from ..scoring.registry import Registry
from ..settings import Settings
from ..store import Store
from ..transaction import Transaction
from .child import terminate
from .node import EmbeddedNats, die_with_parent
from .replication import Litestream

log = logs.get("appliance.runner")

DEMO_RATE = 50.0
DEMO_WORLD = 7
"""The simulator seed of the demo's accounts and terminals: the same on every start."""
DEMO_WARMUP_SECONDS = 1800.0
"""The simulated history a demo publishes on a new node, so accounts have a past."""


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


def demo_warmup(newest: float | None, now: float, full: float = DEMO_WARMUP_SECONDS) -> float:
    """How much history a demo start publishes: ``full`` on a node with nothing stored;
    after a restart only the gap since the newest stored transaction (``newest``, epoch
    seconds), at most ``full``, as terminals that buffered while the node was down would send
    it. A restart that published the whole half hour again would put a second half hour of
    history behind accounts that already have one."""
    if newest is None:
        return full
    return max(0.0, min(full, now - newest))


def demo_stream(rate: float, branch: str, warmup_seconds: float = DEMO_WARMUP_SECONDS,
                seed: int | None = None) -> Iterator[Transaction]:
    """The demo feed: the last ``warmup_seconds`` of simulated history (published at once,
    so accounts have a past), then live at ``rate`` tx/s. Fresh ids on every run (the seed
    is the start time unless given), always the same accounts and terminals
    (:data:`DEMO_WORLD`), so a restarted demo goes on with the customers it had."""
    start = datetime.now(timezone.utc) - timedelta(seconds=warmup_seconds)
    accounts, terminals = population(rate)
    for item in simulate(int(time.time()) if seed is None else seed, start=start, rate=rate,
                         branch=branch, diurnal=False, accounts=accounts, terminals=terminals,
                         world=DEMO_WORLD):
        yield item.tx


async def run_node(settings: Settings, demo: bool = False, demo_rate: float = DEMO_RATE,
                   status: bool = True) -> int:
    """Run the node until SIGINT/SIGTERM. Returns the process exit code."""
    registry = Registry.of(settings)
    model = registry.load(registry.production())  # fail before starting
    store = Store.open(settings.db_path)                                # anything
    embedded = EmbeddedNats(settings) if settings.nats_url is None else None
    replicator = Litestream(settings) if settings.replicate else None  # issue 7
    try:
        url = embedded.start() if embedded is not None else str(settings.nats_url)
        nc = await connect(url, "branchguard-scorer", **client_options(settings))
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
    scorer = Scorer(nc, store, model, settings, registry)
    tasks: list[asyncio.Task[object]] = []
    alerts = AlertsChild(settings)
    api: subprocess.Popen[bytes] | None = None
    scoring: asyncio.Task[None] | None = None
    try:
        if alerts.start():
            tasks.append(asyncio.create_task(alerts.watch(stop)))
        scoring = asyncio.create_task(scorer.run())
        ready = asyncio.create_task(scorer.ready.wait())
        await asyncio.wait([scoring, ready], return_when=asyncio.FIRST_COMPLETED)
        if scoring.done():
            scoring.result()  # raises what stopped it
        if replicator is not None:
            # Only now: rebuilding the state writes nothing, and litestream's first sync of
            # a large database would take the CPU the rebuild needs (2 cores; see
            # docs/replication.md). It replicates whatever was written before it, WAL included.
            await loop.run_in_executor(None, replicator.start)
        log.info("node.ready", txn_id=None, nats_url=url, db=str(settings.db_path),
                 model_version=model.version, demo=demo)
        api = start_api(dataclasses.replace(settings, nats_url=url))
        if demo:
            announce_demo_user(settings)
            load_demo_terminals(settings, demo_rate)  # issue 5: the case page's map
            feed_nc = await connect(url, "branchguard-demo-feed", **client_options(settings))
            warmup = demo_warmup(store.newest_ts(), time.time())
            log.info("demo.feed", txn_id=None, history_seconds=round(warmup, 1), rate=demo_rate)
            tasks.append(asyncio.create_task(
                publish(feed_nc, demo_stream(demo_rate, settings.branch, warmup),
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
        if scoring is not None and not scoring.done():  # failed while scoring had started
            scorer.stop()
            with contextlib.suppress(Exception):
                await scoring
        alerts.stop()
        stop_api(api)
        for task in tasks:
            task.cancel()
        if feed_nc is not None:
            await feed_nc.drain()
        await nc.drain()
        store.close()
        if embedded is not None:
            embedded.stop()
        if replicator is not None:
            replicator.stop()  # after the last commit, which it then replicates
        if status:
            sys.stdout.write("\n")
        log.info("node.stopped", txn_id=None, scored=scorer.counters.transactions)


# --- issue 6: the alert dispatcher, a child process next to the scorer -------------------------

def run_dispatcher_child(settings: Settings) -> None:
    """Entry point of the dispatcher started by ``branchguard run`` (a spawned process):
    dies with its parent, logs as the node does, exits with the dispatcher's code."""
    die_with_parent()
    logs.configure(settings.log_level)
    raise SystemExit(dispatch.run_dispatcher(settings))


class AlertsChild:
    """``branchguard alerts run`` as a spawned child with these exact settings, started when
    any alert destination is configured (otherwise alerts wait in the outbox), restarted if
    it dies: alerts must not stop for good because of one bad moment, and scoring never
    waits for them."""

    RESTART_CHECK_SECONDS = 2.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: BaseProcess | None = None

    def start(self) -> bool:
        if not routing.configured(self.settings):
            log.info("alerts.not_dispatched", txn_id=None,
                     hint="no alert destinations configured (alerts_critical, alerts_high, "
                          "alerts_warning); alerts stay in the outbox")
            return False
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_dispatcher_child, args=(self.settings,), name="branchguard-alerts")
        self.process.start()
        return True

    async def watch(self, stop: asyncio.Event) -> None:
        """Until ``stop``: restart the dispatcher whenever it has exited."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.RESTART_CHECK_SECONDS)
            except TimeoutError:
                if self.process is not None and not self.process.is_alive():
                    log.error("alerts.dispatcher_died", txn_id=None,
                              exitcode=self.process.exitcode)
                    self.start()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then wait: the dispatcher marks what it sent and exits."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.is_alive():
            process.terminate()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()


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
                            start_new_session=True, preexec_fn=die_with_parent)


def stop_api(process: subprocess.Popen[bytes] | None) -> None:
    terminate(process)


# --- the analyst console's demo user (issue 5) ----------------------------------------------

DEMO_USER = "demo"


def announce_demo_user(settings: Settings, out: TextIO = sys.stdout) -> str | None:
    """Give the ``demo`` user (a supervisor) a fresh password and print it once with the
    console's address; a password from an earlier run stops working. Any sign-in lock on
    ``demo`` ends too: the operator expects the password just printed to work at once (other
    users' locks stay). None (and nothing printed) when the console is not served."""
    if not (settings.run_api and settings.console_enabled):
        return None
    from ..casework import users
    from ..casework.login_throttle import unlock
    from ..change import connect_writer

    db = connect_writer(settings.db_path)
    try:
        if users.exists(db.conn, DEMO_USER):
            password = users.set_password(db, DEMO_USER, "runner:demo")
        else:
            password = users.create(db, DEMO_USER, "supervisor", "runner:demo")
        unlock(settings, db, DEMO_USER, None, "runner:demo")
    finally:
        db.close()
    port = settings.api_port or "<api port>"
    out.write(f"console: http://{settings.api_host}:{port}/console/  user: {DEMO_USER}  "
              f"password: {password}  (shown once; new on every --demo start)\n")
    out.flush()
    return password


def load_demo_terminals(settings: Settings, rate: float) -> None:
    """Put the demo feed's terminals (its world and sizes) in the terminal directory."""
    from ..casework.terminal_directory import simulated_sites, write_sites

    accounts, terminals = population(rate)
    write_sites(settings.db_path, simulated_sites(DEMO_WORLD, accounts=accounts,
                                                  terminals=terminals,
                                                  branch=settings.branch),
                "runner:demo", "simulator")
