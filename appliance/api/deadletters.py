"""Dead-letter routes (analysts and above): what the scorer refused, why, and the message
itself, newest first (casework/deadletters.py). Re-submitting one is the command line's
``branchguard deadletters resubmit``: it publishes to NATS, which the API does not."""

from __future__ import annotations

from typing import Any

from ..casework import deadletters
from .endpoint import MAX_ID, Call, Routes
from .errors import ApiError

routes = Routes()


@routes.route("GET", "/api/v1/dead-letters", "analyst", ("before_seq", "reason", "limit"))
def listing(call: Call) -> dict[str, Any]:
    """
    summary: Dead letters newest first, with reason, subject, stream sequence, time and body.
    description: 'The body is text when it is UTF-8 (body), else base64 (body_base64); null
      with body_recorded false for those dead-lettered before bodies were kept. Page with
      before_seq = the previous page''s next_before_seq.'
    parameters:
      - {name: before_seq, in: query, schema: {type: integer, minimum: 1}}
      - {name: reason, in: query, schema: {type: string}, description: 'reason contains this text'}
      - {$ref: '#/components/parameters/limit'}
    responses:
      200: {description: '{"dead_letters": [...], "next_before_seq"}'}
      400: {$ref: '#/components/responses/BadRequest'}
    """
    p = call.params()
    before = p.integer("before_seq", 1, MAX_ID, 0) or None
    limit = p.integer("limit", 1, deadletters.LIMIT, 100)
    rows = deadletters.listing(call.conn, before_seq=before, reason=p.text("reason"),
                               limit=limit)
    return {"dead_letters": [r.as_dict() for r in rows],
            "next_before_seq": rows[-1].stream_seq if len(rows) == limit else None}


@routes.route("GET", "/api/v1/dead-letters/{stream_seq:int}", "analyst")
def one(call: Call) -> dict[str, Any]:
    """
    summary: One dead letter by its TX stream sequence, with its whole body and re-submissions.
    parameters: [{name: stream_seq, in: path, required: true, schema: {type: integer}}]
    responses:
      200: {description: the dead letter}
      404: {$ref: '#/components/responses/NotFound'}
    """
    seq = call.path_id("stream_seq")
    try:
        return deadletters.show(call.conn, seq).as_dict()
    except deadletters.DeadLetterError:
        raise ApiError(404, "no dead letter has this stream sequence", "stream_seq") from None
