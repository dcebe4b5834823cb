"""Running the node and looking at it: ``run``, ``serve``, ``nats-server``, ``simulate``,
``status``, ``settings``."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import click

from .. import logs
from ..settings import describe, format_value, load
from .options import existing_db, friendly_errors, settings_from, settings_options


@click.command()
@settings_options
@click.option("--demo", is_flag=True, help="Also run the demo world: weeks of history, a live "
              "stream of transactions and late labels (docs/demo.md).")
@click.option("--demo-rate", type=click.FloatRange(min=0.001), default=0.25,
              show_default=True,
              help="Transactions per second of the demo stream; its world has as many "
                   "customers as make this rate at two transactions a day each.")
@click.option("--demo-days", type=click.FloatRange(min=0.0), default=28.0,
              show_default=True,
              help="Days of history a new demo node starts with (fewer above a million "
                   "transactions).")
@click.option("--quiet", is_flag=True, help="No status line.")
@friendly_errors
def run(config: Path | None, data_dir: Path | None, nats_url: str | None, demo: bool,
        demo_rate: float, demo_days: float, quiet: bool) -> None:
    """Run the node: nats-server (unless --nats-url), the scorer, and with --demo a feed.

    \b
    Example:
      branchguard run --demo --data-dir ./var
    """
    from ..operations.runner import run_node

    settings = settings_from(config, data_dir, nats_url)
    sys.exit(asyncio.run(run_node(settings, demo=demo, demo_rate=demo_rate,
                                  demo_days=demo_days, status=not quiet)))


@click.command()
@settings_options
@click.option("--count", type=int, default=None,
              help="Transactions to publish (default: 1000 simulated, or the whole CSV; "
                   "0 for endless).")
@click.option("--rate", type=float, default=50.0, show_default=True,
              help="Transactions per second (0 for as fast as possible).")
@click.option("--seed", type=int, default=None,
              help="Simulator seed; the same seed gives the same transactions and ids "
                   "(default: a new one each run, so re-runs are not re-sends).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="Replay this CSV (reference-system or Fraud Handbook columns) instead. "
                   "Its times are history: the node must run with event_time_check = false "
                   "while it loads them (docs/transactions.md).")
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="Write the ground-truth labels to this CSV (they never travel with the "
                   "transactions).")
@click.option("--ack-timeout", type=click.FloatRange(min=0.1), default=30.0,
              show_default=True,
              help="Seconds to wait for JetStream to acknowledge a transaction before it "
                   "counts as not published; publishing stops when nothing is acknowledged "
                   "for this long.")
@click.option("--unpublished", type=click.Path(path_type=Path), default=None,
              help="Write the id and reason of every transaction not published to this CSV.")
@friendly_errors
def simulate(config: Path | None, data_dir: Path | None, nats_url: str | None,
             count: int | None, rate: float, seed: int | None, csv_path: Path | None,
             labels: Path | None, ack_timeout: float, unpublished: Path | None) -> None:
    """Publish simulated (or replayed) transactions to a running node.

    Prints how many JetStream stored; when any was not (the server died, refused it, or
    never answered), names how many and why, and exits 1. Simulated event times are never
    ahead of the clock: at --rate R the stream is live, and at --rate 0 it is a backlog at
    50 tx/s of event time that ends before now.

    \b
    Example:
      branchguard simulate --nats-url nats://127.0.0.1:4222 --count 5000 --rate 500

    Without --nats-url it publishes to nats://127.0.0.1:<nats_port>, the embedded server's
    default address.
    """
    from ..feed.terminal import publish_simulation, write_unpublished

    settings = settings_from(config, data_dir, nats_url)
    if count is None:
        count = 0 if csv_path is not None else 1000
    report = asyncio.run(publish_simulation(
        settings, count=count or None, rate=rate or None,
        seed=int(time.time()) if seed is None else seed, csv_path=csv_path,
        labels_path=labels, ack_timeout=ack_timeout))
    for line in report.lines():
        click.echo(line)
    if unpublished is not None:
        write_unpublished(report, unpublished)
    if report.not_published:
        click.echo(f"error: {report.not_published} of {report.offered} transactions were "
                   "not published", err=True)
        sys.exit(1)


@click.command()
@settings_options
@friendly_errors
def status(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Counts from the node database: transactions, alerts by severity, dead letters."""
    from ..store import Store

    settings = settings_from(config, data_dir, nats_url)
    existing_db(settings)
    store = Store.open(settings.db_path)
    try:
        click.echo(json.dumps(store.counts(), indent=2))
    finally:
        store.close()


@click.command("settings")
@settings_options
@friendly_errors
def show_settings(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Print the effective settings (defaults, file, environment and flags applied)."""
    settings = settings_from(config, data_dir, nats_url)
    for name, _, _ in describe():
        click.echo(f"{name} = {format_value(getattr(settings, name))}")


@click.command("settings-doc", hidden=True)
def settings_doc() -> None:
    """Print the settings table in Markdown (docs/settings.md is generated from this)."""
    click.echo("| setting | default | environment | meaning |\n|---|---|---|---|")
    for name, default, doc in describe():
        click.echo(f"| `{name}` | `{default}` | `BRANCHGUARD_{name.upper()}` | {doc} |")


@click.command()
@settings_options
@click.option("--host", default=None, help="Address to listen on (default: api_host).")
@click.option("--port", type=int, default=None, help="Port (default: api_port; 0 = any free).")
@click.option("--fd", type=int, default=None, hidden=True,
              help="Serve on this inherited listening socket (how `branchguard run` starts it).")
@friendly_errors
def serve(config: Path | None, data_dir: Path | None, nats_url: str | None,
          host: str | None, port: int | None, fd: int | None) -> None:
    """Serve the analyst API (uvicorn) on the node's database until Ctrl-C.

    \b
    Example:
      branchguard keys create --name alice --role analyst
      branchguard serve --data-dir ./var --port 8080
    """
    from ..api.app import serve as run_server

    settings = load(config, data_dir=data_dir, nats_url=nats_url, api_host=host,
                    api_port=port)
    logs.configure(settings.log_level)
    run_server(settings, socket.socket(fileno=fd) if fd is not None else None)


@click.command("nats-server")
@settings_options
@friendly_errors
def nats_server(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Run nats-server in the foreground with the configuration the embedded node writes
    (JetStream under <data_dir>/nats, auth and TLS from the settings): the systemd unit.

    \b
    Example:
      BRANCHGUARD_DATA_DIR=/var/lib/branchguard branchguard nats-server
    """
    from ..operations.node import exec_nats_server

    exec_nats_server(settings_from(config, data_dir, nats_url))


COMMANDS = (run, simulate, status, show_settings, settings_doc, serve, nats_server)
"""What this module adds to ``branchguard``."""
