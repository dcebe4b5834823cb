"""The ``branchguard`` command. Each sub-command parses its options, loads settings, calls one
library function and prints the result; errors exit non-zero with their hint.

One module per command group, each listing what it adds in ``COMMANDS``: ``run`` (the node,
the API, the feed, status and settings), ``models`` (train, retrain, evaluate, the registry,
labels, drift), ``alerts``, ``access`` (keys, users, audit), ``data`` (replication,
retention, the terminal directory), ``rules`` (the typology rules file), ``deadletters``,
``cluster`` (a JetStream cluster's configuration), ``hub`` (a regional hub and its
branches as leaf nodes), ``stage`` (the terminal stage of
partitioned scorers) and ``bench``. ``options`` holds what
they share.
"""

from __future__ import annotations

import click

from . import (access, alerts, bench, cluster, data, deadletters, hub, models, rules,
               run, stage)


@click.group()
@click.version_option(package_name="branchguard")
def cli() -> None:
    """Branchguard: real-time fraud scoring for a bank branch.

    \b
    Quick start:
      branchguard run --demo       embedded node plus a demo transaction stream
      branchguard bench            throughput and latency of this machine
    """


for _group in (run, models, rules, alerts, access, data, deadletters, cluster, hub, stage,
               bench):
    for _command in _group.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="branchguard")
