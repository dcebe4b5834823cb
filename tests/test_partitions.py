"""Partitions of the TX stream by account (issue 19, part B), against a real nats-server:
the Python partition function is the server's own, a partitioned stream refuses another
count, malformed subjects still reach a consumer and are dead-lettered, and one scorer
owning every partition stores exactly what a scorer on an unpartitioned stream does."""

from __future__ import annotations

import asyncio
import random
import string
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from appliance.errors import SettingsError, StreamError
from appliance.scoring.streams import TX_STREAM, ensure_streams, reset_consumer
from appliance.scoring.partitions import (filter_subjects, partition, stream_partitions,
                                          transform)
from appliance.settings import Settings, load
from appliance.transaction import (Malformed, Transaction, branch_of, encode, parse,
                                   subject_for, terminal_subject)

from .conftest import NodeProcess
from .support import (HISTORY, make_transactions, query, read_stream, send_raw, stored_count,
                      wait_until)


def _settings(tmp_path: Path, url: str, partitions: int) -> Settings:
    return load(None, env=HISTORY, data_dir=tmp_path / f"node-{partitions}", nats_url=url,
                partitions=partitions)


def _ids(n: int, seed: int = 19) -> list[str]:
    """Account-like ids of every length the contract allows, and some UTF-8 tokens beyond
    it (the server hashes bytes; the function must too)."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "_-"
    ids = {"".join(rng.choices(alphabet, k=rng.randint(1, 64))) for _ in range(n)}
    ids |= {f"A{i:06d}" for i in range(200)} | {"åäö", "конто-7", "口座"}
    return sorted(ids)


def test_the_partition_function_is_the_servers(tmp_path: Path, nats_url: str) -> None:
    """A few thousand accounts through the real server's ``{{partition(N,3)}}``, for two
    counts: the partition token of every stored subject is what :func:`partition` says."""
    ids = _ids(3000)

    async def stored_subjects(partitions: int) -> list[str]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        name = f"P{partitions}"
        try:
            await js.add_stream(StreamConfig(name=name, subjects=["tx.>"],
                                             subject_transform=transform(partitions)))
            for i, account in enumerate(ids):
                await nc.publish(f"tx.B{i % 3}.T{i % 5}.{account}", b"{}")
            await nc.flush()
            while (await js.stream_info(name)).state.messages < len(ids):
                await asyncio.sleep(0.05)
            sub = await js.pull_subscribe("", durable=None, stream=name, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE))
            subjects: list[str] = []
            while len(subjects) < len(ids):
                subjects += [m.subject for m in await sub.fetch(1000, timeout=5)]
            await js.delete_stream(name)
            return subjects
        finally:
            await nc.close()

    for partitions in (7, 12):
        subjects = asyncio.run(stored_subjects(partitions))
        assert len(subjects) == len(ids)
        seen = set()
        for i, (account, subject) in enumerate(zip(ids, subjects)):
            assert subject == f"txp.{partition(account, partitions)}.B{i % 3}.T{i % 5}.{account}"
            seen.add(subject.split(".")[1])
        assert seen == {str(p) for p in range(partitions)}  # every partition used


def test_transform_filters_and_subject_forms() -> None:
    assert transform(1) is None
    tr = transform(4)
    assert tr is not None and tr.src == "tx.*.*.*"
    assert tr.dest == "txp.{{partition(4,3)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}"
    assert stream_partitions(tr) == 4 and stream_partitions(None) == 1
    assert stream_partitions(transform(4).__class__(src="tx.>", dest="other.>")) is None
    assert filter_subjects([2, 0], 4) == ["txp.0.>", "txp.2.>", "tx.>"]
    assert filter_subjects([3], 4) == ["txp.3.>"]  # untransformed subjects go with 0 only
    for wrong in ([4], [-1], []):
        with pytest.raises(SettingsError):
            filter_subjects(wrong, 4)
    assert terminal_subject("txp.3.BR001.T1.A1") == "tx.BR001.T1.A1"
    assert terminal_subject("tx.BR001.T1.A1") == "tx.BR001.T1.A1"
    assert branch_of("txp.3.BR001.T1.A1") == branch_of("tx.BR001.T1.A1") == "BR001"
    with pytest.raises(SettingsError):
        load(None, env={}, partitions=2, tx_subjects="tx.BR001.>")
    with pytest.raises(SettingsError):
        load(None, env={}, partitions=0)


def test_parse_accepts_both_forms_and_checks_the_partition() -> None:
    tx = make_transactions(1, seed=4)[0].tx
    body = encode(tx)
    p = partition(tx.account_id, 4)
    plain = subject_for("BR001", tx)
    assert parse(plain, body) == tx
    assert parse(f"txp.{p}.BR001.{tx.terminal_id}.{tx.account_id}", body, 4) == tx
    wrong = parse(f"txp.{(p + 1) % 4}.BR001.{tx.terminal_id}.{tx.account_id}", body, 4)
    assert isinstance(wrong, Malformed)
    assert f"is not account {tx.account_id}'s partition {p} of 4" in wrong.reason
    other = msgspec.structs.replace(tx, account_id="SOMEONE-ELSE")
    mismatch = parse(f"txp.{p}.BR001.{tx.terminal_id}.{tx.account_id}", encode(other), 4)
    assert isinstance(mismatch, Malformed) and "does not match" in mismatch.reason
    for subject in (f"txp.{p}.BR001.{tx.terminal_id}", f"txp.{p}.{plain}",
                    f"tx.{p}.BR001.{tx.terminal_id}.{tx.account_id}"):
        bad = parse(subject, body, 4)
        assert isinstance(bad, Malformed) and bad.reason.startswith("bad subject"), subject


def test_the_partition_count_is_fixed_at_stream_creation(tmp_path: Path, nats_url: str
                                                         ) -> None:
    async def go() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            await ensure_streams(js, _settings(tmp_path, nats_url, 4))
            await ensure_streams(js, _settings(tmp_path, nats_url, 4))  # the same: fine
            for other in (1, 6):
                with pytest.raises(StreamError, match="created with 4 partition") as refused:
                    await ensure_streams(js, _settings(tmp_path, nats_url, other))
                assert refused.value.hint == "set partitions = 4 as the stream has it"
            config = (await js.stream_info(TX_STREAM)).config
            assert stream_partitions(config.subject_transform) == 4  # left as it was
            await js.delete_stream(TX_STREAM)
            await ensure_streams(js, _settings(tmp_path, nats_url, 1))
            with pytest.raises(StreamError, match="created with 1 partition"):
                await ensure_streams(js, _settings(tmp_path, nats_url, 4))
            assert (await js.stream_info(TX_STREAM)).config.subject_transform is None
        finally:
            await nc.close()
    asyncio.run(go())


def test_a_consumer_takes_its_partitions_and_zero_the_untransformed(
        tmp_path: Path, nats_url: str) -> None:
    """What each partition set's consumer would deliver, read from the server: partition 0
    also takes the malformed subjects the transform left alone; the sets add up to the
    stream, each message once."""
    settings = _settings(tmp_path, nats_url, 4)
    accounts = [f"A{i:03d}" for i in range(40)]
    malformed = ["tx.BR001.T1", "tx.BR001.T1.A1.extra", "tx.x"]

    async def go() -> dict[frozenset[int], list[str]]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        out: dict[frozenset[int], list[str]] = {}
        try:
            await ensure_streams(js, settings)
            for i, subject in enumerate([f"tx.BR001.T1.{a}" for a in accounts] + malformed):
                await js.publish(subject, b"{}", headers={"Nats-Msg-Id": f"m{i}"})
            for owned in ({0}, {1, 3}, {2}, None):
                await reset_consumer(js, settings, 0, owned)
                sub = await js.pull_subscribe_bind(settings.consumer, stream=TX_STREAM)
                info = await js.consumer_info(TX_STREAM, settings.consumer)
                got = [m.subject for m in await sub.fetch(info.num_pending, timeout=5)] \
                    if info.num_pending else []
                out[frozenset(owned if owned is not None else range(4))] = got
                await sub.unsubscribe()
        finally:
            await nc.close()
        return out

    got = asyncio.run(go())
    zero = got[frozenset({0})]
    assert set(malformed) <= set(zero)
    for owned, subjects in got.items():
        for subject in subjects:
            if subject.startswith("txp."):
                p = int(subject.split(".")[1])
                assert p in owned and p == partition(subject.split(".")[-1], 4)
    parts = got[frozenset({0})] + got[frozenset({1, 3})] + got[frozenset({2})]
    assert sorted(parts) == sorted(got[frozenset(range(4))])
    assert len(parts) == len(accounts) + len(malformed)
    stored = [m.subject for m in read_stream(nats_url, TX_STREAM)]
    assert sorted(stored) == sorted(parts)


# --- the node end to end: one scorer owning all 4 partitions == the unpartitioned node ------

FIXABLE = "DLQ-FIX-19"


def _inputs() -> list[tuple[str, bytes, str]]:
    """Seeded transactions as terminals send them, with a re-send inside the duplicate window
    (dropped by the server), one after it (a new message id: the scorer's duplicate), and
    malformed messages: bad JSON, subjects of three and five tokens (stored untransformed),
    a subject naming another account, and a body without ``channel`` (fixed later)."""
    txs = [item.tx for item in make_transactions(400, seed=19)]
    out = [(subject_for("BR001", tx), encode(tx), tx.transaction_id) for tx in txs]
    first, other = txs[0], txs[1]
    fixable = msgspec.json.decode(encode(msgspec.structs.replace(
        first, transaction_id=FIXABLE)))
    del fixable["channel"]
    bad = [
        (subject_for("BR001", first), b'{"transaction_id": "broken', "bad-json"),
        (f"tx.BR001.{first.terminal_id}", encode(first), "three-tokens"),
        (f"tx.BR001.{first.terminal_id}.{first.account_id}.x", encode(first), "five-tokens"),
        (subject_for("BR001", other), encode(msgspec.structs.replace(
            first, transaction_id="MISMATCH")), "mismatch"),
        (subject_for("BR001", first), msgspec.json.encode(fixable), "fixable"),
    ]
    for at, message in zip((50, 120, 200, 260, 330), bad):
        out.insert(at, message)
    out.insert(150, out[140])  # the same message id again: the server drops it
    out.append((subject_for("BR001", txs[10]), encode(txs[10]), "resend-after-window"))
    return out


def _run_node(tmp_path: Path, partitions: int, node_factory: type[NodeProcess]
              ) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[bytes]]:
    """A real nats-server and ``branchguard run`` with ``partitions``; the inputs, then the
    fixable dead letter re-submitted with its ``channel``: the stored rows, the dead letters
    (subject as the terminal sent it) and the verdicts published."""
    from appliance.casework.deadletters import resubmit
    from appliance.operations.node import EmbeddedNats

    server = EmbeddedNats(load(None, env={}, data_dir=tmp_path / f"nats-{partitions}",
                               nats_port=0))
    url = server.start()
    try:
        data_dir = tmp_path / f"node-{partitions}"
        node = node_factory(data_dir, url,
                            {"BRANCHGUARD_PARTITIONS": str(partitions)}).start()
        db = data_dir / "branchguard.db"
        assert send_raw(url, _inputs())
        wait_until(lambda: stored_count(db) == 400, message="all stored")
        wait_until(lambda: query(db, "SELECT count(*) FROM dead_letters")[0][0] == 5,
                   message="five dead letters")
        seq = query(db, "SELECT stream_seq FROM dead_letters WHERE reason LIKE '%channel%'")
        fixed = msgspec.json.decode(encode(make_transactions(1, seed=19)[0].tx))
        fixed["transaction_id"] = FIXABLE
        asyncio.run(resubmit(_settings(tmp_path, url, partitions), seq[0][0], "tester",
                             msgspec.json.encode(fixed)))
        wait_until(lambda: stored_count(db) == 401, message="the fixed one stored")
        assert node.stop() == 0
        rows = query(db, "SELECT transaction_id, branch, account_id, terminal_id, amount, ts, "
                         "features, features_version, model_risk, risk, severity, decision, "
                         "reasons, details, model_version, rules_version FROM transactions "
                         "ORDER BY transaction_id")
        dead = [(terminal_subject(subject), *rest) for subject, *rest in query(
            db, "SELECT subject, reason, size, body FROM dead_letters ORDER BY stream_seq")]
        stored = [m.subject for m in read_stream(url, TX_STREAM)]
        assert all(s.startswith("txp.") == (partitions > 1) for s in stored
                   if len(s.split(".")) in (4, 5) and not s.endswith(".x"))
        verdicts = sorted(m.subject.encode() + b" " + m.data
                          for m in read_stream(url, "VERDICTS"))
        return rows, dead, verdicts
    finally:
        server.stop()


def test_one_scorer_on_four_partitions_stores_what_the_unpartitioned_node_does(
        tmp_path: Path, node_factory: type[NodeProcess]) -> None:
    plain = _run_node(tmp_path, 1, node_factory)
    partitioned = _run_node(tmp_path, 4, node_factory)
    rows, dead, verdicts = plain
    assert len(rows) == 401 and len(verdicts) == 401 and len(dead) == 5
    assert [r[1] for r in dead] == [r[1] for r in partitioned[1]]  # reasons, in order
    assert dead == partitioned[1]
    assert verdicts == partitioned[2]
    assert rows == partitioned[0]  # features blob, risk, severity, decision, reasons, model


def test_a_node_refuses_a_stream_with_another_partition_count(
        tmp_path: Path, nats_url: str, node_factory: type[NodeProcess]) -> None:
    """`branchguard run` with partitions = 4 on a TX stream created unpartitioned stops with
    the reason, instead of scoring a stream whose subjects it would misread."""
    async def create() -> None:
        nc = await nats.connect(nats_url)
        try:
            await ensure_streams(nc.jetstream(), _settings(tmp_path, nats_url, 1))
        finally:
            await nc.close()
    asyncio.run(create())
    node = node_factory(tmp_path / "node", nats_url, {"BRANCHGUARD_PARTITIONS": "4"})
    with pytest.raises(AssertionError, match="node exited early"):
        node.start()
    assert "the TX stream was created with 1 partition(s)" in node.log()
    assert "set partitions = 1 as the stream has it" in node.log()
    assert node.process is not None and node.process.returncode != 0
