"""The models page (supervisor and admin): the registry (every version, its stage and card
metrics), the production pointer and its history, production and shadow metrics side by side
with their intervals and the shadow's paired difference (backtest.compare_shadow, what
``branchguard evaluate --compare`` prints), and promote and roll back, and a model's stage
(shadow, candidate, retired), each behind a confirmation dialog and audited (promotion.py).

Viewers and analysts get a refusal and nothing else; every action checks the role again when
it runs (Console.act), so a button enabled by a tampered client still does nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from nicegui import run, ui

from appliance.casework.keys import role_at_least
from appliance.casework.numbers import number_text
from appliance.errors import BranchguardError
from appliance.learning.backtest import compare_shadow
from appliance.learning.evaluation import HEADINGS, METRICS, Metric
from appliance.learning.promotion import has_labels, model_history, promote, rollback, set_stage
from appliance.scoring.registry import Registry, RegistryState

from .layout import signed_in, when
from .session import Console

ROLE = "supervisor"
STAGES = {
    "shadow": "It will score every live batch beside production (stored, never acted on); "
              "an earlier shadow goes back to candidate.",
    "candidate": "It stops shadowing, if it did, and waits.",
    "retired": "It is kept for the record and no longer used.",
}
"""The stages the page can set, with what each means (production is Promote's)."""
RESAMPLES = 200
"""Bootstrap resamples of the comparison's intervals (``evaluate --compare``'s default)."""
CARD_METRICS = ("average_precision", "roc_auc", "precision", "recall", "f1", "alerts_per_day")


def _cell(value: Any) -> str:
    return number_text(value) if isinstance(value, (int, float)) else \
        "" if value is None else str(value)


def metric_text(metric: Metric) -> str:
    """A metric with its interval, as people write numbers (Metric.show is for the CLI)."""
    if metric.value is None:
        return "n/a"
    if metric.low is None or metric.high is None:
        return number_text(metric.value)
    return f"{number_text(metric.value)} [{number_text(metric.low)}, {number_text(metric.high)}]"


def _moved(state: dict[str, Any] | None, entry: dict[str, Any]) -> str:
    """What an audited registry change moved: the production model, or for a stage change
    the model's stage."""
    state = state or {}
    if entry["action"] != "model.stage":
        return str(state.get("production", ""))
    version = entry["subject"].removeprefix("model:")
    return str((state.get("stages") or {}).get(version, "as registered"))


def comparison_rows(table: list[tuple[str, dict[str, Metric]]], k: int, budget: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """compare_shadow's rows turned sideways: one row per metric, one column per model."""
    columns = [{"name": "metric", "label": "metric", "field": "metric", "align": "left"}]
    columns += [{"name": f"m{i}", "label": name, "field": f"m{i}", "align": "right"}
                for i, (name, _) in enumerate(table)]
    rows = [{"metric": HEADINGS[m].format(k=k, budget=budget),
             **{f"m{i}": metric_text(metrics[m]) for i, (_, metrics) in enumerate(table)}}
            for m in METRICS]
    return columns, rows


class ModelsView:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.registry = Registry.of(console.settings)

    @ui.refreshable_method
    def body(self) -> None:
        state = self.registry.state()
        listing = self.registry.listing()
        with ui.card().classes("w-full"):
            ui.label(f"In production: {state.production}").classes("text-xl font-bold").props(
                "data-testid=models-production")
            ui.label(f"since {state.changed_at or 'first start (configured model_version)'}"
                     + (f" · reason: {state.reason}" if state.reason else ""))
            ui.label("Earlier production models (newest first): "
                     + (", ".join(reversed(state.history)) or "none")).props(
                "data-testid=models-history")
            with ui.row().classes("items-end gap-2"):
                others = [r["version"] for r in listing if r["version"] != state.production]
                choice = ui.select(others, label="model to promote").classes("w-64").props(
                    "data-testid=models-promote-choice")
                reason = ui.input("reason", value="manual").classes("w-64")
                ui.button("Promote…", on_click=lambda: self.confirm_promote(
                    choice.value, reason.value)).props("data-testid=models-promote")
                back = ui.button("Roll back…", on_click=lambda: self.confirm_rollback(
                    state.history[-1] if state.history else None, reason.value)).props(
                    "outline data-testid=models-rollback")
                if not state.history:
                    back.disable()
                    back.tooltip("no earlier production model is recorded")
            with ui.row().classes("items-end gap-2"):
                staged = ui.select(others, label="model").classes("w-64").props(
                    "data-testid=models-stage-choice")
                stage = ui.select(list(STAGES), label="new stage").classes("w-40").props(
                    "data-testid=models-stage-value")
                ui.button("Set stage…", on_click=lambda: self.confirm_stage(
                    staged.value, stage.value, reason.value)).props(
                    "outline data-testid=models-stage")
        ui.label("Registry").classes("font-bold mt-4")
        columns = [{"name": k, "label": k, "field": k, "align": "left"} for k in
                   ("version", "stage", "created", "parent", "algorithm", "average_precision",
                    "f1")]
        ui.table(columns=columns, rows=[{**r, "average_precision": _cell(
            r["average_precision"]), "f1": _cell(r["f1"])} for r in listing],
            row_key="version").props("dense flat data-testid=models-registry")
        for row in listing:
            card = self.registry.card(row["version"])
            with ui.expansion(f"card of {row['version']}").classes("w-full"):
                metrics = card.get("metrics") or {}
                ui.label(", ".join(f"{m} {_cell(metrics[m])}" for m in CARD_METRICS
                                   if m in metrics) or "no metrics on this card")
                ui.code(json.dumps(card, indent=2, sort_keys=True), language="json").classes(
                    "w-full")
        self.history()

    def history(self) -> None:
        ui.label("Promotions, rollbacks and stage changes (audit trail)").classes(
            "font-bold mt-4")
        rows = [{"seq": e["seq"], "at": when(e["at"]), "actor": e["actor"],
                 "action": e["action"], "subject": e["subject"],
                 "from": _moved(e["before"], e), "to": _moved(e["after"], e),
                 "reason": (e["after"] or {}).get("reason", "")}
                for e in model_history(self.console.reader())]
        ui.table(columns=[{"name": k, "label": k, "field": k, "align": "left"} for k in
                          ("seq", "at", "actor", "action", "subject", "from", "to", "reason")],
                 rows=rows, row_key="seq").props("dense flat data-testid=models-audit")

    def confirm(self, text: str, action: Any) -> None:
        with ui.dialog() as dialog, ui.card():
            ui.label(text).props("data-testid=models-confirm-text")
            with ui.row():
                ui.button("Yes, do it", on_click=lambda: (dialog.close(), action())).props(
                    "data-testid=models-confirm")
                ui.button("Cancel", on_click=dialog.close).props("flat")
        dialog.open()

    def confirm_promote(self, version: str | None, reason: str) -> None:
        if version is None:
            ui.notify("choose a model to promote", type="warning")
            return
        self.confirm(f"Put {version} in production? The scorer switches to it within "
                     f"{self.console.settings.model_check_seconds:g} s.",
                     lambda: self.change(reason, lambda conn, actor, why: promote(
                         conn, self.registry, version, actor, why), _in_production))

    def confirm_stage(self, version: str | None, stage: str | None, reason: str) -> None:
        if version is None or stage is None:
            ui.notify("choose a model and its new stage", type="warning")
            return
        self.confirm(f"Move {version} to {stage}? {STAGES[stage]}",
                     lambda: self.change(reason, lambda conn, actor, why: set_stage(
                         conn, self.registry, version, stage, actor, why),
                         lambda _: f"{version} is now {stage}"))

    def confirm_rollback(self, previous: str | None, reason: str) -> None:
        if previous is None:
            ui.notify("no earlier production model is recorded", type="warning")
            return
        self.confirm(f"Roll back to {previous}?",
                     lambda: self.change(reason, lambda conn, actor, why: rollback(
                         conn, self.registry, actor, why), _in_production))

    def change(self, reason: str,
               make: Callable[[sqlite3.Connection, str, str], RegistryState],
               said: Callable[[RegistryState], str]) -> None:
        """One audited registry change (``make`` of the connection, actor and reason), once
        the role is checked again; then what ``said`` makes of the new state."""
        user = self.console.act(ROLE)
        if user is None:
            return
        why = (reason or "").strip() or "manual"
        try:
            state = self.console.change(lambda conn: make(conn, user.actor, why))
        except BranchguardError as exc:
            ui.notify(f"{exc.message} ({exc.hint})" if exc.hint else exc.message,
                      type="warning")
            return
        ui.notify(said(state), type="positive")
        self.body.refresh()


def _in_production(state: RegistryState) -> str:
    return f"{state.production} is in production"


class ComparisonView:
    """Production against the shadow model, computed on demand (it reads every shadowed
    transaction). The point values come first; the 95 % bootstrap intervals, the same as
    ``branchguard evaluate --compare`` prints, replace them when they are done (resampling
    takes seconds on a week of traffic, and the team should not wait for it to see AP)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.box = ui.column().classes("w-full").props("data-testid=models-comparison")
        self.generation = 0  # a new click supersedes a comparison still being computed

    async def compute(self) -> None:
        settings = self.console.settings
        self.generation += 1
        mine = self.generation
        self.box.clear()
        with self.box:
            ui.label("comparing…")
        labelled = has_labels(self.console.reader())
        for resamples, caption in (
                (0, "computing 95 % bootstrap intervals…"),
                (RESAMPLES, f"with 95 % bootstrap intervals ({RESAMPLES} resamples; the two "
                            "models are judged on the same transactions)")):
            try:  # the second pass can fail too: retention may drop the shadow scores
                table = await run.io_bound(compare_shadow, settings, resamples=resamples)
            except BranchguardError as exc:
                self.box.clear()
                with self.box:
                    ui.label(f"{exc.message}: {exc.hint}" if exc.hint else exc.message)
                return
            if table is None or mine != self.generation:  # shutting down, or clicked again
                return
            self._show(table, labelled, caption)

    def _show(self, table: list[tuple[str, dict[str, Metric]]], labelled: bool,
              caption: str) -> None:
        k, budget = 100, int(self.console.settings.alert_budget_per_day)
        columns, rows = comparison_rows(table, k, budget)
        self.box.clear()
        with self.box:
            if not labelled:
                ui.label("No labels are stored yet (branchguard labels import, or cases "
                         "closed in the console): every transaction counts as genuine, so "
                         "only alerts/day means anything below.").classes(
                    "text-orange-700 font-bold").props("data-testid=models-no-labels")
            ui.label(caption).classes("text-sm text-gray-600").props(
                "data-testid=models-comparison-caption")
            ui.table(columns=columns, rows=rows, row_key="metric").props(
                "dense flat data-testid=models-comparison-table")


def models_page(console: Console) -> None:
    user = signed_in(console, "Models")
    if user is None:
        return
    if not role_at_least(user.role, ROLE):
        ui.label(f"The models page needs the {ROLE} role or above; you are {user.role}."
                 ).props("data-testid=models-refused")
        return
    ModelsView(console).body()
    ui.label("Production and shadow, side by side").classes("font-bold mt-4")
    button = ui.button("Compare production and shadow").props(
        "outline data-testid=models-compare")
    button.on_click(ComparisonView(console).compute)
