"""Allow and deny lists: every active entry, adding one with an optional expiry, and
removing one. Changing a list needs a supervisor (as in the API); the scorer picks the
change up within ``lists_refresh_seconds``."""

from __future__ import annotations

import time

from nicegui import ui

from appliance.casework.keys import role_at_least
from appliance.scoring.lists import KINDS, LISTS, ListError, add_entry, entries, remove_entry

from .layout import signed_in, when
from .session import Console

EXPIRIES = {"never": None, "1 hour": 3600, "1 day": 86400, "7 days": 7 * 86400,
            "30 days": 30 * 86400}


def lists_page(console: Console) -> None:
    user = signed_in(console, "Lists")
    if user is None:
        return
    may_change = role_at_least(user.role, "supervisor")

    @ui.refreshable
    def table() -> None:
        rows = [{**e, "created": when(e["created_at"]),
                 "expires": when(e["expires_at"]) or "never"}
                for e in entries(console.reader())]
        columns = [{"name": k, "label": k, "field": k, "align": "left"} for k in
                   ("entry_id", "list", "kind", "value", "reason", "owner", "created",
                    "expires")]
        ui.table(columns=columns, rows=rows, row_key="entry_id").props(
            "dense flat data-testid=list-entries")
        if may_change and rows:
            with ui.row().classes("items-end gap-2"):
                choice = ui.select({e["entry_id"]: f"#{e['entry_id']} {e['list']} {e['kind']} "
                                    f"{e['value']}" for e in rows}, label="entry to remove"
                                   ).classes("w-72").props("data-testid=list-remove-choice")
                ui.button("Remove", on_click=lambda: remove(choice.value)).props(
                    "outline data-testid=list-remove")

    def remove(entry_id: int | None) -> None:
        actor = console.act("supervisor")
        if actor is None or entry_id is None:
            return
        try:
            console.change(lambda conn: remove_entry(conn, entry_id, actor.actor))
        except ListError as exc:
            ui.notify(exc.message, type="warning")
        table.refresh()

    def add() -> None:
        actor = console.act("supervisor")
        if actor is None:
            return
        value_text, reason_text = value.value.strip(), reason.value.strip()
        if not value_text or not reason_text:
            ui.notify("give the value and a reason", type="warning")
            return
        seconds = EXPIRIES[expiry.value]
        expires_at = None if seconds is None else time.time() + seconds
        try:
            console.change(lambda conn: add_entry(conn, which.value, kind.value, value_text,
                                                  reason_text, actor.actor, expires_at))
        except ListError as exc:
            ui.notify(exc.message, type="warning")
            return
        value.set_value("")
        reason.set_value("")
        table.refresh()

    table()
    if may_change:
        with ui.row().classes("items-end gap-2"):
            which = ui.select(list(LISTS), value="deny", label="list").classes("w-24")
            kind = ui.select(list(KINDS), value="account", label="kind").classes("w-28")
            value = ui.input("account or terminal id").props("data-testid=list-value")
            reason = ui.input("reason").classes("w-64").props("data-testid=list-reason")
            expiry = ui.select(list(EXPIRIES), value="7 days", label="expires").classes("w-28")
            ui.button("Add", on_click=add).props("data-testid=list-add")
    else:
        ui.label("changing the lists needs the supervisor role").classes("text-gray-500")
