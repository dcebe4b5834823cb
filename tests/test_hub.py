"""A regional hub and branches as leaf nodes (operations/hub.py), on real nats-servers: the
configuration ``branchguard hub config`` writes, each branch a node's own embedded server
in its own JetStream domain, what the hub sources from them, and a hub outage caught up."""

from __future__ import annotations

import asyncio
import sys
import time
import tomllib
from pathlib import Path

import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from appliance.bench.hub import HubServer as Hub, leafs
from appliance.operations.cluster import free_port
from appliance.operations.hub import (HubPlan, branch_permissions, ensure_hub_stream,
                                      ensure_uplink, write_hub_config)
from appliance.operations.node import EmbeddedNats, server_config
from appliance.settings import load

BRANCHES = ("br1", "br2")


def wait(condition: object, timeout: float) -> float:
    """Seconds until ``condition()``; fails the test past ``timeout``."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def test_the_written_configuration_keeps_its_passwords_and_confines_each_branch(
        tmp_path: Path) -> None:
    plan = HubPlan(host="127.0.0.1", client_port=4222, leaf_port=7422, monitor_port=8222,
                   store_dir=tmp_path / "store", branches=BRANCHES, public_host="hub.example")
    first = write_hub_config(load(None, env={}), tmp_path / "hub", plan)
    assert set(first.changed) == set(first.files)
    again = write_hub_config(load(None, env={}), tmp_path / "hub", plan)
    assert again.changed == ()  # the same passwords: nothing to restart
    br1 = tomllib.loads((tmp_path / "hub" / "branches" / "br1.toml").read_text())
    assert br1["jetstream_domain"] == "br1"
    assert br1["hub_url"].startswith("nats-leaf://br1:") and "@hub.example:7422" in br1["hub_url"]
    assert (tmp_path / "hub" / "branches" / "br1.toml").stat().st_mode & 0o077 == 0
    settings = load(None, env={}, data_dir=tmp_path / "b", **br1)
    assert 'domain: "br1"' in server_config(settings, tmp_path / "js")
    assert "leafnodes" in server_config(settings, tmp_path / "js")
    hub_conf = (tmp_path / "hub" / "hub.conf").read_text()
    assert '"no_advertise": true' in hub_conf  # branches dial public_host, never around it
    assert 'domain: "hub"' in hub_conf
    allowed = branch_permissions("br1")
    assert "bg.up.br1.>" in allowed["publish"]["allow"]
    assert not any("br2" in s for side in allowed.values() for s in side["allow"])
    with pytest.raises(Exception, match="jetstream_domain"):
        write_hub_config(load(None, env={}), tmp_path / "bad",
                         HubPlan(**{**plan.__dict__, "branches": ("hub",)}))


@pytest.mark.timeout(300)
def test_the_hub_sources_every_branch_and_catches_up_after_an_outage(tmp_path: Path) -> None:
    plan = HubPlan(host="127.0.0.1", client_port=free_port(), leaf_port=free_port(),
                   monitor_port=free_port(), store_dir=tmp_path / "hub-store",
                   branches=BRANCHES, public_host="127.0.0.1")
    out = tmp_path / "hub"
    write_hub_config(load(None, env={}), out, plan)
    hub_url = tomllib.loads((out / "hub.toml").read_text())["nats_url"]
    hub = Hub(out / "hub.conf", tmp_path / "hub.log")
    branches: dict[str, EmbeddedNats] = {}
    hub.start()
    try:
        for b in BRANCHES:
            extra = tomllib.loads((out / "branches" / f"{b}.toml").read_text())
            branches[b] = EmbeddedNats(load(None, env={}, data_dir=tmp_path / b, nats_port=0,
                                            **extra))
            branches[b].start()
        wait(lambda: sorted(leafs(plan.monitor_port)) == list(BRANCHES), 30)
        urls = {b: str(branches[b].url) for b in BRANCHES}
        ids: list[str] = []

        async def publish(b: str, start: int, count: int) -> None:
            nc = await nats.connect(urls[b])  # the branch's own server: no hub needed
            try:
                for i in range(start, start + count):
                    await nc.jetstream().publish(f"alerts.{b}.{i}", f"{b}-{i}".encode(),
                                                 headers={"Nats-Msg-Id": f"{b}-{i}"})
                    ids.append(f"{b}-{i}")
            finally:
                await nc.close()

        async def hub_count() -> int:
            nc = await nats.connect(hub_url)
            try:
                return int((await nc.jetstream().stream_info("ALERTS_ALL")).state.messages)
            finally:
                await nc.close()

        async def set_up() -> None:
            for b in BRANCHES:
                nc = await nats.connect(urls[b])
                js = nc.jetstream()
                await js.add_stream(StreamConfig(name="ALERTS", subjects=["alerts.>"],
                                                 storage=StorageType.FILE))
                await ensure_uplink(js, b, "ALERTS")
                await nc.close()
            nc = await nats.connect(hub_url)
            await ensure_hub_stream(nc.jetstream(), "ALERTS_ALL", "ALERTS", BRANCHES)
            await nc.close()

        asyncio.run(set_up())
        for b in BRANCHES:
            asyncio.run(publish(b, 0, 20))
        wait(lambda: asyncio.run(hub_count()) == 40, 60)

        hub.stop()  # the hub is away; br1 goes on alerting
        asyncio.run(publish("br1", 20, 100))
        hub.start()
        link = wait(lambda: sorted(leafs(plan.monitor_port)) == list(BRANCHES), 30)
        caught = wait(lambda: asyncio.run(hub_count()) >= 140, 60)
        sys.stderr.write(f"\nhub back: links up after {link:.2f} s, every alert at the hub "
                         f"{caught:.2f} s later\n")

        async def at_hub() -> list[tuple[str, str]]:
            nc = await nats.connect(hub_url)
            try:
                sub = await nc.jetstream().subscribe(">", stream="ALERTS_ALL",
                                                     ordered_consumer=True)
                got = []
                for _ in range(140):
                    msg = await sub.next_msg(timeout=5)
                    got.append((msg.subject, msg.data.decode()))
                return got
            finally:
                await nc.close()

        got = asyncio.run(at_hub())
        assert sorted(data for _, data in got) == sorted(ids)  # every one, once
        assert all(subject.startswith(data.split("-")[0] + ".alerts.")
                   for subject, data in got)  # each under its branch
        assert asyncio.run(hub_count()) == 140

        async def trespass() -> list[str]:  # br1's credentials cannot read br2's flow
            errors: list[str] = []

            async def on_error(exc: Exception) -> None:
                errors.append(str(exc))
            br1 = tomllib.loads((out / "branches" / "br1.toml").read_text())["hub_url"]
            nc = await nats.connect(br1.replace("nats-leaf://", "nats://").replace(
                f":{plan.leaf_port}", f":{plan.client_port}"), error_cb=on_error)
            try:
                await nc.subscribe("bg.up.br2.>")
                await nc.flush()
                await asyncio.sleep(0.5)
            finally:
                await nc.close()
            return errors

        assert any("ermissions" in e for e in asyncio.run(trespass()))
    finally:
        for server in branches.values():
            server.stop()
        hub.stop()
