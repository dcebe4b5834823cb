"""Rate limits: per key (and per client address without one), 429 with Retry-After, and
requests pass again once the window has moved on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from appliance.api.app import create_app
from appliance.casework import keys
from appliance.change import connect_writer
from appliance.store import Store
from tests.api_support import api_settings, fill


def _limited(tmp_path: Path, per_second: float) -> Iterator[tuple[TestClient, str, str]]:
    settings = api_settings(tmp_path, api_rate_per_second=per_second, api_rate_burst=5)
    store = Store.open(settings.db_path)
    fill(store, 20)
    writer = connect_writer(settings.db_path)
    one = keys.create(writer, "one", "viewer", "test")[1]
    two = keys.create(writer, "two", "viewer", "test")[1]
    with TestClient(create_app(settings)) as c:
        yield c, one, two
    store.close()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    """5 requests per second."""
    yield from _limited(tmp_path, 5.0)


@pytest.fixture
def long_window(tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    """5 requests per 50 seconds: counts that do not depend on how fast argon2 runs."""
    yield from _limited(tmp_path, 0.1)


def test_a_key_over_its_limit_gets_429_with_retry_after_then_recovers(
        limited: tuple[TestClient, str, str]) -> None:
    client, one, two = limited
    h1, h2 = {"Authorization": f"Bearer {one}"}, {"Authorization": f"Bearer {two}"}
    codes = [client.get("/api/v1/alerts", headers=h1).status_code for _ in range(5)]
    assert codes == [200] * 5
    refused = client.get("/api/v1/alerts", headers=h1)
    assert refused.status_code == 429
    retry = int(refused.headers["retry-after"])
    assert retry == 1  # a window of one second
    assert refused.json()["error"]["retry_after_seconds"] == retry
    assert client.get("/api/v1/alerts", headers=h2).status_code == 200  # its own budget
    time.sleep(retry + 0.05)
    assert client.get("/api/v1/alerts", headers=h1).status_code == 200


def test_requests_without_a_key_are_limited_per_client_address(
        long_window: tuple[TestClient, str, str]) -> None:
    client, one, _ = long_window
    h1 = {"Authorization": f"Bearer {one}"}
    assert client.get("/api/v1/alerts", headers=h1).status_code == 200  # verified: 1 of 5
    codes = [client.get("/healthz").status_code for _ in range(4)]
    assert codes == [200] * 4
    assert client.get("/healthz").status_code == 429
    assert client.get("/api/v1/alerts").status_code == 429  # no key: the address's budget
    assert client.get("/api/v1/alerts", headers=h1).status_code == 200  # the key's own


def test_another_keys_id_cannot_spend_its_budget(
        long_window: tuple[TestClient, str, str]) -> None:
    """The key id is not secret: wrong keys with it count against the sender's address."""
    client, one, _ = long_window
    forged = {"Authorization": "Bearer " + one[:-4] + "AAAA"}
    codes = [client.get("/api/v1/alerts", headers=forged).status_code for _ in range(6)]
    assert codes == [401] * 5 + [429]
    # ...the real key, from another address, still has its whole budget
    other = TestClient(client.app, client=("10.9.8.7", 1234))
    codes = [other.get("/api/v1/alerts", headers={"Authorization": f"Bearer {one}"}
                       ).status_code for _ in range(5)]
    assert codes == [200] * 5


def test_argon2_verifications_per_address_are_limited(tmp_path: Path) -> None:
    settings = api_settings(tmp_path, api_verifications_per_minute=3)
    Store.open(settings.db_path).close()
    key = keys.create(connect_writer(settings.db_path), "k", "viewer", "test")[1]
    with TestClient(create_app(settings)) as client:
        wrong = [{"Authorization": f"Bearer {key[:-3]}{c}{c}{c}"} for c in "ABCD"]
        codes = [client.get("/api/v1/alerts", headers=h).status_code for h in wrong]
        assert codes == [401, 401, 401, 429]
