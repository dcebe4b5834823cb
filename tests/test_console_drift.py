"""Drift status on the overview: the latest ``drift run`` (real run_drift on a real node
database), its per-feature and score PSI, and the warning state above the threshold."""

from __future__ import annotations

import sqlite3

from nicegui.testing import User

from appliance.casework.numbers import number_text
from appliance.casework.overview import drift_status
from appliance.learning.drift import run_drift
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import node_db  # noqa: F401
from tests.console_support import add_user
from tests.test_console_pages import sign_in, simulate, table_with

RECENT = 30 / 86400  # the last 30 s of the 60 s of stored traffic against the 30 s before


def latest(settings: Settings, threshold: float) -> dict[str, object] | None:
    conn = sqlite3.connect(settings.db_path)
    try:
        return drift_status(conn, threshold)
    finally:
        conn.close()


def test_drift_status_is_the_latest_run(node_db: tuple[Settings, Store]  # noqa: F811
                                        ) -> None:
    settings = node_db[0]
    assert latest(settings, 0.2) is None
    run_drift(settings, days=1e-9)  # an earlier run, of almost nothing
    report = run_drift(settings, days=RECENT)
    status = latest(settings, 0.2)
    assert status is not None
    assert status["psi"] == report.psi and status["rows"] == report.rows
    assert status["model_version"] == "if-v1" and "risk" in report.psi
    top = max(report.psi, key=lambda n: report.psi[n])
    low = latest(settings, report.psi[top] / 2)
    assert low is not None and top in low["drifted"]  # type: ignore[operator]
    assert latest(settings, report.psi[top] + 1)["drifted"] == []  # type: ignore[index]


def test_overview_shows_drift_and_warns_above_the_threshold(node_db: tuple[Settings, Store]  # noqa: F811
                                                            ) -> None:
    settings = node_db[0]
    password = add_user(settings, "vera", "viewer")

    async def never(user: User) -> None:
        await sign_in(user, "vera", password)
        await user.open("/overview")
        await user.should_see("drift: never checked (branchguard drift run)")

    simulate(settings, never)
    report = run_drift(settings, days=RECENT)
    top = max(report.psi.values())
    score = report.psi["risk"]

    async def warned(user: User) -> None:
        await sign_in(user, "vera", password)
        await user.open("/overview")
        await user.should_see(f"score PSI {number_text(score)}")  # as people write it
        await user.should_see("WARNING:")
        rows = table_with(user, "overview-drift-table").rows
        assert {r["name"] for r in rows} == {*(n for n in report.psi if n != "risk"),
                                             "risk score"}
        assert all(r["state"] == "above threshold" for r in rows
                   if float(r["psi"]) > top / 2)

    simulate(settings, warned, drift_psi_threshold=str(top / 2))

    async def stable(user: User) -> None:
        await sign_in(user, "vera", password)
        await user.open("/overview")
        await user.should_see(f"stable (all at or below {number_text(top + 1)})")
        await user.should_not_see("WARNING:")

    simulate(settings, stable, drift_psi_threshold=str(top + 1))
