"""API keys and roles: who may call what, 401 against 403, revocation at once, no default
keys, and the `branchguard keys` commands."""

from __future__ import annotations

import re

import json
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from appliance.api.app import specs
from appliance.casework import keys
from appliance.change import connect_writer
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import Keys, client, node_db, role_keys, api_settings  # noqa: F401
from tests.support import query

# One representative call per minimum role: (method, path, json body or None).
CALLS = {
    "viewer": [("GET", "/api/v1/alerts", None), ("GET", "/api/v1/stats", None),
               ("GET", "/api/v1/alerts/1", None), ("GET", "/api/v1/lists", None),
               ("GET", "/api/v1/alerts/1/related", None),
               ("GET", "/api/v1/accounts/A000001/transactions", None)],
    "analyst": [("POST", "/api/v1/alerts/1/notes", {"text": "looked at it"}),
                ("PATCH", "/api/v1/alerts/2", {"version": 1, "assignee": "ana"})],
    "supervisor": [("GET", "/api/v1/audit", None), ("GET", "/api/v1/audit/verify", None),
                   ("POST", "/api/v1/lists", {"list": "deny", "kind": "terminal",
                                              "value": "T-BAD", "reason": "skimmer"})],
    "admin": [("GET", "/api/v1/keys", None)],
}
ORDER = keys.ROLES


@pytest.mark.parametrize("role", ORDER)
def test_each_role_may_do_its_own_calls_and_those_below_and_no_more(
        client: TestClient, role_keys: Keys, role: str) -> None:
    for needed, calls in CALLS.items():
        for method, path, body in calls:
            r = client.request(method, path, json=body, headers=role_keys.header(role))
            if ORDER.index(role) >= ORDER.index(needed):
                assert r.status_code in (200, 201), (role, method, path, r.text)
            else:
                assert r.status_code == 403, (role, method, path, r.text)
                assert r.json()["error"]["field"] == "Authorization"
                assert needed in r.json()["error"]["message"]


def test_reopening_a_closed_case_needs_a_supervisor(client: TestClient,
                                                    role_keys: Keys) -> None:
    analyst, supervisor = role_keys.header("analyst"), role_keys.header("supervisor")
    assert client.patch("/api/v1/alerts/3", json={"version": 1, "status": "INVESTIGATING"},
                        headers=analyst).status_code == 200
    assert client.patch("/api/v1/alerts/3", json={"version": 2, "status": "FALSE_POSITIVE",
                                                    "disposition": "false_positive"},
                        headers=analyst).status_code == 200
    refused = client.patch("/api/v1/alerts/3", json={"version": 3, "status": "INVESTIGATING"},
                           headers=analyst)
    assert refused.status_code == 403 and refused.json()["error"]["field"] == "status"
    reopened = client.patch("/api/v1/alerts/3", json={"version": 3, "status": "INVESTIGATING"},
                            headers=supervisor)
    assert reopened.status_code == 200
    assert reopened.json()["disposed_at"] is None and reopened.json()["version"] == 4


def test_no_key_or_a_bad_key_is_401_and_a_low_role_is_403(client: TestClient,
                                                          role_keys: Keys) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer nonsense"},
                    {"Authorization": "Bearer bg_0123456789ab_" + "x" * 43},
                    {"Authorization": role_keys.header("admin")["Authorization"][:-2] + "zz"}):
        r = client.get("/api/v1/alerts", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["field"] == "Authorization"
    assert client.get("/api/v1/keys", headers=role_keys.header("viewer")).status_code == 403


def test_there_are_no_default_keys(client: TestClient, node_db: tuple[Settings, Store]
                                   ) -> None:
    assert query(node_db[0].db_path, "SELECT count(*) FROM api_keys") == [(0,)]
    for spec in specs():
        if spec.role is None:
            continue
        path = re.sub(r"\{[a-z_]+:int\}", "1", spec.path).replace("{account_id}", "A1") \
            .replace("{key_id}", "k")
        assert "{" not in path, f"a path parameter this test does not fill: {spec.path}"
        assert client.request(spec.method, path, json={}).status_code == 401, spec.path


def test_keys_are_stored_only_as_argon2_hashes(node_db: tuple[Settings, Store]) -> None:
    writer = connect_writer(node_db[0].db_path)
    key_id, key = keys.create(writer, "alice", "analyst", "test")
    [(stored_id, digest)] = query(node_db[0].db_path, "SELECT key_id, hash FROM api_keys")
    assert stored_id == key_id and key.startswith(f"bg_{key_id}_")
    secret = key.removeprefix(f"bg_{key_id}_")  # the secret itself may contain "_"
    assert digest.startswith("$argon2") and key not in digest and secret not in digest


def test_a_revoked_key_stops_working_at_once(client: TestClient, role_keys: Keys,
                                             node_db: tuple[Settings, Store]) -> None:
    headers = role_keys.header("analyst")
    assert client.get("/api/v1/alerts", headers=headers).status_code == 200  # now cached
    key_id = role_keys.analyst.split("_")[1]
    keys.revoke(connect_writer(node_db[0].db_path), key_id, "test")
    assert client.get("/api/v1/alerts", headers=headers).status_code == 401
    # ...and revoking through the API works the same way, and is audited
    viewer_id = role_keys.viewer.split("_")[1]
    r = client.post(f"/api/v1/keys/{viewer_id}/revoke", headers=role_keys.header("admin"))
    assert r.status_code == 200
    assert client.get("/api/v1/alerts", headers=role_keys.header("viewer")).status_code == 401
    actions = [a for (a,) in query(node_db[0].db_path, "SELECT action FROM audit_log")]
    assert actions.count("key.revoke") == 2 and actions.count("key.create") == 4


def branchguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=120)


def test_keys_commands_create_list_and_revoke(tmp_path: Path) -> None:
    data = str(tmp_path / "node")
    created = branchguard("keys", "create", "--name", "bob", "--role", "supervisor",
                          "--data-dir", data)
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    assert made["role"] == "supervisor" and made["key"].startswith("bg_")
    assert "not shown again" in created.stderr
    listed = json.loads(branchguard("keys", "list", "--data-dir", data).stdout)
    assert [k["key_id"] for k in listed] == [made["key_id"]]
    assert "key" not in listed[0] and "hash" not in listed[0]
    assert listed[0]["revoked_at"] is None
    assert branchguard("keys", "revoke", made["key_id"], "--data-dir", data).returncode == 0
    assert json.loads(branchguard("keys", "list", "--data-dir", data).stdout)[0]["revoked_at"]
    missing = branchguard("keys", "revoke", "000000000000", "--data-dir", data)
    assert missing.returncode == 2 and "key_id" in missing.stderr
    bad = branchguard("keys", "create", "--name", "x", "--role", "root", "--data-dir", data)
    assert bad.returncode != 0 and "role" in bad.stderr


def test_verified_keys_skip_argon2_but_not_the_revocation_check(
        node_db: tuple[Settings, Store]) -> None:
    writer = connect_writer(node_db[0].db_path)
    key_id, key = keys.create(writer, "carol", "viewer", "test")
    verifier = keys.KeyVerifier(cache_seconds=60)
    conn = writer.conn
    assert verifier.verify(conn, key) is not None
    assert verifier.verify(conn, key + "x") is None  # a different key with the same id
    assert verifier.verify(conn, key) is not None
    keys.revoke(writer, key_id, "test")
    assert verifier.verify(conn, key) is None
