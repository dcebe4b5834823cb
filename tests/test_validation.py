"""Time-ordered validation: the folds never read past the training window's end, every fit row
is earlier than every validation row, and the forest's features are chosen on them."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.errors import ModelError
from appliance.learning.validation import (FOREST_FOLDS, MIN_VALIDATION_FRAUDS,
                                           VALIDATION_SHARE, as_served, choose_forest_features,
                                           rolling_splits, time_split)
from appliance.scoring.labels import LABEL_FEATURES

DAY = 86400.0


def test_the_split_is_time_ordered_and_inside_the_window() -> None:
    rng = np.random.default_rng(0)
    ts = np.sort(rng.uniform(0, 10 * 86400, 5000))  # ten days
    end = 7 * 86400.0  # the training window ends on day 7; days 7-10 are judged later
    window = np.flatnonzero(ts <= end)
    split = time_split(ts, window, end)
    assert split.end == end
    assert ts[split.fit].max() < split.validation_start <= ts[split.validation].min()
    assert ts[split.validation].max() <= end  # nothing after the window is read
    assert np.array_equal(np.sort(np.concatenate([split.fit, split.validation])), window)
    assert split.validation_start == pytest.approx(ts[window].min() + (1 - VALIDATION_SHARE)
                                                   * (end - ts[window].min()))
    with pytest.raises(ModelError):  # a row after the window's end is refused, not used
        time_split(ts, np.arange(len(ts)), end)


def test_the_forest_features_are_chosen_on_the_validation_fold_only() -> None:
    rng = np.random.default_rng(1)
    n = 6000
    ts = np.arange(n, dtype=np.float64)
    x = rng.normal(size=(n, 4))
    fraud = rng.random(n) < 0.02
    x[fraud, 2] += 6.0  # column 2 tells frauds apart everywhere...
    late = ts >= 4000
    x[late & fraud, 1] += 6.0  # ...column 1 only after the window (rows 4000+)
    end = 3999.0
    known = {i: bool(fraud[i]) for i in range(4000)}
    choice = choose_forest_features(x, ["a", "b", "c", "d"], ts, known, end, ["a"])
    assert choice.features[0] == "c" and "b" not in choice.features
    assert choice.split is not None and choice.split["window_end"] == end
    assert choice.steps[0]["validation_average_precision"] > 0.5
    # the rows after the window (where "b" would shine) were never part of the choice:
    # the same choice comes out when they are scrambled
    scrambled = x.copy()
    scrambled[4000:] = rng.normal(size=(n - 4000, 4))
    assert choose_forest_features(scrambled, ["a", "b", "c", "d"], ts, known, end,
                                  ["a"]).features == choice.features


def test_too_few_known_frauds_keep_the_fallback() -> None:
    ts = np.arange(3000, dtype=np.float64)
    x = np.random.default_rng(2).normal(size=(3000, 3))
    known = {i: i < MIN_VALIDATION_FRAUDS - 1 for i in range(3000)}  # frauds only early
    choice = choose_forest_features(x, ["a", "b", "c"], ts, known, 2999.0, ["b"])
    assert choice.features == ["b"] and "kept" in choice.chosen_by


def test_the_forest_folds_roll_forward_and_never_read_past_the_window() -> None:
    rng = np.random.default_rng(3)
    ts = np.sort(rng.uniform(0, 10 * DAY, 4000))
    end = 7 * DAY
    window = np.flatnonzero(ts <= end)
    folds = rolling_splits(ts, window, end)
    assert len(folds) == FOREST_FOLDS
    seen = np.concatenate([f.validation for f in folds])
    assert len(set(seen.tolist())) == seen.size  # the folds do not overlap
    for before, after in zip(folds, folds[1:]):  # each fold validates after the previous one
        assert ts[before.validation].max() < after.validation_start
        assert before.fit.size < after.fit.size  # and its origin rolls forward
    for fold in folds:
        assert ts[fold.fit].max() < fold.validation_start <= ts[fold.validation].min()
        assert ts[fold.validation].max() <= end and fold.end <= end
    assert folds[-1].end == end and ts[window].max() in ts[folds[-1].validation]
    with pytest.raises(ModelError):
        rolling_splits(ts, np.arange(len(ts)), end)


def test_the_multiple_fold_selection_reads_nothing_after_the_window() -> None:
    rng = np.random.default_rng(4)
    n = 6000
    ts = np.arange(n, dtype=np.float64)
    x = rng.normal(size=(n, 4))
    fraud = rng.random(n) < 0.03
    x[fraud, 0] += 5.0
    end = 3999.0
    known = {i: bool(fraud[i]) for i in range(4000)}
    choice = choose_forest_features(x, ["a", "b", "c", "d"], ts, known, end, ["d"])
    assert choice.features[0] == "a"
    assert choice.split is not None and len(choice.split["folds"]) == FOREST_FOLDS
    assert all(f["used"] and f["window_end"] <= end for f in choice.split["folds"])
    # rows after the window (unlabelled, but the forests' fit rows could reach them) changed
    # in any way: the same choice, the same measured scores
    for scrambled in (rng.normal(size=(n - 4000, 4)) * 50, np.full((n - 4000, 4), np.nan)):
        other = x.copy()
        other[4000:] = scrambled
        again = choose_forest_features(other, ["a", "b", "c", "d"], ts, known, end, ["d"])
        assert again.features == choice.features and again.steps == choice.steps


def brute_force(events: list[tuple[str, str, float, float, int]], account: str, terminal: str,
                t: float, retime: float | None) -> tuple[float, ...]:
    """LABEL_FEATURES at t by definition: the labels whose (re-timed) known time is in
    (t - w, t], with a re-timing that never makes a label known before its known_at."""
    out: list[float] = []
    for key, who in ((1, terminal), (0, account)):
        mine = [(max(k, tt + retime) if retime is not None else k, lab)
                for (a, term, tt, k, lab) in events if (term if key else a) == who]
        for w in (1 * DAY, 7 * DAY, 30 * DAY):
            inside = [lab for k, lab in mine if t - w < k <= t]
            count = float(sum(inside))
            out += [count, count / len(inside) if inside else 0.0]
    return tuple(out)  # LABEL_FEATURES' order: entity, then window, then count and share


@pytest.mark.parametrize("retime", [None, 1 * DAY, 10 * DAY])
def test_a_label_is_never_seen_before_its_known_at(retime: float | None) -> None:
    rng = np.random.default_rng(5)
    end = 40 * DAY
    events = []
    for _ in range(300):  # labels with delays from an hour to three weeks, in any order
        t = float(rng.uniform(0, 30 * DAY))
        known_at = min(t + float(rng.uniform(3600, 21 * DAY)), end)
        events.append((f"A{rng.integers(5)}", f"T{rng.integers(4)}", t, known_at,
                       int(rng.random() < 0.4)))
    state = as_served(events, end, retime)
    for _ in range(300):
        account, terminal = f"A{rng.integers(5)}", f"T{rng.integers(4)}"
        t = float(rng.uniform(0, end))
        assert state.features(account, terminal, t) == pytest.approx(
            brute_force(events, account, terminal, t, retime))
    # one label, looked at just before and at its known_at: invisible, then visible; a
    # re-timing shorter than its delay does not bring it forward
    one = [("A", "T", 0.0, 7 * DAY, 1)]
    for r in (None, 1 * DAY, 0.0):
        lone = as_served(one, end, r)
        assert not any(lone.features("A", "T", 7 * DAY - 1))
        assert lone.features("A", "T", 7 * DAY)[LABEL_FEATURES.index(
            "terminal_known_fraud_count_1d")] == 1
    # a label not known by the window's end is refused, never used
    with pytest.raises(ModelError):
        as_served([("A", "T", 0.0, end + 1, 1)], end)
