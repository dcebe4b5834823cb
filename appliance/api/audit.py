"""Audit routes (supervisor and admin only): read the trail, and check its hash chain."""

from __future__ import annotations

from typing import Any

from .. import audit
from .endpoint import Call, Routes

routes = Routes()


@routes.route("GET", "/api/v1/audit", "supervisor", ("after_seq", "subject", "limit"))
def entries(call: Call) -> dict[str, Any]:
    """
    summary: Audit entries in order, after after_seq (default from the start).
    parameters:
      - {name: after_seq, in: query, schema: {type: integer, minimum: 0}}
      - {name: subject, in: query, schema: {type: string}, description: 'e.g. alert:42'}
      - {$ref: '#/components/parameters/limit'}
    responses:
      200: {description: '{"entries": [...], "next_after_seq"}'}
      400: {$ref: '#/components/responses/BadRequest'}
    """
    p = call.params()
    after = p.integer("after_seq", 0, 2**62, 0)
    limit = p.integer("limit", 1, 500, 100)
    subject = p.text("subject")
    sql = ("SELECT seq, at, actor, action, subject, before, after, prev_hash, hash "
           "FROM audit_log WHERE seq > ?")
    args: list[Any] = [after]
    if subject is not None:
        sql += " AND subject = ?"
        args.append(subject)
    rows = [audit.entry_dict(r) for r in call.conn.execute(sql + " ORDER BY seq LIMIT ?",
                                                            [*args, limit])]
    return {"entries": rows,
            "next_after_seq": rows[-1]["seq"] if len(rows) == limit else None}


@routes.route("GET", "/api/v1/audit/verify", "supervisor")
def verify(call: Call) -> dict[str, Any]:
    """
    summary: Recompute the hash chain; names the first broken entry, if any.
    responses:
      200: {description: '{"ok", "entries", "broken_seq", "problem"}'}
    """
    result = audit.verify(call.conn)
    return {"ok": result.broken_seq is None, "entries": result.entries,
            "broken_seq": result.broken_seq, "problem": result.problem}
