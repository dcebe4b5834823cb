"""The ``branchguard`` command. Each sub-command parses its options, loads settings, calls one
library function and prints the result; errors exit non-zero with their hint."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from . import logs
from .errors import BranchguardError
from .settings import Settings, describe, format_value, load

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
    settings = load(config, data_dir=data_dir, nats_url=nats_url)
    logs.configure(settings.log_level)
    return settings


def friendly_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BranchguardError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="branchguard")
def cli() -> None:
    """Branchguard: real-time fraud scoring for a bank branch.

    \b
    Quick start:
      branchguard run --demo       embedded node plus a demo transaction stream
      branchguard bench            throughput and latency of this machine
    """


def _existing_db(settings: Settings) -> None:
    from .store import require_db

    require_db(settings.db_path)


@cli.command()
@settings_options
@click.option("--demo", is_flag=True, help="Also publish a simulated stream of transactions.")
@click.option("--demo-rate", type=float, default=50.0, show_default=True,
              help="Transactions per second of the demo stream.")
@click.option("--quiet", is_flag=True, help="No status line.")
@friendly_errors
def run(config: Path | None, data_dir: Path | None, nats_url: str | None, demo: bool,
        demo_rate: float, quiet: bool) -> None:
    """Run the node: nats-server (unless --nats-url), the scorer, and with --demo a feed.

    \b
    Example:
      branchguard run --demo --data-dir ./var
    """
    from .runner import run_node

    settings = settings_from(config, data_dir, nats_url)
    sys.exit(asyncio.run(run_node(settings, demo=demo, demo_rate=demo_rate,
                                  status=not quiet)))


@cli.command()
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
              help="Replay this CSV (reference-system or Fraud Handbook columns) instead.")
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="Write the ground-truth labels to this CSV (they never travel with the "
                   "transactions).")
@friendly_errors
def simulate(config: Path | None, data_dir: Path | None, nats_url: str | None,
             count: int | None, rate: float, seed: int | None, csv_path: Path | None,
             labels: Path | None) -> None:
    """Publish simulated (or replayed) transactions to a running node.

    \b
    Example:
      branchguard simulate --nats-url nats://127.0.0.1:4222 --count 5000 --rate 500

    Without --nats-url it publishes to nats://127.0.0.1:<nats_port>, the embedded server's
    default address.
    """
    from .terminal import publish_simulation

    settings = settings_from(config, data_dir, nats_url)
    if count is None:
        count = 0 if csv_path is not None else 1000
    confirmed = asyncio.run(publish_simulation(
        settings, count=count or None, rate=rate or None,
        seed=int(time.time()) if seed is None else seed, csv_path=csv_path,
        labels_path=labels))
    click.echo(f"published {confirmed} transactions")


@cli.command()
@settings_options
@click.option("--count", type=int, default=200_000, show_default=True,
              help="Simulated transactions to train on (ignored with --csv).")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="Train on this CSV instead of simulated data.")
@click.option("--version", "version", default=None,
              help="Model version to write (default: if-<date>-<time>).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="Where to write <version>.onnx and .json (default: <data_dir>/models).")
@click.option("--force", is_flag=True, help="Overwrite an existing model of that version.")
@friendly_errors
def train(config: Path | None, data_dir: Path | None, nats_url: str | None, count: int,
          seed: int, csv_path: Path | None, version: str | None, out_dir: Path | None,
          force: bool) -> None:
    """Train an Isolation Forest on the node's features and write the ONNX model and card.

    \b
    Example:
      branchguard train --count 200000 --version if-v2
      BRANCHGUARD_MODELS_DIR=var/models BRANCHGUARD_MODEL_VERSION=if-v2 branchguard run
    """
    from .replay import replay_csv
    from .simulate import simulate as generate
    from .terminal import population
    from .train import train as fit

    settings = settings_from(config, data_dir, nats_url)
    if csv_path is not None:
        items: Any = replay_csv(csv_path, branch=settings.branch, sort_by_time=True)
        source = f"csv:{csv_path.name}"
    else:
        start = datetime(2026, 1, 5, tzinfo=timezone.utc)
        accounts, terminals = population(2.0)
        items = generate(seed, start=start, rate=2.0, count=count, branch=settings.branch,
                         accounts=accounts, terminals=terminals)
        source = (f"simulate(seed={seed}, count={count}, rate=2/s, {accounts} accounts, "
                  f"{terminals} terminals, from {start.date()})")
    target = out_dir or settings.data_dir / "models"
    name = version or "if-" + time.strftime("%Y%m%d-%H%M%S")
    if (target / f"{name}.onnx").exists() and not force:
        raise BranchguardError("a model of that version exists", field="version", value=name,
                               hint="choose another --version, or pass --force")
    result = fit(items, target, name, source=source, seed=seed)
    click.echo(json.dumps({"model": str(result.onnx_path), "card": str(result.card_path),
                           "metrics": result.card.raw["metrics"]}, indent=2))


@cli.command()
@settings_options
@friendly_errors
def status(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Counts from the node database: transactions, alerts by severity, dead letters."""
    from .store import Store

    settings = settings_from(config, data_dir, nats_url)
    _existing_db(settings)
    store = Store.open(settings.db_path)
    try:
        click.echo(json.dumps(store.counts(), indent=2))
    finally:
        store.close()


@cli.command("settings")
@settings_options
@friendly_errors
def show_settings(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Print the effective settings (defaults, file, environment and flags applied)."""
    settings = settings_from(config, data_dir, nats_url)
    for name, _, _ in describe():
        click.echo(f"{name} = {format_value(getattr(settings, name))}")


@cli.group(invoke_without_command=True)
@click.option("--count", type=int, default=200_000, show_default=True,
              help="Transactions for the full-speed run.")
@click.option("--rates", default="2000,10000", show_default=True,
              help="Fixed offered rates (tx/s), comma-separated; each runs --rate-seconds.")
@click.option("--rate-seconds", type=float, default=10.0, show_default=True)
@click.option("--restart-rows", type=int, default=0, show_default=True,
              help="Also measure restart time with this many stored transactions.")
@click.option("--sync-policy", type=click.Choice(["always", "interval"]), default="interval",
              show_default=True)
@click.option("--baseline", is_flag=True,
              help="Also run the full-speed load through a pass-through consumer (message "
                   "path only, no scoring or storage): the ceiling any scorer has here.")
@click.option("--alerts-to", default=None,
              help="Also run the full-speed load with the alert dispatcher delivering every "
                   "alert to this Apprise URL (compare with the phase before it).")
@click.option("--dead-smtp", is_flag=True,
              help="--alerts-to a mailto:// URL on a loopback port nothing listens on.")
@click.option("--alert-rounds", type=int, default=1, show_default=True,
              help="With --alerts-to/--dead-smtp: alternate the dispatcher phase and a plain "
                   "phase this many times, and compare their means.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
@friendly_errors
def bench(ctx: click.Context, count: int, rates: str, rate_seconds: float, restart_rows: int,
          sync_policy: str, baseline: bool, alerts_to: str | None, dead_smtp: bool,
          alert_rounds: int, as_json: bool) -> None:
    """Start a throwaway node and measure it: sustained tx/s, publish-to-verdict latency
    p50/p95/p99 at fixed offered rates, peak memory, and restart time.

    \b
    Example:
      branchguard bench --count 200000 --rates 2000,10000 --restart-rows 1000000
      branchguard bench --count 200000 --rates '' --dead-smtp   # alerts cost, one run
      branchguard bench --count 100000 --rates '' --dead-smtp --alert-rounds 3
      branchguard bench api --transactions 1000000 --alerts 20000
      branchguard bench replication --seconds 30

    `branchguard bench api` measures the analyst API instead (see its --help).
    """
    if ctx.invoked_subcommand is not None:
        return
    from .bench import dead_smtp_url, format_report, run_bench

    logs.configure("WARNING")
    report = run_bench(count=count, rates=[float(r) for r in rates.split(",") if r],
                       rate_seconds=rate_seconds, restart_rows=restart_rows,
                       sync_policy=sync_policy, baseline=baseline,
                       alerts_to=dead_smtp_url() if dead_smtp else alerts_to,
                       alert_rounds=alert_rounds)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@cli.command("bench-load", hidden=True)
@click.option("--url", required=True)
@click.option("--count", type=int, required=True)
@click.option("--rate", type=float, default=0.0)
@click.option("--seed", type=int, default=2)
def bench_load(url: str, count: int, rate: float, seed: int) -> None:
    """The benchmark's load generator (a separate process): publish, await verdicts, report."""
    from .bench import generate_load

    click.echo(json.dumps(asyncio.run(generate_load(url, count, rate or None, seed))))


@cli.command("bench-passthrough", hidden=True)
@click.option("--url", required=True)
def bench_passthrough(url: str) -> None:
    """The benchmark's baseline consumer: the message path with no scoring (runs until killed)."""
    from .bench import passthrough

    asyncio.run(passthrough(url, load(None, env={})))


@cli.command("settings-doc", hidden=True)
def settings_doc() -> None:
    """Print the settings table in Markdown (docs/settings.md is generated from this)."""
    click.echo("| setting | default | environment | meaning |\n|---|---|---|---|")
    for name, default, doc in describe():
        click.echo(f"| `{name}` | `{default}` | `BRANCHGUARD_{name.upper()}` | {doc} |")


# --- issue 6: alerts ---------------------------------------------------------------------------

@cli.group()
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
    from .dispatch import run_dispatcher

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
    from .dispatch import send_test

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
    from .alert_metrics import status as alert_status

    settings = settings_from(config, data_dir, nats_url)
    _existing_db(settings)
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
    from .alert_messages import case_link
    from .outbox import Outbox

    settings = settings_from(config, data_dir, nats_url)
    _existing_db(settings)
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
# --- analyst API (issue 4): serve, keys, audit, bench api -----------------------------------

def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@cli.command()
@settings_options
@click.option("--host", default=None, help="Address to listen on (default: api_host).")
@click.option("--port", type=int, default=None, help="Port (default: api_port; 0 = any free).")
@friendly_errors
def serve(config: Path | None, data_dir: Path | None, nats_url: str | None,
          host: str | None, port: int | None) -> None:
    """Serve the analyst API (uvicorn) on the node's database until Ctrl-C.

    \b
    Example:
      branchguard keys create --name alice --role analyst
      branchguard serve --data-dir ./var --port 8080
    """
    from .api.app import serve as run_server

    settings = load(config, data_dir=data_dir, nats_url=nats_url, api_host=host,
                    api_port=port)
    logs.configure(settings.log_level)
    run_server(settings)


@cli.group("keys")
def keys_group() -> None:
    """API keys: create (shown once), list, revoke.

    \b
    Example:
      branchguard keys create --name alice --role analyst
      branchguard keys list
      branchguard keys revoke 3f9a0c1d2b4e
    """


def _writer(settings: Settings) -> Any:
    from .change import migrated_writer

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
    from .keys import create

    settings = settings_from(config, data_dir, nats_url)
    key_id, key = create(_writer(settings), name, role, _actor())
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
    from .keys import listing

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
    from .keys import revoke

    settings = settings_from(config, data_dir, nats_url)
    revoke(_writer(settings), key_id, _actor())
    click.echo(json.dumps({"key_id": key_id, "revoked": True}))


@cli.group("audit")
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

    from .audit import verify

    settings = settings_from(config, data_dir, nats_url)
    _existing_db(settings)
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


@bench.command("api")
@click.option("--transactions", type=int, default=1_000_000, show_default=True)
@click.option("--alerts", type=int, default=20_000, show_default=True)
@click.option("--requests", type=int, default=5000, show_default=True,
              help="Requests per phase (cached, uncached).")
@click.option("--concurrency", default="1,8", show_default=True,
              help="Requests in flight, comma-separated: each phase runs at each.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Build the database here, or reuse the one here (default: a temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def bench_api(transactions: int, alerts: int, requests: int, concurrency: str,
              data_dir: Path | None, as_json: bool) -> None:
    """Measure the analyst API: p50/p95/p99 of cached and uncached alert lists.

    \b
    Example:
      branchguard bench api --transactions 1000000 --alerts 20000 --data-dir /tmp/bench-api
    """
    from .bench_api import format_api_report, run_api_bench

    logs.configure("WARNING")
    try:
        in_flight = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise BranchguardError("not a list of whole numbers", field="concurrency",
                               value=concurrency) from None
    report = run_api_bench(transactions, alerts, requests, in_flight, data_dir)
    click.echo(json.dumps(report, indent=2) if as_json else format_api_report(report))


@cli.command("bench-api-load", hidden=True)
@click.option("--url", required=True)
@click.option("--key", required=True)
@click.option("--mode", type=click.Choice(["cached", "uncached"]), required=True)
@click.option("--requests", type=int, required=True)
@click.option("--concurrency", type=int, required=True)
def bench_api_load(url: str, key: str, mode: str, requests: int, concurrency: int) -> None:
    """The API benchmark's load generator (a separate process)."""
    from .bench_api import generate_api_load

    click.echo(json.dumps(asyncio.run(generate_api_load(url, key, mode, requests,
                                                        concurrency))))


# --- issue 7: replication, retention ------------------------------------------------


@bench.command("replication")
@click.option("--seconds", type=float, default=20.0, show_default=True)
@click.option("--rate", type=float, default=50.0, show_default=True,
              help="Commits per second (the scorer commits one batch per commit).")
@click.option("--sync-interval", type=float, default=1.0, show_default=True,
              help="Litestream's monitor and sync interval, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def bench_replication(seconds: float, rate: float, sync_interval: float, as_json: bool) -> None:
    """Measure replication lag: commits on a throwaway node database, replicated by the
    real litestream to a local folder, probed by restoring it.

    \b
    Example:
      branchguard bench replication --seconds 30 --rate 50 --sync-interval 1
    """
    from .replication_lag import format_lag, measure_lag

    logs.configure("WARNING")
    report = measure_lag(seconds=seconds, rate=rate, sync_interval=sync_interval)
    click.echo(json.dumps(report, indent=2) if as_json else format_lag(report))


@cli.command()
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
    from .replication import restore as restore_db

    settings = settings_from(config, data_dir, nats_url)
    click.echo(json.dumps(restore_db(settings, to or settings.db_path, force=force), indent=2))


@cli.command()
@settings_options
@friendly_errors
def replicate(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Run litestream in the foreground for the node database (for systemd or compose,
    with replicate = false on the node), from the same settings as the node.

    \b
    Example:
      BRANCHGUARD_REPLICA_URL=s3://bank-replicas/br001 branchguard replicate
    """
    from .replication import exec_litestream

    exec_litestream(settings_from(config, data_dir, nats_url))


@cli.group()
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
    from .retention import run_retention

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
    from .retention import hold

    hold(settings_from(config, data_dir, nats_url), account, reason)
    click.echo(f"held {account}")


@retention.command("release")
@settings_options
@click.argument("account")
@friendly_errors
def retention_release(config: Path | None, data_dir: Path | None, nats_url: str | None,
                      account: str) -> None:
    """Lift ACCOUNT's legal hold."""
    from .retention import release

    released = release(settings_from(config, data_dir, nats_url), account)
    click.echo(f"released {account}" if released else f"{account} was not on hold")


@retention.command("erase")
@settings_options
@click.argument("account")
@friendly_errors
def retention_erase(config: Path | None, data_dir: Path | None, nats_url: str | None,
                    account: str) -> None:
    """Erase every row of ACCOUNT from every tier (refused while it is on legal hold)."""
    from .retention import erase

    click.echo(json.dumps(erase(settings_from(config, data_dir, nats_url), account), indent=2))


@cli.command("nats-server")
@settings_options
@friendly_errors
def nats_server(config: Path | None, data_dir: Path | None, nats_url: str | None) -> None:
    """Run nats-server in the foreground with the configuration the embedded node writes
    (JetStream under <data_dir>/nats, auth and TLS from the settings): the systemd unit.

    \b
    Example:
      BRANCHGUARD_DATA_DIR=/var/lib/branchguard branchguard nats-server
    """
    from .node import exec_nats_server

    exec_nats_server(settings_from(config, data_dir, nats_url))


# --- analyst console (issue 5): users ----------------------------------------------------

@cli.group("users")
def users_group() -> None:
    """Console users: create (password shown once), list, disable.

    \b
    Example:
      branchguard users create --username alice --role analyst
      branchguard users list
      branchguard users disable alice
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
    from .users import create

    settings = settings_from(config, data_dir, nats_url)
    given = sys.stdin.read().rstrip("\n") if password_stdin else None
    password = create(_writer(settings), username, role, _actor(), given)
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
    from .users import listing

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
    from .users import disable

    settings = settings_from(config, data_dir, nats_url)
    disable(_writer(settings), username, _actor())
    click.echo(json.dumps({"username": username, "disabled": True}))
# --- issue 3: model lifecycle (registry, labels, evaluation, retraining, drift) -------------


@cli.group()
def models() -> None:
    """The model registry: list, show, promote, roll back, set stages.

    \b
    Example:
      branchguard models list
    """


def dir_options(fn: F) -> F:
    """--config and --data-dir, for commands that read the node's data directory only."""
    fn = click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                      help="The node's data directory (default ./var).")(fn)
    return click.option("--config", type=click.Path(path_type=Path, exists=True),
                        default=None, help="TOML settings file.")(fn)


def _registry(config: Path | None, data_dir: Path | None) -> Any:
    from .registry import Registry

    return Registry.of(settings_from(config, data_dir, None))


@models.command("list")
@dir_options
@friendly_errors
def models_list(config: Path | None, data_dir: Path | None) -> None:
    """Every registered model with its stage.

    \b
    Example:
      branchguard models list --data-dir ./var
    """
    rows = _registry(config, data_dir).listing()
    click.echo(f"{'version':<28} {'stage':<11} {'created':<26} {'AP':>6} {'F1':>6}  parent")
    for r in rows:
        ap = "" if r["average_precision"] is None else f"{r['average_precision']:.3f}"
        f1 = "" if r["f1"] is None else f"{r['f1']:.3f}"
        click.echo(f"{r['version']:<28} {r['stage']:<11} {str(r['created']):<26} {ap:>6} "
                   f"{f1:>6}  {r['parent'] or ''}")


@models.command("show")
@click.argument("version")
@dir_options
@friendly_errors
def models_show(version: str, config: Path | None, data_dir: Path | None) -> None:
    """Print a model's card (with its current stage) as JSON.

    \b
    Example:
      branchguard models show if-v1
    """
    click.echo(json.dumps(_registry(config, data_dir).card(version), indent=2))


@models.command("promote")
@click.argument("version")
@click.option("--reason", default="manual", show_default=True)
@dir_options
@friendly_errors
def models_promote(version: str, reason: str, config: Path | None, data_dir: Path | None
                   ) -> None:
    """Make VERSION the production model (a running scorer switches within seconds);
    recorded in the audit trail as cli:<your OS user>.

    \b
    Example:
      branchguard models promote if-20261201-101500 --reason "weekly retrain"
    """
    from .promotion import promote

    _audited_change(config, data_dir,
                    lambda conn, registry: promote(conn, registry, version, _actor(), reason))


@models.command("rollback")
@dir_options
@friendly_errors
def models_rollback(config: Path | None, data_dir: Path | None) -> None:
    """Put the previous production model back (recorded in the audit trail).

    \b
    Example:
      branchguard models rollback --data-dir ./var
    """
    from .promotion import rollback

    _audited_change(config, data_dir,
                    lambda conn, registry: rollback(conn, registry, _actor(), "rollback"))


@models.command("stage")
@click.argument("version")
@click.argument("stage", type=click.Choice(["candidate", "shadow", "retired"]))
@dir_options
@friendly_errors
def models_stage(version: str, stage: str, config: Path | None, data_dir: Path | None) -> None:
    """Set a non-production model's stage (one shadow at a time); recorded in the audit
    trail as cli:<your OS user>.

    \b
    Example:
      branchguard models stage sup-20261201 shadow
    """
    from .promotion import set_stage

    _audited_change(config, data_dir,
                    lambda conn, registry: set_stage(conn, registry, version, stage, _actor(),
                                                     "manual"))


def _audited_change(config: Path | None, data_dir: Path | None, change: Any) -> None:
    """Make one audited registry change on the node (promotion.on_node) and print the
    registry state it leaves."""
    from .promotion import on_node

    click.echo(json.dumps(on_node(settings_from(config, data_dir, None), change).to_json(),
                          indent=2))


@cli.group()
def labels() -> None:
    """Fraud labels, kept apart from transactions (see docs/models.md).

    \b
    Example:
      branchguard labels import chargebacks.csv
    """


@labels.command("import")
@click.argument("file", type=click.Path(path_type=Path, exists=True))
@click.option("--source", default=None, help="Source recorded with each label (default: "
              "the file's source column, else file:<name>).")
@dir_options
@friendly_errors
def labels_import(file: Path, source: str | None, config: Path | None, data_dir: Path | None
                  ) -> None:
    """Import a labels CSV (transaction_id,label,known_at[,source]); all rows or none.

    label is 1 (fraud) or 0; known_at is when it became known, RFC 3339. A transaction keeps
    its first label, so importing a file twice changes nothing.

    \b
    Example:
      branchguard labels import chargebacks.csv --data-dir ./var
    """
    from .labels import import_labels

    settings = settings_from(config, data_dir, None)
    result = import_labels(settings.db_path, file, source)
    click.echo(json.dumps(result.__dict__, indent=2))


def _epoch(text: str | None) -> float | None:
    if text is None:
        return None
    from .labels import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise BranchguardError("not an RFC 3339 date or time", field="since/until",
                               value=text, hint="e.g. 2026-12-01 or 2026-12-01T10:00:00Z"
                               ) from None


@cli.command()
@dir_options
@click.option("--model", "versions", multiple=True,
              help="Also backtest this registered model on the same transactions (repeat).")
@click.option("--compare", is_flag=True,
              help="Live verdicts and the stored shadow scores side by side, on the "
                   "transactions the shadow model scored.")
@click.option("--since", default=None, help="First event time to evaluate (RFC 3339).")
@click.option("--until", default=None, help="End of the period (exclusive, RFC 3339).")
@click.option("--k", type=int, default=100, show_default=True, help="Card precision@k.")
@click.option("--resamples", type=int, default=200, show_default=True,
              help="Bootstrap resamples for the confidence intervals (0: none).")
@click.option("--handbook", "handbook_csv", type=click.Path(path_type=Path, exists=True),
              default=None, help="Run the Fraud Detection Handbook protocol on this CSV in "
              "--data-dir (default: a new temporary directory) instead.")
@click.option("--label-days", default="46-52", show_default=True,
              help="With --handbook: days whose labels are imported.")
@click.option("--training-label-delay", type=float, default=1.0, show_default=True,
              help="With --handbook: days after which training rows' labels count as known "
                   "(training only; scoring uses the real delay of 7 days).")
@friendly_errors
def evaluate(config: Path | None, data_dir: Path | None, versions: tuple[str, ...],
             compare: bool, since: str | None, until: str | None, k: int, resamples: int,
             handbook_csv: Path | None, label_days: str, training_label_delay: float) -> None:
    """Score stored transactions against their labels: ROC AUC, AP, card precision@k,
    recall at the alert budget, precision/recall/F1 at the threshold, with 95 % intervals.

    \b
    Example:
      branchguard evaluate --data-dir ./var --model if-v1 --since 2026-11-01
      branchguard evaluate --compare
      branchguard evaluate --handbook ../shared/data/handbook_days046-066.csv.gz
    """
    from .evaluation import format_table

    settings = settings_from(config, data_dir, None)
    budget = int(settings.alert_budget_per_day)
    if handbook_csv is not None:
        import tempfile

        from .handbook import run_handbook

        first, _, last = label_days.partition("-")
        if data_dir is None:
            settings = load(config, data_dir=Path(tempfile.mkdtemp(prefix="handbook-")))
        report = run_handbook(settings, handbook_csv, label_days=(int(first), int(last or first)),
                              training_label_delay_days=training_label_delay, k=k,
                              resamples=resamples)
        for r in report.retrains:
            click.echo(f"retrain {r.version}: {'promoted' if r.decision.promote else 'kept as candidate'}"
                       f" ({r.decision.reason})")
        click.echo(f"data directory: {settings.data_dir}; {report.seconds:.0f} s\n")
        click.echo(report.table)
        return
    from .backtest import compare_shadow, evaluate_stored

    if compare:
        rows = compare_shadow(settings, since=_epoch(since), until=_epoch(until), k=k,
                              resamples=resamples)
    else:
        rows = evaluate_stored(settings, list(versions), since=_epoch(since),
                               until=_epoch(until), k=k, resamples=resamples)
    click.echo(format_table(rows, k=k, budget=budget))


@cli.command()
@dir_options
@click.option("--supervised", is_flag=True,
              help="Train the supervised challenger (random forest on features, label "
                   "features and the Isolation Forest score) instead of an Isolation Forest.")
@click.option("--holdout-days", type=float, default=2.0, show_default=True,
              help="The last days of labelled transactions, held back to compare models.")
@click.option("--features", default=None,
              help="Comma-separated features for the Isolation Forest (default: production's).")
@click.option("--training-label-delay", type=float, default=None,
              help="Days after which training rows' labels count as known (training only; "
                   "default: their real known_at).")
@click.option("--version", "version", default=None, help="Version of the candidate.")
@click.option("--no-promote", is_flag=True, help="Compare and register, never promote.")
@friendly_errors
def retrain(config: Path | None, data_dir: Path | None, supervised: bool, holdout_days: float,
            features: str | None, training_label_delay: float | None, version: str | None,
            no_promote: bool) -> None:
    """Train a candidate on the stored window, compare it with production on the same
    held-back labelled period, promote it only if its F1 is 2 % higher within the alert budget.

    \b
    Example:
      branchguard retrain --data-dir ./var
      branchguard retrain --supervised --training-label-delay 1
    """
    from .retrain import retrain as run_retrain, summary

    settings = settings_from(config, data_dir, None)
    result = run_retrain(settings, supervised=supervised, holdout_days=holdout_days,
                         if_features=features.split(",") if features else None,
                         version=version, training_label_delay_days=training_label_delay,
                         allow_promotion=not no_promote)
    click.echo(summary(result))



@cli.group()
def drift() -> None:
    """Drift of recent traffic against the production model's training reference.

    \b
    Example:
      branchguard drift run --days 1
    """


@drift.command("run")
@dir_options
@click.option("--days", type=float, default=1.0, show_default=True,
              help="The recent window: the last DAYS of stored transactions.")
@friendly_errors
def drift_run(config: Path | None, data_dir: Path | None, days: float) -> None:
    """PSI per feature and for the risk score; stored; WARNING above drift_psi_threshold.

    \b
    Example:
      branchguard drift run --data-dir ./var --days 1
    """
    from .drift import run_drift

    report = run_drift(settings_from(config, data_dir, None), days=days)
    click.echo(json.dumps({"model_version": report.model_version,
                           "reference": report.reference, "rows": report.rows,
                           "psi": {k: round(v, 4) for k, v in report.psi.items()},
                           "drifted": report.drifted}, indent=2))


# --- issue 5: the terminal directory (the case page's map) ----------------------------------
@cli.group()
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
    from .terminal_directory import import_terminals

    settings = settings_from(config, data_dir, None)
    click.echo(json.dumps(import_terminals(settings.db_path, file).__dict__, indent=2))


def main() -> None:
    cli(prog_name="branchguard")
