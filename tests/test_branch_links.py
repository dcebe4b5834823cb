"""Each branch's link as the hub shows it (casework/branch_links.py, ``/api/v1/branches``):
``since`` moves only when a link comes up or goes down, a lag makes a link "lagging", and a
reading nobody renewed becomes "unknown"."""

from __future__ import annotations

import sqlite3
import time

from starlette.testclient import TestClient

from appliance.casework.branch_links import LinkReading, link_text, links, record
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import Keys, client, node_db, role_keys  # noqa: F401


def look(conn: sqlite3.Connection, at: float, **states: tuple[bool, int | None]) -> None:
    with conn:
        record(conn, [LinkReading(b, up, lag, at - 1) for b, (up, lag) in states.items()], at)


def test_since_is_when_a_link_came_up_or_went_down(node_db: tuple[Settings, Store]) -> None:
    conn = sqlite3.connect(node_db[0].db_path)
    try:
        look(conn, 1000.0, br1=(True, 0), br2=(True, 0))
        look(conn, 1002.0, br1=(True, 0), br2=(False, None))
        look(conn, 1004.0, br1=(True, 40), br2=(False, None))
        seen = {lk["branch"]: lk for lk in links(conn, now=1005.0)}
        assert seen["br1"]["state"] == "lagging" and seen["br1"]["since"] == 1000.0
        assert seen["br2"]["state"] == "down" and seen["br2"]["since"] == 1002.0
        assert link_text(seen["br1"], 1005.0) == "br1: lagging by 40 cases"
        assert link_text(seen["br2"], 1002.0 + 185) == "br2: down since 00:16:42 UTC (3 min)"
        look(conn, 1006.0, br1=(True, 0), br2=(True, 0))
        seen = {lk["branch"]: lk for lk in links(conn, now=1006.0)}
        assert seen["br2"] == {**seen["br2"], "state": "connected", "since": 1006.0}
        assert seen["br1"]["state"] == "connected" and seen["br1"]["since"] == 1000.0
        assert {lk["state"] for lk in links(conn, now=1006.0 + 31)} == {"unknown"}
        with conn:  # minutes the branches sent: the last hour's, summed
            for minute, tx in ((16, 100), (30, 50), (80, 7)):  # 16: over an hour ago
                conn.execute("INSERT INTO branch_minutes VALUES ('br1', ?, ?, 1, 2, 0, 2, 0, 0, "
                             "'m')", [minute, tx])
        [br1] = [lk for lk in links(conn, now=60 * 80.5) if lk["branch"] == "br1"]
        assert br1["last_hour"] == {"transactions": 57, "declined": 2, "alerts": 4,
                                    "critical": 0, "high": 4}
        assert link_text(br1, 60 * 80.5).endswith("· last hour 57 tx, 4 alerts")
    finally:
        conn.close()


def test_the_api_lists_every_branchs_link(client: TestClient, role_keys: Keys,  # noqa: F811
                                          node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    r = client.get("/api/v1/branches", headers=role_keys.header("viewer"))
    assert r.status_code == 200 and r.json() == {"branches": []}  # a node on its own
    conn = sqlite3.connect(node_db[0].db_path)
    try:
        look(conn, time.time(), br1=(True, 0), br2=(False, None))
    finally:
        conn.close()
    r = client.get("/api/v1/branches", headers=role_keys.header("viewer"))
    assert [(b["branch"], b["state"]) for b in r.json()["branches"]] == [
        ("br1", "connected"), ("br2", "down")]
    assert client.get("/api/v1/branches").status_code == 401
