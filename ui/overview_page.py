"""The overview: throughput, alert rate, latency and severity mix over the last hour
(charts redrawn every few seconds from overview.overview), top terminals and reasons,
model and rules versions, dead letters, and how long ago the node last stored a
transaction (red after a minute of silence)."""

from __future__ import annotations

import time
from typing import Any

from nicegui import ui

from appliance.overview import overview
from appliance.score import SEVERITIES

from .layout import signed_in
from .session import Console

REFRESH_SECONDS = 3.0
STALE_SECONDS = 60.0
"""Shown in red when nothing was stored for this long (the scorer or the feed stopped)."""


def _line(name: str, unit: str) -> dict[str, Any]:
    return {"title": {"text": name, "textStyle": {"fontSize": 13}},
            "tooltip": {"trigger": "axis"}, "xAxis": {"type": "time"},
            "yAxis": {"type": "value", "name": unit},
            "series": [{"type": "line", "showSymbol": False, "data": []}]}


def overview_page(console: Console) -> None:
    user = signed_in(console, "Overview")
    if user is None:
        return
    with ui.row().classes("gap-8 items-center"):
        totals = ui.label().classes("text-lg").props("data-testid=overview-totals")
        versions = ui.label().props("data-testid=overview-versions")
        dead = ui.label().props("data-testid=overview-dead-letters")
        pulse = ui.label().props("data-testid=overview-pulse")
    with ui.grid(columns=2).classes("w-full"):
        throughput = ui.echart(_line("transactions per minute", "tx")).classes("h-56")
        rate = ui.echart(_line("alert rate per minute", "%")).classes("h-56")
        latency = ui.echart(_line("event-to-stored latency (mean)", "s")).classes("h-56")
        severity = ui.echart({"title": {"text": "severity mix (last hour)",
                                        "textStyle": {"fontSize": 13}},
                              "tooltip": {}, "series": [{"type": "pie", "data": []}]}
                             ).classes("h-56")
    with ui.row().classes("w-full gap-8"):
        terminals = ui.table(columns=[{"name": "terminal_id", "label": "top terminals",
                                       "field": "terminal_id", "align": "left"},
                                      {"name": "alerts", "label": "alerts",
                                       "field": "alerts"}], rows=[], row_key="terminal_id")
        reasons = ui.table(columns=[{"name": "reason", "label": "top reasons",
                                     "field": "reason", "align": "left"},
                                    {"name": "alerts", "label": "alerts", "field": "alerts"}],
                           rows=[], row_key="reason")

    def refresh() -> None:
        o = overview(console.reader(), time.time())
        series = o["series"]
        throughput.options["series"][0]["data"] = [[p["at"] * 1000, p["transactions"]]
                                                   for p in series]
        rate.options["series"][0]["data"] = [
            [p["at"] * 1000, round(100 * p["alerts"] / p["transactions"], 2)
             if p["transactions"] else 0] for p in series]
        latency.options["series"][0]["data"] = [[p["at"] * 1000, round(p["latency_seconds"], 3)]
                                                for p in series]
        severity.options["series"][0]["data"] = [{"name": s, "value": o["by_severity"][s]}
                                                 for s in SEVERITIES if s in o["by_severity"]]
        for chart in (throughput, rate, latency, severity):
            chart.update()
        totals.set_text(f"last hour: {o['transactions']} transactions, {o['alerts']} alerts "
                        f"({100 * o['alert_rate']:.2f}%)")
        versions.set_text(f"model {o['model_version'] or '—'} · rules {o['rules_version']}")
        dead.set_text(f"dead letters: {o['dead_letters']}")
        last = o["last_stored_at"]
        quiet = None if last is None else time.time() - last
        pulse.set_text("node: nothing scored yet" if quiet is None else
                       f"node: last transaction stored {quiet:.0f} s ago")
        pulse.classes(replace="text-red-700 font-bold" if quiet is None or
                      quiet > STALE_SECONDS else "")
        terminals.rows = o["top_terminals"]
        reasons.rows = o["top_reasons"]
        terminals.update()
        reasons.update()

    refresh()
    ui.timer(REFRESH_SECONDS, refresh)
