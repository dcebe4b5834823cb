"""Detection metrics a fraud team can act on, with bootstrap confidence intervals.

Given, per transaction, its event time, account, risk score (higher = riskier), whether it
raised an alert at the configured thresholds, and its true label:

- ``roc_auc``, ``average_precision``: threshold-free ranking quality (scikit-learn's);
- ``card_precision_at_k``: the Fraud Detection Handbook's daily card precision@k: per UTC day,
  each account scores the maximum of its transactions' risks and is fraudulent if any of that
  day's transactions is; the share of fraudulent accounts among the top ``k``, averaged over
  days. As in the handbook, an account already found fraudulent in an earlier day's top ``k``
  is left out of later days (it is blocked and investigated);
- ``recall_at_budget``: per day, the ``budget`` riskiest transactions are alerted (what a team
  working ``budget`` alerts a day would see); the share of all frauds they contain;
- ``precision``, ``recall``, ``f1``, ``alerts_per_day`` at the configured threshold (a
  transaction is alerted when its verdict is not ``approve``).

Confidence intervals (95 %, percentile bootstrap): transactions are resampled for the
transaction-level metrics, days for the two daily ones (their unit of work is a day).
:func:`compare` judges two models on the same transactions with one set of draws for both,
so the interval of their difference is paired: it can exclude 0 where the two models' own
intervals overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

DAY = 86400.0
METRICS = ("roc_auc", "average_precision", "card_precision_at_k", "recall_at_budget",
           "precision", "recall", "f1", "alerts_per_day")


@dataclass(frozen=True)
class Scored:
    """Parallel arrays, one entry per evaluated transaction."""

    ts: npt.NDArray[np.float64]
    account: npt.NDArray[np.object_]
    score: npt.NDArray[np.float64]
    alert: npt.NDArray[np.bool_]
    label: npt.NDArray[np.bool_]

    @classmethod
    def of(cls, ts: npt.ArrayLike, account: Sequence[str], score: npt.ArrayLike,
           alert: npt.ArrayLike, label: npt.ArrayLike) -> Scored:
        return cls(np.asarray(ts, dtype=np.float64), np.asarray(account, dtype=object),
                   np.asarray(score, dtype=np.float64), np.asarray(alert, dtype=bool),
                   np.asarray(label, dtype=bool))

    def days(self) -> npt.NDArray[np.int64]:
        return np.floor(self.ts / DAY).astype(np.int64)

    def take(self, index: npt.NDArray[np.intp]) -> Scored:
        return Scored(self.ts[index], self.account[index], self.score[index],
                      self.alert[index], self.label[index])


@dataclass(frozen=True)
class Metric:
    value: float | None
    low: float | None = None
    high: float | None = None

    def show(self) -> str:
        if self.value is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def daily_card_precision(s: Scored, k: int) -> list[float]:
    """Card precision@k of each day, in day order, handbook style (see module docstring)."""
    out: list[float] = []
    found: set[str] = set()
    days = s.days()
    for day in np.unique(days):
        m = days == day
        best: dict[str, tuple[float, bool]] = {}
        for account, score, label in zip(s.account[m], s.score[m], s.label[m]):
            old = best.get(account)
            best[account] = (score, bool(label)) if old is None else (max(old[0], score),
                                                                       old[1] or bool(label))
        ranked = sorted(((v[0], v[1], a) for a, v in best.items() if a not in found),
                        key=lambda r: (-r[0], r[2]))[:k]
        out.append(sum(r[1] for r in ranked) / k)
        found.update(r[2] for r in ranked if r[1])
    return out


def daily_budget_hits(s: Scored, budget: int) -> list[tuple[int, int]]:
    """Per day: (frauds among the ``budget`` riskiest transactions, frauds that day)."""
    days = s.days()
    out = []
    for day in np.unique(days):
        m = np.flatnonzero(days == day)
        top = m[np.argsort(-s.score[m], kind="stable")[:budget]]
        out.append((int(s.label[top].sum()), int(s.label[m].sum())))
    return out


def point_metrics(s: Scored, k: int, budget: int) -> dict[str, float | None]:
    """Every metric of :data:`METRICS` on ``s`` (None where undefined, e.g. AUC of one class)."""
    # scikit-learn is imported here, not at the top: the console imports this module for
    # its headings, and importing scikit-learn would add seconds to every API start.
    from sklearn.metrics import (average_precision_score, precision_recall_fscore_support,
                                 roc_auc_score)

    both = 0 < s.label.sum() < len(s.label)
    precision, recall, f1, _ = precision_recall_fscore_support(
        s.label, s.alert, average="binary", zero_division=0.0)
    hits = daily_budget_hits(s, budget)
    frauds = sum(h[1] for h in hits)
    n_days = max(len(np.unique(s.days())), 1)
    return {
        "roc_auc": float(roc_auc_score(s.label, s.score)) if both else None,
        "average_precision": float(average_precision_score(s.label, s.score)) if both else None,
        "card_precision_at_k": float(np.mean(daily_card_precision(s, k))) if len(s.ts) else None,
        "recall_at_budget": sum(h[0] for h in hits) / frauds if frauds else None,
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "alerts_per_day": float(s.alert.sum()) / n_days,
    }


def _bootstrap(s: Scored, k: int, budget: int, resamples: int, seed: int
               ) -> dict[str, npt.NDArray[np.float64]]:
    """Every metric on each of ``resamples`` bootstrap draws (NaN where undefined on a draw;
    alerts/day is not resampled). The draws depend only on ``seed`` and on the numbers of
    transactions and days, so two models scored on the same transactions get the same draws:
    that is what makes :func:`compare`'s difference paired. No draws for no transactions."""
    from sklearn.metrics import (average_precision_score, precision_recall_fscore_support,
                                 roc_auc_score)  # see point_metrics

    n = len(s.ts)
    resamples = max(resamples, 0) if n else 0
    samples = {name: np.full(resamples, np.nan) for name in METRICS}
    if not resamples:
        return samples
    rng = np.random.default_rng(seed)
    cards = np.array(daily_card_precision(s, k))
    hits = np.array(daily_budget_hits(s, budget), dtype=np.float64).reshape(-1, 2)
    for i in range(resamples):
        b = s.take(rng.integers(0, n, n))
        if 0 < b.label.sum() < n:
            samples["roc_auc"][i] = roc_auc_score(b.label, b.score)
            samples["average_precision"][i] = average_precision_score(b.label, b.score)
        p, r, f, _ = precision_recall_fscore_support(b.label, b.alert, average="binary",
                                                     zero_division=0.0)
        samples["precision"][i], samples["recall"][i], samples["f1"][i] = p, r, f
        d = rng.integers(0, len(cards), len(cards))
        samples["card_precision_at_k"][i] = cards[d].mean()
        frauds = hits[d, 1].sum()
        if frauds:
            samples["recall_at_budget"][i] = hits[d, 0].sum() / frauds
    return samples


def _interval(point: float | None, values: npt.NDArray[np.float64]) -> Metric:
    values = values[np.isfinite(values)]
    if point is None or not len(values):
        return Metric(point)
    low, high = np.percentile(values, [2.5, 97.5])
    return Metric(point, float(low), float(high))


def evaluate(s: Scored, *, k: int = 100, budget: int = 100, resamples: int = 200,
             seed: int = 0) -> dict[str, Metric]:
    """Point values and bootstrap 95 % intervals of every metric (``resamples=0``: none)."""
    point = point_metrics(s, k, budget)
    samples = _bootstrap(s, k, budget, resamples, seed)
    return {name: _interval(point[name], samples[name]) for name in METRICS}


def _minus(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def compare(base: Scored, other: Scored, *, k: int = 100, budget: int = 100,
            resamples: int = 200, seed: int = 0
            ) -> tuple[dict[str, Metric], dict[str, Metric], dict[str, Metric]]:
    """Two models on the same transactions (the same times, accounts and labels; only scores
    and alerts differ): each one's metrics as :func:`evaluate` gives them, and ``other``
    minus ``base`` with a paired bootstrap interval. Each draw resamples the same
    transactions for both, so that interval is of the difference itself: one that excludes 0
    says one model is better on this traffic, which two overlapping intervals cannot say."""
    if not (np.array_equal(base.ts, other.ts) and np.array_equal(base.label, other.label)):
        raise ValueError("a comparison needs the same transactions, in the same order")
    a, b = point_metrics(base, k, budget), point_metrics(other, k, budget)
    diff = {name: _minus(b[name], a[name]) for name in METRICS}
    sa = _bootstrap(base, k, budget, resamples, seed)
    sb = _bootstrap(other, k, budget, resamples, seed)
    return ({name: _interval(a[name], sa[name]) for name in METRICS},
            {name: _interval(b[name], sb[name]) for name in METRICS},
            {name: _interval(diff[name], sb[name] - sa[name]) for name in METRICS})


HEADINGS = {"roc_auc": "ROC AUC", "average_precision": "AP",
            "card_precision_at_k": "CP@{k}", "recall_at_budget": "recall@{budget}/day",
            "precision": "precision", "recall": "recall", "f1": "F1",
            "alerts_per_day": "alerts/day"}


def format_table(rows: Sequence[tuple[str, dict[str, Metric]]], *, k: int = 100,
                 budget: int = 100, intervals: bool = True) -> str:
    """A Markdown table, one row per (name, metrics)."""
    head = [HEADINGS[m].format(k=k, budget=budget) for m in METRICS]
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, metrics in rows:
        cells = []
        for m in METRICS:
            metric = metrics[m]
            if m == "alerts_per_day" and metric.value is not None:
                cells.append(f"{metric.value:.1f}")
            else:
                cells.append(metric.show() if intervals else Metric(metric.value).show())
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
