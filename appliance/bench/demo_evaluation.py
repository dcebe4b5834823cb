"""``branchguard evaluate --demo``: how workable the alerts of a demo node are, and which
injected fraud episodes they catch, from what the store holds.

Read from the node database, nothing recomputed:
- an *alert* is a stored verdict other than ``approve`` (the verdict of record; live ones
  raised an alert, history's were stored without, see feed/history.py), counted per day of
  event time and compared with ``alert_budget_per_day``;
- *precision* is the share of alerts whose transaction is labelled fraud, among the alerts
  whose label is known (alerts whose label has not arrived yet are counted apart);
- an *episode* is a demo fraud label's episode (its ``source``, feed/late_labels.py); it is
  *caught* when at least one of its transactions was alerted. Reported per typology.

Only what falls in ``[since, until)`` of event time counts (default: everything stored), so
the first days of a demo, whose accounts had no past yet, can be left out with ``--since``.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..feed.episodes import TYPOLOGIES
from ..feed.late_labels import parse_source
from ..store import require_db

_DAY = 86400.0


@dataclass(frozen=True)
class Catch:
    """Episodes of one typology, and how many had at least one alert."""

    typology: str
    episodes: int
    caught: int

    @property
    def share(self) -> float | None:
        return self.caught / self.episodes if self.episodes else None


@dataclass(frozen=True)
class DemoEvaluation:
    days: float
    transactions: int
    alerts: int
    budget: float
    alerts_labelled: int
    """Alerts whose transaction has a label (precision is over these)."""
    alerts_fraud: int
    per_day: list[int] = field(default_factory=list)
    """Alerts on each whole day of event time, oldest first."""
    catches: list[Catch] = field(default_factory=list)

    @property
    def alerts_per_day(self) -> float:
        return self.alerts / self.days if self.days else 0.0

    @property
    def precision(self) -> float | None:
        return self.alerts_fraud / self.alerts_labelled if self.alerts_labelled else None

    @property
    def caught(self) -> Catch:
        return Catch("all", sum(c.episodes for c in self.catches),
                     sum(c.caught for c in self.catches))


def evaluate_demo(db_path: Path, budget: float, since: float | None = None,
                  until: float | None = None) -> DemoEvaluation:
    """The figures of the module docstring for the node database at ``db_path``."""
    require_db(db_path)
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        lo, hi = conn.execute("SELECT min(ts), max(ts) FROM transactions").fetchone()
        if lo is None:
            return DemoEvaluation(0.0, 0, 0, budget, 0, 0)
        lo = float(lo) if since is None else since
        hi = float(hi) + 1e-3 if until is None else until  # (the newest one counts)
        total, alerts, labelled, fraud = conn.execute(
            "SELECT count(*), coalesce(sum(t.decision != 'approve'), 0), "
            "coalesce(sum(t.decision != 'approve' AND l.label IS NOT NULL), 0), "
            "coalesce(sum(t.decision != 'approve' AND l.label = 1), 0) "
            "FROM transactions t LEFT JOIN labels l USING (transaction_id) "
            "WHERE t.ts >= ? AND t.ts < ?",
            [lo, hi]).fetchone()
        per_day: dict[int, int] = defaultdict(int)
        for day, n in conn.execute(
                "SELECT CAST((t.ts - ?) / 86400.0 AS INTEGER), count(*) FROM transactions t "
                "WHERE t.ts >= ? AND t.ts < ? AND t.decision != 'approve' GROUP BY 1",
                [lo, lo, hi]):
            per_day[int(day)] += int(n)
        whole = int((hi - lo) // _DAY)
        episodes: dict[tuple[str, str], bool] = {}
        for source, flagged in conn.execute(
                "SELECT l.source, t.decision != 'approve' FROM labels l JOIN transactions t "
                "USING (transaction_id) WHERE l.label = 1 AND t.ts >= ? AND t.ts < ?", [lo, hi]):
            parsed = parse_source(source)
            if parsed is not None:
                episodes[parsed] = episodes.get(parsed, False) or bool(flagged)
    finally:
        conn.close()
    catches = []
    for typology in (*TYPOLOGIES, *sorted({t for t, _ in episodes} - set(TYPOLOGIES))):
        mine = [caught for (t, _), caught in episodes.items() if t == typology]
        catches.append(Catch(typology, len(mine), sum(mine)))
    return DemoEvaluation(max(hi - lo, 1.0) / _DAY, int(total), int(alerts), budget,
                          int(labelled), int(fraud), [per_day.get(d, 0) for d in range(whole)],
                          catches)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def format_demo(result: DemoEvaluation) -> str:
    """The evaluation as a few lines of text for the terminal."""
    within = (abs(result.alerts_per_day - result.budget) <= 0.2 * result.budget
              if result.budget else False)
    lines = [
        f"period: {result.days:.1f} days, {result.transactions:,} transactions",
        f"alerts: {result.alerts:,} = {result.alerts_per_day:,.1f} per day; budget "
        f"{result.budget:,.0f} per day ({'within' if within else 'outside'} ±20 %)",
    ]
    if result.per_day:
        ordered = sorted(result.per_day)
        lines.append(f"alerts per whole day: min {ordered[0]:,}, median "
                     f"{ordered[len(ordered) // 2]:,}, max {ordered[-1]:,}")
    lines.append(f"precision of alerts: {_pct(result.precision)} ({result.alerts_fraud:,} "
                 f"fraud of {result.alerts_labelled:,} labelled alerts; "
                 f"{result.alerts - result.alerts_labelled:,} alerts not labelled yet)")
    lines.append("episodes caught (at least one alert):")
    for c in [*result.catches, result.caught]:
        lines.append(f"  {c.typology:<20} {c.caught:>5,} of {c.episodes:>5,}  {_pct(c.share)}")
    return "\n".join(lines)
