"""The login page: username and password, checked by users.authenticate, after the sign-in
throttle (login_throttle.py) has had its say; a passed check goes on to /login/complete,
which rotates the session id (rotation.py). The argon2 check runs in a worker thread
(``run.io_bound``, bounded by secret_hash.py), so a slow check never holds up the event loop
that serves every other page and the API."""

from __future__ import annotations

import time

from nicegui import app, run, ui

from appliance import logs
from appliance.casework import users

from .rotation import PATH
from .session import Console, begin_sign_in

log = logs.get("ui.login")


def login_page(console: Console) -> None:
    ui.page_title("Sign in · Branchguard")
    if console.session_user(app.storage.user, touch=False) is not None:
        ui.navigate.to("/")
        return

    async def attempt() -> None:
        name = username.value.strip()
        address = ui.context.client.ip
        now = time.time()
        throttle = console.throttle
        lock = throttle.locked(name, address, now)
        if lock is not None:
            log.warning("console.login_refused_locked", txn_id=None, user=name,
                        address=address, until=lock.until)
            password.set_value("")
            ui.notify(lock.message(now), type="negative", timeout=10000)
            return
        given = password.value
        user = await run.io_bound(lambda: users.authenticate(console.reader(), name, given))
        if user is None:
            lock = throttle.failed(name, address, now)
            log.warning("console.login_failed", txn_id=None, user=name, address=address)
            password.set_value("")
            ui.notify(lock.message(now) if lock is not None else
                      "wrong username or password, or the user is disabled", type="negative")
            return
        throttle.succeeded(name, address)
        token = begin_sign_in(app.storage.user, user)
        ui.navigate.to(f"{PATH}?token={token}")

    with ui.card().classes("absolute-center w-80"):
        ui.label("Branchguard console").classes("text-lg font-bold")
        username = ui.input("Username").props("data-testid=username autofocus")
        password = ui.input("Password", password=True).props("data-testid=password")
        password.on("keydown.enter", attempt)
        ui.button("Sign in", on_click=attempt).props("data-testid=sign-in")
