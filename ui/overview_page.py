"""The overview: throughput, alert rate, latency and severity mix over the last hour
(charts redrawn every few seconds from overview.overview), top terminals and reasons,
model and rules versions, dead letters, how long ago the node last stored a transaction
(red after a minute of silence), and the latest drift run: PSI per feature and of the risk
score, in a warning state when any is above ``drift_psi_threshold``."""

from __future__ import annotations

import time
from typing import Any

from nicegui import ui

from appliance.casework.numbers import age_text, number_text, percent_text
from appliance.casework.overview import drift_status, overview
from appliance.verdict import SEVERITIES

from .layout import signed_in, when
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
    with ui.card().classes("w-full"):
        drift = ui.label().classes("font-bold").props("data-testid=overview-drift")
        drift_table = ui.table(columns=[
            {"name": "name", "label": "feature", "field": "name", "align": "left"},
            {"name": "psi", "label": "PSI", "field": "psi"},
            {"name": "state", "label": "", "field": "state", "align": "left"}],
            rows=[], row_key="name").props("dense flat data-testid=overview-drift-table")
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
        o = overview(console.reader(), time.time(),
                     ahead_seconds=console.settings.max_clock_skew_seconds)
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
        totals.set_text(f"last hour: {number_text(o['transactions'])} transactions, "
                        f"{number_text(o['alerts'])} alerts ({percent_text(o['alert_rate'], 2)})")
        versions.set_text(f"model {o['model_version'] or '—'} · rules {o['rules_version']}")
        dead.set_text(f"dead letters: {number_text(o['dead_letters'])}")
        last = o["last_stored_at"]
        quiet = None if last is None else time.time() - last
        pulse.set_text("node: nothing scored yet" if quiet is None else
                       f"node: last transaction stored {age_text(quiet)} ago")
        pulse.classes(replace="text-red-700 font-bold" if quiet is None or
                      quiet > STALE_SECONDS else "")
        show_drift(drift_status(console.reader(), console.settings.drift_psi_threshold))
        terminals.rows = [{**t, "alerts": number_text(t["alerts"])} for t in o["top_terminals"]]
        reasons.rows = [{**r, "alerts": number_text(r["alerts"])} for r in o["top_reasons"]]
        terminals.update()
        reasons.update()

    def show_drift(status: dict[str, Any] | None) -> None:
        if status is None:
            drift.set_text("drift: never checked (branchguard drift run)")
            drift.classes(replace="")
            drift_table.rows = []
        else:
            psi = status["psi"]
            head = (f"drift: checked {when(status['run_at'])} on {status['model_version']}, "
                    f"{number_text(status['rows'])} transactions of {when(status['window'][0])} "
                    f"to {when(status['window'][1])}; score PSI "
                    f"{number_text(psi.get('risk', 0.0))}")
            if status["drifted"]:
                drift.set_text(f"{head} · WARNING: {', '.join(status['drifted'])} above "
                               f"{number_text(status['threshold'])}")
                drift.classes(replace="font-bold text-red-700")
            else:
                drift.set_text(f"{head} · stable (all at or below "
                               f"{number_text(status['threshold'])})")
                drift.classes(replace="font-bold text-green-800")
            drift_table.rows = [
                {"name": "risk score" if name == "risk" else name, "psi": number_text(value),
                 "state": "above threshold" if name in status["drifted"] else ""}
                for name, value in sorted(psi.items(), key=lambda kv: -kv[1])]
        drift_table.update()

    refresh()
    ui.timer(REFRESH_SECONDS, refresh)
