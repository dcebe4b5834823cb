"""``branchguard bench``: one run reports both consumers side by side, with the CPU of each
process, the scorer's loop stalls and the issue's targets marked met or missed.

The tiny run uses the real thing (nats-server, the scorer as ``branchguard run`` starts it,
Litestream, the pass-through consumer, the load-generator processes); its figures are
reported, never judged: whether a target is met depends on the machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.bench.report import format_report, kept_up, table, targets

from .test_cli import branchguard


def _phase(consumer: str, offered: float | str, tx_per_second: float, p99: float = 0.0,
           cpu: float = 50.0, stall: float | None = 5.0, verdicts: int = 1000) -> dict[str, Any]:
    return {"consumer": consumer, "offered_rate": offered, "verdicts": verdicts,
            "published": verdicts, "tx_per_second": tx_per_second,
            "latency_ms": {"p50": p99 / 4, "p95": p99 / 2, "p99": p99, "max": p99 * 2},
            "kept_up": None if offered == "full speed" else tx_per_second >= 0.95 * float(offered),
            "cpu_us_per_tx": {consumer: cpu, "nats-server": 30.0, "load-generator": 20.0},
            "loop_lag_ms": {"max_ms": stall, "p99_ms": stall, "windows": 0 if stall is None else 3}}


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in rows}


def test_targets_are_marked_met_or_missed_from_the_figures() -> None:
    phases = [_phase("pass-through", "full speed", 20000.0, cpu=30.0),
              _phase("pass-through", 2000.0, 2000.0, p99=5.0),
              _phase("pass-through", 10000.0, 9990.0, p99=80.0),
              _phase("scorer", "full speed", 10500.0, cpu=58.0),
              _phase("scorer", 2000.0, 1999.0, p99=14.0, stall=19.0),
              _phase("scorer", 10000.0, 9980.0, p99=200.0)]
    rows = table(phases)
    full = rows[1]
    assert (full["consumer"], full["offered"]) == ("scorer", "full speed")
    assert full["share_percent"] == 52.5
    at_2000 = rows[3]
    assert at_2000["pass_through_p99_ms"] == 5.0 and at_2000["p99_vs_pass_through"] == 2.8
    met = _by_name(targets(rows, {"stored_transactions": 1_050_000,
                                  "seconds_to_first_verdict": 8.4}))
    assert {name: t["met"] for name, t in met.items()} == {
        "p99_at_2000": True, "scorer_cpu_at_full_speed": True, "throughput_share": True,
        "keeps_up_at_10000": True, "restart_first_verdict": True, "loop_stall_at_2000": True}

    # each target missed on its own figure
    phases[3] = _phase("scorer", "full speed", 9000.0, cpu=61.0)          # 45 %, 61 µs
    phases[4] = _phase("scorer", 2000.0, 1999.0, p99=16.0, stall=21.0)    # > 15 ms, > 20 ms
    phases[5] = _phase("scorer", 10000.0, 6000.0, p99=900.0)              # fell behind
    missed = _by_name(targets(table(phases), {"stored_transactions": 1_050_000,
                                              "seconds_to_first_verdict": 10.5}))
    assert not any(t["met"] for t in missed.values()), missed
    # p99 under 15 ms but over 3x the pass-through's is missed too
    phases[4] = _phase("scorer", 2000.0, 1999.0, p99=14.9, stall=1.0)
    phases[1] = _phase("pass-through", 2000.0, 2000.0, p99=4.0)
    assert _by_name(targets(table(phases), None))["p99_at_2000"]["met"] is False


def test_targets_without_their_figures_are_not_measured() -> None:
    phases = [_phase("scorer", "full speed", 9000.0, cpu=61.0),
              _phase("scorer", 500.0, 500.0, p99=3.0)]
    found = _by_name(targets(table(phases), {"stored_transactions": 7000,
                                            "seconds_to_first_verdict": 1.2}))
    assert found["scorer_cpu_at_full_speed"]["met"] is False  # no pass-through needed
    for name in ("p99_at_2000", "throughput_share", "keeps_up_at_10000", "loop_stall_at_2000",
                 "restart_first_verdict"):  # the restart target is at 1M stored
        assert found[name]["met"] is None, found[name]
        assert "not measured" in found[name]["measured"]


def test_kept_up_means_every_verdict_at_95_percent_of_the_offered_rate() -> None:
    assert kept_up({"verdicts": 1000, "tx_per_second": 1960.0}, 2000.0, 1000)
    assert not kept_up({"verdicts": 1000, "tx_per_second": 1890.0}, 2000.0, 1000)
    assert not kept_up({"verdicts": 999, "tx_per_second": 2000.0}, 2000.0, 1000)


def test_a_tiny_run_reports_every_figure_for_both_consumers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = branchguard("bench", "--count", "2000", "--rates", "2000,10000", "--rate-seconds",
                         "0.5", "--restart-rows", "2000", "--json", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["replicate"] is True  # Litestream on unless --no-replicate
    phases = report["phases"]
    assert [(p["consumer"], p["offered_rate"]) for p in phases] == [
        ("pass-through", "full speed"), ("pass-through", 2000.0), ("pass-through", 10000.0),
        ("scorer", "full speed"), ("scorer", 2000.0), ("scorer", 10000.0)]
    assert [p["verdicts"] for p in phases] == [2000, 1000, 5000] * 2
    for p in phases:
        cpu = p["cpu_us_per_tx"]
        assert cpu[p["consumer"]] > 0 and cpu["nats-server"] > 0 and cpu["load-generator"] > 0
        lag = p["loop_lag_ms"]
        assert lag["windows"] >= 1 and 0 <= lag["p99_ms"] <= lag["max_ms"], (p["consumer"], lag)
        if p["offered_rate"] != "full speed":
            assert isinstance(p["kept_up"], bool)
            assert 0 < p["latency_ms"]["p50"] <= p["latency_ms"]["p95"] <= p["latency_ms"]["p99"]
    assert all("litestream" in p["cpu_us_per_tx"] for p in phases[3:])

    rows = report["table"]
    assert [(r["consumer"], r["offered"]) for r in rows] == [
        ("pass-through", "full speed"), ("scorer", "full speed"), ("pass-through", 2000.0),
        ("scorer", 2000.0), ("pass-through", 10000.0), ("scorer", 10000.0)]
    assert rows[1]["share_percent"] == round(
        100 * phases[3]["tx_per_second"] / phases[0]["tx_per_second"], 1)
    for scorer_row, pass_row in ((rows[3], rows[2]), (rows[5], rows[4])):
        assert scorer_row["pass_through_p99_ms"] == pass_row["p99_ms"]
        assert scorer_row["stall_max_ms"] is not None and scorer_row["kept_up"] in (True, False)
    found = _by_name(report["targets"])
    assert set(found) == {"p99_at_2000", "scorer_cpu_at_full_speed", "throughput_share",
                          "keeps_up_at_10000", "restart_first_verdict", "loop_stall_at_2000"}
    for name, t in found.items():  # measured in this run, except the 1M-row restart
        assert t["met"] in ((None,) if name == "restart_first_verdict" else (True, False)), t
    assert report["restart"]["verdicts"] == 1
    assert report["restart"]["stored_transactions"] == 2000 + 2000 + 1000 + 5000 + 2000

    # the table on stdout is the same report, readable
    assert result.stdout.strip() == format_report(report).strip()
    assert "Litestream on" in result.stdout
    for t in report["targets"]:
        assert t["target"] in result.stdout and t["measured"] in result.stdout, t


def test_no_replicate_and_no_baseline_leave_out_litestream_and_the_pass_through() -> None:
    result = branchguard("bench", "--count", "500", "--rates", "", "--no-replicate",
                         "--no-baseline", "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # --json alone: the JSON on stdout, as before
    assert report["replicate"] is False
    (phase,) = report["phases"]
    assert phase["consumer"] == "scorer" and phase["verdicts"] == 500
    assert "litestream" not in phase["cpu_us_per_tx"]
    assert _by_name(report["targets"])["throughput_share"]["met"] is None
