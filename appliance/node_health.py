"""What ``branchguard run`` says about its parts, for ``/readyz`` to read.

The runner rewrites ``<data_dir>/node-health.json`` about every second: the state of the
scorer and of each child it supervises (``nats-server``, ``litestream``, ``alerts``), each
``ok`` or a word for what it is doing instead (``starting``, ``restarting``,
``waiting for nats``). The API, a process of its own (a child of the runner, or its own
service beside it), reads it on every ``/readyz``. A file not rewritten for
:data:`STALE_SECONDS` means no runner is looking after this data directory: the scorer is
then ``not running``, whatever the file last said.

It lives at the ground because the writer (``operations``) sits above the reader (``api``),
and both must agree on the one format.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from .settings import Settings

FILE_NAME = "node-health.json"
STALE_SECONDS = 10.0
"""A file older than this was left by a runner that is gone (or stuck)."""
OK = "ok"
NOT_RUNNING = "not running"


def path(settings: Settings) -> Path:
    return settings.data_dir / FILE_NAME


def write(settings: Settings, parts: Mapping[str, str]) -> None:
    """Replace the file with ``parts`` (name → state), atomically: a reader sees the old
    file or the new one, never half of one."""
    target = path(settings)
    temporary = target.with_name(f".{target.name}.{os.getpid()}")
    temporary.write_text(json.dumps({"pid": os.getpid(), "updated": time.time(),
                                     "parts": dict(parts)}))
    os.replace(temporary, target)


def remove(settings: Settings) -> None:
    """At a clean stop: nothing is running here any more."""
    path(settings).unlink(missing_ok=True)


def read(settings: Settings, now: float | None = None) -> dict[str, str]:
    """The parts and their states; ``{"scorer": "not running"}`` when no runner keeps the
    file fresh (none written, unreadable, or older than :data:`STALE_SECONDS`)."""
    try:
        data = json.loads(path(settings).read_text())
        updated, parts = float(data["updated"]), data["parts"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"scorer": NOT_RUNNING}
    if (time.time() if now is None else now) - updated > STALE_SECONDS \
            or not isinstance(parts, dict):
        return {"scorer": NOT_RUNNING}
    return {str(name): str(state) for name, state in parts.items()}
