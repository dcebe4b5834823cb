"""The login page: username and password, checked by users.authenticate."""

from __future__ import annotations

from nicegui import app, ui

from appliance import logs, users

from .session import Console, sign_in

log = logs.get("ui.login")


def login_page(console: Console) -> None:
    ui.page_title("Sign in · Branchguard")
    if console.session_user(app.storage.user, touch=False) is not None:
        ui.navigate.to("/")
        return

    def attempt() -> None:
        user = users.authenticate(console.reader(), username.value.strip(), password.value)
        if user is None:
            log.warning("console.login_failed", txn_id=None, user=username.value.strip())
            password.set_value("")
            ui.notify("wrong username or password, or the user is disabled", type="negative")
            return
        sign_in(app.storage.user, user)
        ui.navigate.to("/")

    with ui.card().classes("absolute-center w-80"):
        ui.label("Branchguard console").classes("text-lg font-bold")
        username = ui.input("Username").props("data-testid=username autofocus")
        password = ui.input("Password", password=True).props("data-testid=password")
        password.on("keydown.enter", attempt)
        ui.button("Sign in", on_click=attempt).props("data-testid=sign-in")
