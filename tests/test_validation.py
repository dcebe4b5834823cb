"""Time-ordered validation: the folds never read past the training window's end, every fit row
is earlier than every validation row, and the forest's features are chosen on them."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.errors import ModelError
from appliance.learning.validation import (MIN_VALIDATION_FRAUDS, VALIDATION_SHARE,
                                           choose_forest_features, time_split)


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
