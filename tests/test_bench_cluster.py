"""``branchguard bench cluster``: a tiny run on three real nats-servers and a real scorer
(``branchguard run``), its figures real numbers in sane ranges and nothing lost or doubled;
and the loss/duplicate check, on fabricated ids, reporting what is missing or doubled where.
The figures are reported, never judged against a target: they depend on the machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from appliance.bench.cluster import run_cluster_bench, spread
from appliance.bench.delivery import check_delivery

from .test_cli import branchguard

IDS = [f"T{i}" for i in range(6)]


def test_the_check_reports_a_loss_and_a_duplicate_where_they_are() -> None:
    assert check_delivery(IDS, IDS, IDS, IDS).ok
    # re-sends of one id are one publish; ids of other runs are counted apart, not as loss
    fine = check_delivery(IDS + ["T0"], IDS + ["OTHER"], IDS, IDS)
    assert fine.ok and fine.tx_stream.unexpected == 1

    lost = check_delivery(IDS, IDS[1:], IDS, IDS)
    assert (lost.lost, lost.duplicated, lost.tx_stream.missing) == (1, 0, 1)
    assert lost.tx_stream.examples == ("T0",) and not lost.ok

    stored_twice = check_delivery(IDS, IDS, IDS + ["T3", "T3"], IDS[:-1])
    assert stored_twice.stored.twice == 2 and stored_twice.verdicts.missing == 1
    assert (stored_twice.lost, stored_twice.duplicated) == (1, 2)
    assert stored_twice.as_dict()["ok"] is False
    assert check_delivery(IDS, IDS, IDS, IDS + ["T5"]).verdicts.twice == 1


def test_spread_is_min_median_p95_max_of_what_was_measured() -> None:
    s = spread([4.0, None, 2.0, 3.0, 1.0, 5.0])
    assert (s["min"], s["median"], s["max"], s["runs"]) == (1.0, 3.0, 5.0, 5)
    assert s["p95"] is not None and 4.0 < s["p95"] <= 5.0
    assert spread([None])["median"] is None


def _number(value: object, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and low <= value <= high


def test_a_tiny_run_measures_every_process_and_loses_nothing() -> None:
    report = run_cluster_bench(count=400, rate=150, seconds=3, runs=1, warmup=100)
    assert report["scorers"] == 1 and "per-partition" in report["note"]
    steady = report["steady"]
    assert steady["verdicts"] == 400 and _number(steady["tx_per_second"], 10, 1e6)
    cpu = steady["cpu_us_per_tx"]
    for name in ("scorer", "nats-1", "nats-2", "nats-3", "load-generator"):
        assert _number(cpu[name], 0, 1e6), (name, cpu)
    assert cpu["scorer"] > 0 and sum(cpu[f"nats-{i}"] for i in (1, 2, 3)) > 0
    (run,) = report["failover"]
    assert run["killed"] in ("nats-1", "nats-2", "nats-3")
    assert run["published"] == 450 and run["acked"] == 450 and run["all_stored"]
    # an election takes seconds, never nothing: a kill that stopped nothing would show ~0
    assert _number(run["to_publish_seconds"], 0.2, 60), run
    # (the scorer may commit a transaction before its publisher hears the ack: no order)
    assert _number(run["to_commit_seconds"], 0.2, 120), run
    assert run["retries"] >= 1 and run["retries"] >= run["retried"], run
    check = run["check"]
    assert (check["lost"], check["duplicated"], report["lost"], report["duplicated"]) == (
        0, 0, 0, 0), check
    assert check["published"] == 450 and check["tx_stream"]["unexpected"] > 0  # the steady ids
    assert report["summary"]["to_publish_seconds"]["median"] == run["to_publish_seconds"]
    # every process stopped, each by its PID: the scorer, its Litestream, the servers
    assert {"scorer", "nats-1", "nats-2", "nats-3", "litestream"} <= set(run["pids"])
    assert not [name for name, pid in run["pids"].items() if Path(f"/proc/{pid}").exists()]
    json.dumps(report)  # what --json writes


def test_the_command_is_there_with_an_example() -> None:
    result = branchguard("bench", "cluster", "--help")
    assert result.returncode == 0 and "--runs" in result.stdout
    assert "branchguard bench cluster --count" in result.stdout
