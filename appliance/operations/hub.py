"""Branches as leaf nodes of a regional hub (issue 20): the configuration of both sides.

A branch's nats-server runs in a JetStream domain of its own (``jetstream_domain``, such as
``br2``) and dials the hub's leafnode port (``hub_url``; node.leaf_block writes that part of
the branch's server file). It keeps scoring and alerting on its own while the link is down.
The hub's nats-server runs in domain ``hub`` and accepts one user per branch.
``branchguard hub config`` (:func:`write_hub_config`) writes:

- ``hub.conf``: the hub's nats-server: its client port, its monitoring port (``/leafz``
  lists each branch's link), JetStream in domain ``hub``, the account ``FLEET`` holding the
  hub's own user and one user per branch, and the leafnode listener (TLS when the settings
  name a certificate);
- ``branches/<branch>.toml``: what each branch adds to its settings (``jetstream_domain``,
  ``hub_url`` with its credentials): a secret, mode 0600;
- ``hub.toml``: the settings of the hub's own processes (``nats_url`` with the hub's user).

Passwords are made once and kept in ``hub-secrets.toml`` (0600), so running the command again
(Ansible does, at every converge) changes nothing unless a branch is added or removed.

Why one account for the hub and every branch: nats-server re-establishes a stream's sources
when a leaf connects only for streams of the account that leaf is bound to. Each branch's
user may only do what the flows need, written from the branch's side (``publish``: what the
branch sends up; ``subscribe``: what the hub sends down): answer the hub's JetStream requests
for its own domain (``$JS.<branch>.API``), deliver on ``bg.up.<branch>.>``, and read what the
hub sends it on ``bg.down.<branch>.>``.

What flows up is sourced by the hub through a durable consumer at each branch, not the
server's own ephemeral one: after the hub restarts, an ephemeral source waits out a 30 s
request timeout and a 10 s back-off before it asks again, whatever the link does, while a
durable one is asked again within 5 s and then as soon as the branch's consumer is heard
(measured on loopback, docs/hub.md).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.request
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (AckPolicy, ConsumerConfig, ExternalStream, StorageType, StreamConfig,
                         StreamConsumerSource, StreamSource, SubjectTransform)
from nats.js.errors import NotFoundError

from ..casework.branch_links import LinkReading
from ..errors import SettingsError
from ..settings import Settings
from .cluster import write_if_changed

HUB_DOMAIN = "hub"
UPLINK = "HUB"
"""The durable consumer, on each branch stream the hub sources, that delivers to the hub."""
DUPLICATE_WINDOW_SECONDS = 120.0
"""A stream that only sources gets no duplicate window by default: the hub's get one, so a
message sourced twice (the same ``Nats-Msg-Id``) is stored once."""
ACCOUNT = "FLEET"
HUB_USER = "hub"


def up_subject(branch: str) -> str:
    """Where a branch's durable consumers deliver what the hub sources from it."""
    return f"bg.up.{branch}"


def down_subject(branch: str) -> str:
    """Where the hub's consumers deliver what a branch sources from the hub."""
    return f"bg.down.{branch}"


def branch_permissions(branch: str) -> dict[str, Any]:
    """What the leaf user of ``branch`` may do at the hub (from the branch's side)."""
    return {
        "publish": {"allow": [
            "$JSC.R.>", "$JS.FC.>", "$JS.ACK.>", "_INBOX.>",  # API and flow-control replies
            f"{up_subject(branch)}.>",                      # what the hub sources from it
            f"$JS.{HUB_DOMAIN}.API.CONSUMER.>",             # what it sources from the hub
        ]},
        "subscribe": {"allow": [
            "$JSC.R.>", "$JS.FC.>", "$JS.ACK.>", "_INBOX.>",
            f"$JS.{branch}.API.CONSUMER.>",                 # the hub asks for its streams
            f"$JS.{branch}.API.STREAM.INFO.>",              # and how far they are
            f"{down_subject(branch)}.>",                    # what the hub sends it
        ]},
    }


@dataclass(frozen=True)
class HubPlan:
    """Where the hub listens, and the branches it serves."""

    host: str
    client_port: int
    leaf_port: int
    monitor_port: int
    store_dir: Path
    branches: tuple[str, ...]
    public_host: str
    """The address branches dial (the hub's name on the WAN); ``host`` is what it binds."""


@dataclass(frozen=True)
class HubConfig:
    files: tuple[Path, ...]
    changed: tuple[Path, ...]


def _check_branches(branches: tuple[str, ...]) -> None:
    if not branches:
        raise SettingsError("a hub serves at least one branch", field="branch", value="")
    for branch in branches:
        probe = Settings(jetstream_domain=branch)
        probe.validate()  # the same rule as the branch's own setting
    if len(set(branches)) != len(branches):
        raise SettingsError("each branch is named once", field="branch",
                            value=",".join(branches))


def _secrets(path: Path, branches: tuple[str, ...]) -> dict[str, str]:
    """Each branch's and the hub user's password: kept from an earlier run, made if new."""
    known: dict[str, str] = {}
    if path.exists():
        known = {str(k): str(v) for k, v in tomllib.loads(path.read_text()).items()}
    wanted = (HUB_USER, *branches)
    out = {name: known.get(name) or secrets.token_urlsafe(24) for name in wanted}
    text = "# Passwords of the hub's users (branchguard hub config). A secret.\n" + "".join(
        f"{json.dumps(name)} = {json.dumps(password)}\n" for name, password in out.items())
    write_if_changed(path, text, mode=0o600)
    return out


def hub_server_file(settings: Settings, plan: HubPlan, passwords: dict[str, str]) -> str:
    """The hub's nats-server configuration."""
    users: list[dict[str, Any]] = [{"user": HUB_USER, "password": passwords[HUB_USER]}]
    users += [{"user": b, "password": passwords[b], "permissions": branch_permissions(b)}
              for b in plan.branches]
    # no_advertise: branches dial the address they were given (``public_host``: a NAT, a
    # proxy, a load balancer) and never the hub's own, which it would otherwise gossip
    leaf: dict[str, Any] = {"listen": f"{plan.host}:{plan.leaf_port}", "no_advertise": True}
    if settings.nats_tls_cert is not None and settings.nats_tls_key is not None:
        leaf["tls"] = {"cert_file": str(settings.nats_tls_cert.resolve()),
                       "key_file": str(settings.nats_tls_key.resolve()), "timeout": 2}
        if settings.nats_tls_ca is not None:
            leaf["tls"]["ca_file"] = str(settings.nats_tls_ca.resolve())
    return (
        "# The regional hub's nats-server, written by `branchguard hub config`;\n"
        "# write it again rather than edit it.\n"
        f"server_name: {json.dumps(HUB_DOMAIN)}\n"
        f"host: {json.dumps(plan.host)}\n"
        f"port: {plan.client_port}\n"
        f"http: {json.dumps(f'{plan.host}:{plan.monitor_port}')}\n"
        "max_payload: 1MB\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(plan.store_dir))}\n"
        f"  domain: {json.dumps(HUB_DOMAIN)}\n"
        "}\n"
        f"accounts: {json.dumps({ACCOUNT: {'jetstream': 'enabled', 'users': users}}, indent=2)}\n"
        f"leafnodes: {json.dumps(leaf, indent=2)}\n"
    )


def branch_settings(plan: HubPlan, branch: str, password: str, tls: bool) -> str:
    """What ``branch`` adds to its settings to become a leaf node of the hub."""
    scheme = "tls" if tls else "nats-leaf"
    url = (f"{scheme}://{quote(branch, safe='')}:{quote(password, safe='')}@"
           f"{plan.public_host}:{plan.leaf_port}")
    return ("# Branch " + branch + " as a leaf node of the regional hub (branchguard hub config).\n"
            "# A secret: it holds the branch's password at the hub.\n"
            f"branch = {json.dumps(branch)}\n"
            f"jetstream_domain = {json.dumps(branch)}\n"
            f"hub_url = {json.dumps(url)}\n")


def hub_settings(plan: HubPlan, password: str) -> str:
    """The settings of the hub's own processes."""
    url = f"nats://{HUB_USER}:{quote(password, safe='')}@{plan.public_host}:{plan.client_port}"
    wildcard = plan.host in ("0.0.0.0", "::", "")  # noqa: S104 - reached on loopback then
    local = "127.0.0.1" if wildcard else plan.host
    monitor = f"http://{local}:{plan.monitor_port}"
    return ("# The hub's own processes (branchguard hub config). A secret.\n"
            f"nats_url = {json.dumps(url)}\n"
            f"hub_branches = {json.dumps(list(plan.branches))}\n"
            f"hub_monitor_url = {json.dumps(monitor)}\n")


def write_hub_config(settings: Settings, out_dir: Path, plan: HubPlan) -> HubConfig:
    """Write the hub's server file and every branch's settings under ``out_dir`` (see the
    module docstring). A file that would not change is left alone."""
    _check_branches(plan.branches)
    out_dir.mkdir(parents=True, exist_ok=True)
    passwords = _secrets(out_dir / "hub-secrets.toml", plan.branches)
    tls = settings.nats_tls_cert is not None and settings.nats_tls_key is not None
    wanted: dict[Path, tuple[str, int]] = {
        out_dir / "hub.conf": (hub_server_file(settings, plan, passwords), 0o640),
        out_dir / "hub.toml": (hub_settings(plan, passwords[HUB_USER]), 0o600),
    }
    for branch in plan.branches:
        wanted[out_dir / "branches" / f"{branch}.toml"] = (
            branch_settings(plan, branch, passwords[branch], tls), 0o600)
    changed = []
    for path, (text, mode) in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if write_if_changed(path, text, mode):
            changed.append(path)
    return HubConfig(files=tuple(wanted), changed=tuple(changed))



def uplink_subject(branch: str, stream: str) -> str:
    return f"{up_subject(branch)}.{stream.lower()}"


async def ensure_uplink(js: JetStreamContext, branch: str, stream: str) -> None:
    """At ``branch``: the durable consumer the hub sources ``stream`` through. Flow-control
    acks (the server's own for sourcing), delivered on the branch's up subject; made once,
    so it remembers what the hub has across restarts of either side."""
    try:
        await js.consumer_info(stream, UPLINK)
        return
    except NotFoundError:
        pass
    await js.add_consumer(stream, ConsumerConfig(
        durable_name=UPLINK, deliver_subject=uplink_subject(branch, stream),
        ack_policy=AckPolicy.FLOW_CONTROL))


def downlink_subject(branch: str, stream: str) -> str:
    return f"{down_subject(branch)}.{stream.lower()}"


def downlink_filters(branch: str) -> list[str]:
    """What of the hub's ``CASEWORK`` goes down to ``branch``: its own labels, and the list
    changes every branch takes (operations/case_flows.py names the subjects)."""
    return [f"casework.{branch}.>", "casework.all.>"]


async def ensure_downlink(js: JetStreamContext, branch: str, stream: str) -> None:
    """At the hub: the durable consumer ``branch`` sources ``stream`` through (its part of
    it, :func:`downlink_filters`), delivered on the branch's down subject: the flows down
    resume where they were after either side restarts, as the uplinks do."""
    try:
        await js.consumer_info(stream, f"{UPLINK}-{branch}")
        return
    except NotFoundError:
        pass
    await js.add_consumer(stream, ConsumerConfig(
        durable_name=f"{UPLINK}-{branch}", deliver_subject=downlink_subject(branch, stream),
        ack_policy=AckPolicy.FLOW_CONTROL, filter_subjects=downlink_filters(branch)))


def branch_source(branch: str, stream: str) -> StreamSource:
    """How ``branch`` sources its part of the hub's ``stream``: through the hub's domain and
    the durable consumer :func:`ensure_downlink` made there."""
    return StreamSource(
        name=stream, external=ExternalStream(api=f"$JS.{HUB_DOMAIN}.API"),
        consumer=StreamConsumerSource(name=f"{UPLINK}-{branch}",
                                      deliver_subject=downlink_subject(branch, stream)))


def hub_source(branch: str, stream: str) -> StreamSource:
    """How the hub sources ``stream`` of ``branch``: through the branch's domain and its
    durable uplink, each subject prefixed with the branch (``alerts.x`` → ``br2.alerts.x``)."""
    return StreamSource(
        name=stream, external=ExternalStream(api=f"$JS.{branch}.API"),
        consumer=StreamConsumerSource(name=UPLINK,
                                      deliver_subject=uplink_subject(branch, stream)),
        subject_transforms=[SubjectTransform(src=">", dest=f"{branch}.>")])


async def ensure_hub_stream(js: JetStreamContext, name: str, stream: str,
                            branches: tuple[str, ...]) -> None:
    """At the hub: stream ``name`` sourcing ``stream`` from every branch (created, or its
    sources brought to ``branches``)."""
    config = StreamConfig(name=name, sources=[hub_source(b, stream) for b in branches],
                          storage=StorageType.FILE,
                          duplicate_window=DUPLICATE_WINDOW_SECONDS)
    try:
        await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)


LINK_SECONDS = 2.0
"""How often the hub's analyst side looks at every branch's link."""


def leafs_up(monitor_url: str) -> set[str]:
    """The names (domains) of the branches whose leaf link is up, from ``/leafz``."""
    if not monitor_url.startswith(("http://", "https://")):
        raise SettingsError("the hub's monitoring address is an http(s) URL",
                            field="hub_monitor_url", value=monitor_url)
    url = f"{monitor_url.rstrip('/')}/leafz?acc={ACCOUNT}"
    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - http(s), checked
        return {str(leaf.get("name")) for leaf in json.load(r).get("leafs") or []}


async def link_readings(nc: Client, settings: Settings, stream: str) -> list[LinkReading]:
    """One look at every branch's link: up or not (``/leafz``), and, per branch, how many
    messages of ``stream``'s source from it the hub has not stored yet and when it last
    heard from it (the raw ``STREAM.INFO``: nats-py's source info drops which branch a
    source is)."""
    loop = asyncio.get_running_loop()
    up = (await loop.run_in_executor(None, leafs_up, settings.hub_monitor_url)
          if settings.hub_monitor_url else set())
    reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2.0)
    now = time.time()
    sources: dict[str, dict[str, Any]] = {}
    for source in json.loads(reply.data).get("sources") or []:
        api = str((source.get("external") or {}).get("api", ""))
        sources[api.removeprefix("$JS.").removesuffix(".API")] = source
    readings = []
    for branch in settings.hub_branches:
        source = sources.get(branch, {})
        active = source.get("active", -1)
        readings.append(LinkReading(
            branch=branch, connected=branch in up,
            lag=int(source.get("lag", 0)) if branch in up else None,
            last_heard=now - active / 1e9 if isinstance(active, int) and active >= 0
            else None))
    return readings
