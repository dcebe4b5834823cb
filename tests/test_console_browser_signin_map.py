"""In a real headless Chromium against the real node and server: the session cookie is a
new one after signing in (the one from before no longer signs anybody in), and the case
page draws the account's terminals as map markers with no tile server at all."""

from __future__ import annotations

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from appliance.casework.terminal_directory import simulated_sites, write_sites
from appliance.feed.terminal import population
from tests.console_support import browser, log_in, screenshot, text_of, wait_for  # noqa: F401
from tests.support import query
from tests.test_console_browser import Console, console  # noqa: F401


def test_cookie_rotated_and_map_markers_without_tiles(console: Console,  # noqa: F811
                                                      browser: WebDriver) -> None:  # noqa: F811
    settings = console.settings
    accounts, terminals = population(5.0)  # the world of make_transactions(seed=5)
    write_sites(settings.db_path, simulated_sites(5, accounts=accounts, terminals=terminals,
                                                  branch="BR001"), "test", "test")
    browser.get(f"{console.base}/login")
    wait_for(browser, lambda d: d.get_cookie("session"), message="a session cookie")
    before = browser.get_cookie("session")["value"]  # type: ignore[index]
    log_in(browser, console.base, "alice", console.passwords["alice"])
    after = browser.get_cookie("session")["value"]  # type: ignore[index]
    assert after != before

    # the alert whose account used the most terminals with a place
    alert_id, account, terminal, placed = query(
        settings.db_path, "SELECT a.alert_id, a.account_id, a.terminal_id, (SELECT "
        "count(DISTINCT t.terminal_id) FROM transactions t JOIN terminals d USING "
        "(terminal_id) WHERE t.account_id = a.account_id AND d.latitude IS NOT NULL) AS n "
        "FROM alerts a ORDER BY n DESC, a.alert_id LIMIT 1")[0]
    assert placed >= 1
    browser.get(f"{console.base}/case/{alert_id}")
    wait_for(browser, lambda d: text_of(d, "tx-terminal_id") == terminal, message="case")
    markers = wait_for(browser, lambda d: (lambda m: m if len(m) == placed else None)(
        d.find_elements(By.CSS_SELECTOR, "[data-testid=terminal-map] path.leaflet-interactive")),
        message=f"{placed} markers")
    fills = [m.get_attribute("fill") for m in markers]
    own = query(settings.db_path, "SELECT latitude FROM terminals WHERE terminal_id = ?",
                [terminal])[0][0]
    assert fills.count("#dc2626") == (1 if own is not None else 0)
    assert browser.find_elements(By.CSS_SELECTOR, "img.leaflet-tile") == []
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})",
                           browser.find_element(By.CSS_SELECTOR, "[data-testid=terminal-map]"))
    screenshot(browser, "console-case-map")

    # the cookie from before signing in opens nothing
    browser.delete_all_cookies()
    browser.add_cookie({"name": "session", "value": before, "path": "/"})
    browser.get(f"{console.base}/case/{alert_id}")
    wait_for(browser, lambda d: d.current_url.endswith("/console/login"),
             message="the old cookie is sent to the login page")
