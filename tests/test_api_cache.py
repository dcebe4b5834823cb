"""The response cache never serves a list that misses a committed change: new alerts from
the scorer's commits and analysts' case changes both make the next request miss."""

from __future__ import annotations

import random
import re

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from starlette.testclient import TestClient

from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import Keys, client, fill, node_db, role_keys  # noqa: F401
from tests.support import query


def counter(client: TestClient, name: str, route: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf'^{name}_total{{route="{re.escape(route)}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_repeated_query_is_a_hit_until_the_scorer_commits(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store]) -> None:
    settings, store = node_db
    h = role_keys.header("viewer")
    first = client.get("/api/v1/alerts", params={"limit": 5}, headers=h)
    again = client.get("/api/v1/alerts", params={"limit": 5}, headers=h)
    assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
    assert first.content == again.content
    assert counter(client, "branchguard_api_cache_hits", "/api/v1/alerts") == 1
    assert counter(client, "branchguard_api_cache_misses", "/api/v1/alerts") == 1

    fill(store, 50, seed=21, first_seq=1000)  # the scorer commits a batch with new alerts
    after = client.get("/api/v1/alerts", params={"limit": 5}, headers=h)
    assert after.headers["x-cache"] == "miss"
    newest = query(settings.db_path, "SELECT max(alert_id) FROM alerts")[0][0]
    assert after.json()["alerts"][0]["alert_id"] == newest
    assert after.json()["total"] == query(settings.db_path, "SELECT count(*) FROM alerts")[0][0]


def test_a_case_change_invalidates_cached_lists_and_stats(
        client: TestClient, role_keys: Keys) -> None:
    h = role_keys.header("viewer")
    params = {"status": "INVESTIGATING"}
    assert client.get("/api/v1/alerts", params=params, headers=h).json()["total"] == 0
    stats = client.get("/api/v1/stats", headers=h).json()
    assert client.get("/api/v1/stats", headers=h).headers["x-cache"] == "hit"
    client.patch("/api/v1/alerts/1", json={"version": 1, "status": "INVESTIGATING"},
                 headers=role_keys.header("analyst"))
    assert client.get("/api/v1/alerts", params=params, headers=h).json()["total"] == 1
    fresh = client.get("/api/v1/stats", headers=h).json()
    assert fresh["by_status"].get("INVESTIGATING") == 1 != stats["by_status"].get(
        "INVESTIGATING")


@hsettings(max_examples=25, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(["read", "commit", "change"]), min_size=5, max_size=15),
       seed=st.integers(0, 10_000))
def test_no_interleaving_of_reads_and_commits_serves_a_stale_list(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store],
        steps: list[str], seed: int) -> None:
    settings, store = node_db
    rng = random.Random(seed)
    h = role_keys.header("viewer")
    query_params = {"limit": 3, "sort": "-created_at"}
    for step in steps:
        if step == "commit":
            last = query(settings.db_path, "SELECT coalesce(max(stream_seq), 0) FROM "
                                           "transactions")[0][0]
            fill(store, rng.randint(1, 30), seed=rng.randint(0, 10**6), first_seq=last + 1)
        elif step == "change":
            alert_id, version = query(settings.db_path, "SELECT alert_id, version FROM alerts "
                                                        "ORDER BY random() LIMIT 1")[0]
            client.patch(f"/api/v1/alerts/{alert_id}", json={
                "version": version, "assignee": f"a{rng.randint(0, 9)}"},
                headers=role_keys.header("analyst"))
        body = client.get("/api/v1/alerts", params=query_params, headers=h).json()
        expected = query(settings.db_path, "SELECT alert_id, assignee, version FROM alerts "
                                           "ORDER BY alert_id DESC LIMIT 3")
        assert [(a["alert_id"], a["assignee"], a["version"]) for a in body["alerts"]] == \
            [tuple(r) for r in expected]
        assert body["total"] == query(settings.db_path, "SELECT count(*) FROM alerts")[0][0]
