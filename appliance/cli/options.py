"""Option helpers shared by every command group: the settings options, loading settings,
turning a :class:`~appliance.errors.BranchguardError` into its message and exit code 2, and
who is acting (for the audit trail)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import logs
from ..errors import BranchguardError
from ..settings import Settings, load

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(fn: F) -> F:
    """--config, --data-dir and --nats-url, shared by every command that reads settings."""
    fn = click.option("--nats-url", default=None,
                      help="Use this NATS server instead of embedding one.")(fn)
    fn = click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                      help="Directory for the database and embedded JetStream (default ./var).")(fn)
    fn = click.option("--config", type=click.Path(path_type=Path, exists=True), default=None,
                      help="TOML settings file (default ./branchguard.toml if present).")(fn)
    return fn


def settings_from(config: Path | None, data_dir: Path | None, nats_url: str | None
                  ) -> Settings:
    """The settings (defaults, file, environment, these flags), with logging set up."""
    settings = load(config, data_dir=data_dir, nats_url=nats_url)
    logs.configure(settings.log_level)
    return settings


def friendly_errors(fn: F) -> F:
    """A :class:`BranchguardError` as ``error: <message, field and hint>`` and exit code 2."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BranchguardError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def existing_db(settings: Settings) -> None:
    """Refuse a data directory with no node database (see ``store.require_db``)."""
    from ..store import require_db

    require_db(settings.db_path)


def actor() -> str:
    """Who the audit trail names for a change made from the command line."""
    import getpass

    return f"cli:{getpass.getuser()}"


def dir_options(fn: F) -> F:
    """--config and --data-dir, for commands that read the node's data directory only."""
    fn = click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                      help="The node's data directory (default ./var).")(fn)
    return click.option("--config", type=click.Path(path_type=Path, exists=True),
                        default=None, help="TOML settings file.")(fn)
