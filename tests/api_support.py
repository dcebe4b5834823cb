"""Fixtures for the analyst API tests: a real node database filled through the scorer's own
store, the real app (in-process through Starlette's TestClient, or as ``branchguard serve``
in a child process), and one key per role."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from appliance.api.app import create_app
from appliance.casework import keys
from appliance.change import connect_writer
from appliance.operations.child import terminate
from appliance.scoring.features import FEATURES_VERSION, feature_state
from appliance.scoring.rules import RULES_VERSION
from appliance.scoring.score import judge
from appliance.settings import Settings, load
from appliance.store import Scored, Store
from tests.support import make_transactions

RISKS = (0.05, 0.3, 0.55, 0.65, 0.75, 0.85, 0.95, 0.1, 0.2, 0.4)


def fill(store: Store, count: int, seed: int = 11, first_seq: int = 1) -> int:
    """Store ``count`` simulated transactions scored with a spread of model risks (so
    every severity shows up); returns the last stream sequence used."""
    state = feature_state(store.reader)
    settings = Settings()
    scored = []
    for i, item in enumerate(make_transactions(count, seed=seed)):
        f = state.observe(item.tx)
        scored.append(Scored(item.tx, "BR001", first_seq + i, f, FEATURES_VERSION,
                             judge(item.tx, f, RISKS[i % 10], "m-test", RULES_VERSION,
                                   settings)))
    store.save_batch(scored, [], "scorer", first_seq + count - 1)
    return first_seq + count - 1


@dataclass
class Keys:
    viewer: str
    analyst: str
    supervisor: str
    admin: str

    def header(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, role)}"}


def api_settings(tmp_path: Path, **overrides: object) -> Settings:
    return load(None, env={}, data_dir=tmp_path / "node", nats_url="nats://127.0.0.1:1",
                **overrides)


def _node_db(root: Path) -> Iterator[tuple[Settings, Store]]:
    settings = api_settings(root)
    store = Store.open(settings.db_path)
    fill(store, 300)
    try:
        yield settings, store
    finally:
        store.close()


def _keys(settings: Settings) -> Keys:
    writer = connect_writer(settings.db_path)
    made = {role: keys.create(writer, f"test-{role}", role, "test")[1] for role in keys.ROLES}
    writer.close()
    return Keys(**made)


def _client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def node_db(tmp_path: Path) -> Iterator[tuple[Settings, Store]]:
    """A node database of its own for one test."""
    yield from _node_db(tmp_path)


@pytest.fixture
def role_keys(node_db: tuple[Settings, Store]) -> Keys:
    """One key per role (argon2 makes each cost a fraction of a second)."""
    return _keys(node_db[0])


@pytest.fixture
def client(node_db: tuple[Settings, Store]) -> Iterator[TestClient]:
    yield from _client(node_db[0])


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Store]]:
    """One database for a module of tests that only read (or add notes)."""
    yield from _node_db(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def shared_keys(shared_db: tuple[Settings, Store]) -> Keys:
    return _keys(shared_db[0])


@pytest.fixture(scope="module")
def shared_client(shared_db: tuple[Settings, Store]) -> Iterator[TestClient]:
    yield from _client(shared_db[0])


_LISTENING = re.compile(r'"event":"api.listening".*?"port":(\d+)')


@dataclass
class ServeProcess:
    """``branchguard serve`` as a child process on a free port."""

    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    @classmethod
    def start(cls, settings: Settings, extra_env: dict[str, str] | None = None
              ) -> ServeProcess:
        log_path = settings.data_dir / f"serve-{time.monotonic_ns()}.log"
        env = {**os.environ, "BRANCHGUARD_DATA_DIR": str(settings.data_dir),
               "BRANCHGUARD_API_PORT": "0", **(extra_env or {})}
        if settings.nats_url:
            env["BRANCHGUARD_NATS_URL"] = settings.nats_url
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "appliance", "serve"],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
        server = cls(process, log_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = _LISTENING.search(log_path.read_text())
            if match:
                server.url = f"http://127.0.0.1:{match.group(1)}"
                return server
            if process.poll() is not None:
                raise AssertionError(f"serve exited:\n{log_path.read_text()}")
            time.sleep(0.05)
        server.stop()
        raise AssertionError(f"serve did not listen:\n{log_path.read_text()}")

    def stop(self) -> int | None:
        return terminate(self.process, 30)
