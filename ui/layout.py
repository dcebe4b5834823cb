"""The frame around every signed-in page: navigation, who is signed in, logout, the banner
for urgent alerts nobody has started on, and the idle check."""

from __future__ import annotations

from nicegui import app, ui

from appliance.casework.keys import role_at_least
from appliance.casework.numbers import number_text
from appliance.casework.overview import waiting_urgent
from appliance.casework.users import User
from appliance.transaction import event_time_text

from .session import Console, sign_out

IDLE_CHECK_SECONDS = 15.0
PAGES = (("Queue", "/"), ("Overview", "/overview"), ("Lists", "/lists"), ("Models", "/models"),
         ("Dead letters", "/dead-letters"))
ROLE_OF_PAGE = {"/models": "supervisor", "/dead-letters": "analyst"}
"""Pages whose link only users of at least this role see (the page itself checks too)."""


def when(ts: float | None) -> str:
    """Epoch seconds as UTC text (the console shows UTC everywhere); any stored value,
    even one beyond what a datetime holds, renders (see event_time_text)."""
    return event_time_text(ts)


def frame(console: Console, user: User, title: str) -> None:
    """Draw the header for ``user`` on the current page."""
    ui.page_title(f"{title} · Branchguard")
    with ui.header().classes("items-center gap-4 bg-slate-800"):
        ui.label("Branchguard").classes("text-lg font-bold")
        for name, path in PAGES:
            if not role_at_least(user.role, ROLE_OF_PAGE.get(path, "viewer")):
                continue
            # NiceGUI puts its mount path (/console) in front of a link's target itself
            ui.link(name, path).classes("text-white").props(
                f"data-testid=nav-{name.lower().replace(' ', '-')}")
        ui.space()
        ui.label(f"{user.username} ({user.role})").props("data-testid=whoami")

        def logout() -> None:
            sign_out(app.storage.user)
            ui.navigate.to("/login")

        ui.button("Log out", on_click=logout).props("flat color=white data-testid=logout")
    banner = ui.label().classes("w-full bg-red-700 text-white p-2 font-bold")
    banner.props("data-testid=urgent-banner")

    def refresh_banner() -> None:
        waiting = waiting_urgent(console.reader())
        banner.set_text(f"{number_text(waiting)} HIGH or CRITICAL alert(s) waiting unreviewed"
                        if waiting else "")
        banner.set_visibility(waiting > 0)

    def check_idle() -> None:
        if console.session_user(app.storage.user, touch=False) is None:
            ui.navigate.to("/login")

    refresh_banner()
    ui.timer(2.0, refresh_banner)
    ui.timer(IDLE_CHECK_SECONDS, check_idle)


def signed_in(console: Console, title: str) -> User | None:
    """This page's user with the frame drawn, or None (and off to the login page) when
    the session ended between the gate and here."""
    user = console.user()
    if user is None:
        ui.navigate.to("/login")
        return None
    frame(console, user, title)
    return user
