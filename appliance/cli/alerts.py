"""``branchguard alerts``: the dispatcher, a test message, delivery status and failures."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from ..errors import BranchguardError
from .options import existing_db, friendly_errors, settings_from, settings_options


@click.group()
def alerts() -> None:
    """Alerts to chat and email through Apprise: the dispatcher and its views.

    \b
    Example:
      BRANCHGUARD_ALERTS_CRITICAL='json://127.0.0.1:9000/hook' branchguard alerts test
      branchguard alerts run --data-dir ./var
      branchguard alerts status
    """


@alerts.command("run")
@settings_options
@friendly_errors
def alerts_run(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Deliver the alert outbox to the configured destinations until Ctrl-C / SIGTERM.

    \b
    Example:
      BRANCHGUARD_ALERTS_HIGH='mailto://smtp.bank.example?to=fraud@bank.example' \\
        branchguard alerts run --data-dir ./var
    """
    from ..alerts.dispatch import run_dispatcher

    sys.exit(run_dispatcher(settings_from(config, data_dir, nats_url)))


@alerts.command("test")
@settings_options
@friendly_errors
def alerts_test(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Send a test message to each configured destination and report each result.

    \b
    Example:
      branchguard alerts test --config branchguard.toml
    """
    from ..alerts.dispatch import send_test

    results = send_test(settings_from(config, data_dir, nats_url))
    if not results:
        raise BranchguardError("no alert destinations configured", field="alerts_critical",
                               hint="set alerts_critical, alerts_high or alerts_warning "
                                    "(see docs/alerts.md)")
    for r in results:
        click.echo(f"{'ok    ' if r.error is None else 'FAILED'} {r.label}"
                   + ("" if r.error is None else f": {r.error}"))
    if any(r.error is not None for r in results):
        sys.exit(1)


@alerts.command("status")
@settings_options
@friendly_errors
def alerts_status(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Alert metrics (sent, failed, retried, queue depth, oldest age), health, destinations.

    \b
    Example:
      branchguard alerts status --data-dir ./var
    """
    from ..alerts.metrics import status as alert_status

    settings = settings_from(config, data_dir, nats_url)
    existing_db(settings)
    click.echo(json.dumps(alert_status(settings), indent=2))


@alerts.command("failed")
@settings_options
@click.option("--limit", type=int, default=100, show_default=True)
@friendly_errors
def alerts_failed(config: Path | None, data_dir: Path | None, nats_url: str | None,
                  limit: int) -> None:
    """List alert deliveries given up on (older than alerts_max_age_seconds), newest first.

    \b
    Example:
      branchguard alerts failed --data-dir ./var --limit 20
    """
    from ..alerts.messages import case_link
    from ..alerts.outbox import Outbox

    settings = settings_from(config, data_dir, nats_url)
    existing_db(settings)
    outbox = Outbox(settings.db_path)
    try:
        rows = outbox.failed(limit)
    finally:
        outbox.close()
    for f in rows:
        click.echo(json.dumps({
            "alert_id": f.alert_id, "severity": f.severity, "destination": f.label,
            "raised_at": datetime.fromtimestamp(f.created_at, timezone.utc).isoformat(),
            "attempts": f.attempts, "last_error": f.last_error,
            "case": case_link(settings.console_url, f.alert_id)}))
    if not rows:
        click.echo("no failed alert deliveries")


COMMANDS = (alerts,)
"""What this module adds to ``branchguard``."""
