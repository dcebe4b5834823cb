"""The typology rules file: ``rules show``, ``rules test FILE``, ``rules deploy FILE``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import actor, dir_options, friendly_errors, settings_from


@click.group("rules")
def rules() -> None:
    """The typology rules file (docs/rules.md): show, test against the stored
    transactions, deploy (audited).

    \b
    Example:
      branchguard rules test my-rules.toml
    """


@rules.command("show")
@dir_options
@friendly_errors
def rules_show(config: Path | None, data_dir: Path | None) -> None:
    """The rules file in force: its path, version and each typology's parameters.

    \b
    Example:
      branchguard rules show --data-dir ./var
    """
    from ..scoring.rulebook import describe

    click.echo(json.dumps(describe(settings_from(config, data_dir, None)), indent=1))


@rules.command("test")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--since", default=None,
              help="Count from this event time (RFC 3339); the replay still starts at the "
                   "first stored transaction.")
@click.option("--until", default=None, help="End of the period counted (exclusive, RFC 3339).")
@dir_options
@friendly_errors
def rules_test(file: Path, as_json: bool, since: str | None, until: str | None,
               config: Path | None, data_dir: Path | None) -> None:
    """Replay the stored transactions through the rules FILE and the rules in force: alerts
    per day, and precision and recall (also per fraud type) where labels exist.

    \b
    Example:
      branchguard rules test candidate.toml --data-dir ./var
      branchguard rules test candidate.toml --until 2026-11-16   # choose on the past
    """
    from ..scoring.rules_trial import report, trial
    from .models import epoch

    result = trial(settings_from(config, data_dir, None), file, epoch(since), epoch(until))
    click.echo(json.dumps(result.to_json(), indent=1) if as_json else report(result))


@rules.command("deploy")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--reason", default="manual", show_default=True)
@dir_options
@friendly_errors
def rules_deploy(file: Path, reason: str, config: Path | None, data_dir: Path | None) -> None:
    """Check the rules FILE, install it where the scorer reads it (a running scorer switches
    within model_check_seconds) and record it in the audit trail as cli:<your OS user>.

    \b
    Example:
      branchguard rules deploy candidate.toml --reason "card testing: 4 small amounts"
    """
    from ..scoring.rulebook import deploy

    done = deploy(settings_from(config, data_dir, None), file, actor(), reason)
    click.echo(f"deployed {done.version} (was {done.previous or 'unreadable'}) to {done.path}")


COMMANDS = (rules,)
