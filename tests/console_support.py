"""Fixtures for the console tests: the node and ``branchguard serve`` as real child
processes, console users, and a real headless Debian Chromium driven by selenium.

The browser is Debian's ``chromium`` with ``chromium-driver`` (``make tools`` installs
them); nothing is downloaded by a test tool. A missing browser fails the test with the
command that installs it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (ElementClickInterceptedException,
                                        ElementNotInteractableException,
                                        StaleElementReferenceException)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from appliance.casework import users
from appliance.change import connect_writer
from appliance.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1400,1000")


def add_user(settings: Settings, username: str, role: str) -> str:
    db = connect_writer(settings.db_path)
    try:
        return users.create(db, username, role, "test")
    finally:
        db.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium (its own profile directory) per test."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: the console tests need Debian's chromium "
                    "and chromium-driver; install them with `make tools` "
                    "(apt-get install -y chromium chromium-driver)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, predicate: Callable[[WebDriver], Any], timeout: float = 20.0,
             message: str = "") -> Any:
    """Poll ``predicate`` (tolerating elements re-rendered under it) until it is truthy."""
    def safe(d: WebDriver) -> Any:
        try:
            return predicate(d)
        except StaleElementReferenceException:
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(safe, message)


def find(driver: WebDriver, testid: str) -> WebElement:
    return wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR,
                                                     f"[data-testid={testid}]"),
                    message=testid)


def click(driver: WebDriver, testid: str) -> None:
    """Click as a user would, after scrolling the element clear of the fixed header; and,
    as a user would, again a moment later while it cannot take the click yet (a dialog or
    menu still opening: the click was not delivered, so it is not a double click)."""
    def attempt(d: WebDriver) -> bool:
        element = find(d, testid)
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        return _clicked(element)
    wait_for(driver, attempt, message=f"{testid} took the click")


def _clicked(element: WebElement) -> bool:
    try:
        element.click()
    except (ElementNotInteractableException, ElementClickInterceptedException):
        return False
    return True


def choose(driver: WebDriver, testid: str, option: str) -> None:
    """Pick ``option`` in a Quasar select as a user does: open its menu, click the item."""
    click(driver, testid)

    def pick(d: WebDriver) -> bool:
        item = next((e for e in d.find_elements(By.CSS_SELECTOR, ".q-menu .q-item")
                     if e.text.strip() == option or e.text.startswith(option + " ")), None)
        return item is not None and _clicked(item)
    wait_for(driver, pick, message=f"option {option} of {testid}")
    wait_for(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, ".q-menu"),
             message="menu closed")


def text_of(driver: WebDriver, testid: str) -> str:
    elements = driver.find_elements(By.CSS_SELECTOR, f"[data-testid={testid}]")
    return elements[0].text if elements else ""


def field(driver: WebDriver, testid: str) -> WebElement:
    """The typing target of an input: Quasar puts the attribute on the native element or
    on its wrapper, depending on the component."""
    element = find(driver, testid)
    if element.tag_name in ("input", "textarea"):
        return element
    return element.find_element(By.CSS_SELECTOR, "input, textarea")


def log_in(driver: WebDriver, base: str, username: str, password: str) -> None:
    driver.get(f"{base}/login")
    field(driver, "username").send_keys(username)
    field(driver, "password").send_keys(password)
    click(driver, "sign-in")
    wait_for(driver, lambda d: text_of(d, "whoami").startswith(username),
             message=f"signed in as {username}")


def queue_rows(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "tr[data-alert-id]")


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.png"
    driver.save_screenshot(str(path))
    return path
