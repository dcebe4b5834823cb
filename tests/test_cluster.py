"""A real 3-server JetStream cluster (operations/cluster.py): its configuration, R3 streams,
and a scorer that loses nothing and stores nothing twice when the server leading ``TX`` is
SIGKILLed mid-stream. Three real nats-server processes on free loopback ports, each stopped
by its PID at the end.

The failover is measured by ``branchguard bench cluster`` (appliance/bench/cluster.py),
on the same loopback cluster (appliance/operations/loopback_cluster.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError

from appliance.bench.delivery import stored_ids, stream_ids
from appliance.bench.partition_scorers import stream_count
from appliance.errors import SettingsError
from appliance.feed.terminal import to_message
from appliance.operations.cluster import REPLICAS, plan_servers, write_cluster_config
from appliance.operations.loopback_cluster import LoopbackCluster as Cluster
from appliance.operations.loopback_cluster import start_loopback_cluster
from appliance.scoring.streams import DLQ_STREAM, TX_STREAM, VERDICT_STREAM, ensure_streams
from appliance.settings import load, nats_servers
from appliance.transaction import Transaction

from .conftest import NodeProcess
from .support import make_transactions, stored_count


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    running = start_loopback_cluster(tmp_path)
    try:
        yield running
    finally:
        running.stop()
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            sys.stderr.write(running.log_tails())


# --- the configuration, without servers ------------------------------------------------------


def test_nats_url_names_every_server_and_the_settings_check_it() -> None:
    assert nats_servers(" nats://a:1, nats://b:2 ,,nats://c:3") == [
        "nats://a:1", "nats://b:2", "nats://c:3"]
    assert load(None, env={"BRANCHGUARD_STREAM_REPLICAS": "3"}).stream_replicas == 3
    assert load(None, env={}).stream_replicas == 1  # a single node is unchanged
    for field, env in (("stream_replicas", {"BRANCHGUARD_STREAM_REPLICAS": "0"}),
                       ("nats_url", {"BRANCHGUARD_NATS_URL": " , "})):
        with pytest.raises(SettingsError) as info:
            load(None, env=env)
        assert info.value.field == field


def test_the_config_routes_each_server_to_the_two_others_and_rewrites_nothing(
        tmp_path: Path) -> None:
    settings = load(None, env={}, data_dir=tmp_path)
    servers = plan_servers((), 14222, 16222, store_root=tmp_path / "stores")
    first = write_cluster_config(settings, tmp_path / "out", servers)
    assert first.nats_url == "nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"
    assert load(first.settings_file, env={}).stream_replicas == REPLICAS
    assert load(first.settings_file, env={}).nats_url == first.nats_url
    for server, path in zip(servers, first.files):
        text = path.read_text()
        routes = json.loads(text[text.index("cluster: ") + 9:])["routes"]
        assert sorted(routes) == sorted(f"nats-route://127.0.0.1:{s.cluster_port}"
                                        for s in servers if s is not server)
        assert f'store_dir: "{tmp_path / "stores" / server.name}"' in text
        assert f"port: {server.client_port}\n" in text
    again = write_cluster_config(settings, tmp_path / "out", servers)
    assert again.changed == () and len(first.changed) == 4


def test_a_cluster_beyond_loopback_needs_auth_and_three_hosts(tmp_path: Path) -> None:
    settings = load(None, env={}, data_dir=tmp_path)
    with pytest.raises(SettingsError, match="three"):
        plan_servers(["10.0.0.1", "10.0.0.2"])
    servers = plan_servers(["10.0.0.1", "10.0.0.2", "10.0.0.3"], store_root=tmp_path)
    with pytest.raises(SettingsError) as info:
        write_cluster_config(settings, tmp_path / "out", servers)
    assert info.value.field == "nats_host"
    auth = tmp_path / "auth.toml"
    auth.write_text('[node]\nuser = "node"\npassword = "p@ss"\n')
    secured = replace(settings, nats_auth_file=auth)
    text = write_cluster_config(secured, tmp_path / "out", servers).files[0].read_text()
    assert "nats-route://node:p%40ss@10.0.0.2:6222" in text  # routes authenticate as the node
    assert '"user": "node"' in text[text.index("cluster: "):]


# --- real servers ----------------------------------------------------------------------------


def test_ensure_streams_makes_r3_streams_on_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    settings = load(None, env={}, data_dir=tmp_path / "node", nats_url=cluster.url,
                    stream_replicas=3)

    async def check() -> None:
        nc = await nats.connect(nats_servers(cluster.url))
        try:
            js = nc.jetstream()
            await ensure_streams(js, settings)
            for name in (TX_STREAM, VERDICT_STREAM, DLQ_STREAM):
                info = await js.stream_info(name)
                assert info.config.num_replicas == 3, name
                assert info.cluster is not None and info.cluster.leader in cluster.processes
                peers = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
                assert peers == set(cluster.processes), name
        finally:
            await nc.close()

    asyncio.run(check())


@dataclass
class Failover:
    published: int
    to_publish_seconds: float
    """From the leader's SIGKILL to the first publish accepted again."""
    to_commit_seconds: float | None
    """From the SIGKILL to the scorer's first commit after it."""
    killed: str


async def _publish_one(js: nats.js.JetStreamContext, tx: Transaction) -> float:
    """Publish until the stream acks it, always under the same msg-id (a re-send of one that
    was stored after all is dropped by the duplicate window); returns when it was acked."""
    message = to_message(tx, "BR001")
    while True:
        try:
            await js.publish(message.subject, message.data, timeout=1.0,
                             headers={"Nats-Msg-Id": message.msg_id})
            return time.monotonic()
        except (NatsError, TimeoutError):
            await asyncio.sleep(0.05)


def run_failover(cluster: Cluster, db: Path, txs: list[Transaction]) -> Failover:
    """Publish the first half, wait until the scorer stored it, SIGKILL the server leading
    TX, publish the rest (with retries) and time the recovery."""
    half = len(txs) // 2
    commit_at: list[float] = []

    async def go() -> Failover:
        nc = await nats.connect(nats_servers(cluster.url), reconnect_time_wait=0.1,
                                max_reconnect_attempts=-1)
        try:
            js = nc.jetstream()
            for tx in txs[:half]:
                await _publish_one(js, tx)
            await asyncio.to_thread(_wait, lambda: stored_count(db) == half, 60)
            leader = str((await js.stream_info(TX_STREAM)).cluster.leader)  # type: ignore[union-attr]
            watcher = threading.Thread(target=_first_commit, args=(db, half, commit_at),
                                       daemon=True)
            watcher.start()
            killed_at = time.monotonic()
            cluster.kill(leader)
            first = await _publish_one(js, txs[half])
            for tx in txs[half + 1:]:
                await _publish_one(js, tx)
            await asyncio.to_thread(_wait, lambda: stored_count(db) == len(txs), 90)
            watcher.join(5)
            return Failover(len(txs), first - killed_at,
                            commit_at[0] - killed_at if commit_at else None, leader)
        finally:
            await nc.close()

    return asyncio.run(go())


def _wait(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _first_commit(db: Path, before: int, out: list[float]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if stored_count(db) > before:
            out.append(time.monotonic())
            return
        time.sleep(0.02)


def test_a_scorer_loses_and_doubles_nothing_when_the_tx_leader_server_is_killed(
        cluster: Cluster, node_factory: type[NodeProcess], tmp_path: Path) -> None:
    txs = [item.tx for item in make_transactions(300, seed=19)]
    node = node_factory(tmp_path / "node", cluster.url,
                        {"BRANCHGUARD_STREAM_REPLICAS": "3"}).start(90)
    result = run_failover(cluster, tmp_path / "node" / "branchguard.db", txs)
    assert result.killed in cluster.processes
    ids = [tx.transaction_id for tx in txs]
    tx_ids = stream_ids(cluster.url, TX_STREAM)
    assert sorted(tx_ids) == sorted(ids)  # every one stored in the stream, none twice
    # a commit does not wait for its verdicts' confirmations, which the election delays
    _wait(lambda: stream_count(cluster.url, VERDICT_STREAM) >= len(ids), 60)
    verdicts = stream_ids(cluster.url, VERDICT_STREAM)
    assert sorted(verdicts) == sorted(ids)  # one verdict each
    stored = {row for row in stored_ids(tmp_path / "node" / "branchguard.db")}
    assert stored == set(ids)
    assert node.process is not None and node.process.poll() is None  # it rode it out


@pytest.mark.parametrize("how", ["stepdown", "kill"])
def test_a_new_consumer_leader_does_not_stall_the_scorer(
        cluster: Cluster, node_factory: type[NodeProcess], tmp_path: Path, how: str) -> None:
    """The consumer's leader changes, told to step down (as an operator does before
    maintenance) or killed, while transactions are arriving and the scorer stays connected
    to a server that lives. Its pull requests were the old leader's: nothing may stall, be
    lost or be stored twice (part A's open question; nats-server 2.x answers the old
    requests, so the scorer needs nothing more)."""
    txs = [item.tx for item in make_transactions(200, seed=29)]
    db = tmp_path / "node" / "branchguard.db"
    servers = nats_servers(cluster.url)
    names = [server.name for server in cluster.config.servers]
    # the node on the first server only: the one it stays connected to
    node = node_factory(tmp_path / "node", servers[0],
                        {"BRANCHGUARD_STREAM_REPLICAS": "3"}).start(90)

    async def go() -> None:
        nc = await nats.connect(servers[1:], reconnect_time_wait=0.1,
                                max_reconnect_attempts=-1)
        try:
            js = nc.jetstream()
            for tx in txs[:100]:
                await _publish_one(js, tx)
            await asyncio.to_thread(_wait, lambda: stored_count(db) == 100, 60)
            stepdown = f"$JS.API.CONSUMER.LEADER.STEPDOWN.{TX_STREAM}.scorer"
            while (before := (await js.consumer_info(TX_STREAM, "scorer")).cluster) is None \
                    or before.leader == names[0]:
                await nc.request(stepdown, b"", timeout=5)  # lead anywhere but the node's
                await asyncio.sleep(0.5)
            async def rest() -> None:  # under way while the leader goes
                for tx in txs[100:]:
                    await _publish_one(js, tx)
                    await asyncio.sleep(0.01)
            publishing = asyncio.create_task(rest())
            await asyncio.sleep(0.3)
            if how == "stepdown":
                reply = await nc.request(stepdown, b"", timeout=5)
                assert b'"success":true' in reply.data, reply.data
            else:
                cluster.kill(str(before.leader))
            await publishing
            await asyncio.to_thread(_wait, lambda: stored_count(db) == len(txs), 60)
            after = (await js.consumer_info(TX_STREAM, "scorer")).cluster
            assert before is not None and after is not None and before.leader != after.leader
        finally:
            await nc.close()

    asyncio.run(go())
    assert sorted(stored_ids(db)) == sorted(tx.transaction_id for tx in txs)
    _wait(lambda: stream_count(cluster.url, VERDICT_STREAM) >= len(txs), 60)  # as above
    assert sorted(stream_ids(cluster.url, VERDICT_STREAM)) == sorted(
        tx.transaction_id for tx in txs)
    assert node.process is not None and node.process.poll() is None
