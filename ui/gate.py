"""The console's gate: an ASGI middleware that refuses every request of a visitor without
a live session, except the login page and NiceGUI's static assets and websocket.

NiceGUI's own auth example matches ``request.url.path`` against its public routes; mounted
under ``/console`` that path carries the mount prefix, so the match is wrong. Here the
path is taken relative to ``scope["root_path"]`` (the mount) before matching, and what is
public is a short allow-list, so anything not on it is refused: a redirect to the login
page for a page, 401 with an empty body for anything else.
"""

from __future__ import annotations

from nicegui import app
from nicegui.version import __version__
from starlette.types import ASGIApp, Receive, Scope, Send

from .session import Console

_ASSETS = tuple(f"/_nicegui/{__version__}/{kind}/" for kind in (
    "static", "libraries", "components", "resources", "esm", "dynamic_resources"))
PUBLIC_PREFIXES = (*_ASSETS, "/_nicegui_ws/")
PUBLIC_PATHS = ("/login", "/login/complete", "/favicon.ico")


def relative_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class Gate:
    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = relative_path(scope)
        if is_public(path):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if self._signed_in():
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "GET" and "/_nicegui/" not in path:
            headers = [(b"location", f"{scope.get('root_path', '')}/login".encode()),
                       (b"content-length", b"0"), (b"cache-control", b"no-store")]
            await send({"type": "http.response.start", "status": 303, "headers": headers})
        else:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def _signed_in(self) -> bool:
        try:
            storage = app.storage.user
        except (RuntimeError, KeyError, AssertionError):  # no session cookie or storage yet
            return False
        return self.console.session_user(storage, touch=True) is not None
