"""Alert routes: the list (filters, sort, cursor pagination, total), one alert with its
transaction, features and reasons, its related open alerts, the account's history, and the
case workflow (status, assignee, notes, bulk changes on related alerts)."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import msgspec

from ..casework.casefile import TX_COLUMNS, alert_transaction, notes
from ..casework.cases import (ALERT_SELECT, STATUSES, CaseError, Change, add_note, alert_row,
                              bulk_change, change_case, needs_supervisor)
from ..casework.keys import role_at_least
from ..casework.queue import BRANCH_FILTER
from ..verdict import SEVERITIES
from . import bodies
from .endpoint import Call, Routes
from .errors import ApiError
from .params import encode_cursor

routes = Routes()
_list = msgspec.json.Decoder(list[Any])

SORTS = {"created_at": "a.alert_id", "risk": "a.risk", "ts": "a.ts"}
SORT_CHOICES = tuple(f"{sign}{name}" for name in SORTS for sign in ("", "-"))
LIST_PARAMS = ("status", "severity", "min_risk", "max_risk", "reason", "account_id",
               "terminal_id", "assignee", "branch", "since", "until", "sort", "limit",
               "cursor")


def _filters(call: Call) -> tuple[list[str], list[Any]]:
    p = call.params()
    where: list[str] = []
    args: list[Any] = []
    for name, column, allowed in (("status", "a.status", STATUSES),
                                  ("severity", "a.severity", SEVERITIES)):
        values = p.choices(name, allowed)
        if values:
            where.append(f"{column} IN ({', '.join('?' * len(values))})")
            args.extend(values)
    low, high = p.number("min_risk", 0.0, 1.0), p.number("max_risk", 0.0, 1.0)
    if low is not None and high is not None and low > high:
        raise ApiError(400, "must not be above max_risk", "min_risk")
    if low is not None:
        where.append("a.risk >= ?")
        args.append(low)
    if high is not None:
        where.append("a.risk <= ?")
        args.append(high)
    reason = p.text("reason")
    if reason is not None:
        where.append("EXISTS (SELECT 1 FROM json_each(a.reasons) WHERE value = ?)")
        args.append(reason)
    for name in ("account_id", "terminal_id", "assignee"):
        value = p.text(name)
        if value is not None:
            where.append(f"a.{name} = ?")
            args.append(value)
    branch = p.text("branch")
    if branch is not None:
        where.append(BRANCH_FILTER)
        args.append(branch)
    more_where, more_args = p.time_range("a.ts")
    return where + more_where, args + more_args


@routes.route("GET", "/api/v1/alerts", "viewer", LIST_PARAMS, cached=True)
def list_alerts(call: Call) -> dict[str, Any]:
    """
    summary: List alerts, newest first by default, with a total count.
    description: >
      Filters combine with AND. Pass next_cursor back as cursor for the next page. Each
      alert carries its transaction's amount, currency, channel, merchant_category,
      location and branch (null once retention purged the transaction), its disposition and
      fraud_type once closed, and age_seconds (since the alert was raised, as of the
      response's as_of, epoch seconds: a cached response keeps the age it was read with).
    parameters:
      - {$ref: '#/components/parameters/status'}
      - {$ref: '#/components/parameters/severity'}
      - {name: min_risk, in: query, schema: {type: number, minimum: 0, maximum: 1}}
      - {name: max_risk, in: query, schema: {type: number, minimum: 0, maximum: 1}}
      - {name: reason, in: query, schema: {type: string}}
      - {name: account_id, in: query, schema: {type: string}}
      - {name: terminal_id, in: query, schema: {type: string}}
      - {name: assignee, in: query, schema: {type: string}}
      - {name: branch, in: query, schema: {type: string}, description: "only this branch's alerts (at a regional hub)"}
      - {$ref: '#/components/parameters/since'}
      - {$ref: '#/components/parameters/until'}
      - {name: sort, in: query, schema: {type: string, enum: [created_at, -created_at, risk, -risk, ts, -ts]}}
      - {$ref: '#/components/parameters/limit'}
      - {name: cursor, in: query, schema: {type: string}}
    responses:
      200: {description: '{"total", "count", "next_cursor", "as_of", "alerts": [...]}'}
      400: {$ref: '#/components/responses/BadRequest'}
    """
    p = call.params()
    sort = p.choice("sort", SORT_CHOICES, "-created_at") or "-created_at"
    descending = sort.startswith("-")
    column = SORTS[sort.lstrip("-")]
    limit = p.integer("limit", 1, 500, 50)
    cursor = p.cursor()
    where, args = _filters(call)
    total = call.conn.execute(
        "SELECT count(*) FROM alerts a" + (" WHERE " + " AND ".join(where) if where else ""),
        args).fetchone()[0]
    page_where, page_args = list(where), list(args)
    if cursor is not None:
        if cursor[0] != sort:
            raise ApiError(400, "the cursor belongs to another sort order", "cursor")
        page_where.append(f"({column}, a.alert_id) {'<' if descending else '>'} (?, ?)")
        page_args.extend(cursor[1:])
    order = "DESC" if descending else "ASC"
    sql = (ALERT_SELECT + (" WHERE " + " AND ".join(page_where) if page_where else "")
           + f" ORDER BY {column} {order}, a.alert_id {order} LIMIT ?")
    rows = [alert_row(r) for r in call.conn.execute(sql, [*page_args, limit + 1])]
    more = len(rows) > limit
    rows = rows[:limit]
    key = sort.lstrip("-")
    next_cursor = (encode_cursor([sort, rows[-1]["alert_id" if key == "created_at" else key],
                                  rows[-1]["alert_id"]]) if more else None)
    as_of = time.time()
    for row in rows:
        row["age_seconds"] = max(0.0, round(as_of - row["created_at"], 3))
    return {"total": total, "count": len(rows), "next_cursor": next_cursor, "as_of": as_of,
            "alerts": rows}


def _alert(conn: sqlite3.Connection, alert_id: int) -> dict[str, Any]:
    row = conn.execute(ALERT_SELECT + " WHERE a.alert_id = ?", (alert_id,)).fetchone()
    if row is None:
        raise ApiError(404, "no such alert", "alert_id")
    return alert_row(row)


@routes.route("GET", "/api/v1/alerts/{alert_id:int}", "viewer")
def get_alert(call: Call) -> dict[str, Any]:
    """
    summary: One alert with its case state, transaction, features, reasons, explanation
      (rules with values, plain-words baseline, model contributions) and notes.
    parameters: [{$ref: '#/components/parameters/alert_id'}]
    responses:
      200: {description: '{"alert", "transaction", "features", "reasons", "explanation", "notes"}'}
      404: {$ref: '#/components/responses/NotFound'}
    """
    alert = _alert(call.conn, call.path_id("alert_id"))
    return {"alert": alert, **alert_transaction(call.conn, alert["transaction_id"], call.api.explainer),
            "notes": notes(call.conn, alert["alert_id"])}


@routes.route("GET", "/api/v1/alerts/{alert_id:int}/related", "viewer")
def related(call: Call) -> dict[str, Any]:
    """
    summary: The other open alerts (NEW or INVESTIGATING) on the same account and terminal.
    parameters: [{$ref: '#/components/parameters/alert_id'}]
    responses:
      200: {description: '{"account": [...], "terminal": [...]}'}
      404: {$ref: '#/components/responses/NotFound'}
    """
    alert = _alert(call.conn, call.path_id("alert_id"))
    out: dict[str, Any] = {}
    for scope in ("account", "terminal"):
        out[scope] = [alert_row(r) for r in call.conn.execute(
            ALERT_SELECT + f" WHERE a.{scope}_id = ? AND a.status IN ('NEW', 'INVESTIGATING') "
            "AND a.alert_id != ? ORDER BY a.alert_id DESC LIMIT 200",
            (alert[f"{scope}_id"], alert["alert_id"]))]
    return out


@routes.route("GET", "/api/v1/accounts/{account_id}/transactions", "viewer", ("limit",),
              cached=True)
def account_history(call: Call) -> dict[str, Any]:
    """
    summary: The account's most recent transactions with their verdicts, newest first.
    parameters:
      - {name: account_id, in: path, required: true, schema: {type: string}}
      - {$ref: '#/components/parameters/limit'}
    responses:
      200: {description: '{"account_id", "transactions": [...]}'}
      400: {$ref: '#/components/responses/BadRequest'}
    """
    limit = call.params().integer("limit", 1, 500, 50)
    account = call.request.path_params["account_id"]
    columns = [c for c in TX_COLUMNS if c != "features"]
    rows = []
    for row in call.conn.execute(
            f"SELECT {', '.join(columns)} FROM transactions WHERE account_id = ? "
            "ORDER BY ts DESC LIMIT ?", (account, limit)):
        item = dict(zip(columns, row))
        item["reasons"] = _list.decode(item["reasons"])
        item["details"] = _list.decode(item["details"])
        rows.append(item)
    return {"account_id": account, "transactions": rows}


@routes.route("PATCH", "/api/v1/alerts/{alert_id:int}", "analyst")
def change(call: Call) -> dict[str, Any]:
    """
    summary: Change an alert's status, assignee or disposition, at the version you last read.
    description: >
      NEW -> INVESTIGATING -> CONFIRMED_FRAUD | FALSE_POSITIVE. Closing takes a disposition
      (confirmed_fraud, customer_confirmed, false_positive, duplicate, other), which decides
      the closed status (status may be left out, or must agree), and with confirmed_fraud a
      fraud_type (velocity_burst, card_testing, amount_spike, impossible_travel,
      atm_cashout, new_terminal_large, other); both become the transaction's label and its
      typology. Reopening a closed alert (back to INVESTIGATING) or re-disposing it (a
      disposition on a closed alert: the label is corrected, and the correction audited)
      needs a supervisor. A stale version gets 409 with the current case state; a
      transition that is not allowed, or a disposition missing, unknown or without its
      fraud type, gets 422 naming the field.
    parameters: [{$ref: '#/components/parameters/alert_id'}]
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [version]
            additionalProperties: false
            properties:
              version: {type: integer, minimum: 1}
              status: {$ref: '#/components/schemas/Status'}
              assignee: {type: string, nullable: true, minLength: 1, maxLength: 100}
              disposition: {$ref: '#/components/schemas/Disposition'}
              fraud_type: {$ref: '#/components/schemas/FraudType'}
    responses:
      200: {description: the new case state}
      400: {$ref: '#/components/responses/BadRequest'}
      403: {description: reopening or re-disposing needs the supervisor role}
      404: {$ref: '#/components/responses/NotFound'}
      409: {description: stale version (the body has the current state)}
      422: {description: transition not allowed, or the disposition or fraud type is missing or wrong}
    """
    alert_id = call.path_id("alert_id")
    body = call.decode(bodies.CaseChange)
    unassign = body.assignee is None
    assignee = None if body.assignee is None or body.assignee is msgspec.UNSET \
        else str(body.assignee)
    principal = call.principal

    def apply(conn: sqlite3.Connection) -> dict[str, Any]:
        row = conn.execute("SELECT status FROM alerts WHERE alert_id = ?",
                           (alert_id,)).fetchone()
        if row and needs_supervisor(row[0], body.status, body.disposition) and principal \
                and not role_at_least(principal.role, "supervisor"):
            raise CaseError(403, "reopening or re-disposing a closed alert needs the "
                            "supervisor role", "disposition" if body.disposition else "status")
        return change_case(conn, alert_id, Change(body.version, body.status, assignee,
                                                  unassign, body.disposition,
                                                  body.fraud_type), call.actor)

    return {"alert_id": alert_id, **call.change(apply)}


@routes.route("POST", "/api/v1/alerts/{alert_id:int}/notes", "analyst")
def note(call: Call) -> tuple[int, dict[str, Any]]:
    """
    summary: Add a note to an alert (notes are never edited or deleted).
    parameters: [{$ref: '#/components/parameters/alert_id'}]
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [text]
            additionalProperties: false
            properties: {text: {type: string, minLength: 1, maxLength: 4000}}
    responses:
      201: {description: the note}
      400: {$ref: '#/components/responses/BadRequest'}
      404: {$ref: '#/components/responses/NotFound'}
    """
    alert_id = call.path_id("alert_id")
    body = call.decode(bodies.Note)
    return 201, call.change(lambda conn: add_note(conn, alert_id, body.text, call.actor))


@routes.route("POST", "/api/v1/alerts/{alert_id:int}/bulk", "analyst")
def bulk(call: Call) -> dict[str, Any]:
    """
    summary: Apply one change to this alert and every other open alert on its account or terminal.
    description: One transaction, one audit entry per alert changed; alerts the transition
      does not apply to are listed as skipped. version is this alert's.
    parameters: [{$ref: '#/components/parameters/alert_id'}]
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [version, scope]
            additionalProperties: false
            properties:
              version: {type: integer, minimum: 1}
              scope: {type: string, enum: [account, terminal]}
              status: {$ref: '#/components/schemas/Status'}
              assignee: {type: string, minLength: 1, maxLength: 100}
              disposition: {$ref: '#/components/schemas/Disposition'}
              fraud_type: {$ref: '#/components/schemas/FraudType'}
    responses:
      200: {description: '{"changed": [...], "skipped": [...]}'}
      400: {$ref: '#/components/responses/BadRequest'}
      404: {$ref: '#/components/responses/NotFound'}
      409: {description: stale version}
      422: {description: the disposition or fraud type is missing or wrong}
    """
    alert_id = call.path_id("alert_id")
    body = call.decode(bodies.Bulk)
    if body.status is None and body.assignee is None and body.disposition is None:
        raise ApiError(400, "give a status, a disposition, an assignee or several", "status")
    return call.change(lambda conn: bulk_change(conn, alert_id, body.version, body.scope,
                                                body.status, body.assignee, call.actor,
                                                body.disposition, body.fraud_type))
