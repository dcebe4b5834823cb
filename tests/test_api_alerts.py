"""Alert reads: filters, sort, cursor pagination with a total, one alert with everything
about it, related open alerts, account history, and errors that name the field."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from starlette.testclient import TestClient

from appliance.scoring.features import FEATURES
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import Keys, shared_client, shared_db, shared_keys  # noqa: F401


@pytest.fixture
def node_db(shared_db: tuple[Settings, Store]) -> tuple[Settings, Store]:
    return shared_db  # these tests only read, or add notes: one database for the module


@pytest.fixture
def role_keys(shared_keys: Keys) -> Keys:
    return shared_keys


@pytest.fixture
def client(shared_client: TestClient) -> TestClient:
    return shared_client
from tests.support import query


def get(client: TestClient, keys: Keys, path: str, **params: Any) -> Any:
    r = client.get(path, params=params, headers=keys.header("viewer"))
    assert r.status_code == 200, r.text
    return r.json()


def all_pages(client: TestClient, keys: Keys, **params: Any) -> tuple[list[Any], set[int]]:
    seen: list[Any] = []
    totals = set()
    cursor = None
    while True:
        page = get(client, keys, "/api/v1/alerts", **params, **({"cursor": cursor} if cursor
                                                                else {}))
        totals.add(page["total"])
        seen.extend(page["alerts"])
        cursor = page["next_cursor"]
        if cursor is None:
            return seen, totals


@pytest.mark.parametrize("sort", ["-created_at", "created_at", "-risk", "risk", "ts", "-ts"])
def test_cursor_pages_cover_every_alert_once_in_order(client: TestClient, role_keys: Keys,
                                                      node_db: tuple[Settings, Store],
                                                      sort: str) -> None:
    alerts, totals = all_pages(client, role_keys, sort=sort, limit=7)
    db_count = query(node_db[0].db_path, "SELECT count(*) FROM alerts")[0][0]
    assert totals == {db_count} and len(alerts) == db_count
    assert len({a["alert_id"] for a in alerts}) == db_count
    field = {"created_at": "alert_id", "risk": "risk", "ts": "ts"}[sort.lstrip("-")]
    keys = [(a[field], a["alert_id"]) for a in alerts]
    assert keys == sorted(keys, reverse=sort.startswith("-"))


def test_filters_match_the_database(client: TestClient, role_keys: Keys,
                                    node_db: tuple[Settings, Store]) -> None:
    db = node_db[0].db_path
    some = query(db, "SELECT a.account_id, a.terminal_id, a.ts, t.branch FROM alerts a "
                     "JOIN transactions t USING (transaction_id) ORDER BY a.alert_id "
                     "LIMIT 1 OFFSET 5")[0]
    cases = [
        ({"severity": "CRITICAL"}, "severity = 'CRITICAL'"),
        ({"severity": "HIGH,WARNING"}, "severity IN ('HIGH', 'WARNING')"),
        ({"status": "NEW"}, "status = 'NEW'"),
        ({"min_risk": 0.7, "max_risk": 0.9}, "risk >= 0.7 AND risk <= 0.9"),
        ({"reason": "ml_anomaly"}, "reasons LIKE '%\"ml_anomaly\"%'"),
        ({"account_id": some[0]}, f"account_id = '{some[0]}'"),
        ({"terminal_id": some[1]}, f"terminal_id = '{some[1]}'"),
        ({"since": some[2]}, f"ts >= {some[2]!r}"),
        ({"until": "2026-03-02T09:30:00+00:00"}, "ts < 1772443800"),
        ({"assignee": "nobody"}, "assignee = 'nobody'"),
        ({"branch": some[3]}, "transaction_id IN (SELECT transaction_id FROM transactions "
                              f"WHERE branch = '{some[3]}')"),
        ({"branch": "elsewhere"}, "0"),
    ]
    for params, where in cases:
        expected = {r[0] for r in query(db, f"SELECT alert_id FROM alerts WHERE {where}")}
        alerts, totals = all_pages(client, role_keys, limit=500, **params)
        assert {a["alert_id"] for a in alerts} == expected, params
        assert totals == {len(expected)}, params
    assert any(query(db, "SELECT 1 FROM alerts WHERE severity = 'CRITICAL'"))


@pytest.mark.parametrize("params, field", [
    ({"min_risk": "high"}, "min_risk"), ({"min_risk": 2}, "min_risk"),
    ({"min_risk": 0.9, "max_risk": 0.1}, "min_risk"), ({"severity": "BAD"}, "severity"),
    ({"status": "OPEN"}, "status"), ({"limit": 0}, "limit"), ({"limit": "ten"}, "limit"),
    ({"sort": "amount"}, "sort"), ({"cursor": "garbage!"}, "cursor"),
    ({"since": "yesterday"}, "since"), ({"colour": "red"}, "colour"),
])
def test_bad_parameters_are_400_naming_the_field(client: TestClient, role_keys: Keys,
                                                 params: dict[str, Any], field: str) -> None:
    r = client.get("/api/v1/alerts", params=params, headers=role_keys.header("viewer"))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


def test_a_cursor_from_another_sort_is_refused(client: TestClient, role_keys: Keys) -> None:
    cursor = get(client, role_keys, "/api/v1/alerts", limit=2, sort="risk")["next_cursor"]
    r = client.get("/api/v1/alerts", params={"cursor": cursor},
                   headers=role_keys.header("viewer"))
    assert r.status_code == 400 and r.json()["error"]["field"] == "cursor"


def test_one_alert_has_its_transaction_features_reasons_and_notes(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store]) -> None:
    [(alert_id, tid)] = query(node_db[0].db_path, "SELECT alert_id, transaction_id FROM "
                              "alerts WHERE reasons != '[]' LIMIT 1")
    client.post(f"/api/v1/alerts/{alert_id}/notes", json={"text": "called the customer"},
                headers=role_keys.header("analyst"))
    made = get(client, role_keys, f"/api/v1/alerts/{alert_id}")["explanation"]
    # made when read, from the stored row (issue 16): its rules are the stored reasons
    stored = json.loads(query(node_db[0].db_path, "SELECT reasons FROM transactions WHERE "
                                                  "transaction_id = ?", [tid])[0][0])
    assert [r["reason"] for r in made["rules"]] == stored and "unusual" in made
    explained = {"unusual": ["amount 4.8x the account's mean"], "contributions": [
        {"feature": "amount", "value": 5100.0, "share": 0.6}], "model_version": "if-v1"}
    conn = sqlite3.connect(node_db[0].db_path)
    with conn:  # as a node older than issue 16 stored it, in the alert's transaction
        conn.execute("INSERT INTO alert_explanations VALUES (?, ?, 0)",
                     (tid, json.dumps(explained)))
    conn.close()
    client.post(f"/api/v1/alerts/{alert_id}/notes", json={"text": "explained"},
                headers=role_keys.header("analyst"))  # a change, so the cache moves on
    body = get(client, role_keys, f"/api/v1/alerts/{alert_id}")
    assert body["explanation"] == explained
    assert body["alert"]["alert_id"] == alert_id and body["alert"]["status"] == "NEW"
    assert body["transaction"]["transaction_id"] == tid
    assert list(body["features"]) == list(FEATURES)
    assert body["reasons"] and all(r["code"] and r["detail"] for r in body["reasons"])
    assert [n["text"] for n in body["notes"]] == ["called the customer", "explained"]
    missing = client.get("/api/v1/alerts/999999", headers=role_keys.header("viewer"))
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "alert_id"
    huge = client.get(f"/api/v1/alerts/{10**30}", headers=role_keys.header("viewer"))
    assert huge.status_code == 404


def test_related_are_the_other_open_alerts_on_the_account_and_terminal(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store]) -> None:
    db = node_db[0].db_path
    [(alert_id, account, terminal)] = query(
        db, "SELECT alert_id, account_id, terminal_id FROM alerts WHERE terminal_id IN "
            "(SELECT terminal_id FROM alerts GROUP BY 1 HAVING count(*) > 2) LIMIT 1")
    body = get(client, role_keys, f"/api/v1/alerts/{alert_id}/related")
    for scope, value in (("account", account), ("terminal", terminal)):
        expected = {r[0] for r in query(db, f"SELECT alert_id FROM alerts WHERE {scope}_id = ? "
                                        "AND alert_id != ?", [value, alert_id])}
        assert {a["alert_id"] for a in body[scope]} == expected
    assert body["terminal"]


def test_account_history_is_newest_first_with_verdicts(client: TestClient, role_keys: Keys,
                                                       node_db: tuple[Settings, Store]) -> None:
    db = node_db[0].db_path
    [(account, n)] = query(db, "SELECT account_id, count(*) AS n FROM transactions "
                               "GROUP BY 1 ORDER BY n DESC LIMIT 1")
    body = get(client, role_keys, f"/api/v1/accounts/{account}/transactions", limit=500)
    assert len(body["transactions"]) == n and n > 1
    stamps = [t["ts"] for t in body["transactions"]]
    assert stamps == sorted(stamps, reverse=True)
    assert {"risk", "severity", "decision", "reasons"} <= set(body["transactions"][0])
    assert len(get(client, role_keys, f"/api/v1/accounts/{account}/transactions",
                   limit=1)["transactions"]) == 1


def test_stats_add_up(client: TestClient, role_keys: Keys,
                      node_db: tuple[Settings, Store]) -> None:
    db = node_db[0].db_path
    body = get(client, role_keys, "/api/v1/stats")
    assert body["transactions"] == query(db, "SELECT count(*) FROM transactions")[0][0]
    assert body["alerts"] == query(db, "SELECT count(*) FROM alerts")[0][0]
    assert sum(body["by_severity"].values()) == body["alerts"]
    assert sum(h["transactions"] for h in body["by_hour"]) == body["transactions"]
    assert sum(h["alerts"] for h in body["by_hour"]) == body["alerts"]
    assert body["alert_rate"] == round(body["alerts"] / body["transactions"], 6)
    assert body["model_version"]["last_scored"] == "m-test"
    assert body["rules_version"]["running"] == body["rules_version"]["last_scored"]
    assert body["top_terminals"][0]["alerts"] >= body["top_terminals"][-1]["alerts"]
    later = get(client, role_keys, "/api/v1/stats", since="2100-01-01")
    assert later["transactions"] == 0 and later["alerts"] == 0
