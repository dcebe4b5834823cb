"""Every write that is not the scorer's: one short transaction per change.

The scorer stays the database's main writer; analysts' changes (cases, notes, lists, keys)
are small and go through :func:`apply_change`. Each runs in ``db.atomic()`` and starts by
bumping the ``api_generation`` row, which does two things: it takes SQLite's write lock at
once (so what the change then reads cannot be changed under it, and a busy database is
waited for by ``busy_timeout`` rather than failing), and it invalidates every cached API
response, since the generation is part of the cache key (see api/cache.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlite_utils import Database

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000


def connect_writer(path: Path) -> Database:
    """A connection for :func:`apply_change` (the schema must already be migrated)."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = NORMAL")
    return Database(conn)


def migrated_writer(path: Path) -> Database:
    """:func:`connect_writer` on the node database at ``path``, created and migrated first
    if this is a new node (what every command-line change needs)."""
    from .store import open_db  # the schema lives with the store

    open_db(path).close()
    return connect_writer(path)


def apply_change(db: Database, change: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``change`` in one transaction that also bumps the cache generation; all or
    nothing. ``change`` must be short: the scorer waits for it."""
    with db.atomic():
        db.conn.execute("UPDATE api_generation SET value = value + 1 WHERE id = 1")
        return change(db.conn)
