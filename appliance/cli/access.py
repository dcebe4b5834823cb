"""Who may do what: API ``keys``, console ``users``, and ``audit verify`` of the trail their
changes leave."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..settings import Settings
from .options import actor, existing_db, friendly_errors, settings_from, settings_options


@click.group("keys")
def keys_group() -> None:
    """API keys: create (shown once), list, revoke.

    \b
    Example:
      branchguard keys create --name alice --role analyst
      branchguard keys list
      branchguard keys revoke 3f9a0c1d2b4e
    """


def _writer(settings: Settings) -> Any:
    from ..change import migrated_writer

    return migrated_writer(settings.db_path)


@keys_group.command("create")
@settings_options
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--role", required=True,
              type=click.Choice(["viewer", "analyst", "supervisor", "admin"]))
@friendly_errors
def keys_create(config: Path | None, data_dir: Path | None, nats_url: str | None, name: str,
                role: str) -> None:
    """Create a key and print it once (only its argon2 hash is stored).

    \b
    Example:
      branchguard keys create --name alice --role analyst
    """
    from ..casework.keys import create

    settings = settings_from(config, data_dir, nats_url)
    key_id, key = create(_writer(settings), name, role, actor())
    click.echo(json.dumps({"key_id": key_id, "name": name, "role": role, "key": key}))
    click.echo("store the key now: it is not shown again", err=True)


@keys_group.command("list")
@settings_options
@friendly_errors
def keys_list(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """List keys: id, name, role, created, revoked (never the keys or hashes).

    \b
    Example:
      branchguard keys list --data-dir ./var
    """
    from ..casework.keys import listing

    settings = settings_from(config, data_dir, nats_url)
    click.echo(json.dumps(listing(_writer(settings).conn), indent=2))


@keys_group.command("revoke")
@settings_options
@click.argument("key_id")
@friendly_errors
def keys_revoke(config: Path | None, data_dir: Path | None, nats_url: str | None,
                key_id: str) -> None:
    """Revoke a key: the API refuses it from the next request on.

    \b
    Example:
      branchguard keys revoke 3f9a0c1d2b4e
    """
    from ..casework.keys import revoke

    settings = settings_from(config, data_dir, nats_url)
    revoke(_writer(settings), key_id, actor())
    click.echo(json.dumps({"key_id": key_id, "revoked": True}))


@click.group("audit")
def audit_group() -> None:
    """The audit trail of case, list and key changes.

    \b
    Example:
      branchguard audit verify --data-dir ./var
    """


@audit_group.command("verify")
@settings_options
@friendly_errors
def audit_verify(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Check the audit trail's hash chain; exit 1 naming the first broken entry.

    \b
    Example:
      branchguard audit verify --data-dir ./var
    """
    import sqlite3

    from ..audit import verify

    settings = settings_from(config, data_dir, nats_url)
    existing_db(settings)
    conn = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
    try:
        result = verify(conn)
    finally:
        conn.close()
    if result.broken_seq is not None:
        click.echo(f"audit chain broken at entry {result.broken_seq}: {result.problem} "
                   f"({result.entries} entries read)", err=True)
        sys.exit(1)
    click.echo(f"audit chain ok: {result.entries} entries")


@click.group("users")
def users_group() -> None:
    """Console users: create (password shown once), list, disable, unlock.

    \b
    Example:
      branchguard users create --username alice --role analyst
      branchguard users list
      branchguard users disable alice
      branchguard users unlock alice --address 10.0.0.7
    """


@users_group.command("create")
@settings_options
@click.option("--username", required=True, help="Login name: a-z, 0-9, '.', '_', '-'.")
@click.option("--role", required=True,
              type=click.Choice(["viewer", "analyst", "supervisor", "admin"]))
@click.option("--password-stdin", is_flag=True,
              help="Read the password from stdin instead of generating one.")
@friendly_errors
def users_create(config: Path | None, data_dir: Path | None, nats_url: str | None,
                 username: str, role: str, password_stdin: bool) -> None:
    """Create a console user; prints a generated password once (only its hash is kept).

    \b
    Example:
      branchguard users create --username alice --role analyst
      printf '%s' "$PASSWORD" | branchguard users create --username bob --role viewer --password-stdin
    """
    from ..casework.users import create

    settings = settings_from(config, data_dir, nats_url)
    given = sys.stdin.read().rstrip("\n") if password_stdin else None
    password = create(_writer(settings), username, role, actor(), given)
    click.echo(json.dumps({"username": username, "role": role,
                           **({} if given else {"password": password})}))
    if not given:
        click.echo("store the password now: it is not shown again", err=True)


@users_group.command("list")
@settings_options
@friendly_errors
def users_list(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """List console users: name, role, created, disabled (never passwords or hashes).

    \b
    Example:
      branchguard users list --data-dir ./var
    """
    from ..casework.users import listing

    settings = settings_from(config, data_dir, nats_url)
    click.echo(json.dumps(listing(_writer(settings).conn), indent=2))


@users_group.command("disable")
@settings_options
@click.argument("username")
@friendly_errors
def users_disable(config: Path | None, data_dir: Path | None, nats_url: str | None,
                  username: str) -> None:
    """Disable a console user: their sessions end at their next page load or action.

    \b
    Example:
      branchguard users disable alice
    """
    from ..casework.users import disable

    settings = settings_from(config, data_dir, nats_url)
    disable(_writer(settings), username, actor())
    click.echo(json.dumps({"username": username, "disabled": True}))


@users_group.command("unlock")
@settings_options
@click.argument("username")
@click.option("--address", default=None,
              help="Only the lock from this client address (default: from every address).")
@friendly_errors
def users_unlock(config: Path | None, data_dir: Path | None, nats_url: str | None,
                 username: str, address: str | None) -> None:
    """End a user's sign-in lockout early (and forget their failed attempts); audited.

    \b
    Example:
      branchguard users unlock alice                      # from every address
      branchguard users unlock alice --address 10.0.0.7   # only from that one
    """
    from ..casework.login_throttle import unlock

    settings = settings_from(config, data_dir, nats_url)
    cleared = unlock(settings, _writer(settings), username, address, actor())
    click.echo(json.dumps({"username": username.lower(), "unlocked": cleared}))


COMMANDS = (keys_group, audit_group, users_group)
"""What this module adds to ``branchguard``."""
