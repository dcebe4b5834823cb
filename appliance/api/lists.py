"""Allow/deny list routes: read by any role, changed (audited) by supervisors and admins.
The lists themselves, and how the scorer applies them, are in appliance/scoring/lists.py."""

from __future__ import annotations

import sqlite3
from typing import Any

from ..scoring import lists
from . import bodies
from .endpoint import Call, Routes
from .params import parse_time

routes = Routes()


@routes.route("GET", "/api/v1/lists", "viewer", ("list", "kind", "include_inactive"))
def get_lists(call: Call) -> dict[str, Any]:
    """
    summary: Allow and deny list entries (active ones unless include_inactive).
    parameters:
      - {name: list, in: query, schema: {type: string, enum: [allow, deny]}}
      - {name: kind, in: query, schema: {type: string, enum: [account, terminal]}}
      - {name: include_inactive, in: query, schema: {type: boolean}}
    responses:
      200: {description: '{"entries": [...]}'}
      400: {$ref: '#/components/responses/BadRequest'}
    """
    p = call.params()
    return {"entries": lists.entries(call.conn, p.choice("list", lists.LISTS),
                                     p.choice("kind", lists.KINDS),
                                     p.boolean("include_inactive"))}


@routes.route("POST", "/api/v1/lists", "supervisor")
def add(call: Call) -> tuple[int, dict[str, Any]]:
    """
    summary: Add an account or terminal to the allow or deny list (the owner is the caller).
    description: The scorer picks it up within lists_refresh_seconds. Deny beats allow beats the model.
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [list, kind, value, reason]
            additionalProperties: false
            properties:
              list: {type: string, enum: [allow, deny]}
              kind: {type: string, enum: [account, terminal]}
              value: {type: string, minLength: 1, maxLength: 100}
              reason: {type: string, minLength: 1, maxLength: 4000}
              expires_at: {description: 'seconds since the epoch or ISO-8601; null never expires', nullable: true}
    responses:
      201: {description: the entry}
      400: {$ref: '#/components/responses/BadRequest'}
      422: {description: expires_at in the past}
    """
    body = call.decode(bodies.ListEntry)
    expires: float | None
    if body.expires_at is None:
        expires = None
    elif isinstance(body.expires_at, str):
        expires = parse_time(body.expires_at, "expires_at")
    else:
        expires = parse_time(str(body.expires_at), "expires_at")

    def insert(conn: sqlite3.Connection) -> dict[str, Any]:
        return lists.add_entry(conn, body.list, body.kind, body.value, body.reason,
                               call.actor, expires)

    return 201, call.change(insert)


@routes.route("DELETE", "/api/v1/lists/{entry_id:int}", "supervisor")
def remove(call: Call) -> dict[str, Any]:
    """
    summary: Remove a list entry (kept, marked removed, audited).
    parameters: [{name: entry_id, in: path, required: true, schema: {type: integer}}]
    responses:
      200: {description: the entry as removed}
      404: {$ref: '#/components/responses/NotFound'}
      409: {description: already removed}
    """
    entry_id = call.path_id("entry_id")
    return call.change(lambda conn: lists.remove_entry(conn, entry_id, call.actor))
