"""The node's data over time: ``restore`` and ``replicate`` (Litestream), ``retention`` and
the ``terminals`` directory."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import click

from ..errors import BranchguardError
from .options import dir_options, friendly_errors, settings_from, settings_options


@click.command()
@settings_options
@click.option("--to", "to", type=click.Path(path_type=Path), default=None,
              help="Database file to write (default: the node's, <data_dir>/branchguard.db).")
@click.option("--force", is_flag=True, help="Overwrite an existing database file.")
@friendly_errors
def restore(config: Path | None, data_dir: Path | None, nats_url: str | None, to: Path | None,
            force: bool) -> None:
    """Rebuild the node database from its Litestream replica (replica_url), then print its
    checkpoint and counts. Start the node on it: it replays the TX stream from there.

    \b
    Example:
      branchguard restore --data-dir /var/lib/branchguard --to /var/lib/branchguard/branchguard.db
    """
    from ..operations.replication import restore as restore_db

    settings = settings_from(config, data_dir, nats_url)
    click.echo(json.dumps(restore_db(settings, to or settings.db_path, force=force), indent=2))


@click.command()
@settings_options
@friendly_errors
def replicate(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Run litestream in the foreground for the node database (for systemd or compose,
    with replicate = false on the node), from the same settings as the node.

    \b
    Example:
      BRANCHGUARD_REPLICA_URL=s3://bank-replicas/br001 branchguard replicate
    """
    from ..operations.replication import exec_litestream

    exec_litestream(settings_from(config, data_dir, nats_url))


@click.group()
def retention() -> None:
    """Retention tiers (hot, warm, cold, purged), legal holds and right-to-erasure.

    \b
    Example:
      branchguard retention run --dry-run
      branchguard retention hold ACC-1042 --reason "case 2026-17"
      branchguard retention erase ACC-2001
    """


def _parse_now(now: str | None) -> datetime | None:
    if now is None:
        return None
    try:
        parsed = datetime.fromisoformat(now)
    except ValueError as exc:
        raise BranchguardError("not an ISO 8601 time", field="now", value=now,
                               hint="e.g. 2027-01-31T00:00:00+00:00") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@retention.command("run")
@settings_options
@click.option("--dry-run", is_flag=True, help="Print what would move or be purged; change nothing.")
@click.option("--now", default=None, help="The clock to apply the tiers against (ISO 8601; "
                                          "default: now). For rehearsals and tests.")
@friendly_errors
def retention_run(config: Path | None, data_dir: Path | None, nats_url: str | None,
                  dry_run: bool, now: str | None) -> None:
    """Move rows to the tier their age says (verified before the source is deleted), purge
    what is past cold_days except held accounts; print every action as a JSON line."""
    from ..operations.retention import run_retention

    settings = settings_from(config, data_dir, nats_url)
    for action in run_retention(settings, now=_parse_now(now), dry_run=dry_run):
        click.echo(json.dumps({"dry_run": dry_run, **action.__dict__}))


@retention.command("hold")
@settings_options
@click.argument("account")
@click.option("--reason", required=True, help="Why (a case or court reference).")
@friendly_errors
def retention_hold(config: Path | None, data_dir: Path | None, nats_url: str | None,
                   account: str, reason: str) -> None:
    """Put ACCOUNT on legal hold: nothing of it is purged or erased until released."""
    from ..operations.retention import hold

    hold(settings_from(config, data_dir, nats_url), account, reason)
    click.echo(f"held {account}")


@retention.command("release")
@settings_options
@click.argument("account")
@friendly_errors
def retention_release(config: Path | None, data_dir: Path | None, nats_url: str | None,
                      account: str) -> None:
    """Lift ACCOUNT's legal hold."""
    from ..operations.retention import release

    released = release(settings_from(config, data_dir, nats_url), account)
    click.echo(f"released {account}" if released else f"{account} was not on hold")


@retention.command("erase")
@settings_options
@click.argument("account")
@friendly_errors
def retention_erase(config: Path | None, data_dir: Path | None, nats_url: str | None,
                    account: str) -> None:
    """Erase every row of ACCOUNT from every tier (refused while it is on legal hold)."""
    from ..operations.retention import erase

    click.echo(json.dumps(erase(settings_from(config, data_dir, nats_url), account), indent=2))


@click.group()
def terminals() -> None:
    """The terminal directory: names, branches and coordinates of terminals.

    \b
    Example:
      branchguard terminals import terminals.csv
    """


@terminals.command("import")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@dir_options
@friendly_errors
def terminals_import(file: Path, config: Path | None, data_dir: Path | None) -> None:
    """Import a terminals CSV (terminal_id,name,branch,latitude,longitude); all rows or none.

    Latitude and longitude are WGS 84 degrees, both given or both empty (no fixed place, e.g.
    an online merchant). A terminal already in the directory takes the file's values.

    \b
    Example:
      branchguard terminals import terminals.csv --data-dir ./var
    """
    from ..casework.terminal_directory import import_terminals

    settings = settings_from(config, data_dir, None)
    click.echo(json.dumps(import_terminals(settings.db_path, file).__dict__, indent=2))


COMMANDS = (restore, replicate, retention, terminals)
"""What this module adds to ``branchguard``."""
