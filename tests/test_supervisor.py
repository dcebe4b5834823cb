"""Supervision in ``branchguard run``: every child killed with SIGKILL under the demo stream
comes back and serves again, nothing is lost or stored twice, and the stop after it is clean
(the drill of ``branchguard bench children``, on the real node)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from appliance import node_health
from appliance.bench.children import CHILDREN, run_drill, zombies
from appliance.operations.child import Child
from appliance.operations.node import EmbeddedNats
from appliance.operations.supervisor import Supervisor
from appliance.scoring.ingest import connect
from appliance.settings import load

from .support import make_transactions, query, send, stored_count, wait_until

Node = type  # the node_factory fixture yields a NodeProcess subclass


@pytest.mark.timeout(400)
def test_each_killed_child_comes_back_and_no_transaction_is_lost_or_stored_twice() -> None:
    report = run_drill(rate=3.0, timeout=60.0, pause=0.5)
    tail = report["log_tail"]
    for name in CHILDREN:
        assert report["children"][name]["back"], f"{name}: {report['children'][name]}\n{tail}"
    sys.stderr.write("seconds back: " + ", ".join(
        f"{n} {r['seconds']}" for n, r in report["children"].items()) + "\n")
    assert report["zombies"] == 0
    assert report["readyz"]["status"] == 200, report["readyz"]
    stop = report["stop"]
    assert stop["exit_code"] == 0 and stop["node_stopped"], f"{stop}\n{tail}"
    assert stop["tracebacks"] == 0 and stop["disconnect_warnings"] == 0, f"{stop}\n{tail}"
    accounting = report["accounting"]
    # Nothing the node committed past is missing. A message that reached the stream as the
    # node stopped is past its checkpoint, so the next start scores it: at most the last
    # second's (3 tx/s) can be.
    assert accounting["lost_count"] == 0, accounting
    assert accounting["missing_count"] <= 3, accounting
    assert all(seq > accounting["checkpoint"] for seq in accounting["missing"]), accounting
    assert accounting["stored_twice"] == 0 and accounting["alerted_twice"] == 0, accounting
    assert accounting["stream_messages"] == accounting["stored"] + \
        accounting["dead_lettered"] + accounting["missing_count"], accounting


# --- the supervisor on its own, with real child processes --------------------------------

@pytest.fixture
def events() -> Iterator[list[logging.LogRecord]]:
    """Every log record of the ``appliance`` loggers while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger, keep = logging.getLogger("appliance"), Keep()
    level = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(keep)
    logger.setLevel(level)


def named(records: list[logging.LogRecord], event: str) -> list[dict[str, Any]]:
    return [{**getattr(r, "fields", {}), "level": r.levelname} for r in records
            if r.getMessage() == event]


class Script(Child):
    """A real child process running a line of Python."""

    def __init__(self, name: str, code: str) -> None:
        super().__init__()
        self.name, self.code = name, code

    def start(self, timeout: float = 15.0) -> None:
        self.spawn([sys.executable, "-c", self.code])


async def supervise(supervisor: Supervisor, until: Callable[[], bool], timeout: float = 30.0
                    ) -> None:
    watching = asyncio.create_task(supervisor.watch())
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    await supervisor.close()
    await watching
    for child in supervisor.children:
        child.stop()


def test_a_child_that_keeps_exiting_is_logged_and_restarted_ever_more_slowly(
        tmp_path: Path, events: list[logging.LogRecord]) -> None:
    settings = load(None, env={}, data_dir=tmp_path, child_restart_initial_seconds=0.05,
                    child_restart_max_seconds=0.4)
    supervisor = Supervisor(settings)

    async def go() -> None:
        supervisor.launch(Script("exits", "raise SystemExit(3)"))
        await supervise(supervisor, lambda: len(named(events, "child.restarting")) >= 6)

    asyncio.run(go())
    exited = named(events, "child.exited")
    assert exited and all(e["exit_code"] == 3 and e["level"] == "ERROR" and
                          e["child"] == "exits" and e["how"] == "exit code 3" for e in exited)
    waits = [e["in_seconds"] for e in named(events, "child.restarting")]
    assert waits[:4] == [0.05, 0.1, 0.2, 0.4] and set(waits[4:]) == {0.4}
    assert zombies(os.getpid()) == 0


def test_a_child_that_ran_long_enough_comes_back_after_the_first_wait_again(
        tmp_path: Path, events: list[logging.LogRecord]) -> None:
    settings = load(None, env={}, data_dir=tmp_path, child_restart_initial_seconds=0.05,
                    child_restart_max_seconds=0.2)
    supervisor = Supervisor(settings)

    async def go() -> None:
        supervisor.launch(Script("naps", "import time; time.sleep(0.5)"))
        await supervise(supervisor, lambda: len(named(events, "child.restarting")) >= 3)

    asyncio.run(go())
    assert {e["in_seconds"] for e in named(events, "child.restarting")} == {0.05}


def test_a_killed_child_is_reaped_restarted_and_reported(
        tmp_path: Path, events: list[logging.LogRecord]) -> None:
    settings = load(None, env={}, data_dir=tmp_path)
    supervisor = Supervisor(settings, lambda: {"scorer": "ok"})
    child = Script("sleeper", "import time; time.sleep(60)")
    health: list[dict[str, str]] = []

    async def go() -> None:
        supervisor.launch(child)
        watching = asyncio.create_task(supervisor.watch())
        while child.pid is None or supervisor.states() != {"sleeper": "ok"}:
            await asyncio.sleep(0.02)
        first = child.pid
        await asyncio.sleep(1.2)  # the health file is rewritten every second
        health.append(node_health.read(settings))
        os.kill(first, signal.SIGKILL)
        while not named(events, "child.restarted"):
            await asyncio.sleep(0.02)
        assert child.pid != first and child.poll() is None
        await supervisor.close()
        await watching
        child.stop()

    asyncio.run(go())
    assert health == [{"scorer": "ok", "sleeper": "ok"}]
    (exited,) = named(events, "child.exited")
    assert exited["exit_code"] == -signal.SIGKILL and exited["how"] == "killed by SIGKILL"
    (back,) = named(events, "child.restarted")
    assert back["child"] == "sleeper" and back["seconds_down"] < 30
    assert zombies(os.getpid()) == 0
    assert node_health.read(settings) == {"scorer": "not running"}  # removed at close


def test_the_health_file_says_not_running_once_it_is_stale(tmp_path: Path) -> None:
    settings = load(None, env={}, data_dir=tmp_path)
    assert node_health.read(settings) == {"scorer": "not running"}
    node_health.write(settings, {"scorer": "ok", "nats-server": "restarting"})
    assert node_health.read(settings) == {"scorer": "ok", "nats-server": "restarting"}
    later = time.time() + node_health.STALE_SECONDS + 1
    assert node_health.read(settings, now=later) == {"scorer": "not running"}


# --- the embedded nats-server and the connection -----------------------------------------

def test_a_restarted_embedded_server_has_the_same_port_and_the_same_streams(
        tmp_path: Path) -> None:
    server = EmbeddedNats(load(None, env={}, data_dir=tmp_path, nats_port=0))
    url = server.start()
    try:
        stored = _stream_messages(url)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        assert server.start() == url
        assert _stream_messages(url) == stored
    finally:
        server.stop()


def _stream_messages(url: str) -> int:
    async def go() -> int:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="KEEP", subjects=["keep.>"])
            if (await js.stream_info("KEEP")).state.messages == 0:
                for i in range(3):
                    await js.publish(f"keep.{i}", b"x")
            return int((await js.stream_info("KEEP")).state.messages)
        finally:
            await nc.close()
    return asyncio.run(go())


def test_a_drain_is_no_warning_and_a_lost_server_is(
        tmp_path: Path, events: list[logging.LogRecord]) -> None:
    server = EmbeddedNats(load(None, env={}, data_dir=tmp_path, nats_port=0))
    url = server.start()
    back = asyncio.Event()

    async def go() -> None:
        nc = await connect(url, "test", on_reconnected=back.set)
        await nc.drain()
        assert [e["level"] for e in named(events, "nats.disconnected")] == ["INFO"]
        nc = await connect(url, "test", on_reconnected=back.set)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        while len(named(events, "nats.disconnected")) < 2:
            await asyncio.sleep(0.02)
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        await asyncio.wait_for(back.wait(), 30)
        await nc.drain()

    try:
        asyncio.run(go())
    finally:
        server.stop()
    assert [e["level"] for e in named(events, "nats.disconnected")] == \
        ["INFO", "WARNING", "INFO"]
    assert len(named(events, "nats.reconnected")) == 1


# --- the scorer across a restart of its NATS server (as under compose or systemd) ---------

def test_the_scorer_carries_on_after_its_nats_server_restarts_and_stops_cleanly_without_it(
        tmp_path: Path, node_factory: Node) -> None:
    server = EmbeddedNats(load(None, env={}, data_dir=tmp_path / "nats", nats_port=0))
    url = server.start()
    try:
        node = node_factory(tmp_path / "node", url, {"BRANCHGUARD_REPLICATE": "false"}).start()
        db = tmp_path / "node" / "branchguard.db"
        txs = [i.tx for i in make_transactions(300, seed=21)]
        assert send(url, txs[:100]) == 100
        wait_until(lambda: stored_count(db) == 100, message="the first 100 stored")
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        time.sleep(1.0)  # the node notices it is gone
        assert server.start() == url  # the same port and store, as a service manager would
        assert send(url, txs[100:200]) == 100
        wait_until(lambda: stored_count(db) == 200, timeout=60,
                   message="the scorer scoring again after the restart")
        assert '"scorer.restarting"' in node.log()

        server.process.send_signal(signal.SIGKILL)  # gone for good this time
        server.process.wait()
        time.sleep(1.0)
        assert node.stop() == 0, node.log()[-3000:]  # (stop() fails after 30 s)
    finally:
        server.stop()
    log = node.log()
    assert '"node.stopped"' in log and "Traceback" not in log, log[-3000:]
    stored = {r for r, in query(db, "SELECT transaction_id FROM transactions")}
    assert stored == {tx.transaction_id for tx in txs[:200]}
