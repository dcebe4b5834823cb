"""Page logic with NiceGUI's simulated user (nicegui.testing.user_simulation, no browser):
the gate, login, queue filters and pages, allowed transitions, a case's values in plain
units, and role checks."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nicegui import ui
from nicegui.testing import User
from nicegui.testing.user_simulation import user_simulation

from appliance.casework.casefile import case_file, plain_value
from appliance.scoring.rules import RULES_VERSION
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import node_db  # noqa: F401
from tests.console_support import add_user
from tests.support import query

MAIN = Path(__file__).with_name("console_main.py")


def simulate(settings: Settings, scenario: Callable[[User], Awaitable[None]],
             **env: str) -> None:
    """Run ``scenario`` against the console on ``settings``' database; ``env`` adds
    BRANCHGUARD_<NAME> settings (e.g. ``console_login_max_failures="3"``)."""
    variables = {"BRANCHGUARD_DATA_DIR": str(settings.data_dir),
                 **{f"BRANCHGUARD_{k.upper()}": v for k, v in env.items()}}
    os.environ.update(variables)
    try:
        async def run() -> None:
            async with user_simulation(main_file=MAIN) as user:
                await scenario(user)
        asyncio.run(run())
    finally:
        for name in variables:
            os.environ.pop(name, None)


CHECKED = 100
"""``should_see`` retries (0.1 s apart) after a sign-in: the password check (argon2) runs in
a worker thread, so its answer comes a moment after the click."""


async def sign_in(user: User, name: str, password: str) -> None:
    await user.open("/login")
    user.find("Username").type(name)
    user.find("Password").type(password)
    user.find("Sign in").click()
    await user.should_see(f"{name} (", retries=CHECKED)


def table_with(user: User, testid: str) -> ui.table:
    """The table on the page whose ``data-testid`` is ``testid``."""
    return next(t for t in user.find(ui.table).elements if t.props.get("data-testid") == testid)


def queue_table(user: User) -> ui.table:
    return table_with(user, "queue")


def force_click(user: User, label: str) -> None:
    """Click a button the page disabled, as a tampered client could: the action itself
    must still refuse."""
    button = user.find(label).elements.pop()
    assert not button.enabled, f"{label} should be disabled"
    button.enabled = True
    user.find(label).click()


def status_of(settings: Settings, alert_id: int) -> str:
    return str(query(settings.db_path, "SELECT status FROM alerts WHERE alert_id = ?",
                     [alert_id])[0][0])


def test_anonymous_is_sent_to_login(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    async def scenario(user: User) -> None:
        for path in ("/", "/overview", "/lists", "/case/1"):
            await user.open(path)
            await user.should_see("Branchguard console")
            await user.should_not_see("Log out")

    simulate(node_db[0], scenario)


def test_wrong_password_is_refused(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    add_user(node_db[0], "alice", "analyst")

    async def scenario(user: User) -> None:
        await user.open("/login")
        user.find("Username").type("alice")
        user.find("Password").type("not-the-password")
        user.find("Sign in").click()
        await user.should_see("wrong username or password", retries=CHECKED)
        await user.open("/")
        await user.should_see("Branchguard console")

    simulate(node_db[0], scenario)


def test_queue_filters_search_and_pages(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings = node_db[0]
    password = add_user(settings, "alice", "analyst")
    total = query(settings.db_path, "SELECT count(*) FROM alerts")[0][0]
    high = query(settings.db_path, "SELECT count(*) FROM alerts WHERE severity = 'HIGH'")[0][0]
    account = query(settings.db_path, "SELECT account_id FROM alerts LIMIT 1")[0][0]

    async def scenario(user: User) -> None:
        await sign_in(user, "alice", password)
        await user.should_see(f"page 1 of {-(-total // 25)} · {total} alerts")
        user.find("next").click()
        await user.should_see(f"page 2 of {-(-total // 25)}")
        rows = queue_table(user).rows
        assert len(rows) == 25 and rows[0]["alert_id"] == total - 25
        unexplained = {r[0] for r in query(settings.db_path, "SELECT alert_id FROM alerts "
                                           "WHERE reasons = '[]'")}
        assert unexplained & {r["alert_id"] for r in rows}  # the fill raises some
        assert all((r["reasons_text"] == "model risk") == (r["alert_id"] in unexplained)
                   for r in rows)  # no row shows an empty reason
        severity = next(s for s in user.find(ui.select).elements
                        if s.props.get("label") == "severity")
        severity.set_value(["HIGH"])
        await user.should_see(f"{high} alerts")
        assert {r["severity"] for r in queue_table(user).rows} == {"HIGH"}
        severity.set_value([])
        user.find("search transaction, account or terminal id").type(account)
        await user.should_see("page 1 of 1")
        assert {r["account_id"] for r in queue_table(user).rows} == {account}

    simulate(settings, scenario)


def test_case_offers_only_allowed_transitions(node_db: tuple[Settings, Store]  # noqa: F811
                                              ) -> None:
    settings = node_db[0]
    password = add_user(settings, "alice", "analyst")

    async def scenario(user: User) -> None:
        await sign_in(user, "alice", password)
        await user.open("/case/4")
        await user.should_see("Start investigating")
        await user.should_not_see("Reopen")
        user.find("Start investigating").click()
        await user.should_see("INVESTIGATING")
        await user.should_not_see("Start investigating")
        assert status_of(settings, 4) == "INVESTIGATING"
        user.find("Close as not fraud…").click()
        await user.should_see("Close alert 4")  # the dialog: nothing changed yet
        assert status_of(settings, 4) == "INVESTIGATING"
        user.find("Cancel").click()
        assert status_of(settings, 4) == "INVESTIGATING"
        user.find("Close as not fraud…").click()
        await user.should_see("Only a supervisor can reopen or correct it")
        user.find("Close case").click()
        await user.should_see("FALSE_POSITIVE")
        assert status_of(settings, 4) == "FALSE_POSITIVE"
        assert query(settings.db_path, "SELECT disposition, fraud_type FROM alerts WHERE "
                     "alert_id = 4") == [("false_positive", None)]
        await user.should_not_see("Close as fraud…")
        force_click(user, "Reopen")  # an analyst cannot reopen
        await user.should_see("reopening or correcting a closed alert needs the supervisor")
        assert status_of(settings, 4) == "FALSE_POSITIVE"

    simulate(settings, scenario)


@pytest.mark.parametrize(("name", "value", "mean", "shown"), [
    ("seconds_since_previous", 30.0, False, "30 s"),
    ("seconds_since_previous", 1294.0, False, "21.6 min"),
    ("seconds_since_previous", 5 * 3600.0, False, "5.0 h"),
    ("seconds_since_previous", 3 * 86400.0, False, "3.0 d"),
    ("seconds_since_previous", 604800.0, False, "7 d or more"),  # the cap: none before
    ("first_time_terminal", 1.0, False, "yes"),
    ("first_time_location", 0.0, False, "no"),
    ("first_time_location", 0.25, True, "0.25"),  # over a baseline: the share of first uses
    ("amount", 426.35, False, "426.4"),
    ("amount_sum_24h", 12260.0, False, "12,260"),  # as a person writes it, not 1.226e+04
    ("amount_max_30d", 999999999.99, False, "1,000,000,000"),
    ("tx_count_1h", 0.0123456, True, "0.01235"),
])
def test_case_values_are_in_the_units_an_analyst_reads(name: str, value: float, mean: bool,
                                                       shown: str) -> None:
    assert plain_value(name, value, mean) == shown


def test_the_case_features_table_uses_those_units(node_db: tuple[Settings, Store]  # noqa: F811
                                                  ) -> None:
    settings = node_db[0]
    password = add_user(settings, "alice", "analyst")
    conn = sqlite3.connect(settings.db_path)
    case = case_file(conn, 4)
    conn.close()
    assert case is not None
    expected = {f["name"]: plain_value(f["name"], f["value"]) for f in case["features"]}
    assert expected["first_time_terminal"] in ("yes", "no")

    async def scenario(user: User) -> None:
        await sign_in(user, "alice", password)
        await user.open("/case/4")
        await user.should_see("Features against the account's baseline")
        rows = table_with(user, "features").rows
        assert {r["name"]: r["value"] for r in rows} == expected

    simulate(settings, scenario)


def test_viewer_sees_but_cannot_act(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings = node_db[0]
    password = add_user(settings, "vera", "viewer")

    async def scenario(user: User) -> None:
        await sign_in(user, "vera", password)
        await user.open("/case/6")
        await user.should_see("Why it was flagged")
        force_click(user, "Close as fraud…")
        await user.should_see("needs the analyst role or above; you are viewer")
        assert status_of(settings, 6) == "NEW"
        await user.open("/overview")
        await user.should_see("dead letters: 0")
        await user.should_see("node: last transaction stored")
        await user.should_see(f"model m-test · rules {RULES_VERSION}")
        await user.open("/lists")
        await user.should_see("changing the lists needs the supervisor role")
        await user.should_not_see("Add")

    simulate(settings, scenario)


def test_supervisor_adds_and_removes_a_list_entry(node_db: tuple[Settings, Store]  # noqa: F811
                                                  ) -> None:
    settings = node_db[0]
    password = add_user(settings, "sam", "supervisor")

    async def scenario(user: User) -> None:
        await sign_in(user, "sam", password)
        await user.open("/lists")
        user.find("account or terminal id").type("A-DENIED-1")
        user.find("reason").type("card reported stolen <b>today</b>")
        user.find("Add").click()
        await user.should_see("entry to remove")
        table = table_with(user, "list-entries")
        rows = query(settings.db_path, "SELECT entry_id, list, kind, owner, expires_at - "
                     "created_at FROM list_entries WHERE value = 'A-DENIED-1'")
        assert len(rows) == 1
        entry_id, list_name, kind, owner, lifetime = rows[0]
        assert (list_name, kind, owner) == ("deny", "account", "user:sam")
        assert abs(lifetime - 7 * 86400) < 5
        shown = next(r for r in table.rows if r["entry_id"] == entry_id)
        assert shown["reason"] == "card reported stolen <b>today</b>"
        user.find("entry to remove").elements.pop().set_value(entry_id)
        user.find("Remove").click()
        await user.should_not_see("entry to remove")  # no active entries left
        assert query(settings.db_path, "SELECT removed_by FROM list_entries WHERE entry_id = ?",
                     [entry_id])[0][0] == "user:sam"
        actions = [r[0] for r in query(settings.db_path, "SELECT action FROM audit_log WHERE "
                                       "subject = ?", [f"list_entry:{entry_id}"])]
        assert actions == ["list.add", "list.remove"]

    simulate(settings, scenario)


def test_bulk_dismiss_on_a_terminal(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    settings = node_db[0]
    password = add_user(settings, "alice", "analyst")
    terminal, count = query(settings.db_path, "SELECT terminal_id, count(*) FROM alerts "
                            "GROUP BY 1 ORDER BY 2 DESC LIMIT 1")[0]
    ids = [r[0] for r in query(settings.db_path, "SELECT alert_id FROM alerts WHERE "
                               "terminal_id = ? ORDER BY alert_id", [terminal])]
    assert count >= 3

    async def scenario(user: User) -> None:
        await sign_in(user, "alice", password)
        await user.open(f"/case/{ids[0]}")
        await user.should_see(f"Other open alerts on this terminal ({count - 1})")
        user.find(f"Close all as not fraud… (this and {count - 1} more)").click()
        await user.should_see(f"these {count} alerts")
        user.find("Close case").click()
        await user.should_see(f"{count} alert(s) now FALSE_POSITIVE (false_positive), "
                              "0 skipped")
        await user.should_see("Other open alerts on this terminal (0)")

    simulate(settings, scenario)
    statuses = query(settings.db_path, "SELECT status, disposed_by FROM alerts WHERE "
                     "terminal_id = ?", [terminal])
    assert statuses == [("FALSE_POSITIVE", "user:alice")] * count
    trail = query(settings.db_path, "SELECT count(*) FROM audit_log WHERE actor = 'user:alice'"
                  " AND action = 'case.change'")[0][0]
    assert trail == 2 * count  # each through INVESTIGATING, then dismissed
