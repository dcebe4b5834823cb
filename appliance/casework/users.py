"""Console users: local accounts with the API's roles and argon2-hashed passwords.

Only the hash is stored. A password is given by the operator or generated (and then shown
once). Users are never deleted, only disabled, so the audit trail's actors stay resolvable.
:func:`authenticate` spends one argon2 verification whether or not the user exists, so the
login form does not reveal which usernames are real by how fast it answers.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from .. import audit
from ..change import apply_change
from ..errors import BranchguardError
from .keys import ROLES
from .secret_hash import hash_secret, verify_secret

MIN_PASSWORD = 12
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DUMMY_HASH = hash_secret(secrets.token_urlsafe(16))


class UsersError(BranchguardError):
    """A bad username, role or password, or an unknown user."""


@dataclass(frozen=True)
class User:
    """A signed-in console user as sessions and audit entries see them."""

    username: str
    role: str
    password_changed_at: float

    @property
    def actor(self) -> str:
        return f"user:{self.username}"


def generate_password() -> str:
    return secrets.token_urlsafe(15)


def _check(username: str, role: str | None, password: str | None) -> None:
    if not _USERNAME.match(username):
        raise UsersError("a username is 1 to 64 of a-z, 0-9, '.', '_', '-', starting with "
                         "a letter or digit", field="username", value=username)
    if role is not None and role not in ROLES:
        raise UsersError("unknown role", field="role", value=role,
                         hint=f"use one of {', '.join(ROLES)}")
    if password is not None and len(password) < MIN_PASSWORD:
        raise UsersError(f"a password needs at least {MIN_PASSWORD} characters",
                         field="password")


def check_username(username: str) -> None:
    """Raise UsersError (field ``username``) unless ``username`` is a valid one."""
    _check(username, None, None)


def create(db: Database, username: str, role: str, created_by: str,
           password: str | None = None) -> str:
    """Create a user; returns the password (generated when not given). Audited without
    the password or its hash."""
    _check(username, role, password)
    password = password or generate_password()
    digest = hash_secret(password)

    def insert(conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM console_users WHERE username = ?",
                        (username,)).fetchone():
            raise UsersError("the user exists", field="username", value=username,
                             hint="`branchguard users list` shows the users")
        now = time.time()
        conn.execute("INSERT INTO console_users (username, role, hash, created_at, created_by,"
                     " password_changed_at) VALUES (?, ?, ?, ?, ?, ?)",
                     (username, role, digest, now, created_by, now))
        audit.append(conn, created_by, "user.create", f"user:{username}", None,
                     {"username": username, "role": role})

    apply_change(db, insert)
    return password


def set_password(db: Database, username: str, actor: str, password: str | None = None
                 ) -> str:
    """Replace a user's password (ending their sessions) and re-enable them; returns the
    new password. Audited without the password."""
    _check(username, None, password)
    password = password or generate_password()
    digest = hash_secret(password)

    def update(conn: sqlite3.Connection) -> None:
        cursor = conn.execute("UPDATE console_users SET hash = ?, password_changed_at = ?, "
                              "disabled_at = NULL, disabled_by = NULL WHERE username = ?",
                              (digest, time.time(), username))
        if cursor.rowcount != 1:
            raise UsersError("no such user", field="username", value=username)
        audit.append(conn, actor, "user.password", f"user:{username}", None,
                     {"username": username})

    apply_change(db, update)
    return password


def disable(db: Database, username: str, actor: str) -> None:
    """Disable a user: their sessions end at their next request or action."""
    def update(conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT role, disabled_at FROM console_users WHERE username = ?",
                           (username,)).fetchone()
        if row is None:
            raise UsersError("no such user", field="username", value=username,
                             hint="`branchguard users list` shows the users")
        if row[1] is not None:
            return
        conn.execute("UPDATE console_users SET disabled_at = ?, disabled_by = ? "
                     "WHERE username = ?", (time.time(), actor, username))
        audit.append(conn, actor, "user.disable", f"user:{username}",
                     {"role": row[0], "disabled": False}, {"role": row[0], "disabled": True})

    apply_change(db, update)


def exists(conn: sqlite3.Connection, username: str) -> bool:
    return conn.execute("SELECT 1 FROM console_users WHERE username = ?",
                        (username,)).fetchone() is not None


def listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every user without the hash."""
    columns = ("username", "role", "created_at", "created_by", "disabled_at", "disabled_by")
    return [dict(zip(columns, r)) for r in conn.execute(
        f"SELECT {', '.join(columns)} FROM console_users ORDER BY username")]


def active(conn: sqlite3.Connection, username: str) -> User | None:
    """The user if they exist and are not disabled (read on every console request)."""
    row = conn.execute("SELECT role, password_changed_at FROM console_users "
                       "WHERE username = ? AND disabled_at IS NULL", (username,)).fetchone()
    return None if row is None else User(username, row[0], row[1])


def authenticate(conn: sqlite3.Connection, username: str, password: str) -> User | None:
    """The user when the password is right and the user is active, else None. Spends one
    argon2 verification (in a bounded slot: secret_hash.py); call it off the event loop."""
    row = conn.execute("SELECT role, hash, password_changed_at, disabled_at FROM "
                       "console_users WHERE username = ?", (username,)).fetchone()
    if not verify_secret(row[1] if row else _DUMMY_HASH, password):
        return None
    if row is None or row[3] is not None:
        return None
    return User(username, row[0], row[2])
