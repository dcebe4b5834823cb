"""The audit trail: every change leaves one chained entry; a hand edit is detected, by
`branchguard audit verify` and by the API, naming the first broken entry."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from starlette.testclient import TestClient

from appliance import audit
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import Keys, client, node_db, role_keys  # noqa: F401
from tests.support import query


def make_changes(client: TestClient, keys: Keys) -> None:
    analyst = keys.header("analyst")
    assert client.patch("/api/v1/alerts/1", json={"version": 1, "status": "INVESTIGATING"},
                        headers=analyst).status_code == 200
    assert client.post("/api/v1/alerts/1/notes", json={"text": "n"},
                       headers=analyst).status_code == 201
    r = client.post("/api/v1/lists", headers=keys.header("supervisor"),
                    json={"list": "allow", "kind": "account", "value": "A9", "reason": "vip"})
    assert r.status_code == 201
    assert client.delete(f"/api/v1/lists/{r.json()['entry_id']}",
                         headers=keys.header("supervisor")).status_code == 200


def verify_cli(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "audit", "verify", "--data-dir",
                           str(settings.data_dir)], capture_output=True, text=True, timeout=60)


def test_every_change_is_one_entry_chained_to_the_last(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store]) -> None:
    make_changes(client, role_keys)
    rows = query(node_db[0].db_path, "SELECT seq, action, subject, before, after, prev_hash, "
                                     "hash FROM audit_log ORDER BY seq")
    assert [r[1] for r in rows] == ["key.create"] * 4 + ["case.change", "case.note",
                                                          "list.add", "list.remove"]
    assert rows[0][5] == audit.GENESIS
    assert all(rows[i][5] == rows[i - 1][6] for i in range(1, len(rows)))
    body = client.get("/api/v1/audit", params={"subject": "alert:1"},
                      headers=role_keys.header("supervisor")).json()
    change = body["entries"][0]
    assert change["before"]["status"] == "NEW" and change["after"]["status"] == "INVESTIGATING"
    assert change["actor"].endswith(":test-analyst")
    ok = verify_cli(node_db[0])
    assert ok.returncode == 0 and "8 entries" in ok.stdout


def test_the_table_refuses_updates_and_deletes(node_db: tuple[Settings, Store],
                                               role_keys: Keys) -> None:
    conn = sqlite3.connect(node_db[0].db_path)
    try:
        for sql in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)
    finally:
        conn.close()


@pytest.mark.parametrize("edit, seq", [
    ("UPDATE audit_log SET after = '{\"status\":\"FALSE_POSITIVE\"}' WHERE seq = 5", 5),
    ("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 6", 6),
    ("DELETE FROM audit_log WHERE seq = 3", 4),
    ("UPDATE audit_log SET at = at + 1 WHERE seq = 8", 8),
])
def test_a_hand_edit_breaks_the_chain_at_that_entry(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store], edit: str,
        seq: int) -> None:
    make_changes(client, role_keys)
    conn = sqlite3.connect(node_db[0].db_path)
    try:  # a tamperer who knows the schema removes the guard first
        conn.executescript("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;"
                           f"{edit};")
    finally:
        conn.close()
    result = verify_cli(node_db[0])
    assert result.returncode == 1
    assert f"broken at entry {seq}" in result.stderr
    api = client.get("/api/v1/audit/verify", headers=role_keys.header("admin")).json()
    assert api["ok"] is False and api["broken_seq"] == seq


def test_rewriting_an_entry_with_a_fresh_hash_still_breaks_the_next_link(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store]) -> None:
    make_changes(client, role_keys)
    conn = sqlite3.connect(node_db[0].db_path)
    try:
        conn.executescript("DROP TRIGGER audit_log_no_update;")
        row = conn.execute("SELECT seq, at, actor, action, subject, before, after, prev_hash "
                           "FROM audit_log WHERE seq = 5").fetchone()
        forged = audit.entry_hash(row[0], row[1], "forger", *row[3:])
        conn.execute("UPDATE audit_log SET actor = 'forger', hash = ? WHERE seq = 5", (forged,))
        conn.commit()
    finally:
        conn.close()
    assert "broken at entry 6" in verify_cli(node_db[0]).stderr
