"""``branchguard bench cluster``: a tiny run of the command on three real nats-servers and
real partitioned scorers (``branchguard cluster scorer``), its report whole, its figures real
numbers, every orphaned partition committed again and nothing lost or doubled;
and the loss/duplicate check, on fabricated ids, reporting what is missing or doubled where.
The figures are reported, never judged against a target: they depend on the machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from appliance.bench.cluster import spread
from appliance.bench.delivery import check_delivery
from appliance.bench.partition_scorers import PARTITIONS

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


@pytest.mark.timeout(900)
def test_the_command_measures_partitioned_scorers_and_loses_nothing() -> None:
    result = branchguard("bench", "cluster", "--scorers", "1,2", "--count", "1500", "--runs",
                         "1", "--seconds", "6", "--drill-count", "0", "--json", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads(result.stdout)
    assert report["partitions"] == PARTITIONS and report["stream_replicas"] == 3
    assert [s["scorers"] for s in report["steady"]] == [1, 2]
    for steady in report["steady"]:
        names = [f"scorer-{i + 1}" for i in range(steady["scorers"])]
        assert steady["verdicts"] == 1500 and _number(steady["tx_per_second"], 1, 1e6)
        cpu = steady["cpu_us_per_tx"]
        for name in (*names, "nats-1", "nats-2", "nats-3", "load-generator"):
            assert _number(cpu[name], 0, 1e6), (name, cpu)
        assert all(cpu[name] > 0 for name in names), cpu  # every scorer did its share
        assert steady["scorer_cpu_us_per_tx"] == sum(cpu[name] for name in names)
        assert steady["terminal_stage"] in names
        assert sorted(p for held in steady["held"].values() for p in held) == list(
            range(PARTITIONS))
    assert _number(report["scorer_cpu_ratio"], 0.1, 10)

    (scorer_run,) = report["failover"]["scorer_kill"]
    assert scorer_run["killed"] != scorer_run["terminal_stage"]
    orphaned = scorer_run["orphaned"]
    assert len(orphaned) == PARTITIONS // 2, orphaned  # the dead one's fair share
    for figures in orphaned.values():
        # the lease is taken, the partition opened, then committed: in that order
        assert figures["first_commit"] is not None, orphaned
        assert figures["lease_taken"] is not None and figures["open"] is not None, orphaned
        assert figures["lease_taken"] <= figures["open"] <= figures["first_commit"], orphaned
        assert isinstance(figures["replayed"], int) and figures["replayed"] >= 0
    (leader_run,) = report["failover"]["leader_kill"]
    assert leader_run["killed"] in ("nats-1", "nats-2", "nats-3")
    assert set(leader_run["first_commit"]) == {str(p) for p in range(PARTITIONS)}
    assert all(t is not None for t in leader_run["first_commit"].values()), leader_run
    for run in (scorer_run, leader_run):
        assert run["published"] == run["acked"] == 3000 and run["all_stored"], run
        check = run["check"]
        assert (check["lost"], check["duplicated"], run["not_published"]) == (0, 0, 0), check
        # every process stopped, each by its PID: the scorers and the servers
        assert not [name for name, pid in run["pids"].items() if Path(f"/proc/{pid}").exists()]
    assert (report["lost"], report["duplicated"]) == (0, 0)
    summary = report["summary"]
    assert summary["scorer_kill"]["first_commit"]["runs"] == PARTITIONS // 2
    assert summary["leader_kill"]["first_commit"]["runs"] == PARTITIONS
    assert "equality" not in report  # --drill-count 0


def test_the_command_is_there_with_an_example() -> None:
    result = branchguard("bench", "cluster", "--help")
    assert result.returncode == 0 and "--runs" in result.stdout
    assert "--scorers" in result.stdout and "--drill-count" in result.stdout
    assert "branchguard bench cluster --scorers 1,2,3" in result.stdout
