"""``GET /login/complete``: where a passed password check becomes a signed-in session under a
new session id (see session.py's module doc for why it takes this extra request).

The anonymous session is emptied whatever happens, so its id (the one the visitor, or whoever
planted the cookie, had before) never authenticates. Only when it held a live token equal to
the one in the query, for a user who is still active with the same password, does the browser
get a fresh random id in its session cookie, signed in; otherwise it is back at the login page.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable

from nicegui import app
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from appliance import logs
from appliance.casework import users

from .session import PENDING, Console, sign_in

log = logs.get("ui.rotation")
PATH = "/login/complete"


def complete_sign_in(console: Console) -> Callable[[Request], Awaitable[Response]]:
    """The route's endpoint, bound to ``console``."""

    async def endpoint(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        anonymous = app.storage.user
        pending = anonymous.get(PENDING)
        if pending is None and console.session_user(anonymous, touch=False) is not None:
            # already signed in (the back button): nothing to exchange, nothing to clear
            return RedirectResponse(f"{root}/", status_code=303,
                                    headers={"cache-control": "no-store"})
        anonymous.clear()
        user = _checked(console, pending, request.query_params.get("token", ""))
        if user is None:
            log.warning("console.sign_in_refused", txn_id=None,
                        user=pending.get("username") if isinstance(pending, dict) else None)
            return RedirectResponse(f"{root}/login", status_code=303,
                                    headers={"cache-control": "no-store"})
        new_id = str(uuid.uuid4())
        request.session["id"] = new_id  # SessionMiddleware sends the new cookie
        # NiceGUI creates a session's storage when a request first brings its id; this
        # request brought the old one, so the new storage is created here
        await app.storage._create_user_storage(new_id)  # noqa: SLF001
        sign_in(app.storage.user, user)
        log.info("console.session_rotated", txn_id=None, user=user.username)
        return RedirectResponse(f"{root}/", status_code=303,
                                headers={"cache-control": "no-store"})

    return endpoint


def _checked(console: Console, pending: object, token: str) -> users.User | None:
    if not isinstance(pending, dict) or not token:
        return None
    if not hmac.compare_digest(str(pending.get("token", "")), token):
        return None
    if float(pending.get("expires", 0)) < time.time():
        return None
    user = users.active(console.reader(), str(pending.get("username")))
    if user is None or user.password_changed_at != pending.get("password_changed_at"):
        return None
    return user
