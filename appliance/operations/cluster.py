"""A 3-server JetStream cluster: the configuration of each server, and the settings the
scorers then use.

The servers run as their own service (``branchguard-nats-cluster@<name>``, one per host),
never inside a scorer: a scorer that crashes must not take a JetStream server with it and
force a leader election. With three servers and streams of three replicas
(``stream_replicas = 3``), the streams outlive any one server: publishing stalls for a few
seconds while a new leader is elected, and a re-send under the same ``Nats-Msg-Id`` is
stored once.

Each file is what the embedded node would write for that server (``node.server_config``:
listen address, JetStream store, sync policy, and the same ``authorization``/``tls`` blocks
from ``nats_auth``), plus its name and a ``cluster`` block with routes to the two others.
When ``nats_auth_file`` is set the routes authenticate as the node's user; with
``nats_tls_cert``/``nats_tls_key`` they use the same certificate (routes verify each other:
the certificate must name every host and allow client as well as server authentication).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import logs
from ..errors import NodeError, SettingsError
from ..nats_auth import load_auth
from ..settings import Settings
from .node import nats_server_binary, server_config

log = logs.get("appliance.cluster")

CLUSTER_NAME = "branchguard"
SERVERS = 3
REPLICAS = 3


@dataclass(frozen=True)
class ClusterServer:
    """One server of the cluster: its name, where clients and the other servers reach it,
    and where its JetStream store lives (on its own host)."""

    name: str
    host: str
    client_port: int
    cluster_port: int
    store_dir: Path

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"


@dataclass(frozen=True)
class ClusterConfig:
    """What :func:`write_cluster_config` wrote."""

    servers: tuple[ClusterServer, ...]
    files: tuple[Path, ...]
    """One nats-server configuration file per server, in the order of ``servers``."""
    settings_file: Path
    """The node settings the scorers of this cluster use (``nats_url``, ``stream_replicas``)."""
    changed: tuple[Path, ...] = ()
    """The files whose content this call changed (none when written again as they were)."""

    @property
    def nats_url(self) -> str:
        """Every server's client URL, comma-separated: the ``nats_url`` setting."""
        return ",".join(server.url for server in self.servers)

    def settings_toml(self) -> str:
        return (f"nats_url = {json.dumps(self.nats_url)}\n"
                f"stream_replicas = {REPLICAS}\n")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the system says is free now (for servers tried on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def plan_servers(hosts: Sequence[str] = (), client_port: int = 4222, cluster_port: int = 6222,
                 store_root: Path = Path("/var/lib/branchguard/nats-cluster")
                 ) -> tuple[ClusterServer, ...]:
    """Three servers named ``nats-1`` .. ``nats-3``. Given ``hosts`` (three addresses), each
    listens on ``client_port`` and ``cluster_port`` of its own host. With no hosts, all three
    run on 127.0.0.1 (to try a cluster on one machine): on ``client_port + i`` and
    ``cluster_port + i``, or on free ports when the port given is 0. Each server's store is
    ``<store_root>/<name>``."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if hosts and len(hosts) != SERVERS:
        raise SettingsError("a cluster needs exactly three servers", field="hosts",
                            value=",".join(hosts),
                            hint="give three addresses, comma-separated, or none for loopback")
    if len(set(hosts)) != len(hosts):
        raise SettingsError("the same host twice", field="hosts", value=",".join(hosts),
                            hint="one server per host; with no hosts all three run on loopback")
    for port, name in ((client_port, "client_port"), (cluster_port, "cluster_port")):
        if not 0 <= port < 65536 - SERVERS or (hosts and port == 0):
            raise SettingsError("invalid port", field=name, value=port,
                                hint="use 1..65532 (0 picks free ports, loopback only)")
    servers = []
    for i in range(SERVERS):
        name = f"nats-{i + 1}"
        if hosts:
            host, client, route = hosts[i], client_port, cluster_port
        else:
            host = "127.0.0.1"
            client = client_port + i if client_port else free_port()
            route = cluster_port + i if cluster_port else free_port()
        servers.append(ClusterServer(name=name, host=host, client_port=client,
                                     cluster_port=route, store_dir=store_root / name))
    return tuple(servers)


def _route_auth(settings: Settings) -> tuple[str, dict[str, Any] | None]:
    """(credentials for route URLs, ``authorization`` of the cluster block): the node's
    user, when the clients need one too."""
    if settings.nats_auth_file is None:
        return "", None
    auth = load_auth(settings.nats_auth_file)
    return (f"{quote(auth.node_user, safe='')}:{quote(auth.node_password, safe='')}@",
            {"user": auth.node_user, "password": auth.node_password, "timeout": 2})


def cluster_block(settings: Settings, me: ClusterServer,
                  servers: Sequence[ClusterServer]) -> str:
    """The ``server_name`` and ``cluster`` part of one server's file."""
    credentials, authorization = _route_auth(settings)
    cluster: dict[str, Any] = {
        "name": CLUSTER_NAME,
        "listen": f"{me.host}:{me.cluster_port}",
        "routes": [f"nats-route://{credentials}{s.host}:{s.cluster_port}"
                   for s in servers if s is not me],
    }
    if authorization is not None:
        cluster["authorization"] = authorization
    if settings.nats_tls_cert is not None and settings.nats_tls_key is not None:
        tls: dict[str, Any] = {"cert_file": str(settings.nats_tls_cert.resolve()),
                               "key_file": str(settings.nats_tls_key.resolve()), "timeout": 2}
        if settings.nats_tls_ca is not None:
            tls["ca_file"] = str(settings.nats_tls_ca.resolve())
        cluster["tls"] = tls
    return (f"server_name: {json.dumps(me.name)}\n"
            f"cluster: {json.dumps(cluster, indent=2)}\n")


def server_file(settings: Settings, me: ClusterServer,
                servers: Sequence[ClusterServer]) -> str:
    """One server's nats-server configuration: the embedded node's for its address and
    store (so auth, TLS and the sync policy are the node's), plus its cluster block."""
    own = dataclasses.replace(settings, nats_host=me.host, nats_port=me.client_port).validate()
    text = server_config(own, me.store_dir).replace(
        "# Written by branchguard at every start; edit branchguard settings instead.\n",
        f"# Server {me.name} of the branchguard JetStream cluster, written by "
        "`branchguard cluster config`;\n# write it again rather than edit it.\n")
    return text + cluster_block(settings, me, servers)


def write_if_changed(path: Path, text: str, mode: int = 0o640) -> bool:
    """Write ``text`` unless the file holds it already (mode 0640: the service's group reads
    it; it may hold credentials); True when it changed."""
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    path.chmod(mode)
    return True


def write_cluster_config(settings: Settings, out_dir: Path,
                         servers: Sequence[ClusterServer]) -> ClusterConfig:
    """Write ``<out_dir>/<name>.conf`` for each server and ``<out_dir>/branchguard-cluster.toml``
    with the settings the scorers use. A file that would not change is left alone, so a
    deployment can run this every time and see (and restart for) real changes only."""
    if len(servers) != SERVERS:
        raise SettingsError("a cluster needs exactly three servers", field="hosts",
                            value=len(servers))
    out_dir.mkdir(parents=True, exist_ok=True)
    files, changed = [], []
    for server in servers:
        path = out_dir / f"{server.name}.conf"
        if write_if_changed(path, server_file(settings, server, servers)):
            changed.append(path)
        files.append(path)
    config = ClusterConfig(servers=tuple(servers), files=tuple(files),
                           settings_file=out_dir / "branchguard-cluster.toml")
    if write_if_changed(config.settings_file, "# The scorers' settings for this cluster "
              "(add them to branchguard.toml).\n" + config.settings_toml()):
        changed.append(config.settings_file)
    return dataclasses.replace(config, changed=tuple(changed))


def exec_cluster_server(config_dir: Path, name: str) -> None:
    """Replace this process with nats-server on ``<config_dir>/<name>.conf`` (written by
    :func:`write_cluster_config`): what ``branchguard-nats-cluster@<name>.service`` runs."""
    conf = config_dir / f"{name}.conf"
    if not conf.is_file():
        raise NodeError("no such cluster server configuration", field="name", value=name,
                        hint=f"write it with `branchguard cluster config --out {config_dir}`")
    exe = str(nats_server_binary())
    log.info("nats.exec", txn_id=None, config=str(conf), server=name)
    os.execv(exe, [exe, "-c", str(conf)])  # noqa: S606
