"""Registers the console's pages with NiceGUI (called once by mount.py, not at import,
so that importing a page module has no side effects)."""

from __future__ import annotations

from nicegui import app, ui

from .case_page import case_page
from .deadletters_page import deadletters_page
from .lists_page import lists_page
from .login_page import login_page
from .models_page import models_page
from .overview_page import overview_page
from .queue_page import queue_page
from .rotation import PATH, complete_sign_in
from .session import Console


def setup(console: Console) -> None:
    ui.page("/login")(lambda: login_page(console))
    app.add_route(PATH, complete_sign_in(console), methods=["GET"])
    ui.page("/")(lambda: queue_page(console))
    ui.page("/overview")(lambda: overview_page(console))
    ui.page("/lists")(lambda: lists_page(console))
    ui.page("/models")(lambda: models_page(console))
    ui.page("/dead-letters")(lambda: deadletters_page(console))

    @ui.page("/case/{alert_id}")
    def case(alert_id: int) -> None:
        case_page(console, alert_id)
