"""Console sessions: who is signed in, whether they still may be, and role checks.

A session is the NiceGUI user storage of one browser (server-side, found by the id in the
signed session cookie): the username, the user's ``password_changed_at`` when they signed
in, and the time of their last page load or action. It ends when it has been idle longer
than ``console_idle_minutes``, when the user is disabled or their password changes, or on
logout. Every page load (through the gate) and every action (through :meth:`Console.act`)
re-reads the user, so a disabled user or a lowered role takes effect at once.

Signing in rotates the session id (against session fixation). The password is checked over
NiceGUI's websocket, where no cookie can be set, so the check only leaves a one-time token in
the anonymous session (:func:`begin_sign_in`) and sends the browser to ``/login/complete``
(rotation.py). That plain HTTP request clears the anonymous session, gives the browser a new
random session id in its cookie and signs that one in: the id a visitor had before signing in
(one an attacker may have planted) never becomes a signed-in one.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

from nicegui import app, ui

from appliance import logs
from appliance.api.endpoint import Api
from appliance.casework import users
from appliance.casework.keys import role_at_least
from appliance.casework.login_throttle import LoginThrottle
from appliance.casework.users import User
from appliance.change import apply_change
from appliance.settings import Settings

log = logs.get("ui.session")
T = TypeVar("T")
MOUNT = "/console"
PENDING = "pending_sign_in"
HANDOFF_SECONDS = 30.0
"""How long the one-time token of a passed password check stays good (see module doc)."""


@dataclass
class Console:
    """What every page shares: settings and the API's per-thread database connections."""

    settings: Settings
    api: Api

    def reader(self) -> sqlite3.Connection:
        return self.api.reader()

    @cached_property
    def throttle(self) -> LoginThrottle:
        """Failed sign-in counts, shared by every console process (login_throttle.py)."""
        return LoginThrottle.of(self.settings)

    def change(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One audited write (change.py): the API's cache is invalidated by it too."""
        return apply_change(self.api.writer(), fn)

    def session_user(self, storage: MutableMapping[str, Any], touch: bool) -> User | None:
        """The signed-in user of ``storage``, or None (and the session cleared) when there
        is none or it has ended (see module doc). ``touch`` counts this as activity."""
        username = storage.get("username")
        if not username:
            return None
        now = time.time()
        if now - float(storage.get("last_seen", 0)) > self.settings.console_idle_minutes * 60:
            log.info("console.session_expired", txn_id=None, user=username)
            storage.clear()
            return None
        user = users.active(self.reader(), str(username))
        if user is None or user.password_changed_at != storage.get("password_changed_at"):
            storage.clear()
            return None
        if touch:
            storage["last_seen"] = now
        return user

    def user(self) -> User | None:
        """This page's user (the gate has already refused anonymous requests)."""
        return self.session_user(app.storage.user, touch=False)

    def act(self, role: str) -> User | None:
        """Check, at the moment of an action, that the session is alive and its role is at
        least ``role``; tells the user why not and returns None otherwise."""
        user = self.session_user(app.storage.user, touch=True)
        if user is None:
            ui.navigate.to("/login")
            return None
        if not role_at_least(user.role, role):
            ui.notify(f"needs the {role} role or above; you are {user.role}", type="negative")
            log.warning("console.forbidden", txn_id=None, user=user.username, needed=role)
            return None
        return user


def begin_sign_in(storage: MutableMapping[str, Any], user: User) -> str:
    """Record in the (anonymous) session that ``user`` passed the password check; returns
    the one-time token that /login/complete exchanges for a new, signed-in session id."""
    token = secrets.token_urlsafe(32)
    storage.clear()
    storage[PENDING] = {"token": token, "username": user.username,
                        "password_changed_at": user.password_changed_at,
                        "expires": time.time() + HANDOFF_SECONDS}
    return token


def sign_in(storage: MutableMapping[str, Any], user: User) -> None:
    storage.clear()
    storage.update(username=user.username, password_changed_at=user.password_changed_at,
                   last_seen=time.time())
    log.info("console.login", txn_id=None, user=user.username, role=user.role)


def sign_out(storage: MutableMapping[str, Any]) -> None:
    log.info("console.logout", txn_id=None, user=storage.get("username"))
    storage.clear()
