"""Allow and deny lists: deny beats allow beats the model, expiry, refresh without a query
per transaction, and the real scorer applying an entry added through the API."""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from starlette.testclient import TestClient

from appliance.change import apply_change, connect_writer
from appliance.scoring import lists
from appliance.scoring.lists import ListFilter
from appliance.store import Store, open_db
from appliance.transaction import Transaction
from appliance.verdict import Verdict
from tests.api_support import Keys, client, node_db, role_keys  # noqa: F401
from tests.support import START, query, read_stream, send, stored_count, wait_until

Node = type


def tx(tid: str, account: str = "A1", terminal: str = "T1", amount: float = 20.0
       ) -> Transaction:
    return Transaction(transaction_id=tid, account_id=account, amount=amount, currency="EUR",
                       timestamp=START + timedelta(minutes=len(tid)), terminal_id=terminal,
                       channel="POS", merchant_category="Grocery", location="Espoo")


def verdict(severity: str = "HIGH", decision: str = "review") -> Verdict:
    return Verdict("t", 0.85, severity, decision, ["ml_anomaly"], ["model risk 0.85"],  # type: ignore[arg-type]
                   0.85, "m", "r")


@pytest.fixture
def db(tmp_path: Path) -> sqlite3.Connection:
    database = open_db(tmp_path / "lists.db")
    return database.conn


def add(conn: sqlite3.Connection, list_name: str, kind: str, value: str,
        expires_at: float | None = None) -> int:
    from sqlite_utils import Database
    entry = apply_change(Database(conn), lambda c: lists.add_entry(
        c, list_name, kind, value, "because", "test", expires_at))
    return int(entry["entry_id"])


def test_deny_beats_allow_beats_the_model(db: sqlite3.Connection) -> None:
    add(db, "allow", "account", "A-BOTH")
    add(db, "deny", "terminal", "T-BAD")
    add(db, "allow", "account", "A-GOOD")
    f = ListFilter(db, refresh_seconds=60)
    f.refresh_if_due()
    now = time.time()
    denied = f.apply(tx("x", "A-BOTH", "T-BAD"), verdict(), now)
    assert (denied.severity, denied.decision) == ("CRITICAL", "decline")
    assert denied.reasons == ["ml_anomaly", "deny_list"] and "T-BAD" in denied.details[-1]
    allowed = f.apply(tx("y", "A-GOOD", "T1"), verdict("CRITICAL", "decline"), now)
    assert (allowed.severity, allowed.decision, allowed.reasons[-1]) == \
        ("INFO", "approve", "allow_list")
    assert allowed.risk == 0.85  # the risk still says how unusual it was
    plain = verdict()
    assert f.apply(tx("z", "A-OTHER", "T1"), plain, now) is plain


def test_expired_and_removed_entries_do_not_apply(db: sqlite3.Connection) -> None:
    add(db, "deny", "account", "A-SOON", expires_at=time.time() + 0.3)
    gone = add(db, "deny", "account", "A-GONE")
    from sqlite_utils import Database
    apply_change(Database(db), lambda c: lists.remove_entry(c, gone, "test"))
    f = ListFilter(db, refresh_seconds=60)
    f.refresh_if_due()
    assert f.apply(tx("a", "A-SOON"), verdict(), time.time()).decision == "decline"
    assert f.apply(tx("b", "A-GONE"), verdict(), time.time()).decision == "review"
    assert f.apply(tx("c", "A-SOON"), verdict(), time.time() + 1).decision == "review"
    assert [e["value"] for e in lists.entries(db)] == ["A-SOON"]


def test_the_filter_reads_the_table_only_every_refresh_period(db: sqlite3.Connection) -> None:
    f = ListFilter(db, refresh_seconds=0.3)
    f.refresh_if_due()
    add(db, "deny", "account", "A-NEW")
    for _ in range(100):
        f.refresh_if_due()  # within the period: no re-read
    assert f.apply(tx("a", "A-NEW"), verdict(), time.time()).decision == "review"
    time.sleep(0.35)
    f.refresh_if_due()
    assert f.apply(tx("b", "A-NEW"), verdict(), time.time()).decision == "decline"


def test_list_endpoints_validate_and_audit(client: TestClient, role_keys: Keys,
                                          node_db: tuple[object, Store]) -> None:
    h = role_keys.header("supervisor")
    bad = client.post("/api/v1/lists", headers=h, json={"list": "grey", "kind": "account",
                                                        "value": "A", "reason": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "list"
    past = client.post("/api/v1/lists", headers=h, json={
        "list": "deny", "kind": "account", "value": "A", "reason": "x",
        "expires_at": "2001-01-01T00:00:00Z"})
    assert past.status_code == 422 and past.json()["error"]["field"] == "expires_at"
    made = client.post("/api/v1/lists", headers=h, json={
        "list": "deny", "kind": "account", "value": "A", "reason": "x",
        "expires_at": "2999-01-01T00:00:00Z"})
    assert made.status_code == 201 and made.json()["owner"].endswith("test-supervisor")
    listed = client.get("/api/v1/lists", params={"list": "deny"},
                        headers=role_keys.header("viewer")).json()["entries"]
    assert [e["value"] for e in listed] == ["A"]
    entry = made.json()["entry_id"]
    assert client.delete(f"/api/v1/lists/{entry}", headers=h).status_code == 200
    assert client.delete(f"/api/v1/lists/{entry}", headers=h).status_code == 409
    assert client.delete("/api/v1/lists/99999", headers=h).status_code == 404
    assert client.get("/api/v1/lists", headers=h).json()["entries"] == []
    assert len(client.get("/api/v1/lists", params={"include_inactive": "true"},
                          headers=h).json()["entries"]) == 1
    db_path = node_db[1].path
    assert [a for (a,) in query(db_path, "SELECT action FROM audit_log WHERE action LIKE "
                                         "'list.%'")] == ["list.add", "list.remove"]


def test_the_running_scorer_applies_the_lists(tmp_path: Path, nats_url: str,
                                              node_factory: Node) -> None:
    data = tmp_path / "node"
    Store.open(data / "branchguard.db").close()
    writer = connect_writer(data / "branchguard.db")
    apply_change(writer, lambda c: lists.add_entry(c, "deny", "account", "A-DENIED",
                                                   "card reported stolen", "test", None))
    apply_change(writer, lambda c: lists.add_entry(c, "allow", "account", "A-VIP",
                                                   "known big spender", "test", None))
    node = node_factory(data, nats_url, {"BRANCHGUARD_LISTS_REFRESH_SECONDS": "0.2"}).start()
    sent = [tx("denied-1", "A-DENIED"), tx("vip-big", "A-VIP", amount=9000.0),
            tx("plain-big", "A-PLAIN", amount=9000.0)]
    assert send(nats_url, sent) == 3
    db = data / "branchguard.db"
    wait_until(lambda: stored_count(db) == 3, message="stored")
    rows = {r[0]: (r[1], r[2], msgspec.json.decode(r[3])) for r in query(
        db, "SELECT transaction_id, severity, decision, reasons FROM transactions")}
    assert rows["denied-1"][:2] == ("CRITICAL", "decline") and "deny_list" in rows["denied-1"][2]
    assert rows["vip-big"][:2] == ("INFO", "approve") and "allow_list" in rows["vip-big"][2]
    assert "high_value" in rows["vip-big"][2]  # the rule still fired; the list won
    assert rows["plain-big"][1] != "approve"
    alerts = {t for (t,) in query(db, "SELECT transaction_id FROM alerts")}
    assert "denied-1" in alerts and "vip-big" not in alerts
    verdicts = {msgspec.json.decode(m.data)["transaction_id"]: msgspec.json.decode(m.data)
                for m in read_stream(nats_url, "VERDICTS", expect=3)}
    assert verdicts["denied-1"]["decision"] == "decline"
    assert node.stop() == 0
