"""Evaluation metrics against scikit-learn's own functions on known data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, f1_score, precision_score, recall_score,
                             roc_auc_score)

from appliance.learning.evaluation import (DAY, METRICS, Scored, compare, daily_card_precision,
                                           evaluate, format_table, point_metrics)

T0 = 1_780_000_000.0 - (1_780_000_000.0 % DAY)


def synthetic(n: int = 3000, days: int = 4, seed: int = 1) -> Scored:
    rng = np.random.default_rng(seed)
    label = rng.random(n) < 0.05
    score = rng.normal(size=n) + 1.5 * label
    ts = T0 + rng.integers(0, days, n) * DAY + rng.random(n) * 80000
    account = np.array([f"A{i}" for i in rng.integers(0, 400, n)], dtype=object)
    alert = score > 1.2
    return Scored.of(ts, list(account), score, alert, label)


def test_threshold_free_and_threshold_metrics_are_scikit_learns() -> None:
    s = synthetic()
    m = point_metrics(s, k=20, budget=30)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(s.label, s.score))
    assert m["average_precision"] == pytest.approx(average_precision_score(s.label, s.score))
    assert m["precision"] == pytest.approx(precision_score(s.label, s.alert))
    assert m["recall"] == pytest.approx(recall_score(s.label, s.alert))
    assert m["f1"] == pytest.approx(f1_score(s.label, s.alert))
    assert m["alerts_per_day"] == pytest.approx(s.alert.sum() / 4)


def test_recall_at_budget_is_recall_of_the_daily_top_transactions() -> None:
    s = synthetic()
    days = s.days()
    chosen = np.zeros(len(s.ts), dtype=bool)
    for d in np.unique(days):
        idx = np.flatnonzero(days == d)
        chosen[idx[np.argsort(-s.score[idx])[:30]]] = True
    assert point_metrics(s, k=20, budget=30)["recall_at_budget"] == pytest.approx(
        recall_score(s.label, chosen))


def test_card_precision_is_precision_of_the_top_accounts_per_day() -> None:
    s = synthetic(days=1)
    accounts = sorted(set(s.account))
    best = {a: max(s.score[s.account == a]) for a in accounts}
    fraud = {a: bool(s.label[s.account == a].any()) for a in accounts}
    top = sorted(accounts, key=lambda a: -best[a])[:25]
    expected = precision_score([fraud[a] for a in top], [True] * len(top))
    assert point_metrics(s, k=25, budget=10)["card_precision_at_k"] == pytest.approx(expected)


def test_card_precision_leaves_out_accounts_found_on_earlier_days() -> None:
    # day 0: A (fraud) and B on top; day 1: A would be top again but is already found
    s = Scored.of([T0, T0 + 1, T0 + 2, T0 + DAY, T0 + DAY + 1, T0 + DAY + 2],
                  ["A", "B", "C", "A", "B", "C"], [0.9, 0.8, 0.1, 0.9, 0.2, 0.8],
                  [False] * 6, [True, False, False, True, False, True])
    assert daily_card_precision(s, k=2) == [0.5, 0.5]  # day 1 ranks C, B (A is blocked)


def test_intervals_bracket_the_point_value_and_the_table_shows_them() -> None:
    s = synthetic()
    metrics = evaluate(s, k=20, budget=30, resamples=50, seed=3)
    for name in ("roc_auc", "average_precision", "f1", "card_precision_at_k"):
        m = metrics[name]
        assert m.low is not None and m.high is not None and m.value is not None
        assert m.low <= m.value <= m.high, name
    table = format_table([("model-x", metrics)], k=20, budget=30)
    assert "| model-x |" in table and "CP@20" in table and "recall@30/day" in table


def test_one_class_gives_undefined_auc_not_an_error() -> None:
    s = Scored.of([T0, T0 + 1], ["A", "B"], [0.1, 0.2], [False, True], [False, False])
    m = evaluate(s, resamples=10)
    assert m["roc_auc"].value is None and m["roc_auc"].show() == "n/a"
    assert m["precision"].value == 0.0


def rescored(s: Scored, score: np.ndarray) -> Scored:
    return Scored.of(s.ts, list(s.account), score, s.alert, s.label)


def test_a_model_against_itself_differs_by_exactly_nothing() -> None:
    s = synthetic()
    alone, again, d = compare(s, s, k=20, budget=30, resamples=50, seed=3)
    assert alone == again == evaluate(s, k=20, budget=30, resamples=50, seed=3)
    for name in METRICS:
        assert d[name].value == 0.0, name
        assert d[name].low in (None, 0.0) and d[name].high in (None, 0.0), name
    ap = alone["average_precision"]
    assert ap.high is not None and ap.low is not None and ap.high - ap.low > 0.05


def test_the_difference_is_paired_so_a_small_steady_gain_shows() -> None:
    s = synthetic(seed=4)
    better = rescored(s, s.score + 0.15 * s.label)  # a little better on every fraud
    mine, theirs, gain = compare(s, better, k=20, budget=30, resamples=100, seed=5)
    d = gain["average_precision"]
    assert d.value == pytest.approx(average_precision_score(s.label, better.score)
                                    - average_precision_score(s.label, s.score))
    assert d.low is not None and d.high is not None and 0 < d.low <= d.value <= d.high
    a, b = mine["average_precision"], theirs["average_precision"]
    assert a.high is not None and b.low is not None
    assert b.low < a.high  # the two intervals alone overlap: they could not say it


def test_a_difference_needs_the_same_transactions() -> None:
    s = synthetic()
    other = synthetic(seed=2)
    with pytest.raises(ValueError, match="same transactions"):
        compare(s, other, resamples=5)
