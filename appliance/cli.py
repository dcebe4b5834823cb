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
    if not settings.db_path.exists():
        raise BranchguardError("no node database here", field="data_dir",
                               value=str(settings.data_dir),
                               hint="pass the --data-dir the node runs with")
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


@cli.command()
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
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def bench(count: int, rates: str, rate_seconds: float, restart_rows: int, sync_policy: str,
          baseline: bool, as_json: bool) -> None:
    """Start a throwaway node and measure it: sustained tx/s, publish-to-verdict latency
    p50/p95/p99 at fixed offered rates, peak memory, and restart time.

    \b
    Example:
      branchguard bench --count 200000 --rates 2000,10000 --restart-rows 1000000
    """
    from .bench import format_report, run_bench

    logs.configure("WARNING")
    report = run_bench(count=count, rates=[float(r) for r in rates.split(",") if r],
                       rate_seconds=rate_seconds, restart_rows=restart_rows,
                       sync_policy=sync_policy, baseline=baseline)
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
    """Make VERSION the production model (a running scorer switches within seconds).

    \b
    Example:
      branchguard models promote if-20261201-101500 --reason "weekly retrain"
    """
    state = _registry(config, data_dir).promote(version, reason=reason)
    click.echo(json.dumps(state.to_json(), indent=2))


@models.command("rollback")
@dir_options
@friendly_errors
def models_rollback(config: Path | None, data_dir: Path | None) -> None:
    """Put the previous production model back.

    \b
    Example:
      branchguard models rollback --data-dir ./var
    """
    click.echo(json.dumps(_registry(config, data_dir).rollback().to_json(), indent=2))


@models.command("stage")
@click.argument("version")
@click.argument("stage", type=click.Choice(["candidate", "shadow", "retired"]))
@dir_options
@friendly_errors
def models_stage(version: str, stage: str, config: Path | None, data_dir: Path | None) -> None:
    """Set a non-production model's stage (one shadow at a time).

    \b
    Example:
      branchguard models stage sup-20261201 shadow
    """
    click.echo(json.dumps(_registry(config, data_dir).set_stage(version, stage).to_json(),
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


def main() -> None:
    cli(prog_name="branchguard")
