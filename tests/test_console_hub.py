"""The hub's console in a real headless Chromium (issue 20): two branches (each the
embedded node as a leaf node) and a hub (``branchguard hub run`` and ``branchguard serve``),
all real processes. The queue shows both branches' alerts side by side, each row naming its
branch, and each branch's link; the branch filter keeps one; a case of one branch closed at
the hub becomes the label at that branch."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from appliance.bench.hub import HubSite, publish
from appliance.bench.partition_scorers import wait_until
from tests.api_support import ServeProcess
from tests.console_support import (add_user, browser, choose, click, log_in,  # noqa: F401
                                   queue_rows, screenshot, text_of, wait_for)
from tests.test_case_flows import query

BRANCHES = ("br1", "br2")


def branch_cells(driver: WebDriver) -> list[str]:
    """The branch column of every row shown, read in one go (the queue re-renders)."""
    return list(driver.execute_script("""
        const heads = [...document.querySelectorAll('[data-testid=queue] th')]
            .map(th => th.textContent.trim());
        const at = heads.indexOf('branch');
        return [...document.querySelectorAll('tr[data-alert-id]')]
            .map(tr => tr.querySelectorAll('td')[at].textContent.trim());"""))


@pytest.mark.timeout(400)
def test_the_hub_console_shows_every_branch_and_its_closing_reaches_the_branch(
        tmp_path: Path, browser: WebDriver) -> None:  # noqa: F811
    site = HubSite(tmp_path, BRANCHES)
    server: ServeProcess | None = None
    try:
        assert site.wait_ready(90)
        for start in range(0, 60, 5):  # in turns, so the newest page has both branches'
            for i, b in enumerate(BRANCHES):
                publish(site.urls[b], b, 21 + i, start, 5)
                wait_until(lambda b=b, start=start: len(query(
                    site.hub_db, "SELECT 1 FROM transactions WHERE branch = ?", b)) > 0, 5)
        assert wait_until(lambda: all(site.branch_alerts(b) for b in BRANCHES)
                          and site.all_at_hub(), 90), site.analyst.log.read_text()[-3000:]
        settings = site.hub_settings()
        password = add_user(settings, "alice", "analyst")
        server = ServeProcess.start(settings, {"BRANCHGUARD_CONFIG": str(
            site.out / "hub.toml")})
        base = f"{server.url}/console"

        log_in(browser, base, "alice", password)
        for b in BRANCHES:  # each branch's link, above the queue
            wait_for(browser, lambda d, b=b: text_of(d, f"link-{b}").startswith(
                f"{b}: connected"),
                     message=f"{b}'s link")
        wait_for(browser, lambda d: set(branch_cells(d)) == set(BRANCHES),
                 message="both branches' alerts side by side")
        screenshot(browser, "hub-console-queue")

        choose(browser, "filter-branch", "br2")
        wait_for(browser, lambda d: branch_cells(d) and set(branch_cells(d)) == {"br2"},
                 message="only br2's alerts")
        alert_id = int(queue_rows(browser)[0].get_attribute("data-alert-id") or 0)
        [(tid,)] = query(site.hub_db, "SELECT transaction_id FROM alerts WHERE alert_id = ?",
                         alert_id)
        queue_rows(browser)[0].click()
        wait_for(browser, lambda d: d.current_url.endswith(f"/console/case/{alert_id}"),
                 message="case page")
        click(browser, "action-confirm")
        choose(browser, "close-fraud-type", "amount_spike")
        click(browser, "close-confirm")
        wait_for(browser, lambda d: text_of(d, "case-status") == "CONFIRMED_FRAUD",
                 message="closed at the hub")
        screenshot(browser, "hub-console-closed")

        assert wait_until(lambda: query(site.branch_db("br2"), "SELECT label, typology, "
                                        "source FROM labels WHERE transaction_id = ?", tid)
                          == [(1, "amount_spike", "analyst:hub/user:alice")], 30), (
            site.nodes["br2"].log.read_text()[-3000:])
        assert query(site.branch_db("br1"), "SELECT count(*) FROM labels") == [(0,)]
    finally:
        if server is not None:
            server.stop()
        site.stop()
