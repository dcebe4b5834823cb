"""Case actions the queue's keys and the case page's buttons share, and the close dialog.

Each takes the alert's version as the analyst last saw it, so a change someone else made
in between is refused (cases.StaleVersion) rather than overwritten. Closing ("confirm" and
"dismiss") always goes through :class:`CloseDialog`: it asks for the disposition code and,
for fraud, the fraud type, says what closing does (final for an analyst; the label the
models learn from), and changes nothing until the analyst confirms. A NEW alert passes
through INVESTIGATING in the same transaction (two audit entries), since the workflow has
no direct NEW -> closed transition. Reopening, and correcting the disposition of a closed
case, need a supervisor, as in the API.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from nicegui import ui

from appliance import logs
from appliance.casework.cases import (CLOSED_STATUSES, CaseError, Change, case_of, change_case,
                                      needs_supervisor)
from appliance.casework.dispositions import DISPOSITIONS, FRAUD_TYPES, problem
from appliance.casework.keys import role_at_least
from appliance.casework.users import User

from .session import Console

log = logs.get("ui.triage")
ACTIONS = {"investigate": "INVESTIGATING", "reopen": "INVESTIGATING"}
CLOSE_ACTIONS = {"confirm": "confirmed_fraud", "dismiss": "false_positive"}
"""The close actions, with the disposition the dialog starts from (the analyst may pick
another before confirming)."""


def change_status(conn: sqlite3.Connection, alert_id: int, version: int, target: str | None,
                  user: User, disposition: str | None = None,
                  fraud_type: str | None = None) -> dict[str, Any]:
    """Move one alert to ``target``, or close (or, for a supervisor, re-dispose) it with
    ``disposition`` (see module doc); raises CaseError."""
    current = case_of(conn, alert_id)
    if current is None:
        raise CaseError(404, "no such alert", "alert_id")
    if needs_supervisor(current["status"], target, disposition) and \
            not role_at_least(user.role, "supervisor"):
        raise CaseError(403, "reopening or correcting a closed alert needs the supervisor "
                        "role", "status")
    closing = disposition is not None or target in CLOSED_STATUSES
    if current["status"] == "NEW" and closing:
        change_case(conn, alert_id, Change(version, "INVESTIGATING"), user.actor)
        version += 1
    return change_case(conn, alert_id, Change(version, target, disposition=disposition,
                                              fraud_type=fraud_type), user.actor)


def act(console: Console, alert_id: int, version: int, action: str,
        disposition: str | None = None, fraud_type: str | None = None
        ) -> dict[str, Any] | None:
    """Run one named action (``assign_me``, a key of ACTIONS, or ``close`` with a
    disposition) as the signed-in analyst; tells the user the outcome. Returns the new case
    state, or None when refused."""
    user = console.act("analyst")
    if user is None:
        return None
    try:
        if action == "assign_me":
            result = console.change(lambda conn: change_case(
                conn, alert_id, Change(version, assignee=user.username), user.actor))
        else:
            target = ACTIONS.get(action)
            result = console.change(lambda conn: change_status(
                conn, alert_id, version, target, user, disposition, fraud_type))
    except CaseError as exc:
        ui.notify(f"alert {alert_id}: {exc.message}", type="warning")
        return None
    log.info("console.case_changed", txn_id=None, alert_id=alert_id, action=action,
             user=user.username, status=result["status"], disposition=result["disposition"],
             fraud_type=result["fraud_type"])
    ui.notify(f"alert {alert_id}: {result['status']}"
              + (f" ({closed_as(result)})" if result["disposition"] else "")
              + (f", assigned to {result['assignee']}" if result["assignee"] else ""),
              type="positive")
    return result


def closed_as(case: dict[str, Any]) -> str:
    """A closed case's disposition as the console writes it: ``confirmed_fraud:
    card_testing``, ``customer_confirmed``; empty while open."""
    if not case.get("disposition"):
        return ""
    return str(case["disposition"]) + (f": {case['fraud_type']}" if case.get("fraud_type")
                                       else "")


class CloseDialog:
    """Asks how a case (or several) is closed, then confirms before anything changes.

    ``apply(disposition, fraud_type)`` does the change and returns True when it was made;
    the dialog stays open (showing why) when it returns False. One dialog per page: opening
    it again while open does nothing, so a repeated key cannot stack dialogs."""

    def __init__(self) -> None:
        self.apply: Callable[[str, str | None], bool] = lambda _d, _f: False
        with ui.dialog() as self.dialog, ui.card().classes("w-[28rem]").props(
                "data-testid=close-dialog"):
            self.title = ui.label().classes("text-lg font-bold").props(
                "data-testid=close-title")
            self.code = ui.select({code: f"{code} — {d.meaning}"
                                   for code, d in DISPOSITIONS.items()},
                                  label="disposition", on_change=lambda _: self.show()
                                  ).classes("w-full").props("data-testid=close-disposition")
            self.fraud_type = ui.select(list(FRAUD_TYPES), label="fraud type",
                                        on_change=lambda _: self.show()).classes(
                "w-full").props("data-testid=close-fraud-type")
            self.summary = ui.label().classes("text-sm").props("data-testid=close-summary")
            self.problem = ui.label().classes("text-sm text-red-700").props(
                "data-testid=close-problem")
            with ui.row().classes("w-full justify-end"):
                ui.button("Cancel", on_click=self.dialog.close).props(
                    "flat data-testid=close-cancel")
                self.confirm = ui.button("Close case", on_click=self.submit).props(
                    "color=negative data-testid=close-confirm")

    def open(self, title: str, code: str | None, fraud_type: str | None,
             apply: Callable[[str, str | None], bool], what: str = "this case") -> None:
        if self.dialog.value:
            return
        self.apply, self.what = apply, what
        self.title.set_text(title)
        self.code.set_value(code)
        self.fraud_type.set_value(fraud_type)
        self.show()
        self.dialog.open()

    def show(self) -> None:
        code, fraud_type = self.code.value, self.fraud_type.value
        disposition = DISPOSITIONS.get(code) if code else None
        fraud = disposition is not None and disposition.fraud
        self.fraud_type.set_visibility(fraud)
        found = problem(code, fraud_type if fraud else None)
        self.problem.set_text(found[1] if found else "")
        self.confirm.set_enabled(found is None)
        if disposition is None:
            self.summary.set_text("")
            return
        outcome = (f"fraud ({fraud_type})" if fraud and fraud_type else
                   "fraud" if fraud else "not fraud")
        self.summary.set_text(
            f"Closes {self.what} as {disposition.status} and records the transaction as "
            f"{outcome} for the models. Only a supervisor can reopen or correct it.")

    def submit(self) -> None:
        code, fraud_type = self.code.value, self.fraud_type.value
        disposition = DISPOSITIONS.get(code) if code else None
        if disposition is None:
            return
        fraud_type = fraud_type if disposition.fraud else None
        if problem(code, fraud_type) is None and self.apply(code, fraud_type):
            self.dialog.close()
