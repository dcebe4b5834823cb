"""The report of ``branchguard bench``: the phases of both consumers as one table, the
issue's targets beside the figures (met, missed or not measured), and the text a person
reads. The JSON of ``--json FILE`` holds the same rows (``table``) and targets.
"""

from __future__ import annotations

import math
from typing import Any

KEPT_UP_SHARE = 0.95
"""A consumer kept up with an offered rate when every verdict came and the achieved rate
(verdicts over first publish to last verdict) was at least this share of the offered one."""

P99_AT_2000_MAX_MS = 15.0
P99_AT_2000_MAX_TIMES_PASS_THROUGH = 3.0
SCORER_CPU_MAX_US = 60.0
THROUGHPUT_MIN_SHARE_PERCENT = 50.0
RESTART_ROWS = 1_000_000
RESTART_MAX_SECONDS = 10.0
LOOP_STALL_MAX_MS = 20.0
"""Issue 16's targets, for one run with Litestream on."""

FULL = "full speed"


def kept_up(result: dict[str, Any], offered: float, count: int) -> bool:
    """Whether a fixed-rate phase of ``count`` transactions kept up with ``offered`` tx/s."""
    return bool(result["verdicts"] >= count
                and result["tx_per_second"] >= KEPT_UP_SHARE * offered)


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) \
        else float(value)


def table(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per offered rate (full speed first) and consumer (the pass-through, then the
    scorer), from the first phase of each; each scorer row carries the figures it is judged
    against: its share of the pass-through's throughput at full speed, the pass-through's
    p99 at the same offered rate."""
    first: dict[tuple[str, Any], dict[str, Any]] = {}
    offered: list[Any] = []
    for p in phases:
        if p["consumer"] not in ("pass-through", "scorer"):
            continue
        first.setdefault((p["consumer"], p["offered_rate"]), p)
        if p["offered_rate"] not in offered:
            offered.append(p["offered_rate"])
    offered.sort(key=lambda o: -1.0 if o == FULL else float(o))
    rows = []
    for rate in offered:
        base = first.get(("pass-through", rate))
        for consumer in ("pass-through", "scorer"):
            phase = first.get((consumer, rate))
            if phase is None:
                continue
            fixed = rate != FULL
            lat = phase["latency_ms"]
            row: dict[str, Any] = {
                "offered": rate, "consumer": consumer, "tx_per_second": phase["tx_per_second"],
                "share_percent": None, "kept_up": phase.get("kept_up") if fixed else None,
                "p50_ms": _number(lat["p50"]) if fixed else None,
                "p95_ms": _number(lat["p95"]) if fixed else None,
                "p99_ms": _number(lat["p99"]) if fixed else None,
                "pass_through_p99_ms": None, "p99_vs_pass_through": None,
                "stall_max_ms": phase["loop_lag_ms"]["max_ms"],
                "stall_p99_ms": phase["loop_lag_ms"]["p99_ms"],
                "cpu_us_per_tx": phase["cpu_us_per_tx"]}
            if consumer == "scorer" and base is not None:
                if not fixed and base["tx_per_second"]:
                    row["share_percent"] = round(
                        100 * phase["tx_per_second"] / base["tx_per_second"], 1)
                base_p99 = _number(base["latency_ms"]["p99"])
                if fixed and base_p99:
                    row["pass_through_p99_ms"] = base_p99
                    if row["p99_ms"] is not None:
                        row["p99_vs_pass_through"] = round(row["p99_ms"] / base_p99, 1)
            rows.append(row)
    return rows


def _row(rows: list[dict[str, Any]], consumer: str, offered: Any) -> dict[str, Any] | None:
    return next((r for r in rows if r["consumer"] == consumer and r["offered"] == offered),
                None)


def _target(name: str, target: str, measured: str | None, met: bool | None
            ) -> dict[str, Any]:
    return {"name": name, "target": target, "measured": measured or "not measured",
            "met": met}


def targets(rows: list[dict[str, Any]], restart: dict[str, Any] | None
            ) -> list[dict[str, Any]]:
    """Issue 16's targets against this run's rows (:func:`table`) and restart figure:
    ``met`` is True or False, or None when the run did not measure it (no 2,000/s or
    10,000/s phase, no pass-through, fewer than 1M rows stored for the restart)."""
    found = []
    scorer_2k, base_2k = _row(rows, "scorer", 2000.0), _row(rows, "pass-through", 2000.0)
    text, met = None, None
    if scorer_2k and scorer_2k["p99_ms"] is not None and scorer_2k["pass_through_p99_ms"]:
        p99, base = scorer_2k["p99_ms"], scorer_2k["pass_through_p99_ms"]
        text = f"{p99:.1f} ms, {p99 / base:.1f}× the pass-through's {base:.1f} ms"
        met = p99 <= P99_AT_2000_MAX_MS and p99 <= P99_AT_2000_MAX_TIMES_PASS_THROUGH * base
    elif scorer_2k and base_2k is None:
        text = f"not measured: no pass-through at 2,000/s (scorer p99 {scorer_2k['p99_ms']} ms)"
    found.append(_target("p99_at_2000", "p99 at 2,000/s ≤ 3× the pass-through's p99 and "
                         "≤ 15 ms", text, met))

    full = _row(rows, "scorer", FULL)
    cpu = full["cpu_us_per_tx"].get("scorer") if full else None
    found.append(_target("scorer_cpu_at_full_speed", "scorer CPU ≤ 60 µs per transaction at "
                         "full speed", None if cpu is None else f"{cpu:.0f} µs",
                         None if cpu is None else cpu <= SCORER_CPU_MAX_US))

    share = full["share_percent"] if full else None
    base_full = _row(rows, "pass-through", FULL)
    found.append(_target(
        "throughput_share", "full-speed throughput ≥ 50 % of the pass-through's",
        None if share is None or full is None or base_full is None else
        f"{share:.1f} % ({full['tx_per_second']:,.0f} against "
        f"{base_full['tx_per_second']:,.0f} tx/s)",
        None if share is None else share >= THROUGHPUT_MIN_SHARE_PERCENT))

    at_10k = _row(rows, "scorer", 10000.0)
    found.append(_target(
        "keeps_up_at_10000", "keeps up at 10,000 tx/s offered",
        None if at_10k is None else
        f"{at_10k['tx_per_second']:,.0f} tx/s ({'kept up' if at_10k['kept_up'] else 'fell behind'})",
        None if at_10k is None else bool(at_10k["kept_up"])))

    text, met = None, None
    if restart is not None:
        stored, seconds = restart["stored_transactions"], restart["seconds_to_first_verdict"]
        text = f"{seconds:.1f} s with {stored:,} stored"
        if stored >= RESTART_ROWS:
            met = seconds <= RESTART_MAX_SECONDS
        else:
            text = f"not measured at 1M stored (--restart-rows 1000000): {text}"
    found.append(_target("restart_first_verdict", "restart with 1M stored transactions: "
                         "first verdict within 10 s", text, met))

    stall = scorer_2k["stall_max_ms"] if scorer_2k else None
    found.append(_target("loop_stall_at_2000", "no event-loop stall > 20 ms at 2,000/s",
                         None if stall is None else f"largest {stall:.1f} ms",
                         None if stall is None else stall <= LOOP_STALL_MAX_MS))
    return found


def _cell(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _offered(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:,.0f}/s"


def format_table(report: dict[str, Any]) -> list[str]:
    """The rows of :func:`table` as text, one line each, and the targets below them."""
    head = (f"{'offered':>10} {'consumer':>12} {'tx/s':>8} {'share':>6} {'kept up':>7} "
            f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'÷ pass':>7} {'stall ms':>8} "
            f"{'stall p99':>9}  CPU µs/tx by process")
    lines = [head]
    for r in report["table"]:
        cpu = r["cpu_us_per_tx"]
        kept = "–" if r["kept_up"] is None else ("yes" if r["kept_up"] else "NO")
        lines.append(
            f"{_offered(r['offered']):>10} {r['consumer']:>12} {r['tx_per_second']:>8,.0f} "
            f"{_cell(r['share_percent'], '.0f', ' %'):>6} {kept:>7} "
            f"{_cell(r['p50_ms']):>8} {_cell(r['p95_ms']):>8} {_cell(r['p99_ms']):>8} "
            f"{_cell(r['p99_vs_pass_through'], '.1f', '×'):>7} "
            f"{_cell(r['stall_max_ms'], '.1f'):>8} {_cell(r['stall_p99_ms'], '.1f'):>9}  "
            + " · ".join(f"{name} {us:.0f}" for name, us in cpu.items())
            + f" = {sum(cpu.values()):.0f}")
    lines += ["share: the scorer's tx/s as a share of the pass-through's at full speed",
              "kept up: every verdict came, at ≥ 95 % of the offered rate",
              "÷ pass: the scorer's p99 over the pass-through's p99 at the same offered rate",
              "stall ms: the consumer's largest event-loop stall in the phase; stall p99: the "
              "worst p99 of its 1 s windows", "",
              "issue 16's targets (one run, Litestream on, quiet machine):"]
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    for t in report["targets"]:
        lines.append(f"  {verdict[t['met']]:>12}  {t['target']}: {t['measured']}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The whole report as a person reads it."""
    litestream = ("Litestream on" if report.get("replicate", True) else
                  "Litestream off (--no-replicate; the targets are with it on)")
    lines = [f"{litestream}, sync_policy={report['sync_policy']}, "
             f"cpus={report['machine']['cpus']}; one run, figures depend on the machine's load",
             *format_table(report), ""]
    for p in report["phases"]:
        if "alert_metrics" in p:
            m = p["alert_metrics"]
            lines.append(f"alerts to {p['alerts_to']}: {m['branchguard_alerts_queue_depth']} "
                         f"undelivered, {m['branchguard_alerts_retried']} failed attempts, "
                         f"{m['branchguard_alerts_sent']} sent; dispatcher CPU during the phase "
                         f"{p['dispatcher_cpu_seconds']} s, peak memory "
                         f"{p['dispatcher_peak_rss_mib']} MiB")
    if "alerts_comparison" in report:
        c = report["alerts_comparison"]
        for r in c["rounds"]:
            lines.append(f"with the dispatcher {r['with_dispatcher_tx_per_second']} tx/s "
                         f"(scorer {r['with_dispatcher_scorer_cpu_us']} µs/tx) against "
                         f"{r['plain_tx_per_second']} tx/s (scorer {r['plain_scorer_cpu_us']} "
                         f"µs/tx) on either side: {r['difference_percent']:+.1f} %")
        lines.append(f"mean difference: {c['mean_difference_percent']:+.1f} %")
    lines.append(f"scorer peak memory: {report.get('scorer_peak_rss_mib')} MiB")
    if "restart" in report:
        r = report["restart"]
        lines.append(f"restart with {r['stored_transactions']} stored transactions: first "
                     f"verdict after {r['seconds_to_first_verdict']} s "
                     f"(peak memory {r['scorer_peak_rss_mib']} MiB)")
    return "\n".join(lines)
