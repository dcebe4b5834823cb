"""Authentication and roles: ``Authorization: Bearer <key>``.

401 means "who are you?" (no key, a malformed one, an unknown, wrong or revoked one); 403
means "you may not" (a valid key whose role is below the route's). The key check itself is
in keys.py (one indexed lookup, argon2 at most once per key per cache period).
"""

from __future__ import annotations

import sqlite3

from starlette.requests import Request

from ..casework.keys import KeyVerifier, Principal, role_at_least
from .errors import ApiError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="branchguard"'}


def bearer(request: Request) -> str | None:
    """The presented key, or None when there is no ``Authorization`` header."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "use Authorization: Bearer <key>", "Authorization", _CHALLENGE)
    return token.strip()


def authenticate(conn: sqlite3.Connection, verifier: KeyVerifier, token: str | None,
                 role: str) -> Principal:
    """The caller's principal if the key is valid and its role at least ``role``."""
    if token is None:
        raise ApiError(401, "an API key is required", "Authorization", _CHALLENGE)
    principal = verifier.verify(conn, token)
    if principal is None:
        raise ApiError(401, "unknown, wrong or revoked API key", "Authorization", _CHALLENGE)
    if not role_at_least(principal.role, role):
        raise ApiError(403, f"needs the {role} role or above; this key is {principal.role}",
                       "Authorization")
    return principal
