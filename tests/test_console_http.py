"""The console over plain HTTP from a real ``branchguard serve``: an anonymous visitor gets
nothing under /console but the login page and static assets; the session secret is
generated once, private, and reused."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import ServeProcess, fill, node_db  # noqa: F401

ROUTES = ("/", "/overview", "/lists", "/models", "/case/1", "/case/999999", "/no-such-page",
          "/login/complete", "/login/complete?token=guessed",
          "/_nicegui/client/abc/upload/1", "/_nicegui/auto/static/x/y.txt",
          "/_nicegui/auto/media/x/y.mp4", "//overview", "/login/../overview",
          "/%2e%2e/overview")


@pytest.fixture
def server(node_db: tuple[Settings, Store]) -> Iterator[ServeProcess]:  # noqa: F811
    process = ServeProcess.start(node_db[0])
    try:
        yield process
    finally:
        process.stop()


def test_anonymous_gets_nothing(server: ServeProcess,
                                node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    secret_ids = [r[0] for r in node_db[1].reader.execute(
        "SELECT transaction_id FROM transactions LIMIT 20")]
    with httpx.Client(base_url=server.url, follow_redirects=False) as client:
        for route in ROUTES:
            for method in ("GET", "POST"):
                response = client.request(method, "/console" + route)
                assert response.status_code in (303, 401, 404, 405), (method, route)
                assert response.content == b"" or response.status_code in (404, 405), \
                    (method, route, response.text[:200])
                assert not any(t in response.text for t in secret_ids)
                if response.status_code == 303:
                    assert response.headers["location"] == "/console/login"
    with httpx.Client(base_url=server.url, follow_redirects=False,
                      cookies={"session": "forged.cookie.value"}) as forger:
        forged = forger.get("/console/")
        assert forged.status_code == 303 and forged.content == b""
    with httpx.Client(base_url=server.url, follow_redirects=False) as client:
        login = client.get("/console/login")
        assert login.status_code == 200 and "Branchguard" in login.text
        assert not any(t in login.text for t in secret_ids)
        # the API next to it still answers, and still wants its key
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/v1/alerts").status_code == 401


def test_session_secret_is_generated_private_and_reused(
        server: ServeProcess, node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    path: Path = node_db[0].data_dir / "console-secret"
    first = path.read_text()
    assert len(first.strip()) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    server.stop()
    again = ServeProcess.start(node_db[0])
    try:
        assert path.read_text() == first
    finally:
        again.stop()


def test_configured_secret_is_used_and_too_short_refused(tmp_path: Path) -> None:
    from appliance.errors import SettingsError
    from appliance.settings import load

    with pytest.raises(SettingsError, match="console_secret"):
        load(None, env={"BRANCHGUARD_CONSOLE_SECRET": "short"}, data_dir=tmp_path)
    settings = load(None, env={"BRANCHGUARD_CONSOLE_SECRET": "s" * 40}, data_dir=tmp_path)
    assert "s" * 40 not in repr(settings)
    from ui.secret import session_secret

    assert session_secret(settings) == "s" * 40
    assert not (tmp_path / "console-secret").exists()
