"""Rate limits: per key (and per client address without one), 429 with Retry-After, and
requests pass again once the window has moved on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
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


def test_wrong_secrets_with_a_real_key_id_get_429_before_the_hash_check(tmp_path: Path
                                                                        ) -> None:
    """Counted per key id before argon2, from any address: guesses at one key stop at once."""
    settings = api_settings(tmp_path, api_key_attempts_per_minute=3,
                            api_verifications_per_minute=1000)
    Store.open(settings.db_path).close()
    key = keys.create(connect_writer(settings.db_path), "k", "viewer", "test")[1]
    wrong = [{"Authorization": f"Bearer {key[:-3]}{n:03d}"} for n in range(6)]
    with TestClient(create_app(settings)) as client:
        codes = [client.get("/api/v1/alerts", headers=h).status_code for h in wrong]
        assert codes == [401, 401, 401, 429, 429, 429]
        refused = client.get("/api/v1/alerts", headers=wrong[0])
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["field"] == "Authorization"
        other = TestClient(client.app, client=("10.9.8.7", 1234))  # another address: same id
        assert other.get("/api/v1/alerts", headers=wrong[1]).status_code == 429
        # another key's id is not held back
        second = keys.create(connect_writer(settings.db_path), "k2", "viewer", "test")[1]
        assert client.get("/api/v1/alerts", headers={"Authorization": f"Bearer {second}"}
                          ).status_code == 200


def test_a_flood_on_its_key_id_does_not_lock_out_a_key_that_has_passed(tmp_path: Path
                                                                      ) -> None:
    """The holder of the real key keeps working, even when every request of theirs needs
    argon2 again (api_key_cache_seconds 0)."""
    settings = api_settings(tmp_path, api_key_attempts_per_minute=3,
                            api_verifications_per_minute=3, api_key_cache_seconds=0)
    Store.open(settings.db_path).close()
    key = keys.create(connect_writer(settings.db_path), "k", "viewer", "test")[1]
    real = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        holder = TestClient(client.app, client=("10.1.1.1", 1234))
        assert holder.get("/api/v1/alerts", headers=real).status_code == 200
        wrong = [{"Authorization": f"Bearer {key[:-3]}{n:03d}"} for n in range(5)]
        codes = [client.get("/api/v1/alerts", headers=h).status_code for h in wrong]
        assert codes == [401, 401, 429, 429, 429]
        for _ in range(4):  # past both the key id's and its own address's attempts
            assert holder.get("/api/v1/alerts", headers=real).status_code == 200
        # ...and the attacker who got the flood 429'd cannot pass the real key's check by
        # sending the right key id with another wrong secret from the holder's address
        assert holder.get("/api/v1/alerts", headers=wrong[0]).status_code == 429



def test_guesses_at_one_key_id_from_many_addresses_stop_at_the_default_limit(
        tmp_path: Path) -> None:
    """Default settings: each address sends one wrong secret for the same real key id (a
    botnet, or a rotating address); the key id's own count stops them after 10."""
    settings = api_settings(tmp_path)
    Store.open(settings.db_path).close()
    key = keys.create(connect_writer(settings.db_path), "k", "viewer", "test")[1]
    with TestClient(create_app(settings)) as client:
        codes = [TestClient(client.app, client=(f"10.0.{n}.1", 1234)).get(
            "/api/v1/alerts", headers={"Authorization": f"Bearer {key[:-3]}{n:03d}"}
        ).status_code for n in range(12)]
    assert codes == [401] * 10 + [429] * 2


def test_a_refusal_is_held_without_holding_up_anyone_else(tmp_path: Path) -> None:
    """A 429 waits api_refusal_delay_seconds before it is sent (that is what paces a
    flood), on a timer: a request from someone else made meanwhile is answered first."""
    settings = api_settings(tmp_path, api_rate_burst=1, api_rate_per_second=0.02,
                            api_refusal_delay_seconds=2.0)
    Store.open(settings.db_path).close()
    key = keys.create(connect_writer(settings.db_path), "k", "viewer", "test")[1]
    app = create_app(settings)
    answered: list[tuple[str, int, float]] = []

    async def scenario() -> None:
        flood = httpx.AsyncClient(transport=httpx.ASGITransport(app, client=("10.0.0.1", 1)),
                                  base_url="http://node")
        analyst = httpx.AsyncClient(transport=httpx.ASGITransport(app,
                                                                  client=("10.0.0.2", 1)),
                                    base_url="http://node")
        async with flood, analyst:
            assert (await flood.get("/healthz")).status_code == 200  # its one request

            async def timed(name: str, client: httpx.AsyncClient, path: str,
                            headers: dict[str, str]) -> None:
                started = time.monotonic()
                response = await client.get(path, headers=headers)
                answered.append((name, response.status_code, time.monotonic() - started))

            async def later() -> None:
                await asyncio.sleep(0.3)
                await timed("analyst", analyst, "/api/v1/alerts",
                            {"Authorization": f"Bearer {key}"})

            await asyncio.gather(timed("flood", flood, "/healthz", {}), later())

    asyncio.run(scenario())
    assert [(name, status) for name, status, _ in answered] == [("analyst", 200),
                                                                ("flood", 429)]
    assert answered[1][2] >= 2.0  # held for the delay (a lower bound: sleep guarantees it)
