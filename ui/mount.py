"""Mounting the console under ``/console`` of the API's Starlette app.

NiceGUI keeps its pages and its app in module-level state, so there is one console per
process: :func:`mount` is called once, by ``branchguard serve``. It points NiceGUI's
server-side storage at ``<data_dir>/console`` (before NiceGUI is imported, since NiceGUI
reads the location at import), puts the gate in front of every console route, registers
the pages and hands the app to ``ui.run_with``.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette

from appliance.settings import Settings

from .secret import session_secret

COOKIE_DAYS = 1
"""Longest a session cookie lives; the idle timeout usually ends the session first."""


def mount(app: Starlette, settings: Settings) -> None:
    """Serve the console under ``/console`` of ``app`` (built by api.app.create_app)."""
    storage = settings.data_dir / "console"
    storage.mkdir(parents=True, exist_ok=True)
    os.environ["NICEGUI_STORAGE_PATH"] = str(storage.resolve())
    from nicegui import app as nicegui_app
    from nicegui import ui
    from nicegui.storage import Storage

    from ui.gate import Gate
    from ui.pages import setup
    from ui.session import MOUNT, Console

    Storage.path = storage.resolve()
    console = Console(settings, app.state.api)
    nicegui_app.add_middleware(Gate, console=console)
    setup(console)
    # run_with only needs mount(), user_middleware and router.lifespan_context, which a
    # Starlette app has; its annotation says FastAPI
    ui.run_with(app, mount_path=MOUNT, title="Branchguard",  # type: ignore[arg-type]
                storage_secret=session_secret(settings),
                session_middleware_kwargs={"same_site": "strict",
                                           "max_age": COOKIE_DAYS * 86400},
                show_welcome_message=False, favicon="🛡️")
