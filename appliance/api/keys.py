"""Key routes (admin only): list keys (never their hashes) and revoke one. Keys are created
with ``branchguard keys create``, the only place a key is ever shown."""

from __future__ import annotations

from typing import Any

from ..casework import keys
from .endpoint import Call, Routes
from .errors import ApiError

routes = Routes()


@routes.route("GET", "/api/v1/keys", "admin")
def list_keys(call: Call) -> dict[str, Any]:
    """
    summary: Every API key's id, name, role and state.
    responses:
      200: {description: '{"keys": [...]}'}
    """
    return {"keys": keys.listing(call.conn)}


@routes.route("POST", "/api/v1/keys/{key_id}/revoke", "admin")
def revoke(call: Call) -> dict[str, Any]:
    """
    summary: Revoke a key; it is refused from the next request on.
    parameters: [{name: key_id, in: path, required: true, schema: {type: string}}]
    responses:
      200: {description: '{"key_id", "revoked": true}'}
      404: {$ref: '#/components/responses/NotFound'}
    """
    key_id = call.request.path_params["key_id"]
    try:
        keys.revoke(call.api.writer(), key_id, call.actor)
    except keys.KeysError as exc:
        raise ApiError(404, exc.message, "key_id") from None
    return {"key_id": key_id, "revoked": True}
