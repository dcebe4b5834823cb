"""Signing in to the console: failed attempts throttled (a lockout refuses even the right
password, and ends), and the session id rotated at sign-in (the id a visitor had before does
not authenticate afterwards). NiceGUI's simulated user, with its real cookie jar."""

from __future__ import annotations

import asyncio

import httpx
from nicegui import core
from nicegui.testing import User

from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import node_db  # noqa: F401
from tests.console_support import add_user
from tests.test_console_pages import CHECKED, sign_in, simulate


async def try_password(user: User, name: str, password: str) -> None:
    await user.open("/login")
    user.find("Username").type(name)
    user.find("Password").type(password)
    user.find("Sign in").click()


def anonymous_client(session_cookie: str | None) -> httpx.AsyncClient:
    """A second browser on the same app, carrying only ``session_cookie``."""
    client = httpx.AsyncClient(transport=httpx.ASGITransport(core.app), base_url="http://test")
    if session_cookie is not None:
        client.cookies.set("session", session_cookie)
    return client


def test_lockout_refuses_the_right_password_until_it_ends(node_db: tuple[Settings, Store]  # noqa: F811
                                                          ) -> None:
    settings = node_db[0]
    password = add_user(settings, "alice", "analyst")

    async def scenario(user: User) -> None:
        for _ in range(2):
            await try_password(user, "alice", "wrong")
            await user.should_see("wrong username or password", retries=CHECKED)
        await try_password(user, "alice", "wrong")
        await user.should_see("too many failed sign-ins; try again after", retries=CHECKED)
        await try_password(user, "alice", password)  # the right one, refused while locked
        await user.should_see("too many failed sign-ins; try again after")
        await user.should_not_see("alice (")
        await user.open("/")
        await user.should_see("Branchguard console")  # still the login page
        await asyncio.sleep(1.3)  # the lockout (1.2 s) ends
        await sign_in(user, "alice", password)

    simulate(settings, scenario, console_login_max_failures="3",
             console_login_lockout_minutes="0.02")


def test_one_users_lockout_leaves_the_others_at_that_address_alone(
        node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    """Analysts behind one proxy share an address: alice's typos must not lock bob out."""
    settings = node_db[0]
    add_user(settings, "alice", "analyst")
    bob = add_user(settings, "bob", "analyst")

    async def scenario(user: User) -> None:
        for _ in range(2):
            await try_password(user, "alice", "wrong")
            await user.should_see("wrong username or password", retries=CHECKED)
        await try_password(user, "alice", "wrong")
        await user.should_see("too many failed sign-ins; try again after", retries=CHECKED)
        await sign_in(user, "bob", bob)  # same browser, same address

    simulate(settings, scenario, console_login_max_failures="3")


def test_session_id_is_rotated_at_sign_in(node_db: tuple[Settings, Store]  # noqa: F811
                                         ) -> None:
    settings = node_db[0]
    password = add_user(settings, "alice", "analyst")

    async def scenario(user: User) -> None:
        await user.open("/login")
        before = user.http_client.cookies.get("session")
        assert before
        await sign_in(user, "alice", password)
        after = user.http_client.cookies.get("session")
        assert after and after != before
        async with anonymous_client(before) as planted:
            response = await planted.get("/")
            assert response.status_code == 303
            assert response.headers["location"] == "/login"
        async with anonymous_client(after) as signed_in:
            response = await signed_in.get("/")
            assert response.status_code == 200 and "alice (analyst)" in response.text
            # back to the completion (the back button): still signed in, no new session
            again = await signed_in.get("/login/complete?token=used")
            assert again.status_code == 303 and again.headers["location"] == "/"
            assert (await signed_in.get("/")).status_code == 200

    simulate(settings, scenario)


def test_a_forged_or_replayed_completion_signs_nobody_in(node_db: tuple[Settings, Store]  # noqa: F811
                                                         ) -> None:
    settings = node_db[0]
    add_user(settings, "alice", "analyst")

    async def scenario(user: User) -> None:
        async with anonymous_client(None) as visitor:
            response = await visitor.get("/login/complete?token=guessed")
            assert response.status_code == 303
            assert response.headers["location"] == "/login"
            assert (await visitor.get("/")).status_code == 303

    simulate(settings, scenario)
