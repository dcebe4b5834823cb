"""``deadletters list``, ``show`` and ``resubmit``: the messages the scorer refused, with
their reasons and bodies, and putting one back after a fix (casework/deadletters.py)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from ..settings import Settings
from .options import actor, existing_db, friendly_errors, settings_from, settings_options


@click.group("deadletters")
def deadletters() -> None:
    """Dead letters: what the scorer refused, why, and the message itself.

    \b
    Example:
      branchguard deadletters list --data-dir ./var --reason "bad json"
      branchguard deadletters show 4711
      branchguard deadletters resubmit 4711 --body fixed.json
    """


def _conn(settings: Settings) -> Any:
    """A connection to the node database (migrated, so older databases read too)."""
    from ..change import migrated_writer

    existing_db(settings)
    return migrated_writer(settings.db_path).conn


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _json(letter: Any, body: bool) -> dict[str, Any]:
    out: dict[str, Any] = letter.as_dict(body=body)
    out["received_at"] = _iso(letter.received_at)
    for r in out["resubmissions"]:
        r["at"] = _iso(r["at"])
    return out


@deadletters.command("list")
@settings_options
@click.option("--reason", default=None, help="Only those whose reason contains this text.")
@click.option("--before-seq", type=int, default=None,
              help="Only those below this stream sequence (the next page).")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--bodies/--no-bodies", default=True, show_default=True,
              help="Include each message's body.")
@friendly_errors
def deadletters_list(config: Path | None, data_dir: Path | None, nats_url: str | None,
                     reason: str | None, before_seq: int | None, limit: int,
                     bodies: bool) -> None:
    """List dead letters, newest first: one JSON line each (stream sequence, time, subject,
    reason, size, body, re-submissions).

    \b
    Example:
      branchguard deadletters list --data-dir ./var --reason oversize --limit 20
    """
    from ..casework.deadletters import listing

    conn = _conn(settings_from(config, data_dir, nats_url))
    try:
        rows = listing(conn, before_seq=before_seq, reason=reason, limit=limit)
    finally:
        conn.close()
    for letter in rows:
        click.echo(json.dumps(_json(letter, bodies), ensure_ascii=True))
    if not rows:
        click.echo("no dead letters" + (" with that reason" if reason else ""), err=True)


@deadletters.command("show")
@settings_options
@click.argument("stream_seq", type=int)
@friendly_errors
def deadletters_show(config: Path | None, data_dir: Path | None, nats_url: str | None,
                     stream_seq: int) -> None:
    """One dead letter with its whole body and its re-submissions, as JSON.

    \b
    Example:
      branchguard deadletters show 4711 --data-dir ./var
    """
    from ..casework.deadletters import show

    conn = _conn(settings_from(config, data_dir, nats_url))
    try:
        letter = show(conn, stream_seq)
    finally:
        conn.close()
    click.echo(json.dumps(_json(letter, True), indent=2, ensure_ascii=True))


@deadletters.command("resubmit")
@settings_options
@click.argument("stream_seq", type=int)
@click.option("--body", "body_path", type=click.Path(path_type=Path, exists=True,
                                                     dir_okay=False), default=None,
              help="Publish this corrected message instead of the stored body.")
@click.option("--again", is_flag=True,
              help="Re-submit a dead letter that was re-submitted before.")
@friendly_errors
def deadletters_resubmit(config: Path | None, data_dir: Path | None, nats_url: str | None,
                         stream_seq: int, body_path: Path | None, again: bool) -> None:
    """Publish a dead letter again to the TX stream, on its original subject, once what
    refused it is fixed: its stored body, or a corrected one. Checked against the contract
    first; audited; refused if it was re-submitted before, unless --again.

    \b
    Example:
      branchguard deadletters resubmit 4711 --body fixed.json --data-dir ./var
    """
    from ..casework.deadletters import resubmit

    settings = settings_from(config, data_dir, nats_url)
    existing_db(settings)
    body = body_path.read_bytes() if body_path is not None else None
    done = asyncio.run(resubmit(settings, stream_seq, actor(), body, again))
    click.echo(json.dumps({"stream_seq": stream_seq, **done.as_dict(),
                           "at": _iso(done.at)}))


COMMANDS = (deadletters,)
"""What this module adds to ``branchguard``."""
