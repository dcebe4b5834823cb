"""The console's reads and its triage rule: queue filters, search, sort and pages, the live
marker, the case file, the overview, and status changes through the case workflow."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from appliance.store import decode_features
from appliance.casework.casefile import alert_transaction, case_file
from appliance.casework.cases import CaseError, Change, change_case
from appliance.casework.overview import overview, waiting_urgent
from appliance.casework.queue import UNASSIGNED, QueueQuery, alert_page, marker, newer_than
from appliance.casework.users import User
from appliance.change import apply_change, connect_writer
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import fill, node_db  # noqa: F401
from ui.triage import change_status

ANALYST = User("alice", "analyst", 0.0)
SUPERVISOR = User("sam", "supervisor", 0.0)


def _conn(settings: Settings) -> sqlite3.Connection:
    return sqlite3.connect(settings.db_path)


def _all(conn: sqlite3.Connection) -> list[tuple]:  # type: ignore[type-arg]
    return conn.execute("SELECT alert_id, severity, risk, reasons, account_id, terminal_id, "
                        "transaction_id, status, assignee, ts FROM alerts").fetchall()


def test_filters_match_a_direct_count(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    conn = _conn(node_db[0])
    rows = _all(conn)
    everything = QueueQuery(statuses=(), page_size=500)
    assert alert_page(conn, everything).total == len(rows) > 100
    high = alert_page(conn, QueueQuery(statuses=(), severities=("HIGH", "CRITICAL"),
                                       page_size=500))
    assert high.total == sum(r[1] in ("HIGH", "CRITICAL") for r in rows)
    assert {a["severity"] for a in high.alerts} == {"HIGH", "CRITICAL"}
    risky = alert_page(conn, QueueQuery(statuses=(), min_risk=0.9, page_size=500))
    assert risky.total == sum(r[2] >= 0.9 for r in rows) and risky.total > 0
    ml = alert_page(conn, QueueQuery(statuses=(), reason="ml_anomaly", page_size=500))
    assert ml.total == sum("ml_anomaly" in r[3] for r in rows) and ml.total > 0
    mid_ts = sorted(r[9] for r in rows)[len(rows) // 2]
    later = alert_page(conn, QueueQuery(statuses=(), since=mid_ts, page_size=500))
    assert later.total == sum(r[9] >= mid_ts for r in rows)
    bogus = alert_page(conn, QueueQuery(statuses=("NOT_A_STATUS",), page_size=500))
    assert bogus.total == len(rows)  # unknown values are ignored, not injected


def test_search_by_transaction_account_or_terminal(node_db: tuple[Settings, Store]  # noqa: F811
                                                   ) -> None:
    conn = _conn(node_db[0])
    row = _all(conn)[7]
    by_tx = alert_page(conn, QueueQuery(statuses=(), search=row[6]))
    assert [a["alert_id"] for a in by_tx.alerts] == [row[0]]
    by_account = alert_page(conn, QueueQuery(statuses=(), search=f"  {row[4]} "))
    assert row[0] in [a["alert_id"] for a in by_account.alerts]
    assert all(a["account_id"] == row[4] for a in by_account.alerts)
    by_terminal = alert_page(conn, QueueQuery(statuses=(), search=row[5]))
    assert all(a["terminal_id"] == row[5] for a in by_terminal.alerts)
    assert alert_page(conn, QueueQuery(statuses=(), search="nope' OR 1=1 --")).total == 0


def test_sort_and_pages_beyond_the_first(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    conn = _conn(node_db[0])
    total = alert_page(conn, QueueQuery(statuses=())).total
    seen: list[int] = []
    page = 0
    while True:
        got = alert_page(conn, QueueQuery(statuses=(), page=page, page_size=25))
        if not got.alerts:
            break
        seen += [a["alert_id"] for a in got.alerts]
        page += 1
    assert len(seen) == len(set(seen)) == total and page == -(-total // 25)
    assert seen == sorted(seen, reverse=True)
    oldest = alert_page(conn, QueueQuery(statuses=(), sort="oldest", page_size=5)).alerts
    assert [a["alert_id"] for a in oldest] == sorted(seen)[:5]
    risks = [a["risk"] for a in alert_page(conn, QueueQuery(statuses=(), sort="risk",
                                                            page_size=500)).alerts]
    assert risks == sorted(risks, reverse=True)


def test_mine_and_unassigned(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings = node_db[0]
    conn = _conn(settings)
    writer = connect_writer(settings.db_path)
    apply_change(writer, lambda c: change_case(c, 3, Change(1, assignee="alice"), "user:alice"))
    mine = alert_page(conn, QueueQuery(assignee="alice"))
    assert [a["alert_id"] for a in mine.alerts] == [3]
    unassigned = alert_page(conn, QueueQuery(statuses=(), assignee=UNASSIGNED))
    assert unassigned.total == alert_page(conn, QueueQuery(statuses=())).total - 1


def test_marker_moves_on_new_alerts_and_on_changes(node_db: tuple[Settings, Store]  # noqa: F811
                                                   ) -> None:
    settings, store = node_db
    conn = _conn(settings)
    first = marker(conn)
    fill(store, 30, seed=99, first_seq=10_000)
    second = marker(conn)
    assert second[0] > first[0] and second[1] == first[1]
    fresh = newer_than(conn, first[0])
    assert [a["alert_id"] for a in fresh] == list(range(first[0] + 1, second[0] + 1))
    apply_change(connect_writer(settings.db_path),
                 lambda c: change_case(c, 1, Change(1, "INVESTIGATING"), "user:alice"))
    third = marker(conn)
    assert third[0] == second[0] and third[1] > second[1]


def test_case_file_has_everything(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings = node_db[0]
    conn = _conn(settings)
    # an alert whose account has earlier transactions, so there is a baseline
    alert_id, account, ts = conn.execute(
        "SELECT a.alert_id, a.account_id, a.ts FROM alerts a WHERE (SELECT count(*) FROM "
        "transactions t WHERE t.account_id = a.account_id AND t.ts < a.ts) >= 2 "
        "LIMIT 1").fetchone()
    writer = connect_writer(settings.db_path)
    apply_change(writer, lambda c: change_case(c, alert_id, Change(1, "INVESTIGATING"),
                                               "user:alice"))
    case = case_file(conn, alert_id)
    assert case is not None
    explanation = case["explanation"]  # made now, from the stored row (issue 16)
    stored_reasons = [r["code"] for r in case["reasons"]]
    assert [r["reason"] for r in explanation["rules"]] == stored_reasons
    assert explanation["model_version"] == case["transaction"]["model_version"]
    assert isinstance(explanation["unusual"], list)
    tid = case["alert"]["transaction_id"]
    with writer.conn:
        writer.conn.execute("INSERT INTO alert_explanations VALUES (?, ?, 0)",
                            (tid, '{"unusual": ["first use of this terminal"]}'))
    case = case_file(conn, alert_id)
    assert case is not None
    assert case["explanation"] == {"unusual": ["first use of this terminal"]}
    assert case["alert"]["status"] == "INVESTIGATING"
    assert case["transaction"]["account_id"] == account
    assert all(r["detail"] for r in case["reasons"])
    amount = next(f for f in case["features"] if f["name"] == "amount")
    previous = [r[0] for r in conn.execute(
        "SELECT amount FROM transactions WHERE account_id = ? AND ts < ?", (account, ts))]
    assert amount["baseline_rows"] == len(previous)
    assert amount["baseline"] == pytest.approx(sum(previous) / len(previous))
    assert [t["ts"] for t in case["timeline"]] == sorted(t["ts"] for t in case["timeline"])
    assert sum(t["transactions"] for t in case["terminals"]) == conn.execute(
        "SELECT count(*) FROM transactions WHERE account_id = ?", (account,)).fetchone()[0]
    assert all(a["account_id"] == account and a["alert_id"] != alert_id
               and a["status"] in ("NEW", "INVESTIGATING") for a in case["related"]["account"])
    assert [(h["action"], h["after"]["status"]) for h in case["history"]] == \
        [("case.change", "INVESTIGATING")]
    assert case_file(conn, 10**9) is None


def test_a_transaction_of_unknown_features_version_or_gone_is_read_without_names(
        node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings = node_db[0]
    conn = _conn(settings)
    alert_id, tid = conn.execute("SELECT alert_id, transaction_id FROM alerts "
                                 "WHERE reasons != '[]' LIMIT 1").fetchone()
    stored = decode_features(conn.execute("SELECT features FROM transactions "
                                          "WHERE transaction_id = ?", (tid,)).fetchone()[0])
    known = alert_transaction(conn, tid)
    assert list(known["features"].values()) == stored and known["reasons"]
    with conn:  # a row written by a features version this code does not know
        conn.execute("UPDATE transactions SET features_version = 'features-v99' "
                     "WHERE transaction_id = ?", (tid,))
    assert alert_transaction(conn, tid)["features"] == {"values": stored}
    case = case_file(conn, alert_id)
    assert case is not None and case["features"] == [] and case["reasons"] == known["reasons"]
    with conn:  # retention has moved the row out of the hot tier
        conn.execute("DELETE FROM transactions WHERE transaction_id = ?", (tid,))
    assert alert_transaction(conn, tid) == {"transaction": {}, "features": {}, "reasons": [],
                                            "explanation": None}
    case = case_file(conn, alert_id)
    assert case is not None and case["transaction"] == {} and case["explanation"] is None


def test_confirm_passes_through_investigating(node_db: tuple[Settings, Store]  # noqa: F811
                                              ) -> None:
    settings = node_db[0]
    writer = connect_writer(settings.db_path)
    with pytest.raises(CaseError) as no_disposition:  # refused whole: not left INVESTIGATING
        apply_change(writer, lambda c: change_status(c, 5, 1, "CONFIRMED_FRAUD", ANALYST))
    assert no_disposition.value.status == 422 and no_disposition.value.field == "disposition"
    assert case_file(_conn(settings), 5)["alert"]["status"] == "NEW"  # type: ignore[index]
    after = apply_change(writer, lambda c: change_status(c, 5, 1, "CONFIRMED_FRAUD", ANALYST,
                                                         "confirmed_fraud", "amount_spike"))
    assert after["status"] == "CONFIRMED_FRAUD" and after["version"] == 3
    assert (after["disposition"], after["fraud_type"]) == ("confirmed_fraud", "amount_spike")
    history = case_file(_conn(settings), 5)["history"]  # type: ignore[index]
    assert [h["after"]["status"] for h in history] == ["INVESTIGATING", "CONFIRMED_FRAUD"]
    assert {h["actor"] for h in history} == {"user:alice"}
    with pytest.raises(CaseError) as stale:
        apply_change(writer, lambda c: change_status(c, 5, 1, "FALSE_POSITIVE", ANALYST))
    assert stale.value.status == 409
    with pytest.raises(CaseError) as forbidden:
        apply_change(writer, lambda c: change_status(c, 5, 3, "INVESTIGATING", ANALYST))
    assert forbidden.value.status == 403
    reopened = apply_change(writer, lambda c: change_status(c, 5, 3, "INVESTIGATING",
                                                            SUPERVISOR))
    assert reopened["status"] == "INVESTIGATING"


def test_overview_counts_the_window(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings = node_db[0]
    conn = _conn(settings)
    latest = conn.execute("SELECT max(ts) FROM transactions").fetchone()[0]
    o = overview(conn, latest + 1, window_seconds=10 * 86400)
    assert o["transactions"] == 300
    assert o["alerts"] == conn.execute("SELECT count(*) FROM alerts").fetchone()[0]
    assert sum(p["transactions"] for p in o["series"]) == 300
    assert sum(o["by_severity"].values()) == o["alerts"]
    assert o["top_reasons"][0]["reason"] == "ml_anomaly"
    assert o["model_version"] == "m-test" and o["dead_letters"] == 0
    assert o["last_stored_at"] == conn.execute("SELECT max(stored_at) FROM transactions"
                                               ).fetchone()[0]
    assert o["waiting_urgent"] == waiting_urgent(conn) == conn.execute(
        "SELECT count(*) FROM alerts WHERE severity IN ('HIGH', 'CRITICAL')").fetchone()[0]
    empty = overview(conn, time.time() + 10 * 86400, window_seconds=60)
    assert empty["transactions"] == 0 and empty["series"] == []


def test_the_queue_offers_every_reason_an_alert_can_carry() -> None:
    """The reason filter lists the typologies too (their alerts are the ones a team most
    wants to work by kind), beside the other rules and the deny list."""
    from appliance.casework.queue import REASONS
    from appliance.scoring.rulebook import TYPOLOGIES
    from appliance.scoring.rules import HARD_REASONS, RULES
    assert set(REASONS) == {*TYPOLOGIES, *HARD_REASONS, *(r.__name__ for r in RULES), "deny_list"}
    assert len(REASONS) == len(set(REASONS))
