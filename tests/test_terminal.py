"""``branchguard simulate`` answers for every transaction: what JetStream stored, and what it
did not and why, with a non-zero exit when anything was not published; and it never stamps
an event time ahead of the clock. Against a real nats-server, killed part way through."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nats
import pytest

from appliance.feed.simulate import span_bound
from appliance.feed.terminal import simulated
from appliance.operations.node import EmbeddedNats
from appliance.scoring.streams import TX_STREAM, ensure_streams
from appliance.settings import Settings, load
from appliance.transaction import parse

from .support import read_stream

UTC = timezone.utc


def _simulate(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "appliance", "simulate", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ})


def _server(root: Path, port: int = 0) -> tuple[EmbeddedNats, Settings]:
    settings = load(None, env={}, data_dir=root, nats_port=port)
    server = EmbeddedNats(settings)
    server.start()
    return server, settings


def _with_streams(url: str, settings: Settings) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        await ensure_streams(nc.jetstream(), settings)
        await nc.close()
    asyncio.run(go())


def _stream_count(url: str) -> int:
    async def go() -> int:
        nc = await nats.connect(url, max_reconnect_attempts=0)
        try:
            return int((await nc.jetstream().stream_info(TX_STREAM)).state.messages)
        finally:
            await nc.close()
    return asyncio.run(go())


def _stored(url: str, expect: int) -> dict[str, tuple[datetime, datetime]]:
    """transaction id -> (its event time, when JetStream stored it), for the TX stream."""
    out = {}
    for msg in read_stream(url, TX_STREAM, expect=expect):
        tx = parse(msg.subject, msg.data)
        out[tx.transaction_id] = (tx.timestamp, msg.metadata.timestamp)  # type: ignore[union-attr]
    return out


def _unpublished(path: Path) -> dict[str, str]:
    with path.open() as f:
        return {row["transaction_id"]: row["reason"] for row in csv.DictReader(f)}


@pytest.fixture
def killable(tmp_path: Path) -> Iterator[list[EmbeddedNats]]:
    """Servers a test starts (and may kill); whatever is left running is stopped."""
    servers: list[EmbeddedNats] = []
    yield servers
    for server in servers:
        server.stop()


def test_a_stream_nobody_stores_is_reported_and_exits_1(tmp_path: Path,
                                                        nats_url: str) -> None:
    # JetStream is up, but no stream listens on tx.>: every publish is answered 503
    run = subprocess.run([sys.executable, "-m", "appliance", "simulate", "--nats-url",
                          nats_url, "--count", "40", "--rate", "0", "--unpublished",
                          str(tmp_path / "missed.csv")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "published 0 transactions" in run.stdout
    assert "NOT published: 40 of 40" in run.stdout
    assert "40 refused: no stream answered" in run.stdout
    assert "40 of 40 transactions were not published" in run.stderr
    missed = _unpublished(tmp_path / "missed.csv")
    assert len(missed) == 40 and all("no stream answered" in r for r in missed.values())


def test_simulate_across_a_server_crash_names_what_it_could_not_publish(
        tmp_path: Path, killable: list[EmbeddedNats]) -> None:
    server, settings = _server(tmp_path / "nats")
    killable.append(server)
    _with_streams(server.url, settings)
    missed_file = tmp_path / "missed.csv"
    run = _simulate("--nats-url", server.url, "--count", "4000", "--rate", "400",
                    "--ack-timeout", "2", "--unpublished", str(missed_file))
    try:
        deadline = time.monotonic() + 120
        while _stream_count(server.url) < 500:
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "simulate published nothing"
            time.sleep(0.02)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)  # the node's NATS dies, with no warning
        server.process.wait()
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, out + err
    assert "published " in out, out + err
    published = int(out.split("published ", 1)[1].split()[0])
    missed = _unpublished(missed_file)
    assert published + len(missed) == 4000  # every transaction is accounted for
    assert 500 <= published < 4000
    assert f"NOT published: {len(missed)} of 4000" in out
    assert "stopped early: nothing acknowledged for 2 s" in out
    assert f"{len(missed)} of 4000 transactions were not published" in err
    assert all(r.startswith(("lost: no acknowledgement", "not sent: nothing acknowledged"))
               for r in missed.values()), set(missed.values())

    # what the server kept: everything reported published, nothing stamped ahead of its time
    again, _ = _server(tmp_path / "nats", port=int(server.url.rsplit(":", 1)[1]))
    killable.append(again)
    stored = _stored(again.url, published)
    # every transaction acknowledged is stored; of those named, only "lost" ones may be
    assert len(set(stored) - set(missed)) == published
    assert all(missed[tid].startswith("lost") for tid in set(stored) & set(missed))
    ahead = [tid for tid, (event, at) in stored.items() if event > at]
    assert ahead == [], f"{len(ahead)} events stamped after JetStream stored them"


def test_a_restarted_server_loses_nothing_the_report_does_not_name(
        tmp_path: Path, killable: list[EmbeddedNats]) -> None:
    server, settings = _server(tmp_path / "nats")
    killable.append(server)
    _with_streams(server.url, settings)
    port = int(server.url.rsplit(":", 1)[1])
    missed_file = tmp_path / "missed.csv"
    run = _simulate("--nats-url", server.url, "--count", "3000", "--rate", "500",
                    "--ack-timeout", "5", "--unpublished", str(missed_file), "--seed", "4")
    try:
        while _stream_count(server.url) < 500:
            assert run.poll() is None, run.communicate()
            time.sleep(0.02)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        time.sleep(1.0)
        again, _ = _server(tmp_path / "nats", port=port)  # back on its port, same store
        killable.append(again)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    published = int(out.split("published ", 1)[1].split()[0])
    missed = _unpublished(missed_file)
    assert published + len(missed) == 3000, out
    assert run.returncode == (1 if missed else 0), out + err
    stored = _stored(again.url, published)
    assert len(set(stored) - set(missed)) == published
    everything = {f"S4-{n:09d}" for n in range(3000)}
    assert everything - set(stored) <= set(missed)  # whatever is not stored is named
    assert all(event <= at for event, at in stored.values())


def test_a_backlog_at_rate_0_ends_before_the_clock(tmp_path: Path,
                                                   killable: list[EmbeddedNats]) -> None:
    server, settings = _server(tmp_path / "nats")
    killable.append(server)
    _with_streams(server.url, settings)
    before = datetime.now(UTC)
    run = subprocess.run([sys.executable, "-m", "appliance", "simulate", "--nats-url",
                          server.url, "--count", "3000", "--rate", "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "published 3000 transactions" in run.stdout
    stored = _stored(server.url, 3000)
    assert len(stored) == 3000
    assert all(event <= at for event, at in stored.values())
    events = sorted(event for event, _ in stored.values())
    # a backlog, 50 tx/s of event time: an hour's first minute, not a burst at one instant
    assert (events[-1] - events[0]).total_seconds() > 30
    assert before - events[0] <= timedelta(seconds=span_bound(3000, 50.0))


def test_the_simulated_stream_is_dated_before_now_whatever_its_size() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    for count in (1, 10, 1000, 30000):
        stamps = [i.tx.timestamp for i in simulated(9, count=count, rate=None, branch="BR001",
                                                    now=now)]
        assert len(stamps) == count and max(stamps) <= now
        assert (now - min(stamps)).total_seconds() <= span_bound(count, 50.0)
    live = [i.tx.timestamp for i in simulated(9, count=200, rate=20.0, branch="BR001",
                                              now=now)]
    assert min(live) >= now  # a live stream starts now; the publisher waits for each one
