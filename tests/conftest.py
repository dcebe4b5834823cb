"""Fixtures that run the real thing: a real nats-server on a free loopback port, real SQLite
files in per-test temp dirs, the scorer as a real child process. Each stops what it started."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.operations.node import EmbeddedNats
from appliance.settings import Settings, load
from tests.support import HISTORY


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A real nats-server with JetStream, on 127.0.0.1 and a port the OS chose."""
    server = EmbeddedNats(load(None, env={}, data_dir=tmp_path / "nats-host", nats_port=0))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def settings(tmp_path: Path, nats_url: str) -> Settings:
    return load(None, env=HISTORY, data_dir=tmp_path / "node", nats_url=nats_url)


@dataclass
class NodeProcess:
    """``branchguard run`` as a child process, against an existing NATS."""

    data_dir: Path
    nats_url: str
    extra_env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        return self.spawn(["run", "--quiet", "--data-dir", str(self.data_dir), "--nats-url",
                           self.nats_url], '"node.ready"', timeout)

    def spawn(self, args: list[str], ready: str, timeout: float) -> NodeProcess:
        """Run ``branchguard <args>``; wait until its log shows ``ready``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"{args[0]}-{time.monotonic_ns()}.log"
        env = {**os.environ, "BRANCHGUARD_RUN_API": "false", **HISTORY, **self.extra_env}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "appliance", *args],
                                            stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in self.log():
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"node exited early:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"node not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"node did not stop on SIGTERM:\n{self.log()}")
        return self.process.returncode


@pytest.fixture
def node_factory(request: pytest.FixtureRequest) -> Iterator[type[NodeProcess]]:
    started: list[NodeProcess] = []

    class Factory(NodeProcess):
        def start(self, timeout: float = 60.0) -> NodeProcess:
            started.append(self)
            return super().start(timeout)

    yield Factory
    for node in started:
        node.kill()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for node in started:
            sys.stderr.write(f"--- node log {node.log_path}\n{node.log()[-5000:]}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def run_async(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)
