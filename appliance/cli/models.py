"""The model lifecycle: ``train``, ``retrain``, ``evaluate``, ``models``, ``labels``, ``drift``."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from ..errors import BranchguardError
from ..settings import load
from .options import actor, dir_options, friendly_errors, settings_from, settings_options


@click.command()
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
    from ..feed.replay import replay_csv
    from ..feed.simulate import simulate as generate
    from ..feed.terminal import population
    from ..learning.train import train as fit

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


@click.group()
def models() -> None:
    """The model registry: list, show, promote, roll back, set stages.

    \b
    Example:
      branchguard models list
    """


def _registry(config: Path | None, data_dir: Path | None) -> Any:
    from ..scoring.registry import Registry

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
    from ..learning.promotion import promote

    _audited_change(config, data_dir,
                    lambda conn, registry: promote(conn, registry, version, actor(), reason))


@models.command("rollback")
@dir_options
@friendly_errors
def models_rollback(config: Path | None, data_dir: Path | None) -> None:
    """Put the previous production model back (recorded in the audit trail).

    \b
    Example:
      branchguard models rollback --data-dir ./var
    """
    from ..learning.promotion import rollback

    _audited_change(config, data_dir,
                    lambda conn, registry: rollback(conn, registry, actor(), "rollback"))


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
    from ..learning.promotion import set_stage

    _audited_change(config, data_dir,
                    lambda conn, registry: set_stage(conn, registry, version, stage, actor(),
                                                     "manual"))


def _audited_change(config: Path | None, data_dir: Path | None, change: Any) -> None:
    """Make one audited registry change on the node (promotion.on_node) and print the
    registry state it leaves."""
    from ..learning.promotion import on_node

    click.echo(json.dumps(on_node(settings_from(config, data_dir, None), change).to_json(),
                          indent=2))


@click.group()
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
    from ..scoring.labels import import_labels

    settings = settings_from(config, data_dir, None)
    result = import_labels(settings.db_path, file, source)
    click.echo(json.dumps(result.__dict__, indent=2))


def epoch(text: str | None) -> float | None:
    """``--since``/``--until`` as epoch seconds (None stays None)."""
    if text is None:
        return None
    from ..scoring.labels import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise BranchguardError("not an RFC 3339 date or time", field="since/until",
                               value=text, hint="e.g. 2026-12-01 or 2026-12-01T10:00:00Z"
                               ) from None


@click.command()
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
@click.option("--demo", "demo_world", is_flag=True,
              help="The demo's figures instead: alerts per day against the budget, precision "
                   "of alerts, and the injected fraud episodes caught per typology.")
@click.option("--handbook", "handbook_csv", type=click.Path(path_type=Path, exists=True),
              default=None, help="Run the Fraud Detection Handbook protocol on this CSV in "
              "--data-dir (default: a new temporary directory) instead.")
@click.option("--label-days", default="46-52", show_default=True,
              help="With --handbook: days whose labels are imported.")
@click.option("--training-label-delay", type=float, default=None,
              help="With --handbook: days after their transaction before which training rows' "
                   "labels never count (default: each from its own known_at; a label is never "
                   "counted before its known_at).")
@friendly_errors
def evaluate(config: Path | None, data_dir: Path | None, versions: tuple[str, ...],
             compare: bool, since: str | None, until: str | None, k: int, resamples: int,
             demo_world: bool, handbook_csv: Path | None, label_days: str,
             training_label_delay: float) -> None:
    """Score stored transactions against their labels: ROC AUC, AP, card precision@k,
    recall at the alert budget, precision/recall/F1 at the threshold, with 95 % intervals.

    \b
    Example:
      branchguard evaluate --data-dir ./var --model if-v1 --since 2026-11-01
      branchguard evaluate --compare
      branchguard evaluate --demo --data-dir ./var --since 2026-12-01
      branchguard evaluate --handbook ../shared/data/handbook_days046-066.csv.gz
    """
    from ..learning.evaluation import format_table

    settings = settings_from(config, data_dir, None)
    budget = int(settings.alert_budget_per_day)
    if demo_world:
        from ..bench.demo_evaluation import evaluate_demo, format_demo

        click.echo(format_demo(evaluate_demo(settings.db_path, settings.alert_budget_per_day,
                                             since=epoch(since), until=epoch(until))))
        return
    if handbook_csv is not None:
        import tempfile

        from ..bench.handbook import run_handbook

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
    from ..learning.backtest import compare_shadow, evaluate_stored

    if compare:
        rows = compare_shadow(settings, since=epoch(since), until=epoch(until), k=k,
                              resamples=resamples)
    else:
        rows = evaluate_stored(settings, list(versions), since=epoch(since),
                               until=epoch(until), k=k, resamples=resamples)
    click.echo(format_table(rows, k=k, budget=budget))


@click.command()
@dir_options
@click.option("--supervised", is_flag=True,
              help="Train the supervised challenger (two LightGBM models on features, label "
                   "features and the Isolation Forest score, tuned on a time-ordered split) "
                   "instead of an Isolation Forest.")
@click.option("--holdout-days", type=float, default=2.0, show_default=True,
              help="The last days of labelled transactions, held back to compare models.")
@click.option("--features", default=None,
              help="Comma-separated features for the Isolation Forest (default: chosen by "
                   "time-ordered validation inside the window, see docs/models.md).")
@click.option("--training-label-delay", type=float, default=None,
              help="Days after their transaction before which training rows' labels never "
                   "count (default: their real known_at; a label is never counted before it).")
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
    from ..learning.retrain import retrain as run_retrain, summary

    settings = settings_from(config, data_dir, None)
    result = run_retrain(settings, supervised=supervised, holdout_days=holdout_days,
                         if_features=features.split(",") if features else None,
                         version=version, training_label_delay_days=training_label_delay,
                         allow_promotion=not no_promote)
    click.echo(summary(result))


@click.group()
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
    from ..learning.drift import run_drift

    report = run_drift(settings_from(config, data_dir, None), days=days)
    click.echo(json.dumps({"model_version": report.model_version,
                           "reference": report.reference, "rows": report.rows,
                           "psi": {k: round(v, 4) for k, v in report.psi.items()},
                           "drifted": report.drifted}, indent=2))


COMMANDS = (train, models, labels, evaluate, retrain, drift)
"""What this module adds to ``branchguard``."""
