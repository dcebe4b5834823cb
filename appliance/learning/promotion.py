"""Promote and roll back (console and command line), each recorded in the audit trail.

The registry (registry.py) is files, the audit trail is the database; a change is made inside
the audit entry's own database transaction (``change.apply_change``): the registry's pointer
is swapped first, then the entry appended, so a registry change that fails (a model whose
sha256 does not match, nothing to roll back to) writes no entry, and an entry records the
state before and after exactly as the registry wrote it. Subjects are ``model:<version>`` of
the model put in production; actions ``model.promote`` and ``model.rollback``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from .. import audit
from ..audit import entry_dict
from ..change import apply_change, migrated_writer
from ..scoring.registry import Registry, RegistryState
from ..settings import Settings


def promote(conn: sqlite3.Connection, registry: Registry, version: str, actor: str,
            reason: str) -> RegistryState:
    """Make ``version`` production (registry.promote) and audit it; call in apply_change."""
    before = registry.state()
    return _audited(conn, actor, "model.promote", version, before,
                    registry.promote(version, reason=reason))


def rollback(conn: sqlite3.Connection, registry: Registry, actor: str, reason: str
             ) -> RegistryState:
    """Put the previous production model back (registry.rollback) and audit it."""
    before = registry.state()
    after = registry.rollback(reason=reason)
    return _audited(conn, actor, "model.rollback", after.production, before, after)


def set_stage(conn: sqlite3.Connection, registry: Registry, version: str, stage: str,
              actor: str, reason: str) -> RegistryState:
    """Set a non-production model's stage (registry.set_stage: putting one in ``shadow``
    makes it score every live batch) and audit it."""
    before = registry.state()
    return _audited(conn, actor, "model.stage", version, before,
                    registry.set_stage(version, stage, reason=reason))


def _audited(conn: sqlite3.Connection, actor: str, action: str, version: str,
             before: RegistryState, after: RegistryState) -> RegistryState:
    """The audit entry of a registry change that has been made: ``after`` is returned."""
    audit.append(conn, actor, action, f"model:{version}", before.to_json(), after.to_json())
    return after


def on_node(settings: Settings, change: Callable[[sqlite3.Connection, Registry], RegistryState]
            ) -> RegistryState:
    """Run an audited registry change against the node's own database and registry (the
    command line's way: ``branchguard models promote|rollback``)."""
    db = migrated_writer(settings.db_path)
    try:
        return apply_change(db, lambda conn: change(conn, Registry.of(settings)))
    finally:
        db.close()


def model_history(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The audited promotions, rollbacks and stage changes, newest first."""
    return [entry_dict(r) for r in conn.execute(
        "SELECT seq, at, actor, action, subject, before, after, prev_hash, hash FROM audit_log "
        "WHERE action IN ('model.promote', 'model.rollback', 'model.stage') "
        "ORDER BY seq DESC LIMIT ?",
        (limit,))]


def has_labels(conn: sqlite3.Connection) -> bool:
    """Whether any label is stored (without labels, precision, recall, F1, AP and AUC say
    nothing: every transaction counts as genuine)."""
    return conn.execute("SELECT 1 FROM labels LIMIT 1").fetchone() is not None
