"""Rate limits: per key (and per client address without one), 429 with Retry-After, and
requests pass again once the window has moved on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from appliance import keys
from appliance.api.app import create_app
from appliance.change import connect_writer
from appliance.store import Store
from tests.api_support import api_settings, fill


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    settings = api_settings(tmp_path, api_rate_per_second=5.0, api_rate_burst=5)
    store = Store.open(settings.db_path)
    fill(store, 20)
    writer = connect_writer(settings.db_path)
    one = keys.create(writer, "one", "viewer", "test")[1]
    two = keys.create(writer, "two", "viewer", "test")[1]
    with TestClient(create_app(settings)) as c:
        yield c, one, two
    store.close()


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
        limited: tuple[TestClient, str, str]) -> None:
    client, one, _ = limited
    codes = [client.get("/healthz").status_code for _ in range(5)]
    assert codes == [200] * 5
    assert client.get("/healthz").status_code == 429
    assert client.get("/api/v1/alerts").status_code == 429  # no key: the address's budget
    assert client.get("/api/v1/alerts",
                      headers={"Authorization": f"Bearer {one}"}).status_code == 200
    time.sleep(1.05)
    assert client.get("/healthz").status_code == 200
