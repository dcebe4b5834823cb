"""The three servers of a JetStream cluster (:mod:`.cluster`) run on this machine's loopback,
as child processes: to try a cluster, to test against one and to measure one
(``branchguard bench cluster``).

Each server is exactly what ``branchguard cluster config`` writes, on free ports, with its
store under a directory of the caller's. :meth:`LoopbackCluster.kill` ends one server with
SIGKILL (a crash of its host); :meth:`LoopbackCluster.stop` ends every server still running,
each by its own PID, and is safe to call twice.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.errors import Error as NatsError

from .. import logs
from ..errors import NodeError
from ..settings import load, nats_servers
from .cluster import ClusterConfig, plan_servers, write_cluster_config
from .node import nats_server_binary

log = logs.get("appliance.loopback_cluster")

STOP_SECONDS = 5.0
"""How long a server gets to stop after SIGTERM before it is sent SIGKILL."""


@dataclass
class LoopbackCluster:
    """Three running servers: their configuration, their processes by name, their logs."""

    config: ClusterConfig
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated (the ``nats_url`` setting)."""
        return self.config.nats_url

    @property
    def pids(self) -> dict[str, int]:
        """Each server's PID, by name (``nats-1`` .. ``nats-3``)."""
        return {name: process.pid for name, process in self.processes.items()}

    def kill(self, name: str) -> None:
        """SIGKILL one server by its PID, as a crash of its host would end it."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            log.info("cluster.server_killed", txn_id=None, server=name, pid=process.pid)

    def stop(self) -> None:
        """Stop every server still running (SIGTERM, then SIGKILL after
        :data:`STOP_SECONDS`), each by its PID."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.kill(name)

    def log_tails(self, chars: int = 3000) -> str:
        """The end of each server's log, for a failure message."""
        return "".join(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}\n"
                       for path in sorted(self.logs.glob("*.log")))


def start_loopback_cluster(root: Path, timeout: float = 30.0) -> LoopbackCluster:
    """Start the three servers ``branchguard cluster config`` describes, on free loopback
    ports (configuration in ``root/cluster``, stores in ``root/stores``, logs in
    ``root/logs``); return once JetStream answers (a meta leader is elected). Raises
    :class:`NodeError` when it does not within ``timeout`` seconds, with every server
    stopped."""
    settings = load(None, env={}, data_dir=root / "node")
    config = write_cluster_config(settings, root / "cluster",
                                  plan_servers((), 0, 0, store_root=root / "stores"))
    cluster = LoopbackCluster(config, root / "logs")
    cluster.logs.mkdir(parents=True, exist_ok=True)
    try:
        for server, path in zip(config.servers, config.files):
            with (cluster.logs / f"{server.name}.log").open("wb") as out:
                cluster.processes[server.name] = subprocess.Popen(
                    [str(nats_server_binary()), "-c", str(path)], stdout=out,
                    stderr=subprocess.STDOUT)
        asyncio.run(wait_for_meta_leader(config.nats_url, timeout))
    except BaseException:
        cluster.stop()
        raise
    log.info("cluster.started", txn_id=None, url=cluster.url, pids=cluster.pids)
    return cluster


async def _not_listening_yet(exc: Exception) -> None:
    """A server just started may refuse the first connection: no traceback for that."""


async def wait_for_meta_leader(url: str, timeout: float) -> None:
    """Return once the cluster at ``url`` answers JetStream API requests (its servers
    have elected a meta leader); :class:`NodeError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    nc = await nats.connect(nats_servers(url), connect_timeout=1, reconnect_time_wait=0.2,
                            error_cb=_not_listening_yet)
    try:
        while True:
            try:
                info = await nc.request("$JS.API.INFO", b"", timeout=1)
                if b'"error"' not in info.data:
                    return
            except NatsError:
                pass
            if time.monotonic() > deadline:
                raise NodeError("the cluster elected no JetStream meta leader", field="url",
                                value=url, hint="see the servers' logs")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
