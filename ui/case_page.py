"""One case: the transaction, why it was flagged, the account's baseline and timeline, the
map of its terminals (terminal_map.py), related open alerts (with bulk actions), notes, the
allowed status changes and the case's audit history. Everything comes from
casefile.case_file in one read; every text from a transaction or a note is shown as text
(labels and table cells are escaped), never as HTML. Closing (one case or in bulk) and
correcting a closed case's disposition go through the close dialog (triage.CloseDialog),
which asks for the disposition and fraud type and confirms first. Numbers are written as
people write them (casework/numbers.py).
"""

from __future__ import annotations

import json
from typing import Any

from nicegui import ui

from appliance.casework.case_text import NOTE_MAX
from appliance.casework.casefile import case_file, plain_value, value_text
from appliance.casework.cases import (CLOSED_STATUSES, OPEN_STATUSES, CaseError, add_note,
                                      bulk_change)
from appliance.casework.dispositions import DISPOSITIONS
from appliance.casework.keys import role_at_least
from appliance.casework.numbers import amount_text, number_text, percent_text
from appliance.casework.users import User

from .layout import signed_in, when
from .queue_page import COLUMNS, table_row
from .session import Console
from .terminal_map import terminal_map
from .triage import CLOSE_ACTIONS, CloseDialog, act, closed_as

TX_FIELDS = ("transaction_id", "branch", "account_id", "terminal_id", "amount", "sent_amount",
             "channel", "merchant_category", "location", "model_risk", "risk", "severity",
             "decision", "model_version", "rules_version")
"""``amount`` is shown with ``currency`` (the node's); ``sent_amount`` with ``sent_currency``
is empty unless the terminal sent another currency than the node's."""
MONEY = {"amount": "currency", "sent_amount": "sent_currency"}
SHARES = ("model_risk", "risk")
"""Shown as percentages."""


def tx_text(tx: dict[str, Any], name: str) -> str:
    """One transaction field as the case page shows it."""
    if name in MONEY:
        return amount_text(tx.get(name), tx.get(MONEY[name]))
    if name in SHARES:
        return percent_text(tx.get(name))
    return value_text(tx.get(name))
NOTE_LIMIT = NOTE_MAX


class CaseView:
    def __init__(self, console: Console, user: User, alert_id: int) -> None:
        self.console = console
        self.user = user
        self.alert_id = alert_id
        self.case: dict[str, Any] = {}
        self.closer = CloseDialog()

    @ui.refreshable_method
    def body(self) -> None:
        case = case_file(self.console.reader(), self.alert_id, self.console.api.explainer)
        if case is None:
            ui.label(f"no alert {self.alert_id}").props("data-testid=missing")
            return
        self.case = case
        alert = case["alert"]
        with ui.row().classes("items-center gap-4"):
            ui.label(f"Alert {alert['alert_id']}").classes("text-2xl")
            ui.badge(alert["severity"]).props("data-testid=case-severity")
            ui.label(f"risk {percent_text(alert['risk'])}").props("data-testid=case-risk")
            ui.label(alert["status"]).classes("text-lg font-bold").props(
                "data-testid=case-status")
            ui.label(closed_as(alert)).props("data-testid=case-disposition")
            ui.label(f"assignee: {alert['assignee'] or '—'}").props("data-testid=case-assignee")
            ui.label(f"version {alert['version']}").classes("text-gray-500")
        self.actions(alert)
        with ui.row().classes("w-full items-start gap-4"):
            self.transaction(case)
            self.reasons(case)
        self.features(case)
        self.timeline(case)
        self.related(case)
        self.notes(case)
        self.history(case)

    def actions(self, alert: dict[str, Any]) -> None:
        status, version = alert["status"], alert["version"]
        analyst = role_at_least(self.user.role, "analyst")
        buttons: list[tuple[str, str, bool]] = [("Assign to me", "assign_me", True)]
        if status == "NEW":
            buttons.append(("Start investigating", "investigate", True))
        if status in OPEN_STATUSES:
            buttons += [("Close as fraud…", "confirm", True),
                        ("Close as not fraud…", "dismiss", True)]
        if status in CLOSED_STATUSES:
            supervisor = role_at_least(self.user.role, "supervisor")
            buttons += [("Reopen", "reopen", supervisor),
                        ("Correct disposition…", "correct", supervisor)]
        with ui.row().classes("gap-2"):
            for label, action, allowed in buttons:
                button = ui.button(label, on_click=lambda a=action: self.run(version, a))
                button.props(f"data-testid=action-{action}")
                if not (analyst and allowed):
                    button.disable()
                    button.tooltip("your role cannot do this")

    def run(self, version: int, action: str) -> None:
        if action in CLOSE_ACTIONS or action == "correct":
            self.ask_close(version, action)
        elif act(self.console, self.alert_id, version, action) is not None:
            self.body.refresh()

    def ask_close(self, version: int, action: str) -> None:
        if self.console.act("analyst") is None:
            return
        alert = self.case["alert"]

        def apply(disposition: str, fraud_type: str | None) -> bool:
            done = act(self.console, self.alert_id, version, "close", disposition,
                       fraud_type)
            if done is not None:
                self.body.refresh()
            return done is not None

        if action == "correct":
            self.closer.open(f"Correct the disposition of alert {self.alert_id}",
                             alert["disposition"], alert["fraud_type"], apply,
                             f"alert {self.alert_id}")
        else:
            self.closer.open(f"Close alert {self.alert_id}", CLOSE_ACTIONS[action], None,
                             apply, f"alert {self.alert_id}")

    def transaction(self, case: dict[str, Any]) -> None:
        tx = case["transaction"]
        with ui.card().classes("w-96"):
            ui.label("Transaction").classes("font-bold")
            with ui.grid(columns=2).classes("gap-x-4 gap-y-0"):
                ui.label("event time (UTC)")
                ui.label(when(tx.get("ts")))
                for name in TX_FIELDS:
                    ui.label(name).classes("text-gray-600")
                    ui.label(tx_text(tx, name)).props(f"data-testid=tx-{name}")

    def reasons(self, case: dict[str, Any]) -> None:
        with ui.card().classes("grow"):
            ui.label("Why it was flagged").classes("font-bold")
            for reason in case["reasons"]:
                with ui.row().classes("gap-2"):
                    ui.badge(reason["code"])
                    ui.label(reason["detail"]).props("data-testid=reason-detail")
            if not case["reasons"]:
                ui.label("no rule fired; the model's risk alone raised it")
            explanation = case.get("explanation")
            if explanation:
                for sentence in explanation["unusual"]:
                    ui.label(sentence).props("data-testid=unusual")
                if explanation["contributions"]:
                    ui.label(f"What drove the model's risk ({explanation['model_version']}, "
                             f"{percent_text(explanation['model_risk'])})").classes(
                        "font-bold mt-2")
                    for c in explanation["contributions"]:
                        ui.label(f"{c['feature']} = {plain_value(c['feature'], c['value'])}: "
                                 f"{percent_text(c['share'], 0)}").props(
                            "data-testid=contribution")

    def features(self, case: dict[str, Any]) -> None:
        rows = [{"name": f["name"], "value": plain_value(f["name"], f["value"]),
                 "baseline": plain_value(f["name"], f["baseline"], mean=True),
                 "difference": value_text(f["value"] - f["baseline"])
                 if f["baseline"] is not None else ""} for f in case["features"]]
        n = case["features"][0]["baseline_rows"] if case["features"] else 0
        ui.label(f"Features against the account's baseline (mean of its previous "
                 f"{number_text(n)} transactions)").classes("font-bold mt-4")
        ui.table(columns=[{"name": k, "label": k, "field": k, "align": "left"}
                          for k in ("name", "value", "baseline", "difference")],
                 rows=rows, row_key="name").props("dense flat data-testid=features")

    def timeline(self, case: dict[str, Any]) -> None:
        points = case["timeline"]
        tx_id = case["alert"]["transaction_id"]
        ui.label("The account's recent transactions").classes("font-bold mt-4")
        ui.echart({
            "tooltip": {"trigger": "item"},
            "xAxis": {"type": "time"},
            "yAxis": {"type": "value", "name": "amount"},
            "series": [{"type": "scatter", "name": "amount",
                        "data": [{"value": [p["ts"] * 1000, p["amount"]],
                                  "itemStyle": {"color": "#dc2626" if p["transaction_id"] ==
                                                tx_id else "#2563eb"}} for p in points]}],
        }).classes("w-full h-64")
        ui.label("Terminals the account used").classes("font-bold")
        terminal_map(case["terminals"], case["alert"]["terminal_id"],
                     self.console.settings.console_map_tiles)
        ui.table(columns=[{"name": k, "label": k, "field": k, "align": "left"}
                          for k in ("terminal_id", "name", "location", "transactions",
                                    "last")],
                 rows=[{**t, "transactions": number_text(t["transactions"]),
                        "last": when(t["last_ts"])} for t in case["terminals"]],
                 row_key="terminal_id").props("dense flat")

    def related(self, case: dict[str, Any]) -> None:
        alert = case["alert"]
        for scope in ("account", "terminal"):
            rows = [table_row(a) for a in case["related"][scope]]
            ui.label(f"Other open alerts on this {scope} ({number_text(len(rows))})").classes(
                "font-bold mt-4")
            if not rows:
                continue
            ui.table(columns=COLUMNS, rows=rows, row_key="alert_id").props("dense flat")
            if alert["status"] in OPEN_STATUSES:
                with ui.row():
                    for label, action, target in (
                            ("Close all as fraud…", "confirm", "CONFIRMED_FRAUD"),
                            ("Close all as not fraud…", "dismiss", "FALSE_POSITIVE")):
                        ui.button(f"{label} (this and {number_text(len(rows))} more)",
                                  on_click=lambda s=scope, a=action, n=len(rows):
                                  self.ask_bulk(s, a, n)
                                  ).props(f"outline data-testid=bulk-{scope}-{target}")

    def ask_bulk(self, scope: str, action: str, more: int) -> None:
        if self.console.act("analyst") is None:
            return
        self.closer.open(f"Close alert {self.alert_id} and {number_text(more)} more on its "
                         f"{scope}", CLOSE_ACTIONS[action], None,
                         lambda d, f: self.bulk(scope, d, f),
                         f"these {number_text(more + 1)} alerts")

    def bulk(self, scope: str, disposition: str, fraud_type: str | None) -> bool:
        user = self.console.act("analyst")
        if user is None:
            return False
        version = self.case["alert"]["version"]

        def apply(conn: Any) -> dict[str, Any]:
            # through INVESTIGATING first, as the workflow requires, then closed
            first = bulk_change(conn, self.alert_id, version, scope, "INVESTIGATING", None,
                                user.actor)
            second = bulk_change(conn, self.alert_id, version + 1, scope, None, None,
                                 user.actor, disposition, fraud_type)
            return {"changed": second["changed"], "skipped": first["skipped"]
                    + second["skipped"]}

        try:
            result = self.console.change(apply)
        except CaseError as exc:
            ui.notify(exc.message, type="warning")
            return False
        status = DISPOSITIONS[disposition].status
        ui.notify(f"{number_text(len(result['changed']))} alert(s) now {status} "
                  f"({disposition}), {number_text(len(result['skipped']))} skipped",
                  type="positive")
        self.body.refresh()
        return True

    def notes(self, case: dict[str, Any]) -> None:
        ui.label("Notes").classes("font-bold mt-4")
        with ui.column().classes("gap-1").props("data-testid=notes"):
            for note in case["notes"]:
                with ui.row().classes("gap-2"):
                    ui.label(f"{when(note['at'])} {note['author']}").classes("text-gray-600")
                    ui.label(note["text"]).classes("whitespace-pre-wrap").props(
                        "data-testid=note-text")
        text = ui.textarea("Add a note", validation={
            f"at most {NOTE_LIMIT} characters": lambda v: len(v or "") <= NOTE_LIMIT}
        ).classes("w-full").props("data-testid=note-input")

        def save() -> None:
            user = self.console.act("analyst")
            body = (text.value or "").strip()
            if user is None or not body or len(body) > NOTE_LIMIT:
                return
            try:
                self.console.change(lambda conn: add_note(conn, self.alert_id, body,
                                                          user.actor))
            except CaseError as exc:  # control characters: case_text says what is allowed
                ui.notify(exc.message, type="warning")
                return
            self.body.refresh()

        ui.button("Add note", on_click=save).props("data-testid=note-add")

    def history(self, case: dict[str, Any]) -> None:
        ui.label("History (audit trail)").classes("font-bold mt-4")
        rows = [{"seq": e["seq"], "at": when(e["at"]), "actor": e["actor"],
                 "action": e["action"],
                 "before": json.dumps(e["before"], sort_keys=True) if e["before"] else "",
                 "after": json.dumps(e["after"], sort_keys=True) if e["after"] else ""}
                for e in case["history"]]
        ui.table(columns=[{"name": k, "label": k, "field": k, "align": "left"}
                          for k in ("seq", "at", "actor", "action", "before", "after")],
                 rows=rows, row_key="seq").props("dense flat data-testid=history")


def case_page(console: Console, alert_id: int) -> None:
    user = signed_in(console, f"Alert {alert_id}")
    if user is None:
        return
    with ui.row():
        ui.link("← back to the queue", "/")  # NiceGUI adds the mount path
    CaseView(console, user, alert_id).body()
