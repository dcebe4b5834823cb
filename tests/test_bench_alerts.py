"""``branchguard bench --dead-smtp``: the full-speed load with the dispatcher failing against
a dead SMTP server, between two plain runs (a smoke run: numbers are reported, not judged)."""

from __future__ import annotations

import json

from .test_cli import branchguard


def test_bench_with_a_dead_smtp_destination_reports_all_three_phases() -> None:
    result = branchguard("bench", "--count", "2000", "--rates", "", "--dead-smtp", "--json",
                         timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before, alerts, after = json.loads(result.stdout)["phases"]
    assert [p.get("consumer") for p in (before, alerts, after)] == [None, "+alerts", None]
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
