"""The live alert queue: filters, search, sort, pages, and keyboard triage.

Live without reloading: a timer polls queue.marker (newest alert id, change generation)
every ``console_poll_seconds`` and re-reads the page only when it moved, so a freshly
scored alert shows within one poll interval. Keys (ignored while typing in a field):
``j``/``k`` or arrows move the selection, Enter opens the case, ``a`` assigns it to you,
``i`` starts investigating, ``c`` (fraud) and ``d`` (not fraud) open the close dialog, which
asks for the disposition and fraud type and changes nothing until confirmed.

Each row shows what an analyst reads first: the amount in its currency, where (merchant
category and location), the channel, and the alert's age; numbers are written as people
write them (casework/numbers.py). Ages are re-read at least every ``AGE_REFRESH_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from nicegui import ui
from nicegui.events import KeyEventArguments

from appliance.casework.cases import STATUSES
from appliance.casework.numbers import age_text, amount_text, number_text, percent_text
from appliance.casework.branch_links import link_text, links
from appliance.casework.queue import REASONS, SORTS, UNASSIGNED, QueueQuery, alert_page, marker
from appliance.casework.users import User
from appliance.verdict import SEVERITIES

from .layout import signed_in, when
from .session import Console
from .triage import CLOSE_ACTIONS, CloseDialog, act, closed_as

TIME_RANGES = {"any time": None, "last 15 minutes": 900, "last hour": 3600,
               "last 24 hours": 86400}
COLUMNS = [
    {"name": "alert_id", "label": "#", "field": "alert_id", "align": "left"},
    {"name": "age", "label": "age", "field": "age_text", "align": "right"},
    {"name": "when", "label": "event time (UTC)", "field": "when", "align": "left"},
    {"name": "severity", "label": "severity", "field": "severity", "align": "left"},
    {"name": "risk", "label": "risk", "field": "risk_text", "align": "right"},
    {"name": "amount", "label": "amount", "field": "amount_text", "align": "right"},
    {"name": "where", "label": "merchant / location", "field": "where", "align": "left"},
    {"name": "channel", "label": "channel", "field": "channel_text", "align": "left"},
    {"name": "reasons", "label": "reasons", "field": "reasons_text", "align": "left"},
    {"name": "account_id", "label": "account", "field": "account_id", "align": "left"},
    {"name": "terminal_id", "label": "terminal", "field": "terminal_id", "align": "left"},
    {"name": "branch", "label": "branch", "field": "branch", "align": "left"},
    {"name": "status", "label": "status", "field": "status_text", "align": "left"},
    {"name": "assignee", "label": "assignee", "field": "assignee", "align": "left"},
]
AGE_REFRESH_SECONDS = 30.0
NO_RULE = "model risk"
"""The reasons cell of an alert no rule fired on (the case page says the same in full)."""
KEYS = {"a": "assign_me", "i": "investigate", "c": "confirm", "d": "dismiss"}
"""``confirm`` and ``dismiss`` open the close dialog (triage.CLOSE_ACTIONS)."""


def table_row(alert: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """One queue row, its numbers as people write them. An alert no rule fired on was
    raised by the model's risk alone (under ``ml_risk_threshold``, over ``warning_risk``);
    it says so rather than show no reason. Merchant and location are shown together (either
    may be missing); a closed case's status says how it was closed."""
    where = " · ".join(str(alert[k]) for k in ("merchant_category", "location")
                       if alert.get(k))
    return {**alert, "when": when(alert["ts"]), "risk_text": percent_text(alert["risk"]),
            "age_text": age_text((time.time() if now is None else now) - alert["created_at"]),
            "amount_text": amount_text(alert.get("amount"), alert.get("currency")),
            "where": where, "channel_text": alert.get("channel") or "",
            "status_text": alert["status"] + (f" ({closed_as(alert)})"
                                              if alert.get("disposition") else ""),
            "reasons_text": ", ".join(alert["reasons"]) or NO_RULE,
            "assignee": alert["assignee"] or ""}


class QueueView:
    """One browser tab's queue: its query, the rows shown and the selected row."""

    def __init__(self, console: Console, user: User) -> None:
        self.console = console
        self.user = user
        self.query = QueueQuery()
        self.time_range: str = "any time"
        self.mine = False
        self.rows: list[dict[str, Any]] = []
        self.selected = 0
        self.seen = (-1, -1)
        self.total = 0
        self.pages = 1
        self.read_at = 0.0

    def effective_query(self) -> QueueQuery:
        seconds = TIME_RANGES.get(self.time_range)
        return dataclasses.replace(
            self.query, since=None if seconds is None else time.time() - seconds,
            assignee=self.user.username if self.mine else self.query.assignee)

    def build(self) -> None:
        self.links: ui.row | None = None
        self.link_texts: list[str] = []
        if self.console.settings.hub_branches:  # at a regional hub: each branch's link
            self.links = ui.row().classes("gap-2").props("data-testid=branch-links")
        with ui.row().classes("w-full items-end gap-2"):
            ui.select(list(STATUSES), multiple=True, value=list(self.query.statuses),
                      label="status", on_change=lambda e: self.set(statuses=tuple(e.value))
                      ).classes("w-64").props("use-chips data-testid=filter-status")
            ui.select(list(SEVERITIES), multiple=True, value=[], label="severity",
                      on_change=lambda e: self.set(severities=tuple(e.value))
                      ).classes("w-56").props("use-chips data-testid=filter-severity")
            ui.select({"": "any reason", **{r: r for r in REASONS}}, value="", label="reason",
                      on_change=lambda e: self.set(reason=e.value or None)
                      ).classes("w-40").props("data-testid=filter-reason")
            ui.number("min risk", min=0, max=1, step=0.05,
                      on_change=lambda e: self.set(min_risk=e.value)).classes("w-24")
            ui.number("max risk", min=0, max=1, step=0.05,
                      on_change=lambda e: self.set(max_risk=e.value)).classes("w-24")
            ui.select(list(TIME_RANGES), value=self.time_range, label="event time",
                      on_change=lambda e: self.set_time(e.value)).classes("w-40")
            ui.input("assignee", placeholder=UNASSIGNED,
                     on_change=lambda e: self.set(assignee=e.value.strip() or None)
                     ).classes("w-32")
            ui.checkbox("mine", on_change=lambda e: self.set_mine(e.value)
                        ).props("data-testid=filter-mine")
            ui.input("search transaction, account or terminal id",
                     on_change=lambda e: self.set(search=e.value.strip() or None)
                     ).classes("w-72").props("clearable data-testid=search")
            branches = self.console.settings.hub_branches
            if branches:  # at a regional hub: every branch's alerts (docs/hub.md)
                ui.select({"": "any branch", **{b: b for b in branches}}, value="",
                          label="branch", on_change=lambda e: self.set(branch=e.value or None)
                          ).classes("w-32").props("data-testid=filter-branch")
            ui.select(list(SORTS), value=self.query.sort, label="sort",
                      on_change=lambda e: self.set(sort=e.value)).classes("w-32")
        self.table = ui.table(columns=COLUMNS, rows=[], row_key="alert_id").classes("w-full")
        self.table.props("dense flat data-testid=queue")
        self.table.add_slot("body", r"""
            <q-tr :props="props" @click="$parent.$emit('open', props.row)"
                  :class="props.row.selected ? 'bg-blue-100' : ''" class="cursor-pointer"
                  :data-alert-id="props.row.alert_id">
              <q-td v-for="col in props.cols" :key="col.name" :props="props">
                {{ col.value }}
              </q-td>
            </q-tr>""")
        self.table.on("open", lambda e: self.open(int(e.args["alert_id"])))
        with ui.row().classes("items-center gap-2"):
            ui.button("previous", on_click=lambda: self.turn(-1)).props(
                "flat data-testid=page-previous")
            self.pager = ui.label().props("data-testid=pager")
            ui.button("next", on_click=lambda: self.turn(1)).props("flat data-testid=page-next")
            ui.label("keys: j/k move · Enter open · a assign to me · i investigate · "
                     "c close as fraud · d close as not fraud").classes("text-gray-500 text-sm")
        self.closer = CloseDialog()
        ui.keyboard(on_key=self.key)
        self.refresh()
        self.show_links()
        ui.timer(self.console.settings.console_poll_seconds, self.poll)

    def set(self, **changes: Any) -> None:
        self.query = dataclasses.replace(self.query, page=0, **changes)
        self.refresh()

    def set_time(self, value: str) -> None:
        self.time_range = value
        self.set()

    def set_mine(self, value: bool) -> None:
        self.mine = value
        self.set()

    def turn(self, step: int) -> None:
        page = min(max(0, self.query.page + step), self.pages - 1)
        if page != self.query.page:
            self.query = dataclasses.replace(self.query, page=page)
            self.refresh()

    def poll(self) -> None:
        if marker(self.console.reader()) != self.seen or \
                time.time() - self.read_at >= AGE_REFRESH_SECONDS:
            self.refresh()
        self.show_links()

    def show_links(self) -> None:
        """Each branch's link (connected, lagging by N, down since T), read anew."""
        if self.links is None:
            return
        now = time.time()
        shown = [(link, link_text(link, now)) for link in links(self.console.reader(), now)]
        if [text for _, text in shown] == self.link_texts:
            return  # nothing new to draw
        self.link_texts = [text for _, text in shown]
        self.links.clear()
        with self.links:
            for link, text in shown:
                colour = {"connected": "green", "lagging": "orange"}.get(link["state"], "red")
                ui.badge(text, color=colour).props(
                    f"data-testid=link-{link['branch']} data-state={link['state']}")

    def refresh(self) -> None:
        conn = self.console.reader()
        self.seen = marker(conn)
        self.read_at = time.time()
        page = alert_page(conn, self.effective_query())
        self.total = page.total
        self.pages = page.pages(self.query.page_size)
        kept = self.rows[self.selected]["alert_id"] if self.rows else None
        self.rows = [table_row(a, self.read_at) for a in page.alerts]
        ids = [r["alert_id"] for r in self.rows]
        # the selection follows its alert when new ones arrive above it
        self.selected = ids.index(kept) if kept in ids else \
            min(self.selected, max(0, len(self.rows) - 1))
        self.show()

    def show(self) -> None:
        for i, row in enumerate(self.rows):
            row["selected"] = i == self.selected
        self.table.rows = self.rows
        self.table.update()
        self.pager.set_text(f"page {number_text(self.query.page + 1)} of "
                            f"{number_text(self.pages)} · "
                            f"{number_text(self.total)} alerts")

    def open(self, alert_id: int) -> None:
        ui.navigate.to(f"/case/{alert_id}")

    def key(self, e: KeyEventArguments) -> None:
        if not e.action.keydown or not self.rows:
            return
        name = e.key.name
        if name in ("j", "ArrowDown", "k", "ArrowUp"):
            step = 1 if name in ("j", "ArrowDown") else -1
            self.selected = min(max(0, self.selected + step), len(self.rows) - 1)
            self.show()
        elif name == "Enter":
            self.open(self.rows[self.selected]["alert_id"])
        elif name in KEYS:
            row = self.rows[self.selected]
            if KEYS[name] in CLOSE_ACTIONS:
                self.ask_close(row, CLOSE_ACTIONS[KEYS[name]])
            elif act(self.console, row["alert_id"], row["version"], KEYS[name]) is not None:
                self.refresh()

    def ask_close(self, row: dict[str, Any], code: str) -> None:
        """The close dialog for the selected row (only for someone who may close it)."""
        if self.console.act("analyst") is None:
            return
        alert_id, version = row["alert_id"], row["version"]

        def apply(disposition: str, fraud_type: str | None) -> bool:
            done = act(self.console, alert_id, version, "close", disposition, fraud_type)
            if done is not None:
                self.refresh()
            return done is not None

        self.closer.open(f"Close alert {alert_id}", code, None, apply,
                         f"alert {alert_id}")


def queue_page(console: Console) -> None:
    user = signed_in(console, "Queue")
    if user is None:
        return
    QueueView(console, user).build()
