"""``branchguard bench cluster``: partitioned scorers (``branchguard cluster scorer``, issue 19)
on a real 3-server JetStream cluster (R3 streams, :mod:`appliance.operations.loopback_cluster`)
on this machine's loopback, ``TX`` in :data:`~.partition_scorers.PARTITIONS` partitions.
Three parts:

- **steady**, for each scorer count asked (1, 2, 3): a fresh cluster, that many scorers,
  every partition open, then ``count`` transactions at full speed from the load generator
  (``branchguard bench-load``, as ``branchguard bench`` runs it): tx/s, and the CPU µs per
  transaction of every process by name (each scorer, each nats-server, the load
  generator) from :mod:`.proc`. "A scorer's CPU per transaction" is the scorers' sum over
  the transactions: the same work split N ways, so at 3 scorers against 1 it shows what
  partitioning itself costs. The terminal stage runs inside one of the scorer processes;
  the report names which (its log holds the ``stage.terminals`` lease);
- **failover** (:mod:`.cluster_failover`), ``runs`` times each on a fresh cluster: a
  scorer SIGKILLed, and the server leading ``TX`` SIGKILLed, under a fixed rate; the
  seconds to lease taken, partition open and first commit of each orphaned partition,
  transactions replayed, and the loss/duplicate check of every run;
- **equality** (:func:`.scaleout.run_drill`): the scale-out drill at ``drill_count``
  transactions, every stored feature vector and verdict compared with one scorer's.

Every process is stopped by its PID at the end, whatever happened.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..operations.cluster import REPLICAS
from .cluster_failover import leader_kill_run, scorer_kill_run, start_scorers
from .partition_scorers import PARTITIONS
from .proc import CpuMeter
from .scaleout import run_drill
from .throughput import run_load

SCORER_TARGET_SECONDS = 5.0
"""Issue 19: p95 from a scorer's SIGKILL to the first commit of each orphaned partition."""
LEADER_TARGET_SECONDS = 12.0
"""Issue 19: the same when the server leading ``TX`` dies."""
CPU_TARGET_RATIO = 1.15
"""Issue 19: a scorer's CPU per transaction at 3 scorers within 15 % of 1 scorer's."""


def steady_phase(root: Path, scorers: int, count: int, warmup: int) -> dict[str, Any]:
    """``count`` transactions at full speed through ``scorers`` partitioned scorers on a
    fresh cluster, after ``warmup`` untimed ones: tx/s and each process's CPU µs per
    transaction."""
    run = start_scorers(root, scorers)
    try:
        if warmup:
            run_load(run.cluster.url, warmup, None, seed=1)  # imports, caches, first pages
        first, *rest = run.children
        meter = CpuMeter(first.process.pid, first.name,
                         {**{c.name: c.process.pid for c in rest}, **run.cluster.pids})
        result = run_load(run.cluster.url, count, None, seed=2)
        verdicts = max(1, int(result["verdicts"]))
        cpu = {**meter.per_transaction(verdicts), "load-generator": round(
            result["load_generator_cpu_seconds"] * 1e6 / verdicts)}
        stage = [c.name for c in run.children if c.runs_terminal_stage()]
        held = {c.name: sorted(c.held()) for c in run.children}
    finally:
        run.stop()
    return {"scorers": scorers, "verdicts": result["verdicts"],
            "seconds": result["seconds"], "tx_per_second": result["tx_per_second"],
            "cpu_us_per_tx": cpu,
            "scorer_cpu_us_per_tx": sum(cpu[c.name] for c in run.children),
            "terminal_stage": stage[0] if stage else None, "held": held, "pids": run.pids}


def spread(values: list[float | None]) -> dict[str, float | None]:
    """min, median, p95 (linear between ranks) and max of the values measured (None when a
    run measured nothing)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"min": None, "median": None, "p95": None, "max": None, "runs": 0}
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3),
            "p95": round(float(np.percentile(xs, 95)), 3), "max": round(max(xs), 3),
            "runs": len(xs)}


def _summary(scorer_runs: list[dict[str, Any]], leader_runs: list[dict[str, Any]]
             ) -> dict[str, Any]:
    """Each figure's spread over every orphaned partition (or partition) of every run."""
    orphaned = [t for r in scorer_runs for t in r["orphaned"].values()]
    return {
        "scorer_kill": {name: spread([t[name] for t in orphaned])
                        for name in ("lease_taken", "open", "first_commit", "replayed")},
        "leader_kill": {
            "to_publish_seconds": spread([r["to_publish_seconds"] for r in leader_runs]),
            "first_commit": spread([t for r in leader_runs for t in r["first_commit"].values()
                                    ])}}


def _equality(drill: dict[str, Any]) -> dict[str, Any]:
    """What the drill's comparison with one scorer found, and whether all of it is nil."""
    c, z = drill["comparison"], drill["zombie"]
    out = {"count": drill["count"], "caught_up": drill["caught_up"],
           **{k: c[k] for k in ("reference_rows", "missing", "unexpected", "stored_twice",
                                "features_differ", "verdicts_differ",
                                "stored_unlike_published")},
           "dead_letters_equal": c["dead_letters"] == c["reference_dead_letters"],
           "ids_with_two_verdicts": drill["ids_with_two_verdicts"],
           "zombie_found_lost": z["found_lost"] == z["held_when_stopped"],
           "zombie_commit_failures": z["commit_failures"]}
    out["ok"] = bool(out["caught_up"] and out["dead_letters_equal"]
                     and out["zombie_found_lost"]
                     and not any(out[k] for k in ("missing", "unexpected", "stored_twice",
                                                  "features_differ", "verdicts_differ",
                                                  "stored_unlike_published",
                                                  "ids_with_two_verdicts",
                                                  "zombie_commit_failures")))
    return out


def run_cluster_bench(scorers: list[int], count: int, rate: float, seconds: float,
                      runs: int = 5, warmup: int = 2000, drill_count: int = 10_000
                      ) -> dict[str, Any]:
    """The steady phase for each scorer count, ``runs`` failover runs of each kind, and the
    drill (none with ``drill_count`` 0); the figures, each run's check and their spread. A
    failover run whose check fails keeps its directory (``kept``: the scorers' and servers'
    logs, the partitions' databases); everything else is removed."""
    root = Path(tempfile.mkdtemp(prefix="branchguard-bench-cluster-"))
    report: dict[str, Any] = {"servers": 3, "stream_replicas": REPLICAS,
                              "partitions": PARTITIONS, "count": count, "rate": rate,
                              "seconds": seconds, "runs": runs, "steady": [],
                              "failover": {"scorer_kill": [], "leader_kill": []}}
    try:
        for n in scorers:
            report["steady"].append(steady_phase(root / f"steady-{n}", n, count, warmup))
        for run in range(runs):
            for kind, measure in (("scorer_kill", scorer_kill_run),
                                  ("leader_kill", leader_kill_run)):
                run_root = root / f"{kind}-{run + 1}"
                result = measure(run_root, rate, seconds, 1000 + run)
                report["failover"][kind].append(result)
                if _passed(result):
                    shutil.rmtree(run_root, ignore_errors=True)
                else:  # its scorers' and servers' logs and databases, to see what happened
                    report.setdefault("kept", []).append(str(run_root))
        if drill_count:
            report["equality"] = _equality(run_drill(root / "drill", count=drill_count))
    finally:
        if report.get("kept"):
            for phase in root.glob("steady-*"):
                shutil.rmtree(phase, ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    steady = {s["scorers"]: s["scorer_cpu_us_per_tx"] for s in report["steady"]}
    if 1 in steady and max(steady) > 1:
        report["scorer_cpu_ratio"] = round(steady[max(steady)] / max(1, steady[1]), 3)
    every = [r for kind in report["failover"].values() for r in kind]
    report["summary"] = _summary(report["failover"]["scorer_kill"],
                                 report["failover"]["leader_kill"])
    report["lost"] = sum(r["check"]["lost"] + r["not_published"] for r in every)
    report["duplicated"] = sum(r["check"]["duplicated"] for r in every)
    return report


def _passed(run: dict[str, Any]) -> bool:
    """Whether a failover run stored every transaction once, with one verdict each."""
    return bool(run["all_stored"] and run["check"]["ok"] and not run["not_published"])


def _met(value: float | None, target: float) -> str:
    return "not measured" if value is None else ("met" if value <= target else "MISSED")


def format_cluster_report(report: dict[str, Any]) -> str:
    """The report as a person reads it."""
    lines = [f"3 nats-servers (R{report['stream_replicas']}) on loopback, TX in "
             f"{report['partitions']} partitions, partitioned scorers "
             "(branchguard cluster scorer)"]
    for s in report["steady"]:
        cpu = s["cpu_us_per_tx"]
        lines.append(f"steady, {s['scorers']} scorer(s): {s['verdicts']:,} transactions at "
                     f"full speed, {s['tx_per_second']:,.0f} tx/s; terminal stage in "
                     f"{s['terminal_stage']}")
        lines.append("  CPU µs/tx: " + " · ".join(f"{name} {us:.0f}" for name, us in cpu.items())
                     + f" = {sum(cpu.values()):.0f}; the scorers together "
                     f"{s['scorer_cpu_us_per_tx']:.0f}")
    if "scorer_cpu_ratio" in report:
        ratio = report["scorer_cpu_ratio"]
        lines.append(f"  scorers' CPU per transaction, most scorers against 1: ×{ratio:.2f} "
                     f"(target ≤ ×{CPU_TARGET_RATIO:.2f}: {_met(ratio, CPU_TARGET_RATIO)})")
    lines.append(f"failover: {report['rate']:g}/s for {report['seconds']:g} s, 2 scorers, "
                 f"the kill half-way; {report['runs']} run(s) of each, each on a fresh cluster")
    for i, r in enumerate(report["failover"]["scorer_kill"], 1):
        per = "; ".join(f"p{p} taken {t['lease_taken']} open {t['open']} commit "
                        f"{t['first_commit']} replayed {t['replayed']}"
                        for p, t in r["orphaned"].items())
        lines.append(f"  scorer run {i}: killed {r['killed']} (stage in "
                     f"{r['terminal_stage']}): {per}; {_checked(r)}")
    for i, r in enumerate(report["failover"]["leader_kill"], 1):
        commits = " ".join(f"p{p} {t}" for p, t in r["first_commit"].items())
        lines.append(f"  leader run {i}: killed {r['killed']}; publish accepted again after "
                     f"{r['to_publish_seconds']} s; first commit {commits}; {_checked(r)}")
    names = [("scorer_kill", "lease_taken", "scorer kill → lease taken, s"),
             ("scorer_kill", "open", "scorer kill → partition open, s"),
             ("scorer_kill", "first_commit", "scorer kill → first commit, s"),
             ("scorer_kill", "replayed", "transactions replayed"),
             ("leader_kill", "to_publish_seconds", "leader kill → publish accepted, s"),
             ("leader_kill", "first_commit", "leader kill → first commit, s")]
    for kind, key, label in names:
        s = report["summary"][kind][key]
        lines.append(f"  {label:<34} min {s['min']} · median {s['median']} · p95 {s['p95']} "
                     f"· max {s['max']} (n={s['runs']})")
    scorer_p95 = report["summary"]["scorer_kill"]["first_commit"]["p95"]
    leader_p95 = report["summary"]["leader_kill"]["first_commit"]["p95"]
    lines.append(f"  targets: p95 scorer kill → first commit ≤ {SCORER_TARGET_SECONDS:g} s "
                 f"{_met(scorer_p95, SCORER_TARGET_SECONDS)}; leader kill → first commit "
                 f"≤ {LEADER_TARGET_SECONDS:g} s {_met(leader_p95, LEADER_TARGET_SECONDS)}")
    lines.append(f"loss/duplicate check over every run: {report['lost']} lost, "
                 f"{report['duplicated']} duplicated "
                 f"({'OK' if report['lost'] == report['duplicated'] == 0 else 'FAILED'})")
    if report.get("kept"):
        lines.append("  failed runs kept, with their logs and databases: "
                     + ", ".join(report["kept"]))
    if "equality" in report:
        e = report["equality"]
        lines.append(f"equality with one scorer (drill, {e['count']:,} transactions): "
                     f"missing {e['missing']}, unexpected {e['unexpected']}, stored twice "
                     f"{e['stored_twice']}, features differ {e['features_differ']}, verdicts "
                     f"differ {e['verdicts_differ']}, stored unlike the verdict of record "
                     f"{e['stored_unlike_published']}, ids with two verdicts "
                     f"{e['ids_with_two_verdicts']}, dead letters equal "
                     f"{e['dead_letters_equal']}, zombie found its partitions lost "
                     f"{e['zombie_found_lost']} ({'OK' if e['ok'] else 'FAILED'})")
    return "\n".join(lines)


def _checked(run: dict[str, Any]) -> str:
    c = run["check"]
    return (f"{run['retried']} of {run['published']} re-sent; "
            f"lost {c['lost'] + run['not_published']} (missing from TX "
            f"{c['tx_stream']['missing']}, stored {c['stored']['missing']}, VERDICTS "
            f"{c['verdicts']['missing']}), duplicated {c['duplicated']}")
