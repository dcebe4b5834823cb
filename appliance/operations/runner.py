"""``branchguard run``: the embedded server, the scorer, the demo feed and the status line,
and the children it supervises (nats-server, litestream, the API, the alert dispatcher).

Ctrl-C (SIGINT) or SIGTERM stops the restarts and the feed, lets the scorer finish and ack
the batch in hand, stops the API and the dispatcher, closes the connections and the
database and stops nats-server, then litestream: every process it started, cleanly, also
after a child or the NATS server has died and come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np
from nats.aio.client import Client
from nats.errors import Error as NatsError

from .. import compiled, logs
from ..alerts import routing
from ..errors import NodeError
from ..feed.terminal import publish
from ..nats_auth import client_options
from ..scoring.ingest import connect
from ..scoring.pipeline import Counters
from ..scoring.registry import Registry
from ..settings import Settings
from ..store import Store
from . import demo as demo_world
from .case_flows import scoring_side
from .looplag import LoopLag
from .node import EmbeddedNats
from .replication import Litestream
from .scoring import ScorerRun
from .services import AlertDispatcher, ApiServer
from .supervisor import Supervisor

log = logs.get("appliance.runner")

DEMO_RATE = demo_world.DEMO_RATE


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


async def run_node(settings: Settings, demo: bool = False, demo_rate: float = DEMO_RATE,
                   status: bool = True, demo_days: float = demo_world.DEMO_HISTORY_DAYS) -> int:
    """Run the node until SIGINT/SIGTERM. Returns the process exit code. With ``demo``, the
    demo world (operations/demo.py) at ``demo_rate`` tx/s with up to ``demo_days`` of
    history."""
    registry = Registry.of(settings)
    model = registry.load(registry.production())  # fail before starting
    store = Store.open(settings.db_path)                                # anything
    embedded = EmbeddedNats(settings) if settings.nats_url is None else None
    replicator = Litestream(settings) if settings.replicate else None  # issue 7
    reconnected = asyncio.Event()
    try:
        url = embedded.start() if embedded is not None else str(settings.nats_url)
        nc = await connect(url, "branchguard-scorer", on_reconnected=reconnected.set,
                           **client_options(settings))
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
    world = demo_world.demo_world(demo_rate) if demo else None
    start: demo_world.DemoStart | None = None
    if world is not None:  # before the scorer rebuilds its state from the stored rows
        try:
            start = await loop.run_in_executor(None, lambda: demo_world.prepare_demo(
                settings, store, model, world, demo_world.history_days(world, demo_days)))
        except BaseException:
            await close(nc)
            store.close()
            if embedded is not None:
                embedded.stop()
            raise
    scoring = ScorerRun(nc, store, model, settings, registry, reconnected)
    supervisor = Supervisor(settings, lambda: {"scorer": scoring.health})
    if embedded is not None:
        supervisor.adopt(embedded)
    api = ApiServer(dataclasses.replace(settings, nats_url=url)) if settings.run_api else None
    feed: asyncio.Task[int] | None = None
    tasks: list[asyncio.Task[None]] = []
    code = 1
    lag = LoopLag(settings.loop_lag_window_seconds) if settings.loop_lag_window_seconds else None
    watching = asyncio.create_task(supervisor.watch())
    try:
        if lag is not None:  # from the start: the state rebuild's stall is part of the story
            lag.start()
        if routing.configured(settings):
            supervisor.launch(AlertDispatcher(settings))
        else:
            log.info("alerts.not_dispatched", txn_id=None,
                     hint="no alert destinations configured (alerts_critical, alerts_high, "
                          "alerts_warning); alerts stay in the outbox")
        await scoring.start()
        if replicator is not None:
            # Only now: rebuilding the state writes nothing, and litestream's first sync of
            # a large database would take the CPU the rebuild needs (2 cores; see
            # docs/replication.md). It replicates whatever was written before it, WAL included.
            await loop.run_in_executor(None, replicator.start)
            supervisor.adopt(replicator)
        log.info("node.ready", txn_id=None, nats_url=url, db=str(settings.db_path),
                 model_version=model.version, demo=demo, compiled=compiled.status)
        for module, how in compiled.status.items():
            if how in (compiled.NOT_BUILT, compiled.STALE):  # slower than it could be
                log.warning("compiled.not_used", txn_id=None, module=module, reason=how)
        if api is not None:
            with contextlib.suppress(NodeError):  # then the supervisor keeps trying
                api.bind()
            supervisor.launch(api)
        if world is not None and start is not None:
            announce_demo_user(settings, port=api.port if api is not None else None)
            feed_nc = await connect(url, "branchguard-demo-feed", **client_options(settings))
            log.info("demo.feed", txn_id=None, rate=demo_rate, customers=world.customers,
                     history_rows=start.history.rows)
            feed = asyncio.create_task(
                publish(feed_nc, demo_world.live_stream(world, start.live_from),
                        branch=settings.branch, realtime=True, stop=stop))
            tasks.append(asyncio.create_task(
                demo_world.deliver_labels(settings, world, start.labels_until, stop)))
        if settings.hub_url:  # a branch of a regional hub: cases up, casework down
            tasks.append(asyncio.create_task(scoring_side(nc, settings, stop)))
        if status:
            line = StatusLine(scoring.counters)
            tasks.append(asyncio.create_task(_every(settings.summary_interval_seconds,
                                                    line.show, stop)))
        with contextlib.suppress(Exception):  # logged by scoring.stop below, exit code 1
            await scoring.keep(stop)  # until stopped, or a scorer failed while connected
            code = 0
    finally:
        stop.set()
        await supervisor.close()
        if feed is not None:
            await _end(feed, grace=2.0 if feed_nc is not None and feed_nc.is_connected else 0)
        if await scoring.stop(grace=STOP_GRACE_SECONDS) is not None:
            code = 1
        if lag is not None:
            lag.stop()
        await asyncio.gather(*(loop.run_in_executor(None, child.stop)  # side by side
                               for child in supervisor.children
                               if child is not embedded and child is not replicator))
        if api is not None:
            api.close()
        for task in tasks:
            await _end(task, grace=1.0)
        for connection in (feed_nc, nc):
            if connection is not None:
                await close(connection)
        store.close()
        if embedded is not None:
            embedded.stop()
        if replicator is not None:
            replicator.stop()  # after the last commit, which it then replicates
        await _end(watching, grace=1.0)
        if status:
            sys.stdout.write("\n")
        c = scoring.counters
        log.info("node.stopped", txn_id=None, scored=c.transactions, alerts=c.alerts,
                 dead_letters=c.dead_letters, duplicates=c.duplicates, conflicts=c.conflicts,
                 adopted=c.adopted, exit_code=code)
    return code


STOP_GRACE_SECONDS = 10.0
"""How long a stop lets the scorer finish the batch in hand and its acks."""


async def _end(task: asyncio.Task[Any], grace: float) -> None:
    """Give ``task`` ``grace`` seconds to finish by itself, then cancel it; never raises."""
    if not task.done():
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(task), grace)
    if not task.done():
        task.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task


async def close(nc: Client, timeout: float = 5.0) -> None:
    """Drain a connection that is up (what it published is flushed first); close one that
    is not (a drain while reconnecting raises, and would wait for a server that is gone)."""
    if nc.is_closed:
        return
    try:
        if nc.is_connected:
            await asyncio.wait_for(nc.drain(), timeout)
            return
    except (TimeoutError, NatsError):
        pass
    with contextlib.suppress(NatsError):
        await nc.close()


async def _every(seconds: float, fn: Callable[[], None], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            fn()


# --- the analyst console's demo user (issue 5) ----------------------------------------------

DEMO_USER = "demo"


def announce_demo_user(settings: Settings, out: TextIO = sys.stdout,
                       port: int | None = None) -> str | None:
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
    shown = port or settings.api_port or "<api port>"
    out.write(f"console: http://{settings.api_host}:{shown}/console/  user: {DEMO_USER}  "
              f"password: {password}  (shown once; new on every --demo start)\n")
    out.flush()
    return password
