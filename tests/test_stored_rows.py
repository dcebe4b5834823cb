"""Rows stored before the contract's issue-17 checks existed: a database may hold event times
a datetime cannot hold (9999-12-31T23:59:59-14:00 is in year 10000 UTC,
0001-01-01T00:00:00+14:00 in year 0) or far in the future, and text with control and
bidirectional formatting characters. Every console page, API route, chart and alert message
renders them, without an error, as what they are."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta, timezone

from nicegui import ui
from nicegui.testing import User
from starlette.testclient import TestClient

from appliance.alerts.messages import AlertView, digest, single
from appliance.api.app import create_app
from appliance.casework.overview import overview
from appliance.learning.backtest import load_rows
from appliance.scoring.features import FEATURES_VERSION, feature_state
from appliance.scoring.rules import RULES_VERSION
from appliance.scoring.score import judge
from appliance.settings import Settings
from appliance.store import Scored, Store
from appliance.transaction import Transaction, event_time_text
from tests.api_support import _keys, node_db  # noqa: F401
from tests.console_support import add_user
from tests.support import query
from tests.test_console_pages import queue_table, sign_in, simulate

ACCOUNT = "A-FAR"
FAR = {
    "year-10000": datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14))),
    "year-0": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))),
    "2099": datetime(2099, 1, 1, tzinfo=timezone.utc),
}


def store_far_rows(store: Store) -> dict[str, int]:
    """One alerting transaction per FAR time on ACCOUNT, stored as an old node did (straight
    through the store); returns each one's alert id."""
    state = feature_state(store.reader)
    scored = []
    seq = int(query(store.path, "SELECT max(stream_seq) FROM transactions")[0][0])
    for i, (name, stamp) in enumerate(FAR.items()):
        tx = Transaction(transaction_id=f"far-{name}", account_id=ACCOUNT, amount=9000.0 + i,
                         currency="EUR", timestamp=stamp, terminal_id="T-FAR", channel="POS",
                         location="Esp\u202eoo\x07")
        f = state.observe(tx)
        scored.append(Scored(tx, "BR001", seq + 1 + i, f, FEATURES_VERSION,
                             judge(tx, f, 0.95, "m-test", RULES_VERSION, Settings())))
    store.save_batch(scored, [], "scorer", seq + len(scored))
    return {name: int(query(store.path, "SELECT alert_id FROM alerts WHERE transaction_id = ?",
                            [f"far-{name}"])[0][0]) for name in FAR}


def test_event_time_text_says_what_a_time_beyond_a_datetime_is() -> None:
    assert event_time_text(FAR["year-10000"].timestamp()) == \
        "after 9999-12-31 (epoch 253402351199 s)"
    assert event_time_text(FAR["year-0"].timestamp()) == \
        "before 0001-01-01 (epoch -62135647200 s)"
    assert event_time_text(FAR["2099"].timestamp()) == "2099-01-01 00:00:00"
    assert event_time_text(float("nan")) == "not a time (nan)"
    assert event_time_text(None) == ""


def test_console_pages_render_stored_rows_of_any_time(
        node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings, store = node_db
    alerts = store_far_rows(store)
    password = add_user(settings, "alice", "analyst")

    async def scenario(user: User) -> None:
        await sign_in(user, "alice", password)
        await user.open(f"/case/{alerts['year-10000']}")
        await user.should_see("after 9999-12-31 (epoch 253402351199 s)")
        await user.should_see("Esp<U+202E>oo<U+0007>")  # not reversed, nothing hidden
        await user.open(f"/case/{alerts['year-0']}")
        await user.should_see("before 0001-01-01 (epoch -62135647200 s)")
        await user.should_see("Other open alerts on this account (2)")
        await user.open("/")
        user.find("search transaction, account or terminal id").type(ACCOUNT)
        await user.should_see("page 1 of 1 · 3 alerts")
        assert {r["account_id"] for r in queue_table(user).rows} == {ACCOUNT}
        sort = next(s for s in user.find(ui.select).elements if s.props.get("label") == "sort")
        sort.set_value("event_time")
        await user.should_see("page 1 of 1 · 3 alerts")
        await user.open("/overview")
        await user.should_see("last hour:")

    simulate(settings, scenario)


def test_overview_charts_leave_out_event_times_ahead_of_the_clock(
        node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings, store = node_db
    store_far_rows(store)
    conn = sqlite3.connect(settings.db_path)
    try:
        now = time.time()
        o = overview(conn, now)
    finally:
        conn.close()
    assert all(p["at"] <= now + settings.max_clock_skew_seconds for p in o["series"])
    assert all(p["latency_seconds"] > -settings.max_clock_skew_seconds for p in o["series"])
    assert o["transactions"] == 0 and o["alerts"] == 0  # the fill is from 2026-03


def test_api_routes_answer_for_stored_rows_of_any_time(
        node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings, store = node_db
    alerts = store_far_rows(store)
    header = {"Authorization": f"Bearer {_keys(settings).viewer}"}
    with TestClient(create_app(settings)) as client:
        for path in ("/api/v1/alerts", "/api/v1/alerts?sort=-ts", "/api/v1/alerts?sort=ts",
                     f"/api/v1/alerts?account_id={ACCOUNT}",
                     *(f"/api/v1/alerts/{a}" for a in alerts.values()),
                     *(f"/api/v1/alerts/{a}/related" for a in alerts.values()),
                     f"/api/v1/accounts/{ACCOUNT}/transactions", "/api/v1/stats",
                     "/api/v1/stats?since=2026-01-01T00:00:00Z", "/metrics"):
            response = client.get(path, headers=header)
            assert response.status_code < 500, (path, response.text[:300])
        case = client.get(f"/api/v1/alerts/{alerts['year-10000']}", headers=header).json()
        assert case["transaction"]["ts"] == FAR["year-10000"].timestamp()
        for sort in ("-ts", "ts"):  # keyset pages over the far times, cursor by cursor
            seen: list[int] = []
            url: str | None = f"/api/v1/alerts?account_id={ACCOUNT}&sort={sort}&limit=1"
            while url is not None:
                page = client.get(url, headers=header).json()
                seen.extend(a["alert_id"] for a in page["alerts"])
                url = (f"/api/v1/alerts?account_id={ACCOUNT}&sort={sort}&limit=1&cursor="
                       f"{page['next_cursor']}" if page["next_cursor"] else None)
            expected = [alerts[k] for k in ("year-10000", "2099", "year-0")]
            assert seen == (expected if sort == "-ts" else expected[::-1])


def test_alert_messages_render_stored_rows_of_any_time(
        node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    _, store = node_db
    store_far_rows(store)
    views = [AlertView(0, "CRITICAL", 0.95, time.time(), stamp.timestamp(), ACCOUNT, "T-FAR",
                       "BR001", 9000.0, "EUR", ["high_value"], ["amount 9000.00 >= 5000.00"],
                       "decline", "POS", "Espoo", None) for stamp in FAR.values()]
    assert "after 9999-12-31" in single(views[0], "http://console").body
    assert "before 0001-01-01" in digest(views, "http://console").body






def test_learning_reads_past_rows_beyond_the_calendar(
        node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    """Backtests, retraining and drift read every stored row as a Transaction: a time a
    datetime cannot hold is left out instead of stopping them with a ValueError."""
    settings, store = node_db
    store_far_rows(store)
    rows = load_rows(settings.db_path)
    ids = {tx.transaction_id for tx in rows.txs}
    assert "far-2099" in ids and not {"far-year-10000", "far-year-0"} & ids
    assert len(rows) == 301
