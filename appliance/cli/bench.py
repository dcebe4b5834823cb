"""``branchguard bench``: the throughput, API, replication and features benchmarks, and their hidden
load-generator commands."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import logs
from ..errors import BranchguardError
from ..settings import load
from .options import friendly_errors

json_option = click.option(
    "--json", "json_to", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
    help="Also write the report as JSON to FILE; `--json` alone prints only the JSON, "
         "instead of the table.")


def emit(report: dict[str, Any], json_to: str | None,
         table: Callable[[dict[str, Any]], str]) -> None:
    """What ``--json`` asks for: the JSON alone (``-``), or the table and the JSON in a
    file, or the table alone."""
    if json_to == "-":
        click.echo(json.dumps(report, indent=2))
        return
    if json_to is not None:
        Path(json_to).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    click.echo(table(report))


@click.group(invoke_without_command=True)
@click.option("--count", type=int, default=200_000, show_default=True,
              help="Transactions for the full-speed run.")
@click.option("--rates", default="2000,10000", show_default=True,
              help="Fixed offered rates (tx/s), comma-separated; each runs --rate-seconds.")
@click.option("--rate-seconds", type=float, default=10.0, show_default=True)
@click.option("--restart-rows", type=int, default=0, show_default=True,
              help="Also measure restart time with this many stored transactions.")
@click.option("--sync-policy", type=click.Choice(["always", "interval"]), default="interval",
              show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="First run the same phases through a pass-through consumer (message path "
                   "only, no scoring or storage): the ceiling any scorer has here, and what "
                   "the scorer's figures are compared with.")
@click.option("--replicate/--no-replicate", default=True, show_default=True,
              help="Litestream replicating the scorer's database, as `branchguard run` does "
                   "by default (issue 16's targets are with it on).")
@click.option("--alerts-to", default=None,
              help="Also run the full-speed load with the alert dispatcher delivering every "
                   "alert to this Apprise URL (compare with the phase before it).")
@click.option("--dead-smtp", is_flag=True,
              help="--alerts-to a mailto:// URL on a loopback port nothing listens on.")
@click.option("--alert-rounds", type=int, default=1, show_default=True,
              help="With --alerts-to/--dead-smtp: alternate the dispatcher phase and a plain "
                   "phase this many times, and compare their means.")
@json_option
@click.pass_context
@friendly_errors
def bench(ctx: click.Context, count: int, rates: str, rate_seconds: float, restart_rows: int,
          sync_policy: str, baseline: bool, replicate: bool, alerts_to: str | None,
          dead_smtp: bool, alert_rounds: int, json_to: str | None) -> None:
    """Start a throwaway node and measure it against the pass-through consumer, in one run:
    sustained tx/s of both and the scorer's share, publish-to-verdict latency p50/p95/p99 at
    each offered rate beside the pass-through's p99 and whether it kept up, CPU µs per
    transaction of each process, the largest event-loop stall, peak memory and restart
    time; then issue 16's targets, each met or missed.

    \b
    Example:
      branchguard bench --count 200000 --rates 2000,10000 --restart-rows 1000000
      branchguard bench --count 50000 --rates 2000,10000 --rate-seconds 8 --json bench.json
      branchguard bench --count 50000 --rates 2000 --no-replicate   # Litestream's share
      branchguard bench --count 200000 --rates '' --dead-smtp   # alerts cost, one run
      branchguard bench --count 100000 --rates '' --dead-smtp --alert-rounds 3
      branchguard bench api --transactions 1000000 --alerts 20000
      branchguard bench replication --seconds 30
      branchguard bench children
      branchguard bench features
      branchguard bench writer

    `branchguard bench api` measures the analyst API instead (see its --help).
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..bench.report import format_report
    from ..bench.throughput import dead_smtp_url, run_bench

    logs.configure("WARNING")
    try:
        offered = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        raise BranchguardError("not a list of rates", field="rates", value=rates,
                               hint="tx/s, comma-separated: --rates 2000,10000") from None
    report = run_bench(count=count, rates=offered, rate_seconds=rate_seconds,
                       restart_rows=restart_rows, sync_policy=sync_policy, baseline=baseline,
                       alerts_to=dead_smtp_url() if dead_smtp else alerts_to,
                       alert_rounds=alert_rounds, replicate=replicate)
    emit(report, json_to, format_report)


@click.command("bench-load", hidden=True)
@click.option("--url", required=True)
@click.option("--count", type=int, required=True)
@click.option("--rate", type=float, default=0.0)
@click.option("--seed", type=int, default=2)
def bench_load(url: str, count: int, rate: float, seed: int) -> None:
    """The benchmark's load generator (a separate process): publish, await verdicts, report."""
    from ..bench.throughput import generate_load

    click.echo(json.dumps(asyncio.run(generate_load(url, count, rate or None, seed))))


@click.command("bench-passthrough", hidden=True)
@click.option("--url", required=True)
def bench_passthrough(url: str) -> None:
    """The benchmark's baseline consumer: the message path with no scoring (runs until killed)."""
    from ..bench.throughput import passthrough

    logs.configure("INFO")  # its loop.lag lines, read back by the benchmark
    asyncio.run(passthrough(url, load(None, env={})))


@bench.command("api")
@click.option("--transactions", type=int, default=1_000_000, show_default=True)
@click.option("--alerts", type=int, default=20_000, show_default=True)
@click.option("--requests", type=int, default=5000, show_default=True,
              help="Requests per phase (cached, uncached).")
@click.option("--concurrency", default="1,8", show_default=True,
              help="Requests in flight, comma-separated: each phase runs at each.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Build the database here, or reuse the one here (default: a temp dir).")
@click.option("--wrong-secret-flood", "flood", type=click.IntRange(min=0), default=0,
              show_default=True,
              help="Also run each phase beside this many clients sending the bench key's id "
                   "with wrong secrets as fast as they are answered.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def bench_api(transactions: int, alerts: int, requests: int, concurrency: str,
              data_dir: Path | None, flood: int, as_json: bool) -> None:
    """Measure the analyst API: p50/p95/p99 of cached and uncached alert lists, idle and,
    with --wrong-secret-flood, beside a flood of wrong secrets.

    \b
    Example:
      branchguard bench api --transactions 1000000 --alerts 20000 --data-dir /tmp/bench-api
      branchguard bench api --transactions 100000 --concurrency 1 --wrong-secret-flood 16
    """
    from ..bench.api import format_api_report, run_api_bench

    logs.configure("WARNING")
    try:
        in_flight = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise BranchguardError("not a list of whole numbers", field="concurrency",
                               value=concurrency) from None
    report = run_api_bench(transactions, alerts, requests, in_flight, data_dir, flood)
    click.echo(json.dumps(report, indent=2) if as_json else format_api_report(report))


@click.command("bench-api-load", hidden=True)
@click.option("--url", required=True)
@click.option("--key", required=True)
@click.option("--mode", type=click.Choice(["cached", "uncached"]), required=True)
@click.option("--requests", type=int, required=True)
@click.option("--concurrency", type=int, required=True)
@click.option("--seed", type=int, default=7)
def bench_api_load(url: str, key: str, mode: str, requests: int, concurrency: int,
                   seed: int) -> None:
    """The API benchmark's load generator (a separate process)."""
    from ..bench.api import generate_api_load

    click.echo(json.dumps(asyncio.run(generate_api_load(url, key, mode, requests,
                                                        concurrency, seed))))


@click.command("bench-api-flood", hidden=True)
@click.option("--url", required=True)
@click.option("--key-id", required=True)
@click.option("--clients", type=int, required=True)
def bench_api_flood(url: str, key_id: str, clients: int) -> None:
    """The API benchmark's wrong-secret flood (a separate process, until SIGTERM)."""
    from ..bench.flood import wrong_secret_flood

    def started() -> None:
        click.echo("started")  # the benchmark waits for this line (stdout is a pipe)
        sys.stdout.flush()

    click.echo(json.dumps(asyncio.run(wrong_secret_flood(url, key_id, clients, started))))


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
    from ..bench.replication import format_lag, measure_lag

    logs.configure("WARNING")
    report = measure_lag(seconds=seconds, rate=rate, sync_interval=sync_interval)
    click.echo(json.dumps(report, indent=2) if as_json else format_lag(report))


@bench.command("children")
@click.option("--rate", type=float, default=5.0, show_default=True,
              help="Transactions per second of the demo stream during the drill (at most 10).")
@click.option("--only", default=",".join(("api", "alerts", "litestream", "nats-server")),
              show_default=True, help="Children to kill, comma-separated, in this order.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds each child gets to come back before it counts as not back.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def bench_children(rate: float, only: str, timeout: float, as_json: bool) -> None:
    """The kill -9 drill: SIGKILL each child of `branchguard run --demo` in turn and time it
    back to serving; then a clean stop, and every stream message accounted for.

    \b
    Example:
      branchguard bench children --rate 5
    """
    from ..bench.children import format_drill, run_drill

    logs.configure("WARNING")
    try:
        report = run_drill(rate=rate, children=[c for c in only.split(",") if c],
                           timeout=timeout)
    except ValueError as exc:
        raise BranchguardError(str(exc), field="only", value=only) from None
    click.echo(json.dumps({k: v for k, v in report.items() if k != "log_tail"}, indent=2)
               if as_json else format_drill(report))


@bench.command("hub")
@click.option("--rate", type=float, default=5.0, show_default=True,
              help="Offered tx/s at each branch (the demo's own rate is 0.25).")
@click.option("--seconds", type=float, default=30.0, show_default=True,
              help="Length of the steady phase (latency branch -> hub).")
@click.option("--cut-seconds", type=float, default=60.0, show_default=True,
              help="How long the last branch's link to the hub is cut.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Where the processes' logs and databases go (default: a new temp dir).")
@json_option
@friendly_errors
def bench_hub(rate: float, seconds: float, cut_seconds: float, work_dir: Path | None,
              json_to: str | None) -> None:
    """Measure three branches and a regional hub on loopback (each branch `branchguard
    run` as a leaf node, the hub's nats-server and `branchguard hub run`): the latency of
    each alert from branch to hub (p50/p99) at --rate; then the last branch's link cut for
    --cut-seconds while every branch goes on: the alerts pending when it returns, how long
    the link and the hub took to catch up; and every alert at the hub once. Exits 1 when
    the exactly-once check fails.

    \b
    Example:
      branchguard bench hub --rate 5 --seconds 30 --cut-seconds 60
    """
    from ..bench.hub import format_hub_report, run_hub_bench

    logs.configure("WARNING")
    report = run_hub_bench(rate=rate, seconds=seconds, cut_seconds=cut_seconds,
                           work_dir=work_dir)
    emit(report, json_to, format_hub_report)
    if not report.get("exactly_once", {}).get("ok"):
        sys.exit(1)


@bench.command("cluster")
@click.option("--scorers", default="1,2,3", show_default=True,
              help="Scorer counts for the steady phase, comma-separated: each on a fresh "
                   "cluster.")
@click.option("--count", type=int, default=20_000, show_default=True,
              help="Transactions for each full-speed (steady) phase.")
@click.option("--rate", type=float, default=500.0, show_default=True,
              help="Offered tx/s during each failover run.")
@click.option("--seconds", type=float, default=20.0, show_default=True,
              help="Length of each failover run; the kill comes half-way.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Failover runs of each kind (a scorer, the TX leader), each on a fresh "
                   "cluster; min/median/p95/max reported.")
@click.option("--warmup", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Untimed transactions before each steady phase.")
@click.option("--drill-count", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="Transactions of the scale-out drill compared with one scorer (0: skip).")
@json_option
@friendly_errors
def bench_cluster(scorers: str, count: int, rate: float, seconds: float, runs: int,
                  warmup: int, drill_count: int, json_to: str | None) -> None:
    """Measure partitioned scorers on a real 3-server JetStream cluster (R3, TX in 6
    partitions) on loopback: for each scorer count, full-speed tx/s and CPU µs per
    transaction of every process by name; then a scorer SIGKILLed and the TX leader
    SIGKILLed under a fixed rate, each --runs times: seconds to lease taken, partition open
    and first commit of each orphaned partition, transactions replayed, and every
    transaction in TX once, stored once, one verdict each; then the scale-out drill's
    comparison with one scorer. Exits 1 when a check fails.

    \b
    Example:
      branchguard bench cluster --scorers 1,2,3 --count 20000 --runs 5
      branchguard bench cluster --scorers 1,2 --count 2000 --runs 1 --seconds 6 \\
          --drill-count 0 --json cluster.json
    """
    from ..bench.cluster import format_cluster_report, run_cluster_bench

    logs.configure("WARNING")
    try:
        counts = [int(n) for n in scorers.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise BranchguardError("not a list of scorer counts", field="scorers", value=scorers,
                               hint="whole numbers from 1, comma-separated: --scorers 1,2,3")
    report = run_cluster_bench(scorers=counts, count=count, rate=rate, seconds=seconds,
                               runs=runs, warmup=warmup, drill_count=drill_count)
    emit(report, json_to, format_cluster_report)
    if report["lost"] or report["duplicated"] or not report.get("equality", {}).get("ok", True):
        raise SystemExit(1)


@bench.command("features")
@click.option("--count", type=int, default=50_000, show_default=True,
              help="Transactions timed in each round.")
@click.option("--warm", type=int, default=200_000, show_default=True,
              help="Transactions observed untimed first, so accounts have a history.")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Pure and compiled runs, alternately; the medians are reported.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def bench_features(count: int, warm: int, rounds: int, as_json: bool) -> None:
    """Measure FeatureState.observe's CPU per transaction, compiled by mypyc against its
    pure-Python source, on the throughput benchmark's simulated stream (no node needed).

    \b
    Example:
      branchguard bench features --count 50000 --warm 200000 --rounds 3
    """
    from ..bench.features import format_features, measure_features

    report = measure_features(count=count, warm=warm, rounds=rounds)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json
               else format_features(report))


@bench.command("writer")
@click.option("--rows", type=int, default=300_000, show_default=True,
              help="Scored transactions stored for each group size (the database's size "
                   "at the end).")
@click.option("--groups", default="500,5000", show_default=True,
              help="Rows per commit to compare, comma-separated.")
@click.option("--rounds", type=int, default=2, show_default=True,
              help="The group sizes alternate this many times; CPU medians are reported.")
@click.option("--checkpoint-every", type=int, default=15_000, show_default=True,
              help="Rows between PASSIVE checkpoints (the node checkpoints about once a "
                   "second).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def bench_writer(rows: int, groups: str, rounds: int, checkpoint_every: int,
                 as_json: bool) -> None:
    """Measure the writer's CPU and WAL frames per row by rows per commit, on the
    throughput benchmark's stream (no node needed): why a backlog is committed in large
    groups (scoring/commit.py).

    \b
    Example:
      branchguard bench writer --rows 300000 --groups 500,1000,5000 --rounds 2
    """
    from ..bench.writer import format_writer, measure_writer

    sizes = tuple(int(g) for g in groups.split(",") if g.strip())
    report = measure_writer(rows=rows, groups=sizes, rounds=rounds,
                            checkpoint_every=checkpoint_every)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_writer(report))


COMMANDS = (bench, bench_load, bench_passthrough, bench_api_load, bench_api_flood)
"""What this module adds to ``branchguard``."""
