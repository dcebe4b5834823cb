"""API keys: roles, creation, revocation and verification.

A key reads ``bg_<key_id>_<secret>``. Only an argon2 hash of the whole key is stored, under
its ``key_id`` (12 hex characters, not secret), so verifying a request costs one indexed
lookup and at most one argon2 verification. A key verified recently is remembered in memory
(as a sha256 of the presented key, never the key) for ``cache_seconds``, but the lookup that
reads ``revoked_at`` and the role happens on every request, so a revoke takes effect at once.
There are no default keys: ``branchguard keys create`` makes the first.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from .. import audit
from ..change import apply_change
from ..errors import BranchguardError
from .secret_hash import hash_secret, verify_secret

ROLES = ("viewer", "analyst", "supervisor", "admin")
"""In increasing order of power: each role may do everything the ones before it may."""
_KEY = re.compile(r"^bg_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")


class KeysError(BranchguardError):
    """A key command was given a bad role or an unknown key id."""


def role_at_least(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its name and its role."""

    key_id: str
    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}:{self.name}"


def create(db: Database, name: str, role: str, created_by: str) -> tuple[str, str]:
    """Create a key; returns (key_id, key). The key is shown once and never stored."""
    if role not in ROLES:
        raise KeysError("unknown role", field="role", value=role,
                        hint=f"use one of {', '.join(ROLES)}")
    if not name.strip() or len(name) > 100:
        raise KeysError("a key needs a name of 1 to 100 characters", field="name", value=name)
    key_id = secrets.token_hex(6)
    key = f"bg_{key_id}_{secrets.token_urlsafe(32)}"
    digest = hash_secret(key)

    def insert(conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.execute("INSERT INTO api_keys (key_id, name, role, hash, created_at, created_by) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (key_id, name, role, digest, now, created_by))
        audit.append(conn, created_by, "key.create", f"key:{key_id}", None,
                     {"key_id": key_id, "name": name, "role": role})

    apply_change(db, insert)
    return key_id, key


def revoke(db: Database, key_id: str, revoked_by: str) -> None:
    """Revoke a key; every request with it is refused from the next one on."""
    def update(conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT name, role, revoked_at FROM api_keys WHERE key_id = ?",
                           (key_id,)).fetchone()
        if row is None:
            raise KeysError("no such key", field="key_id", value=key_id,
                            hint="`branchguard keys list` shows the key ids")
        if row[2] is not None:
            return
        conn.execute("UPDATE api_keys SET revoked_at = ?, revoked_by = ? WHERE key_id = ?",
                     (time.time(), revoked_by, key_id))
        audit.append(conn, revoked_by, "key.revoke", f"key:{key_id}",
                     {"name": row[0], "role": row[1], "revoked": False},
                     {"name": row[0], "role": row[1], "revoked": True})

    apply_change(db, update)


def listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every key without its hash: id, name, role, created, revoked."""
    return [{"key_id": r[0], "name": r[1], "role": r[2], "created_at": r[3],
             "created_by": r[4], "revoked_at": r[5], "revoked_by": r[6]}
            for r in conn.execute("SELECT key_id, name, role, created_at, created_by, "
                                  "revoked_at, revoked_by FROM api_keys ORDER BY created_at")]


def key_id_of(key: str) -> str | None:
    """The (non-secret) key id of a well-formed key, or None."""
    match = _KEY.match(key)
    return None if match is None else match.group(1)


class KeyVerifier:
    """Checks ``Authorization: Bearer`` keys: one indexed lookup per request, one argon2
    verification per key per ``cache_seconds``.

    It remembers, per key id, the sha256 of the key that last passed argon2 in this process
    (never the key) and until when that pass counts. :meth:`recently_verified` (the pass
    still counts) and :meth:`known_good` (it passed at some time) let the API decide which
    limits a request counts against without a database read or argon2: a wrong secret sent
    with a real key id matches neither."""

    def __init__(self, cache_seconds: float) -> None:
        self.cache_seconds = cache_seconds
        self._verified: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def _remembered(self, key: str) -> tuple[bytes, float] | None:
        """The remembered pass of this exact key, or None."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        with self._lock:
            cached = self._verified.get(key_id)
        return cached if cached is not None and \
            cached[0] == hashlib.sha256(key.encode()).digest() else None

    def recently_verified(self, key: str) -> bool:
        """Whether this exact key passed argon2 within ``cache_seconds`` (no database read:
        this only decides which rate limit a request counts against)."""
        cached = self._remembered(key)
        return cached is not None and cached[1] >= time.monotonic()

    def known_good(self, key: str) -> bool:
        """Whether this exact key ever passed argon2 in this process (it may need argon2
        again, but is not one of a flood's guesses)."""
        return self._remembered(key) is not None

    def verify(self, conn: sqlite3.Connection, key: str) -> Principal | None:
        """The key's principal, or None when it is malformed, unknown, wrong or revoked.
        Spends at most one argon2 verification (in a bounded slot: secret_hash.py)."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        row = conn.execute("SELECT name, role, hash, revoked_at FROM api_keys WHERE key_id = ?",
                           (key_id,)).fetchone()
        if row is None or row[3] is not None:
            return None
        if not self.recently_verified(key):
            if not verify_secret(row[2], key):
                return None
            with self._lock:
                self._verified[key_id] = (hashlib.sha256(key.encode()).digest(),
                                          time.monotonic() + self.cache_seconds)
        return Principal(key_id, row[0], row[1])
