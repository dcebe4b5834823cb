"""``branchguard bench --dead-smtp``: the full-speed load with the dispatcher failing against
a dead SMTP server, between two plain runs (a smoke run: numbers are reported, not judged)."""

from __future__ import annotations

import json

from .test_cli import branchguard


def test_bench_with_a_dead_smtp_destination_reports_all_three_phases() -> None:
    result = branchguard("bench", "--count", "2000", "--rates", "", "--dead-smtp", "--no-baseline",
                         "--json",
                         timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before, alerts, after = json.loads(result.stdout)["phases"]
    assert [p["consumer"] for p in (before, alerts, after)] == ["scorer", "+alerts", "scorer"]
    assert before["verdicts"] == alerts["verdicts"] == after["verdicts"] == 2000
    metrics = alerts["alert_metrics"]
    assert alerts["alerts_to"] == "mailto://..."
    assert metrics["branchguard_alerts_sent"] == 0  # nothing listens there
    assert metrics["branchguard_alerts_queue_depth"] > 0
    # whether the dispatcher got to a first attempt within so short a phase depends on the
    # machine's speed (bursts wait alerts_group_wait_seconds); retries are test_dispatch's
    assert metrics["branchguard_alerts_retried"] >= 0
    assert alerts["dispatcher_cpu_seconds"] > 0
    # every phase says what each process spent on it, per transaction
    for phase in (before, alerts, after):
        cpu = phase["cpu_us_per_tx"]
        assert cpu["scorer"] > 0 and cpu["nats-server"] > 0, cpu
        assert "litestream" in cpu, cpu  # the scorer's replication child is counted too
    # the comparison is of the dispatcher phase against the plain phases on either side
    report = json.loads(result.stdout)["alerts_comparison"]
    plain = (before["tx_per_second"] + after["tx_per_second"]) / 2
    (only,) = report["rounds"]
    assert only["plain_tx_per_second"] == round(plain)
    assert only["with_dispatcher_tx_per_second"] == round(alerts["tx_per_second"])
    assert only["difference_percent"] == round(100 * (alerts["tx_per_second"] - plain) / plain, 1)
    assert only["with_dispatcher_scorer_cpu_us"] == alerts["cpu_us_per_tx"]["scorer"]
    assert report["mean_difference_percent"] == only["difference_percent"]


def test_bench_alert_rounds_alternate_dispatcher_and_plain_phases() -> None:
    result = branchguard("bench", "--count", "1000", "--rates", "", "--dead-smtp",
                         "--alert-rounds", "2", "--no-baseline", "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    phases = report["phases"]
    assert [p["consumer"] for p in phases] == ["scorer", "+alerts", "scorer", "+alerts", "scorer"]
    assert all(p["verdicts"] == 1000 for p in phases)
    # each dispatcher phase is compared with its own neighbours, the second with 3rd and 5th
    rounds = report["alerts_comparison"]["rounds"]
    assert len(rounds) == 2
    assert rounds[1]["plain_tx_per_second"] == round(
        (phases[2]["tx_per_second"] + phases[4]["tx_per_second"]) / 2)
    assert report["alerts_comparison"]["mean_difference_percent"] == round(
        (rounds[0]["difference_percent"] + rounds[1]["difference_percent"]) / 2, 1)
