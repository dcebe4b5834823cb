"""The case workflow: allowed and refused transitions, optimistic concurrency (one success
and one 409, over real HTTP), assignment, notes, bulk changes with one audit entry each."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from appliance.casework.cases import TRANSITIONS
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import Keys, ServeProcess, client, node_db, role_keys  # noqa: F401
from tests.support import query


def patch(client: TestClient, keys: Keys, alert_id: int, role: str = "analyst",
          **body: Any) -> httpx.Response:
    return client.patch(f"/api/v1/alerts/{alert_id}", json=body, headers=keys.header(role))


def test_the_workflow_and_its_disposition(client: TestClient, role_keys: Keys,
                                          node_db: tuple[Settings, Store]) -> None:
    r = patch(client, role_keys, 1, version=1, status="INVESTIGATING", assignee="ana")
    assert r.status_code == 200 and r.json()["version"] == 2
    assert r.json()["assignee"] == "ana" and r.json()["disposed_at"] is None
    r = patch(client, role_keys, 1, version=2, status="CONFIRMED_FRAUD",
              disposition="confirmed_fraud", fraud_type="card_testing")
    assert r.status_code == 200
    assert (r.json()["disposition"], r.json()["fraud_type"]) == ("confirmed_fraud",
                                                                 "card_testing")
    [(status, disposed_at, disposed_by, updated_by)] = query(
        node_db[0].db_path, "SELECT status, disposed_at, disposed_by, updated_by FROM alerts "
                            "WHERE alert_id = 1")
    assert status == "CONFIRMED_FRAUD" and disposed_at is not None
    assert disposed_by == updated_by and disposed_by.startswith("key:")
    r = patch(client, role_keys, 1, version=3, assignee=None)
    assert r.status_code == 200 and r.json()["assignee"] is None
    assert r.json()["status"] == "CONFIRMED_FRAUD"
    # the disposition is now the transaction's label, known from the moment it was made
    db = node_db[0].db_path
    [(label, typology, source)] = query(
        db, "SELECT l.label, l.typology, l.source FROM labels l JOIN alerts a "
            "ON a.transaction_id = l.transaction_id WHERE a.alert_id = 1")
    assert label == 1 and typology == "card_testing" and source == f"analyst:{disposed_by}"
    assert query(db, "SELECT disposition, fraud_type FROM alerts WHERE alert_id = 1") == [
        ("confirmed_fraud", "card_testing")]
    assert patch(client, role_keys, 2, version=1, status="INVESTIGATING").status_code == 200
    assert query(db, "SELECT count(*) FROM labels l JOIN alerts a ON a.transaction_id = "
                     "l.transaction_id WHERE a.alert_id = 2") == [(0,)]  # not a disposition
    # the status may be left out: the disposition decides it
    r = patch(client, role_keys, 2, version=2, disposition="customer_confirmed")
    assert r.status_code == 200 and r.json()["status"] == "FALSE_POSITIVE"
    assert query(db, "SELECT l.label, l.typology FROM labels l JOIN alerts a ON "
                     "a.transaction_id = l.transaction_id WHERE a.alert_id = 2") == [(0, None)]


def test_every_transition_not_in_the_table_is_refused(client: TestClient,
                                                      role_keys: Keys) -> None:
    # NEW may only become INVESTIGATING
    for target, code in (("CONFIRMED_FRAUD", "confirmed_fraud"),
                         ("FALSE_POSITIVE", "false_positive")):
        r = patch(client, role_keys, 5, version=1, status=target, disposition=code,
                  **({"fraud_type": "other"} if code == "confirmed_fraud" else {}))
        assert r.status_code == 422 and r.json()["error"]["field"] == "status", r.text
    assert patch(client, role_keys, 5, version=1, status="INVESTIGATING").status_code == 200
    r = patch(client, role_keys, 5, version=2, status="NEW")
    assert r.status_code == 422
    assert patch(client, role_keys, 5, version=2, status="FALSE_POSITIVE",
                 disposition="duplicate").status_code == 200
    r = patch(client, role_keys, 5, role="supervisor", version=3, status="CONFIRMED_FRAUD")
    assert r.status_code == 422  # a status alone never flips a closed case (a disposition
    # does: test_re_disposing_corrects_the_label)
    assert set(TRANSITIONS["FALSE_POSITIVE"]) == {"INVESTIGATING"}
    [(version,)] = [(v,) for v in [client.get("/api/v1/alerts/5", headers=role_keys.header(
        "viewer")).json()["alert"]["version"]]]
    assert version == 3  # refused changes changed nothing


def test_a_stale_version_is_409_with_the_current_state(client: TestClient,
                                                       role_keys: Keys) -> None:
    assert patch(client, role_keys, 7, version=1, assignee="ana").status_code == 200
    r = patch(client, role_keys, 7, version=1, assignee="bob")
    assert r.status_code == 409 and r.json()["error"]["field"] == "version"
    assert r.json()["error"]["current"]["assignee"] == "ana"
    assert r.json()["error"]["current"]["version"] == 2


@pytest.mark.parametrize("body, field", [
    ({}, "version"), ({"version": "1"}, "version"), ({"version": 0}, "version"),
    ({"version": 1, "status": "DONE"}, "status"), ({"version": 1, "assignee": ""}, "assignee"),
    ({"version": 1, "colour": "red"}, "colour"),
])
def test_bad_bodies_are_400_naming_the_field_and_change_nothing(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store],
        body: dict[str, Any], field: str) -> None:
    r = patch(client, role_keys, 2, **body)
    assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
    assert query(node_db[0].db_path, "SELECT version FROM alerts WHERE alert_id = 2") == [(1,)]
    raw = client.patch("/api/v1/alerts/2", content=b"{not json",
                       headers=role_keys.header("analyst"))
    assert raw.status_code == 400 and raw.json()["error"]["field"] == "body"


def test_bulk_changes_related_open_alerts_with_one_audit_entry_each(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store]) -> None:
    db = node_db[0].db_path
    [(anchor, terminal)] = query(db, "SELECT min(alert_id), terminal_id FROM alerts GROUP BY "
                                     "terminal_id HAVING count(*) >= 3 LIMIT 1")
    others = [r[0] for r in query(db, "SELECT alert_id FROM alerts WHERE terminal_id = ? "
                                      "AND alert_id != ?", [terminal, anchor])]
    # one of them already closed: it is not "open", so bulk leaves it alone
    closed = others[0]
    patch(client, role_keys, closed, version=1, status="INVESTIGATING")
    patch(client, role_keys, closed, version=2, status="FALSE_POSITIVE",
          disposition="false_positive")
    before = query(db, "SELECT count(*) FROM audit_log")[0][0]
    r = client.post(f"/api/v1/alerts/{anchor}/bulk", headers=role_keys.header("analyst"),
                    json={"version": 1, "scope": "terminal", "status": "INVESTIGATING",
                          "assignee": "ana"})
    assert r.status_code == 200, r.text
    changed = {c["alert_id"] for c in r.json()["changed"]}
    assert changed == {anchor, *others} - {closed}
    assert query(db, "SELECT count(*) FROM audit_log")[0][0] - before == len(changed)
    subjects = {s for (s,) in query(db, "SELECT subject FROM audit_log WHERE seq > ?",
                                    [before])}
    assert subjects == {f"alert:{a}" for a in changed}
    statuses = set(query(db, "SELECT status, assignee FROM alerts WHERE alert_id IN "
                             f"({', '.join(map(str, changed))})"))
    assert statuses == {("INVESTIGATING", "ana")}
    # a second bulk to close them: all INVESTIGATING now, so none skipped
    refused = client.post(f"/api/v1/alerts/{anchor}/bulk", headers=role_keys.header("analyst"),
                          json={"version": 2, "scope": "terminal", "status": "FALSE_POSITIVE"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "disposition"
    r = client.post(f"/api/v1/alerts/{anchor}/bulk", headers=role_keys.header("analyst"),
                    json={"version": 2, "scope": "terminal", "disposition": "confirmed_fraud",
                          "fraud_type": "velocity_burst"})
    assert r.status_code == 200 and not r.json()["skipped"]
    assert set(query(db, "SELECT a.status, a.disposition, a.fraud_type, l.label, l.typology "
                         "FROM alerts a JOIN labels l USING (transaction_id) WHERE a.alert_id "
                         f"IN ({', '.join(map(str, changed))})")) == {
        ("CONFIRMED_FRAUD", "confirmed_fraud", "velocity_burst", 1, "velocity_burst")}
    stale = client.post(f"/api/v1/alerts/{anchor}/bulk", headers=role_keys.header("analyst"),
                        json={"version": 2, "scope": "terminal", "assignee": "bob"})
    assert stale.status_code == 409


def test_notes_are_appended_and_audited(client: TestClient, role_keys: Keys,
                                        node_db: tuple[Settings, Store]) -> None:
    for text in ("first", "second"):
        r = client.post("/api/v1/alerts/4/notes", json={"text": text},
                        headers=role_keys.header("analyst"))
        assert r.status_code == 201
    notes = client.get("/api/v1/alerts/4", headers=role_keys.header("viewer")).json()["notes"]
    assert [n["text"] for n in notes] == ["first", "second"]
    assert query(node_db[0].db_path, "SELECT count(*) FROM audit_log WHERE action = "
                                     "'case.note' AND subject = 'alert:4'") == [(2,)]
    r = client.post("/api/v1/alerts/999999/notes", json={"text": "x"},
                    headers=role_keys.header("analyst"))
    assert r.status_code == 404


def test_concurrent_updates_give_one_success_and_one_409(
        node_db: tuple[Settings, Store], role_keys: Keys) -> None:
    server = ServeProcess.start(node_db[0])
    try:
        headers = role_keys.header("analyst")
        for alert_id in range(10, 20):
            barrier = threading.Barrier(2)
            codes: list[int] = []

            def update(name: str) -> None:
                with httpx.Client(base_url=server.url, headers=headers) as http:
                    http.get("/healthz")  # connected before the race starts
                    barrier.wait()
                    codes.append(http.patch(f"/api/v1/alerts/{alert_id}", json={
                        "version": 1, "status": "INVESTIGATING", "assignee": name}).status_code)

            threads = [threading.Thread(target=update, args=(n,)) for n in ("ana", "bob")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(codes) == [200, 409], (alert_id, codes)
        versions = query(node_db[0].db_path, "SELECT version FROM alerts WHERE alert_id "
                                             "BETWEEN 10 AND 19")
        assert versions == [(2,)] * 10
    finally:
        assert server.stop() == 0, server.log_path.read_text()


def test_a_busy_database_waits_instead_of_failing(node_db: tuple[Settings, Store],
                                                  role_keys: Keys, tmp_path: Path) -> None:
    """An API write while the scorer holds the write lock waits for it (busy_timeout)."""
    settings, store = node_db
    from tests.api_support import fill
    with TestClient(__import__("appliance.api.app", fromlist=["create_app"]).create_app(
            settings)) as c:
        done: list[int] = []
        store.db.conn.execute("BEGIN IMMEDIATE")
        t = threading.Thread(target=lambda: done.append(patch(
            c, role_keys, 30, version=1, assignee="ana").status_code))
        t.start()
        t.join(0.5)
        assert not done  # waiting for the lock
        store.db.conn.execute("COMMIT")
        t.join(10)
        assert done == [200]
        fill(store, 10, seed=5, first_seq=1000)  # and the scorer's next batch still commits


@pytest.mark.parametrize("text", ["   ", "\t\n  \r\n", "\u00a0\u2003"])
def test_a_blank_note_is_422_and_stores_nothing(client: TestClient, role_keys: Keys,
                                               node_db: tuple[Settings, Store],
                                               text: str) -> None:
    before = query(node_db[0].db_path, "SELECT count(*) FROM audit_log")
    r = client.post("/api/v1/alerts/4/notes", json={"text": text},
                    headers=role_keys.header("analyst"))
    assert r.status_code == 422 and r.json()["error"]["field"] == "text", r.text
    assert query(node_db[0].db_path, "SELECT count(*) FROM alert_notes") == [(0,)]
    assert query(node_db[0].db_path, "SELECT count(*) FROM audit_log") == before


@pytest.mark.parametrize("text", ["bell \x07 in a note", "reversed \u202eetoN",
                                  "escape \x1b[31m red"])
def test_a_note_with_control_or_bidi_characters_is_422(client: TestClient, role_keys: Keys,
                                                      text: str) -> None:
    r = client.post("/api/v1/alerts/4/notes", json={"text": text},
                    headers=role_keys.header("analyst"))
    assert r.status_code == 422 and r.json()["error"]["field"] == "text", r.text


def test_a_note_keeps_its_lines_and_tabs(client: TestClient, role_keys: Keys) -> None:
    r = client.post("/api/v1/alerts/4/notes", json={"text": "called the customer\n\tno answer"},
                    headers=role_keys.header("analyst"))
    assert r.status_code == 201 and r.json()["text"] == "called the customer\n\tno answer"


BAD_ASSIGNEES = ["<script>alert(1)</script>", "ana<b>", "ana\x07", "ana\nbob", "\u202eana",
                 "ana\u200b", " ana", "ana  lima", "a&b", "ana\"", "ana;drop"]


@pytest.mark.parametrize("assignee", BAD_ASSIGNEES)
def test_an_assignee_with_markup_or_control_characters_is_422(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store],
        assignee: str) -> None:
    r = patch(client, role_keys, 2, version=1, assignee=assignee)
    assert r.status_code == 422 and r.json()["error"]["field"] == "assignee", r.text
    bulk = client.post("/api/v1/alerts/2/bulk", headers=role_keys.header("analyst"),
                       json={"version": 1, "scope": "account", "assignee": assignee})
    assert bulk.status_code == 422 and bulk.json()["error"]["field"] == "assignee", bulk.text
    assert query(node_db[0].db_path, "SELECT version, assignee FROM alerts WHERE alert_id = 2"
                 ) == [(1, None)]


@pytest.mark.parametrize("assignee", ["ana", "ana.lima", "ana_lima-2", "ana@bank.example",
                                      "Ana Lima", "José Núñez", "d'Arcy"])
def test_an_assignee_may_be_a_username_an_address_or_a_name(
        client: TestClient, role_keys: Keys, assignee: str) -> None:
    r = patch(client, role_keys, 2, version=1, assignee=assignee)
    assert r.status_code == 200 and r.json()["assignee"] == assignee, r.text


def test_a_patch_that_changes_nothing_is_a_no_op(client: TestClient, role_keys: Keys,
                                                 node_db: tuple[Settings, Store]) -> None:
    db = node_db[0].db_path
    audit_before = query(db, "SELECT count(*) FROM audit_log")
    row_before = query(db, "SELECT version, updated_at, updated_by FROM alerts "
                           "WHERE alert_id = 2")
    for body in ({"status": "NEW"}, {"assignee": None}, {}, {"status": "NEW", "assignee": None}):
        r = patch(client, role_keys, 2, version=1, **body)
        assert r.status_code == 200, (body, r.text)
        assert r.json()["version"] == 1 and r.json()["status"] == "NEW", body
        assert r.json()["updated_at"] == row_before[0][1] and r.json()["assignee"] is None
    assert query(db, "SELECT version, updated_at, updated_by FROM alerts WHERE alert_id = 2"
                 ) == row_before
    assert query(db, "SELECT count(*) FROM audit_log") == audit_before
    # once assigned, assigning the same person again changes nothing either
    assert patch(client, role_keys, 2, version=1, assignee="ana").json()["version"] == 2
    again = patch(client, role_keys, 2, version=2, status="NEW", assignee="ana")
    assert again.status_code == 200 and again.json()["version"] == 2
    assert query(db, "SELECT count(*) FROM audit_log WHERE subject = 'alert:2'") == [(1,)]
    # a no-op against a stale version is still a 409: the caller's view is out of date
    assert patch(client, role_keys, 2, version=1, status="NEW").status_code == 409


@pytest.mark.parametrize("raw", [b'{"version": 1, "status": "INVESTIGATING", "status": "NEW"}',
                                 b'{"version": 1, "version": 1}',
                                 b'{"version": 1, "assignee": "ana", "assignee": null}'])
def test_a_body_with_a_key_twice_is_400_naming_it(client: TestClient, role_keys: Keys,
                                                  node_db: tuple[Settings, Store],
                                                  raw: bytes) -> None:
    """Which of two values was meant cannot be known: neither wins."""
    r = client.patch("/api/v1/alerts/2", content=raw,
                     headers={**role_keys.header("analyst"), "Content-Type": "application/json"})
    assert r.status_code == 400 and "more than once" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["field"] in ("status", "version", "assignee")
    assert query(node_db[0].db_path, "SELECT version FROM alerts WHERE alert_id = 2") == [(1,)]


@pytest.mark.parametrize("body, status, field", [
    ({"status": "CONFIRMED_FRAUD"}, 422, "disposition"),       # closing needs a disposition
    ({"status": "FALSE_POSITIVE"}, 422, "disposition"),
    ({"disposition": "confirmed_fraud"}, 422, "fraud_type"),   # fraud needs its type
    ({"disposition": "false_positive", "fraud_type": "card_testing"}, 422, "fraud_type"),
    ({"fraud_type": "card_testing"}, 422, "disposition"),      # a type alone closes nothing
    ({"disposition": "false_positive", "status": "CONFIRMED_FRAUD"}, 422, "status"),
    ({"disposition": "confirmed_fraud", "fraud_type": "other", "status": "INVESTIGATING"},
     422, "status"),
    ({"disposition": "stolen"}, 400, "disposition"),           # not a code
    ({"disposition": "confirmed_fraud", "fraud_type": "skimming"}, 400, "fraud_type"),
    ({"disposition": "CONFIRMED_FRAUD"}, 400, "disposition"),  # codes are lower case
])
def test_a_close_without_a_valid_disposition_is_refused_naming_the_field(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store],
        body: dict[str, Any], status: int, field: str) -> None:
    assert patch(client, role_keys, 6, version=1, status="INVESTIGATING").status_code == 200
    r = patch(client, role_keys, 6, version=2, **body)
    assert r.status_code == status and r.json()["error"]["field"] == field, r.text
    db = node_db[0].db_path
    assert query(db, "SELECT status, version, disposition FROM alerts WHERE alert_id = 6") == [
        ("INVESTIGATING", 2, None)]
    assert query(db, "SELECT count(*) FROM labels") == [(0,)]


def test_re_disposing_corrects_the_label_and_audits_it(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store]) -> None:
    db = node_db[0].db_path
    assert patch(client, role_keys, 8, version=1, status="INVESTIGATING").status_code == 200
    assert patch(client, role_keys, 8, version=2, disposition="confirmed_fraud",
                 fraud_type="card_testing").status_code == 200
    [(tid, first_known)] = query(db, "SELECT l.transaction_id, l.known_at FROM labels l JOIN "
                                     "alerts a USING (transaction_id) WHERE a.alert_id = 8")
    # an analyst may not re-dispose a closed case; a supervisor may, without reopening it
    refused = patch(client, role_keys, 8, version=3, disposition="customer_confirmed")
    assert refused.status_code == 403 and refused.json()["error"]["field"] == "disposition"
    r = patch(client, role_keys, 8, role="supervisor", version=3,
              disposition="customer_confirmed")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["disposition"], r.json()["fraud_type"]) == (
        "FALSE_POSITIVE", "customer_confirmed", None)
    [(label, typology, known, source)] = query(
        db, "SELECT label, typology, known_at, source FROM labels WHERE transaction_id = ?",
        [tid])
    assert (label, typology) == (0, None) and known > first_known
    [(actor, before, after)] = query(db, "SELECT actor, before, after FROM audit_log WHERE "
                                         "action = 'label.correct' AND subject = ?",
                                     [f"transaction:{tid}"])
    assert actor.endswith(":test-supervisor") and source == f"analyst:{actor}"
    assert '"label":1' in before and '"typology":"card_testing"' in before
    assert '"label":0' in after and '"typology":null' in after
    assert query(db, "SELECT before_label, after_label, before_typology, actor FROM "
                     "label_corrections WHERE transaction_id = ?", [tid]) == [
        (1, 0, "card_testing", actor)]
    # the same disposition again is a no-op; another fraud type is a correction too
    same = patch(client, role_keys, 8, role="supervisor", version=4,
                 disposition="customer_confirmed")
    assert same.status_code == 200 and same.json()["version"] == 4
    assert patch(client, role_keys, 8, role="supervisor", version=4,
                 disposition="confirmed_fraud", fraud_type="atm_cashout").status_code == 200
    assert query(db, "SELECT label, typology FROM labels WHERE transaction_id = ?", [tid]) == [
        (1, "atm_cashout")]
    assert query(db, "SELECT count(*) FROM label_corrections") == [(2,)]
    # reopening and closing the same way again changes no label
    assert patch(client, role_keys, 8, role="supervisor", version=5,
                 status="INVESTIGATING").status_code == 200
    assert query(db, "SELECT disposition, fraud_type, disposed_at FROM alerts WHERE "
                     "alert_id = 8") == [(None, None, None)]
    assert patch(client, role_keys, 8, version=6, disposition="confirmed_fraud",
                 fraud_type="atm_cashout").status_code == 200
    assert query(db, "SELECT count(*) FROM label_corrections") == [(2,)]


def test_the_alert_list_has_the_queue_columns_and_the_age(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store]) -> None:
    r = client.get("/api/v1/alerts?limit=5", headers=role_keys.header("viewer"))
    assert r.status_code == 200
    body = r.json()
    stored = {tid: (amount, currency, channel, merchant, location) for tid, amount, currency,
              channel, merchant, location in query(
                  node_db[0].db_path, "SELECT transaction_id, amount, currency, channel, "
                  "merchant_category, location FROM transactions")}
    for alert in body["alerts"]:
        assert (alert["amount"], alert["currency"], alert["channel"],
                alert["merchant_category"], alert["location"]) == stored[
                    alert["transaction_id"]]
        assert alert["age_seconds"] == pytest.approx(body["as_of"] - alert["created_at"],
                                                     abs=0.01)
        assert alert["age_seconds"] >= 0 and alert["disposition"] is None
    assert {a["currency"] for a in body["alerts"]} and all(
        isinstance(a["amount"], float) for a in body["alerts"])


def test_the_api_codes_are_the_casework_codes() -> None:
    from typing import get_args

    from appliance.api.bodies import DispositionCode, FraudType
    from appliance.casework.dispositions import CODES, FRAUD_TYPES
    assert get_args(DispositionCode) == CODES and get_args(FraudType) == FRAUD_TYPES


def test_stats_name_the_rules_deployed_not_the_shipped_ones(
        client: TestClient, role_keys: Keys, node_db: tuple[Settings, Store],
        tmp_path: Path) -> None:
    """After ``rules deploy`` the scorer reads the deployed file: the stats say its version
    (they said the shipped file's, whatever was deployed)."""
    from appliance.scoring import rulebook
    settings = node_db[0]
    before = client.get("/api/v1/stats", headers=role_keys.header("viewer")).json()
    assert before["rules_version"]["running"] == rulebook.load(rulebook.SHIPPED_RULES).version
    candidate = tmp_path / "rules.toml"
    candidate.write_text(rulebook.SHIPPED_RULES.read_text().replace(
        'version = "rules-v2"', 'version = "rules-branch-7"'))
    rulebook.deploy(settings, candidate, actor="test")
    after = client.get("/api/v1/stats", params={"since": "2000-01-01"},
                       headers=role_keys.header("viewer")).json()
    assert after["rules_version"]["running"] == "rules-branch-7"
