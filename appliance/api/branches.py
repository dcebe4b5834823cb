"""``/api/v1/branches``: at a regional hub, each branch's link (casework/branch_links.py)."""

from __future__ import annotations

from typing import Any

from ..casework.branch_links import links
from .endpoint import Call, Routes

routes = Routes()


@routes.route("GET", "/api/v1/branches", "viewer", ())
def list_branches(call: Call) -> dict[str, Any]:
    """
    summary: Each branch's link to this hub, as the hub last saw it.
    description: >
      At a regional hub (docs/hub.md): state is connected, lagging (lag cases at the branch
      not at the hub yet), down (since when the hub saw it go) or unknown (no reading in
      the last 30 s: branchguard hub run is not running). Empty on a branch's own node.
    responses:
      200: {description: '{"branches": [{"branch", "state", "since", "lag", "last_heard", "checked_at"}]}'}
    """
    return {"branches": links(call.conn)}
