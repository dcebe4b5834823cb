"""``branchguard cluster config``: the configuration of a 3-server JetStream cluster
(operations/cluster.py) and the settings its scorers use."""

from __future__ import annotations

from pathlib import Path

import click

from .options import dir_options, friendly_errors, settings_from, settings_options


@click.group()
def cluster() -> None:
    """A 3-server JetStream cluster run as its own service (docs/operations.md).

    \b
    Example:
      branchguard cluster config --hosts 10.0.0.11,10.0.0.12,10.0.0.13 --out /etc/branchguard/nats-cluster
    """


@cluster.command("config")
@dir_options
@click.option("--hosts", default="",
              help="Three server addresses, comma-separated; none: three servers on 127.0.0.1.")
@click.option("--client-port", type=int, default=4222, show_default=True,
              help="Client port (on loopback, the first of three; 0 picks free ports).")
@click.option("--cluster-port", type=int, default=6222, show_default=True,
              help="Route port (on loopback, the first of three; 0 picks free ports).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for nats-1.conf .. nats-3.conf and branchguard-cluster.toml.")
@click.option("--store-dir", type=click.Path(path_type=Path), default=None,
              help="JetStream stores go in <store-dir>/<server name> "
                   "(default: /var/lib/branchguard/nats-cluster, or --out on loopback).")
@friendly_errors
def cluster_config(config: Path | None, data_dir: Path | None, hosts: str, client_port: int,
                   cluster_port: int, out_dir: Path, store_dir: Path | None) -> None:
    """Write one nats-server configuration file per server (name, client port, routes to
    the two others, its JetStream store, the node's auth and TLS settings) and the scorers'
    settings (nats_url with the three servers, stream_replicas = 3); print the settings.

    \b
    Example:
      branchguard cluster config --out ./cluster --client-port 0 --cluster-port 0
      nats-server -c ./cluster/nats-1.conf   # and nats-2, nats-3
    """
    from ..operations.cluster import plan_servers, write_cluster_config

    settings = settings_from(config, data_dir, None)
    addresses = [h for h in hosts.split(",") if h.strip()]
    root = store_dir or (Path("/var/lib/branchguard/nats-cluster") if addresses
                         else out_dir.resolve())
    servers = plan_servers(addresses, client_port, cluster_port, root.resolve())
    written = write_cluster_config(settings, out_dir, servers)
    for path in (*written.files, written.settings_file):
        click.echo(f"# {'wrote' if path in written.changed else 'unchanged'} {path}", err=True)
    click.echo(written.settings_toml(), nl=False)


@cluster.command("server")
@click.argument("name")
@click.option("--dir", "config_dir", type=click.Path(path_type=Path), required=True,
              help="The directory `cluster config --out` wrote.")
@friendly_errors
def cluster_server(name: str, config_dir: Path) -> None:
    """Run one server of the cluster (nats-server on DIR/NAME.conf) in the foreground: the
    systemd unit branchguard-nats-cluster@NAME runs it this way.

    \b
    Example:
      branchguard cluster server nats-1 --dir /etc/branchguard/nats-cluster
    """
    from ..operations.cluster import exec_cluster_server

    exec_cluster_server(config_dir, name)


@cluster.command("scorer")
@settings_options
@friendly_errors
def cluster_scorer(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Score a share of a partitioned TX stream until Ctrl-C (SIGTERM): join the other
    scorers, own partitions by lease, rebalance as scorers come and go, and hand every
    partition off on the way out (docs/operations.md, "Partitioned scorers").

    \b
    Example:
      branchguard cluster scorer --config /etc/branchguard/branchguard-cluster.toml
    """
    import asyncio
    import sys

    from ..operations.partitioned import run_scorer

    settings = settings_from(config, data_dir, nats_url)
    sys.exit(asyncio.run(run_scorer(settings)))


@cluster.command("analyst")
@settings_options
@friendly_errors
def cluster_analyst(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Run the site's analyst host until Ctrl-C (SIGTERM): store every case the scorer
    machines raise into this node's database (where `branchguard serve` and `branchguard
    alerts run` work on them), and send the labels its dispositions make and its list
    changes back to every scorer machine (docs/operations.md, "One view of the site").

    \b
    Example:
      branchguard cluster analyst --config /etc/branchguard/branchguard-cluster.toml
    """
    import asyncio
    import sys

    from ..operations.case_flows import run_analyst

    settings = settings_from(config, data_dir, nats_url)
    sys.exit(asyncio.run(run_analyst(settings)))


COMMANDS = (cluster,)
"""What this module adds to ``branchguard``."""
