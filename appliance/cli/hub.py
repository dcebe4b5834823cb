"""``branchguard hub config``: a regional hub and its branches as leaf nodes
(operations/hub.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import dir_options, friendly_errors, settings_from, settings_options


@click.group()
def hub() -> None:
    """A regional hub whose branches are leaf nodes (docs/hub.md).

    \b
    Example:
      branchguard hub config --branch br1 --branch br2 --public-host hub.example --out /etc/branchguard/hub
    """


@hub.command("config")
@dir_options
@click.option("--branch", "branches", multiple=True, required=True,
              help="A branch's name, which is also its JetStream domain (repeat per branch).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for hub.conf, hub.toml, hub-secrets.toml and branches/*.toml.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the hub's nats-server binds (the WAN address, or 0.0.0.0, in production).")
@click.option("--public-host", default="127.0.0.1", show_default=True,
              help="The hub's address as the branches dial it.")
@click.option("--client-port", type=int, default=4222, show_default=True)
@click.option("--leaf-port", type=int, default=7422, show_default=True)
@click.option("--monitor-port", type=int, default=8222, show_default=True,
              help="nats-server's monitoring port (/leafz: each branch's link).")
@click.option("--store-dir", type=click.Path(path_type=Path), default=None,
              help="The hub's JetStream store (default: /var/lib/branchguard/hub).")
@friendly_errors
def hub_config(config: Path | None, data_dir: Path | None, branches: tuple[str, ...],
               out_dir: Path, host: str, public_host: str, client_port: int, leaf_port: int,
               monitor_port: int, store_dir: Path | None) -> None:
    """Write the hub's nats-server configuration (domain hub, one user per branch allowed
    only its own flows, the leafnode listener, TLS from the settings), each branch's
    settings (jetstream_domain, hub_url with its password) and the hub processes' settings.
    Passwords are made once and kept, so running it again changes only what changed.

    \b
    Example:
      branchguard hub config --branch br1 --branch br2 --out ./hub
      nats-server -c ./hub/hub.conf
      cat ./hub/branches/br1.toml >> /etc/branchguard/branchguard.toml   # on branch br1
    """
    from ..operations.hub import HubPlan, write_hub_config

    settings = settings_from(config, data_dir, None)
    plan = HubPlan(host=host, client_port=client_port, leaf_port=leaf_port,
                   monitor_port=monitor_port,
                   store_dir=(store_dir or Path("/var/lib/branchguard/hub")).resolve(),
                   branches=branches, public_host=public_host)
    written = write_hub_config(settings, out_dir, plan)
    for path in written.files:
        click.echo(f"# {'wrote' if path in written.changed else 'unchanged'} {path}")


@hub.command("run")
@settings_options
@friendly_errors
def hub_run(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Run the hub's analyst side until Ctrl-C (SIGTERM), with the hub.toml `hub config`
    wrote: every branch's cases (sourced from each branch's CASES through its leaf link)
    stored once in the hub's database, where `branchguard serve` shows them with their
    branch; the labels the hub's dispositions make go down to the branch that owns each
    transaction, and its list changes to every branch (docs/hub.md).

    \b
    Example:
      branchguard hub run --config /etc/branchguard/hub/hub.toml --data-dir /var/lib/branchguard/hub-node
    """
    import asyncio
    import sys

    from ..errors import SettingsError
    from ..operations.case_flows import run_analyst

    settings = settings_from(config, data_dir, nats_url)
    if not settings.hub_branches:
        raise SettingsError("the hub serves branches", field="hub_branches", value=(),
                            hint="use the hub.toml `branchguard hub config` wrote")
    sys.exit(asyncio.run(run_analyst(settings)))


COMMANDS = (hub,)
