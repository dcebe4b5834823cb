"""Case actions the queue's keys and the case page's buttons share.

Each takes the alert's version as the analyst last saw it, so a change someone else made
in between is refused (cases.StaleVersion) rather than overwritten. "Confirm" and
"dismiss" on a NEW alert pass through INVESTIGATING in the same transaction (two audit
entries), since the workflow has no direct NEW -> closed transition. Reopening needs a
supervisor, as in the API.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from nicegui import ui

from appliance import logs
from appliance.casework.cases import (CLOSED_STATUSES, CaseError, Change, case_of, change_case,
                                      is_reopen)
from appliance.casework.keys import role_at_least
from appliance.casework.users import User

from .session import Console

log = logs.get("ui.triage")
ACTIONS = {"investigate": "INVESTIGATING", "confirm": "CONFIRMED_FRAUD",
           "dismiss": "FALSE_POSITIVE", "reopen": "INVESTIGATING"}


def change_status(conn: sqlite3.Connection, alert_id: int, version: int, target: str,
                  user: User) -> dict[str, Any]:
    """Move one alert to ``target`` (see module doc); raises CaseError."""
    current = case_of(conn, alert_id)
    if current is None:
        raise CaseError(404, "no such alert", "alert_id")
    if is_reopen(current["status"], target) and not role_at_least(user.role, "supervisor"):
        raise CaseError(403, "reopening a closed alert needs the supervisor role", "status")
    if current["status"] == "NEW" and target in CLOSED_STATUSES:
        change_case(conn, alert_id, Change(version, "INVESTIGATING"), user.actor)
        version += 1
    return change_case(conn, alert_id, Change(version, target), user.actor)


def act(console: Console, alert_id: int, version: int, action: str) -> dict[str, Any] | None:
    """Run one named action (``assign_me`` or a key of ACTIONS) as the signed-in analyst;
    tells the user the outcome. Returns the new case state, or None when refused."""
    user = console.act("analyst")
    if user is None:
        return None
    try:
        if action == "assign_me":
            result = console.change(lambda conn: change_case(
                conn, alert_id, Change(version, assignee=user.username), user.actor))
        else:
            target = ACTIONS[action]
            result = console.change(lambda conn: change_status(conn, alert_id, version, target,
                                                               user))
    except CaseError as exc:
        ui.notify(f"alert {alert_id}: {exc.message}", type="warning")
        return None
    log.info("console.case_changed", txn_id=None, alert_id=alert_id, action=action,
             user=user.username, status=result["status"])
    ui.notify(f"alert {alert_id}: {result['status']}"
              + (f", assigned to {result['assignee']}" if result["assignee"] else ""),
              type="positive")
    return result
