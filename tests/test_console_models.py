"""The models page with NiceGUI's simulated user: the registry and its production pointer,
promote and roll back behind a confirmation (audited, chain intact), production against
shadow side by side (with the CLI's intervals), and the refusal for viewers and analysts."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from nicegui import ui
from nicegui.testing import User

from appliance.audit import verify
from appliance.learning.backtest import compare_shadow
from appliance.learning.evaluation import HEADINGS, METRICS
from ui.models_page import metric_text
from appliance.scoring.labels import import_labels, write_label_file
from appliance.scoring.registry import Registry
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import node_db  # noqa: F401
from tests.console_support import add_user
from tests.support import query
from tests.test_console_pages import sign_in, simulate, table_with
from tests.test_registry import copy_shipped


def model_actions(settings: Settings) -> list[tuple[str, str, str]]:
    return [(r[0], r[1], r[2]) for r in query(
        settings.db_path, "SELECT actor, action, subject FROM audit_log WHERE action LIKE "
        "'model.%' ORDER BY seq")]


def add_shadow_scores(settings: Settings, version: str, count: int) -> None:
    conn = sqlite3.connect(settings.db_path)
    with conn:
        conn.execute(
            "INSERT INTO shadow_scores (transaction_id, model_version, model_risk, risk, "
            "decision) SELECT transaction_id, ?, model_risk, risk, CASE WHEN risk > 0.9 THEN "
            "'review' ELSE 'approve' END FROM transactions ORDER BY ts LIMIT ?",
            (version, count))
    conn.close()


def supervisor_and_candidate(settings: Settings) -> tuple[str, Registry]:
    """Supervisor sam (his password) and a candidate model m-b beside the shipped if-v1."""
    copy_shipped(settings.data_dir / "models", "m-b")
    return add_user(settings, "sam", "supervisor"), Registry.of(settings)


async def open_models(user: User, username: str, password: str) -> None:
    await sign_in(user, username, password)
    await user.open("/models")


def test_supervisor_promotes_and_rolls_back(node_db: tuple[Settings, Store]  # noqa: F811
                                            ) -> None:
    settings = node_db[0]
    password, registry = supervisor_and_candidate(settings)

    async def scenario(user: User) -> None:
        await open_models(user, "sam", password)
        await user.should_see("In production: if-v1")
        await user.should_see("card of m-b")
        await user.should_see("Earlier production models (newest first): none")
        user.find("model to promote").elements.pop().set_value("m-b")
        user.find("Promote…").click()
        await user.should_see("Put m-b in production?")
        user.find("Cancel").click()
        assert registry.production() == "if-v1"
        user.find("Promote…").click()
        user.find("Yes, do it").click()
        await user.should_see("m-b is in production")
        await user.should_see("In production: m-b")
        assert registry.production() == "m-b"
        assert registry.stage("if-v1") == "retired"
        user.find("Roll back…").click()
        await user.should_see("Roll back to if-v1?")
        user.find("Yes, do it").click()
        await user.should_see("if-v1 is in production")
        assert registry.production() == "if-v1"

    simulate(settings, scenario)
    assert model_actions(settings) == [("user:sam", "model.promote", "model:m-b"),
                                       ("user:sam", "model.rollback", "model:if-v1")]
    before, after = query(settings.db_path, "SELECT before, after FROM audit_log WHERE "
                          "action = 'model.promote'")[0]
    assert '"production":"if-v1"' in before and '"production":"m-b"' in after
    conn = sqlite3.connect(settings.db_path)
    assert verify(conn).broken_seq is None
    conn.close()


def select_with(user: User, testid: str) -> ui.select:
    return next(e for e in user.find(ui.select).elements if e.props.get("data-testid") == testid)


def test_supervisor_sets_a_models_stage(node_db: tuple[Settings, Store]  # noqa: F811
                                       ) -> None:
    settings = node_db[0]
    password, registry = supervisor_and_candidate(settings)

    async def scenario(user: User) -> None:
        await open_models(user, "sam", password)
        select_with(user, "models-stage-choice").set_value("m-b")
        select_with(user, "models-stage-value").set_value("shadow")
        user.find("Set stage…").click()
        await user.should_see("Move m-b to shadow?")
        user.find("Cancel").click()
        assert registry.shadow() is None
        user.find("Set stage…").click()
        user.find("Yes, do it").click()
        await user.should_see("m-b is now shadow")
        assert registry.shadow() == "m-b" and registry.production() == "if-v1"
        for _ in range(50):  # the page refreshes after the notification
            rows = table_with(user, "models-audit").rows
            if rows:
                break
            await asyncio.sleep(0.1)
        assert [(r["action"], r["from"], r["to"]) for r in rows] == [
            ("model.stage", "as registered", "shadow")]

    simulate(settings, scenario)
    assert model_actions(settings) == [("user:sam", "model.stage", "model:m-b")]


def test_production_and_shadow_side_by_side(node_db: tuple[Settings, Store]  # noqa: F811
                                            ) -> None:
    settings = node_db[0]
    password = add_user(settings, "ada", "admin")

    async def scenario(user: User) -> None:
        await sign_in(user, "ada", password)
        await user.open("/models")
        user.find("Compare production and shadow").click()
        await user.should_see("no shadow scores stored in that period")
        add_shadow_scores(settings, "m-shadow", 120)
        user.find("Compare production and shadow").click()
        await user.should_see("No labels are stored yet")
        table = table_with(user, "models-comparison-table")
        assert [c["label"] for c in table.columns] == [
            "metric", "live (m-test) on the 120 shadowed by m-shadow",
            "shadow m-shadow (stored scores)", "shadow m-shadow − live (paired)"]
        rows = table.rows
        metrics = [r["metric"] for r in rows]
        assert metrics[0] == "ROC AUC" and "alerts/day" in metrics
        alerts_row = next(r for r in rows if r["metric"] == "alerts/day")
        assert alerts_row["m0"] != alerts_row["m1"]  # live and shadow decided differently
        assert float(alerts_row["m2"]) == pytest.approx(
            float(alerts_row["m1"]) - float(alerts_row["m0"]), abs=2e-3)

    simulate(settings, scenario)


def test_the_comparison_gains_the_clis_bootstrap_intervals(
        node_db: tuple[Settings, Store], tmp_path: Path) -> None:  # noqa: F811
    settings = node_db[0]
    password = add_user(settings, "ada", "admin")
    add_shadow_scores(settings, "m-shadow", 120)
    shadowed = [r[0] for r in query(settings.db_path, "SELECT transaction_id FROM "
                                    "shadow_scores ORDER BY transaction_id")]
    write_label_file(tmp_path / "labels.csv", [(t, int(n % 5 == 0), 0.0)
                                               for n, t in enumerate(shadowed)])
    import_labels(settings.db_path, tmp_path / "labels.csv")
    cli = compare_shadow(settings)  # what `branchguard evaluate --compare` prints
    expected = {HEADINGS[m].format(k=100, budget=int(settings.alert_budget_per_day)):
                [metric_text(metrics[m]) for _, metrics in cli] for m in METRICS}  # the CLI's
    # figures, written as people write numbers
    assert len(cli) == 3 and all("[" in cell for cell in expected["AP"])

    async def scenario(user: User) -> None:
        await sign_in(user, "ada", password)
        await user.open("/models")
        user.find("Compare production and shadow").click()
        caption = ""
        for _ in range(600):  # the intervals replace the point values when they are done
            caption = next((c.text for c in user.find(ui.label).elements
                            if c.props.get("data-testid") == "models-comparison-caption"), "")
            if caption.startswith("with 95 %"):
                break
            await asyncio.sleep(0.1)
        assert caption.startswith("with 95 % bootstrap intervals (200 resamples")
        rows = table_with(user, "models-comparison-table").rows
        assert {r["metric"]: [r["m0"], r["m1"], r["m2"]] for r in rows} == expected

    simulate(settings, scenario)


def test_viewers_and_analysts_are_refused(node_db: tuple[Settings, Store]  # noqa: F811
                                          ) -> None:
    settings = node_db[0]
    copy_shipped(settings.data_dir / "models", "m-b")
    passwords = {name: add_user(settings, name, role)
                 for name, role in (("vera", "viewer"), ("alice", "analyst"))}

    async def scenario(user: User) -> None:
        for name, password in passwords.items():
            await sign_in(user, name, password)
            await user.should_not_see("Models")  # no link in the header
            await user.open("/models")
            await user.should_see("The models page needs the supervisor role or above")
            await user.should_not_see("Promote…")
            await user.should_not_see("In production")
            user.find("Log out").click()
            await user.should_see("Sign in")

    simulate(settings, scenario)
    assert Registry.of(settings).production() == "if-v1"
    assert model_actions(settings) == []
