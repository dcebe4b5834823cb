"""``branchguard stage terminals``: the terminal stage (scoring/terminal_stage.py), which
partitioned scorers join for every terminal's windows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from .options import friendly_errors, settings_from, settings_options


@click.group()
def stage() -> None:
    """Stages that run beside partitioned scorers (docs/operations.md).

    \b
    Example:
      branchguard stage terminals --nats-url nats://127.0.0.1:4222
    """


@stage.command("terminals")
@settings_options
@friendly_errors
def stage_terminals(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Run the terminal stage until Ctrl-C / SIGTERM: every TX message's terminal windows to
    the TERM stream, under the lease stage.terminals (a second copy stands by). Needs
    partitions above 1 and the scorers' NATS server.

    \b
    Example:
      BRANCHGUARD_PARTITIONS=4 branchguard stage terminals --nats-url nats://127.0.0.1:4222
    """
    from ..scoring.terminal_stage import run_terminal_stage

    asyncio.run(run_terminal_stage(settings_from(config, data_dir, nats_url)))


COMMANDS = (stage,)
"""What this module adds to ``branchguard``."""
