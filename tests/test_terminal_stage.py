"""The terminal stage (issue 19), against a real nats-server: its records are the terminal
windows a single scorer computes over the same messages in stream order (re-sends,
conflicting re-sends, malformed messages and late events included), they stay so across a
SIGKILL, and a partition's scorer joined with them stores the features of a single scorer."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from appliance.errors import FencedError
from appliance.scoring import pipeline
from appliance.scoring.features import FEATURES, FeatureState, Windows
from appliance.scoring.model import Model
from appliance.scoring.streams import TX_STREAM, ensure_streams
from appliance.scoring.terminal_feed import TerminalFeed
from appliance.scoring.terminal_stage import (Ledger, Observation, TerminalStage, db_path, decode_record,
                                              partition_of)
from appliance.settings import Settings
from appliance.store import Store, decode_features
from appliance.transaction import Admission, Malformed, Transaction, encode, subject_for

from .support import HISTORY, make_transactions, query, read_stream, send_raw, wait_until

PARTITIONS = 3
TERMINAL = [FEATURES.index(f"terminal_{k}_{w}") for w in ("1h", "24h", "7d")
            for k in ("count", "sum")]


def _inputs(n: int = 2800, seed: int = 23) -> list[tuple[str, bytes, str]]:
    """Seeded transactions as terminals send them, and among them: identical re-sends and
    re-sends with another body (new message ids, so the server keeps them), malformed
    messages (bad JSON, a three-token subject, a subject naming another account), and late
    events (1.5 h, 30 h and 8 days behind, so beyond the 7-day horizon)."""
    rng = random.Random(seed)
    txs = [item.tx for item in make_transactions(n, seed=seed)]
    out = [(subject_for("BR001", tx), encode(tx), tx.transaction_id) for tx in txs]
    extra: list[tuple[int, tuple[str, bytes, str]]] = []
    for i in range(60):
        at = rng.randrange(10, n)
        tx = txs[rng.randrange(0, at)]
        extra.append((at, (subject_for("BR001", tx), encode(tx), f"same-{i}")))
    for i in range(40):
        at = rng.randrange(10, n)
        tx = txs[rng.randrange(0, at)]
        other = msgspec.structs.replace(tx, amount=round(tx.amount + 1.25, 2))
        extra.append((at, (subject_for("BR001", other), encode(other), f"other-{i}")))
    for i in range(60):
        at = rng.randrange(10, n)
        tx = txs[at]
        late = msgspec.structs.replace(
            tx, transaction_id=f"LATE{i:04d}",
            timestamp=tx.timestamp - timedelta(hours=(1.5, 30.0, 192.0)[i % 3]))
        extra.append((at, (subject_for("BR001", late), encode(late), late.transaction_id)))
    for i in range(30):
        at = rng.randrange(10, n)
        tx, other = txs[at], txs[at - 1]
        bad = [(subject_for("BR001", tx), b'{"transaction_id": "bro', f"bad-{i}"),
               (f"tx.BR001.{tx.terminal_id}", encode(tx), f"three-{i}"),
               (subject_for("BR001", other),
                encode(msgspec.structs.replace(tx, transaction_id=f"MIS{i}")), f"mis-{i}")]
        extra.append((at, bad[i % 3]))
    for at, message in sorted(extra, key=lambda e: -e[0]):
        out.insert(at, message)
    return out


def _partitioned(settings: Settings) -> Settings:
    return dataclasses.replace(settings, partitions=PARTITIONS)


def _create_streams(settings: Settings) -> None:
    async def go() -> None:
        nc = await nats.connect(settings.nats_url)
        try:
            await ensure_streams(nc.jetstream(), settings)
        finally:
            await nc.close()
    asyncio.run(go())


def _reference(settings: Settings, messages: list[Any]
               ) -> dict[int, tuple[Transaction, tuple[float, ...]] | None]:
    """What a single scorer decides for each TX message, in stream order: None (malformed,
    or a re-send), or the transaction and its features from one FeatureState."""
    admission, state = Admission.of(settings), FeatureState()
    seen: set[str] = set()
    out: dict[int, tuple[Transaction, tuple[float, ...]] | None] = {}
    for m in messages:
        seq = m.metadata.sequence.stream
        tx = admission.parse(m.subject, m.data, m.metadata.timestamp.timestamp())
        if isinstance(tx, Malformed) or tx.transaction_id in seen:
            out[seq] = None
            continue
        seen.add(tx.transaction_id)
        out[seq] = (tx, state.observe(tx))
    return out


def _records(url: str, expect: int) -> dict[int, set[bytes]]:
    """Every TERM record's distinct payloads, by TX sequence (checking its partition)."""
    out: dict[int, set[bytes]] = {}
    for m in read_stream(url, "TERM", expect=expect):
        _, p, seq = m.subject.split(".")
        out.setdefault(int(seq), set()).add(bytes(m.data))
        assert int(p) in range(PARTITIONS)
    return out


def _check(settings: Settings, records: dict[int, set[bytes]]) -> int:
    """Every TX message has exactly one distinct record, equal to the reference; returns how
    many were observed."""
    tx_messages = read_stream(settings.nats_url or "", TX_STREAM)
    reference = _reference(settings, tx_messages)
    assert sorted(records) == sorted(reference), "a record per TX message, none else"
    joined, observed = FeatureState(), 0
    for m in tx_messages:
        seq = m.metadata.sequence.stream
        assert len(records[seq]) == 1, f"TX {seq} has different records"
        record = decode_record(next(iter(records[seq])))
        expected = reference[seq]
        if expected is None:
            assert record is None, f"TX {seq} observed, a single scorer would not"
            continue
        tx, features = expected
        assert record is not None, f"TX {seq} ({tx.transaction_id}) not observed"
        assert [features[i] for i in TERMINAL] == [
            float(v) if k % 2 == 0 else v / 1000.0 for k, v in enumerate(record)]
        assert joined.observe(tx, record) == features  # bit for bit, the whole vector
        observed += 1
    assert not joined.terminals, "given windows leave the state's own untouched"
    assert len({partition_of(m.subject) for m in tx_messages}) == PARTITIONS
    return observed


async def _run_stage(settings: Settings, until_seq: int, timeout: float = 60.0) -> None:
    nc = await nats.connect(settings.nats_url)
    stage = TerminalStage(nc, settings, lease=None)
    task = asyncio.create_task(stage.run())
    try:
        deadline = time.monotonic() + timeout
        while Ledger(db_path(settings)).checkpoint() < until_seq:
            if task.done():
                task.result()
            assert time.monotonic() < deadline, "the stage did not reach the end"
            await asyncio.sleep(0.05)
    finally:
        stage.stop()
        await asyncio.wait_for(task, 10.0)
        await nc.drain()


def test_observe_with_given_terminal_windows_is_observe() -> None:
    txs = [i.tx for i in make_transactions(3000, seed=5)]
    plain, joined = FeatureState(), FeatureState()
    windows = FeatureState()  # the stage's windows: only its terminals are used
    for tx in txs:
        expected = plain.observe(tx)
        w = windows.terminals.setdefault(tx.terminal_id, Windows())
        given = w.observe(tx.timestamp.timestamp(), round(tx.amount * 1000))
        assert joined.observe(tx, given) == expected
    assert joined.terminals == {} and plain.terminals
    assert joined.snapshot()["accounts"] == plain.snapshot()["accounts"]


def test_a_stopped_copy_cannot_commit_once_a_later_copy_claimed_the_ledger(
        tmp_path: Path) -> None:
    """A copy SIGSTOPped in its commit and woken after the next copy read the ledger must
    not commit: the next copy would take those ids for re-sends and publish their terminals'
    windows short for good (Ledger.claim)."""
    path = tmp_path / "terminals.db"
    zombie, successor = Ledger(path), Ledger(path)
    try:
        zombie.claim(7)
        first = Observation("t1", b"d", "T1", 100.0, 5000, 1)
        zombie.commit([first], 1, lease_token=7)
        successor.claim(9)  # the next tenure, before it reads anything
        with pytest.raises(FencedError):
            zombie.commit([Observation("t2", b"d", "T1", 101.0, 5000, 2)], 2, lease_token=7)
        assert successor.checkpoint() == 1
        assert successor.digests(["t1", "t2"]) == {"t1": b"d"}  # t2 is the successor's
        with pytest.raises(FencedError):
            zombie.claim(7)  # nor can it claim the ledger back
        successor.commit([Observation("t2", b"d", "T1", 101.0, 5000, 2)], 2, lease_token=9)
        assert successor.checkpoint() == 2
    finally:
        zombie.close()
        successor.close()


def test_the_feed_finds_where_to_start_by_sequence(settings: Settings) -> None:
    """The feed starts its ordered consumer by a TERM sequence found from a stored time
    (TerminalFeed._term_seq_from), never by time: nats-py re-creates an ordered consumer
    after a missed heartbeat with the start time kept beside the sequence, which the server
    refuses (10094)."""
    settings = _partitioned(settings)
    _create_streams(settings)

    async def go() -> tuple[list[int], list[int]]:
        nc = await nats.connect(settings.nats_url)
        try:
            js = nc.jetstream()
            seqs = []
            for i in range(40):
                seqs.append((await js.publish(f"term.0.{i + 1}", b"null")).seq)
                if i % 10 == 9:
                    await asyncio.sleep(0.05)  # stored times apart, as a live stream's
            times = [(await js.get_msg("TERM", q)).time for q in seqs]
            feed = TerminalFeed(js, 0)
            found = [await feed._term_seq_from(t, seqs[0], seqs[-1]) for t in times]
            edges = [await feed._term_seq_from(times[0] - timedelta(seconds=60), seqs[0],
                                               seqs[-1]),
                     await feed._term_seq_from(times[-1] + timedelta(seconds=60), seqs[0],
                                               seqs[-1])]
            await feed.start(0)  # checkpoint 0, TX empty: from the start of TERM
            await feed.stop()
            return [seqs[times.index(t)] for t in times] + [seqs[0], seqs[-1] + 1], found + edges
        finally:
            await nc.close()

    expected, found = asyncio.run(go())
    assert found == expected  # the first record stored at or after each time


def test_the_stage_records_what_a_single_scorer_computes(settings: Settings) -> None:
    settings = _partitioned(settings)
    _create_streams(settings)
    inputs = _inputs()
    assert send_raw(settings.nats_url or "", inputs)
    asyncio.run(_run_stage(settings, len(inputs)))
    observed = _check(settings, _records(settings.nats_url or "", len(inputs)))
    assert 2800 <= observed < len(inputs) - 100  # the re-sends and the malformed were not
    assert query(db_path(settings), "SELECT count(*) FROM observed")[0][0] == observed


def _spawn_stage(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **HISTORY, "BRANCHGUARD_PARTITIONS": str(PARTITIONS)}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "stage", "terminals", "--data-dir",
             str(settings.data_dir), "--nats-url", settings.nats_url or ""],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    return process


def _send_in_background(url: str, messages: list[tuple[str, bytes, str]], chunk: int
                        ) -> threading.Thread:
    def feed() -> None:
        for start in range(0, len(messages), chunk):
            send_raw(url, messages[start:start + chunk])
            time.sleep(0.05)
    thread = threading.Thread(target=feed)
    thread.start()
    return thread


def test_the_stage_survives_sigkill_with_the_same_records(settings: Settings,
                                                           tmp_path: Path) -> None:
    settings = _partitioned(settings)
    _create_streams(settings)
    url = settings.nats_url or ""
    inputs = _inputs()
    log = tmp_path / "stage.log"
    ledger = db_path(settings)

    def checkpoint() -> int:
        return Ledger(ledger).checkpoint() if ledger.exists() else 0

    assert send_raw(url, inputs[:800])
    first = _spawn_stage(settings, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: checkpoint() > 0, timeout=30, message="the stage started")
        feeding = _send_in_background(url, inputs[800:], chunk=100)
        wait_until(lambda: checkpoint() > 1400, timeout=30, message="mid-stream")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = checkpoint()
        feeding.join(60)
        assert killed_at < len(inputs), "killed after the end: nothing tested"
        second = _spawn_stage(settings, log)  # waits out the dead one's lease
        wait_until(lambda: checkpoint() == len(inputs), timeout=60,
                   message=f"the new stage to finish:\n{log.read_text()[-3000:]}")
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0, log.read_text()[-3000:]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    assert text.count('"terminal_stage.ready"') == 2, text[-3000:]
    _check(settings, _records(url, len(inputs)))


def test_a_partition_scorer_joined_with_the_stage_stores_single_scorer_features(
        settings: Settings) -> None:
    """The scorer of partition 1 (its consumer on that partition only), with a TerminalFeed:
    every stored feature vector is the one a single FeatureState over the whole stream
    computes; without the feed its terminal features would differ (checked too)."""
    settings = dataclasses.replace(_partitioned(settings), consumer="scorer-p1")
    _create_streams(settings)
    inputs = _inputs(1500, seed=29)
    assert send_raw(settings.nats_url or "", inputs)

    async def go() -> dict[str, list[float]]:
        stage_nc = await nats.connect(settings.nats_url)
        stage = TerminalStage(stage_nc, settings, lease=None)
        stage_task = asyncio.create_task(stage.run())
        nc = await nats.connect(settings.nats_url)
        store = Store.open(settings.db_path)
        feed = TerminalFeed(nc.jetstream(), 1, wait_seconds=20.0)
        scorer = pipeline.Scorer(nc, store, Model.load(settings.models_dir,
                                                       settings.model_version),
                                 settings, owned=frozenset({1}), terminal_feed=feed)
        task = asyncio.create_task(scorer.run())
        try:
            deadline = time.monotonic() + 60
            while scorer.confirmed_upto < max(
                    m.metadata.sequence.stream for m in tx_messages
                    if partition_of(m.subject) == 1):
                assert not task.done() or task.result() is None
                assert time.monotonic() < deadline, "the scorer did not reach the end"
                await asyncio.sleep(0.05)
            assert scorer.counters.terminal_disagreements == 0
        finally:
            scorer.stop()
            await asyncio.wait_for(task, 20.0)
            await feed.stop()
            stage.stop()
            await asyncio.wait_for(stage_task, 10.0)
            store.close()
            await nc.drain()
            await stage_nc.drain()
        return {tid: decode_features(blob) for tid, blob in query(
            settings.db_path, "SELECT transaction_id, features FROM transactions")}

    tx_messages = read_stream(settings.nats_url or "", TX_STREAM, expect=len(inputs))
    stored = asyncio.run(go())
    reference = _reference(settings, tx_messages)
    mine = {r[0].transaction_id: r for seq, r in reference.items() if r is not None and
            partition_of(next(m.subject for m in tx_messages
                              if m.metadata.sequence.stream == seq)) == 1}
    assert len(mine) > 300 and set(stored) == set(mine)
    for tid, (_, features) in mine.items():
        assert stored[tid] == list(features), tid
    local = FeatureState()  # what the scorer would have computed on its own
    differs = 0
    for tid, (tx, features) in mine.items():
        if local.observe(tx) != features:
            differs += 1
    assert differs > 100, "the partition's own windows would have been right: no test"
