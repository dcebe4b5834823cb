"""The dead-letter section in a real headless Chromium against ``branchguard serve``: an
analyst sees what the scorer refused, newest first, filters by reason, and opens one to
read its body, shown as text (markup not run, a right-to-left override written out, not
obeyed); a viewer is refused and not offered the link."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from appliance.settings import Settings
from appliance.store import DeadLetter, Store
from tests.api_support import ServeProcess, api_settings
from tests.console_support import (add_user, browser, click, field, find,  # noqa: F401
                                   log_in, screenshot, text_of, wait_for)

XSS = '{"transaction_id": "<img src=x onerror=window.__xss=1><script>window.__xss=2</script>'
RLO = '{"location": "\u202egnp.exe"}'


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Settings, str, dict[str, str]]]:
    settings = api_settings(tmp_path)
    store = Store.open(settings.db_path)
    letters = [DeadLetter(10 + i, f"tx.BR001.T{i}.A{i}", f"bad json: number {i}", 2, b"{}")
               for i in range(3)]
    letters += [DeadLetter(20, "tx.BR001.T9.A9", "bad json: object keys", len(XSS),
                           XSS.encode()),
                DeadLetter(21, "tx.BR001.T8.A8", "invalid: location", len(RLO.encode()),
                           RLO.encode())]
    store.save_batch([], letters, "scorer", 21)
    store.close()
    passwords = {"alice": add_user(settings, "alice", "analyst"),
                 "vera": add_user(settings, "vera", "viewer")}
    server = ServeProcess.start(settings)
    try:
        yield settings, f"{server.url}/console", passwords
    finally:
        server.stop()


def rows(driver: WebDriver) -> list[str]:
    return [r.get_attribute("data-stream-seq") or "" for r in
            driver.find_elements(By.CSS_SELECTOR, "tr[data-stream-seq]")]


def test_an_analyst_reads_dead_letters_and_their_bodies(
        site: tuple[Settings, str, dict[str, str]], browser: WebDriver) -> None:  # noqa: F811
    _, base, passwords = site
    log_in(browser, base, "alice", passwords["alice"])
    links = {e.get_attribute("data-testid"): e.get_attribute("href")
             for e in browser.find_elements(By.CSS_SELECTOR, "a[data-testid^=nav-]")}
    assert links == {"nav-queue": f"{base}/", "nav-overview": f"{base}/overview",
                     "nav-lists": f"{base}/lists", "nav-dead-letters": f"{base}/dead-letters"}
    click(browser, "nav-dead-letters")
    wait_for(browser, lambda d: rows(d) == ["21", "20", "12", "11", "10"],
             message="dead letters newest first")
    assert "5 dead letter(s)" in text_of(browser, "deadletters-pager")

    field(browser, "deadletters-reason").send_keys("object keys")
    wait_for(browser, lambda d: rows(d) == ["20"], message="filtered by reason")
    find(browser, "deadletters")
    browser.find_element(By.CSS_SELECTOR, "tr[data-stream-seq='20']").click()
    wait_for(browser, lambda d: "Dead letter 20" in text_of(d, "deadletter"),
             message="the dead letter opened")
    assert text_of(browser, "deadletter-body") == XSS  # the markup, as text
    assert browser.execute_script("return window.__xss") is None  # ...never run
    assert "bad json: object keys" in text_of(browser, "deadletter-reason")
    assert "deadletters resubmit 20" in text_of(browser, "deadletter")

    field(browser, "deadletters-reason").send_keys(Keys.CONTROL, "a")
    field(browser, "deadletters-reason").send_keys("location")
    wait_for(browser, lambda d: rows(d) == ["21"], message="the other one")
    browser.find_element(By.CSS_SELECTOR, "tr[data-stream-seq='21']").click()
    wait_for(browser, lambda d: "Dead letter 21" in text_of(d, "deadletter"),
             message="the second dead letter")
    # the override is written out, so the text reads as sent, not reversed
    assert text_of(browser, "deadletter-body") == '{"location": "\\u202egnp.exe"}'
    screenshot(browser, "console-dead-letters")


def test_a_viewer_is_refused(site: tuple[Settings, str, dict[str, str]],
                             browser: WebDriver) -> None:  # noqa: F811
    _, base, passwords = site
    log_in(browser, base, "vera", passwords["vera"])
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid=nav-dead-letters]")
    browser.get(f"{base}/dead-letters")
    assert "needs the analyst role" in text_of(browser, "deadletters-refused") or \
        wait_for(browser, lambda d: "needs the analyst role" in
                 text_of(d, "deadletters-refused"), message="refused")
    assert not browser.find_elements(By.CSS_SELECTOR, "tr[data-stream-seq]")
