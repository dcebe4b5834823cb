"""The LightGBM challenger: its one ONNX graph gives LightGBM's own predictions, and its
tuning picks the grid point with the best validation score."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from sklearn.ensemble import IsolationForest

from appliance.learning.challenger import (GRID, Challenger, challenger_to_onnx,
                                           stacked_input, tune)
from appliance.learning.validation import time_split

TOLERANCE = 1e-5
"""ONNX Runtime sums the trees' leaf values in float32, LightGBM in float64: the two agree to
about 1e-7 on a probability; 1e-5 is the contract (the card records the measured gap)."""


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 7)).astype(np.float32)
    x[:, 3] = rng.integers(0, 5, n)  # a count-like column: values sit on split thresholds
    x[rng.random(x.shape) < 0.02] = np.nan  # missing values follow LightGBM's default side
    y = np.nan_to_num(x[:, 0]) + 0.5 * np.nan_to_num(x[:, 3]) + 0.3 * rng.normal(size=n) > 2.5
    return x, y


def test_challenger_graph_gives_lightgbms_predictions() -> None:
    x, y = data(6000, 0)
    forest = IsolationForest(n_estimators=50, random_state=1).fit(x[:, [0, 3]])
    stacked = stacked_input(x, forest, [0, 3])
    split = time_split(np.arange(6000, dtype=np.float64), np.arange(6000), 6000.0)
    pair = Challenger.fit(stacked, y, 5, split)  # columns 5 and 6 play the label features
    assert pair.full.n_features_in_ == 8 and pair.behaviour_columns == [0, 1, 2, 3, 4, 7]
    assert pair.behaviour.n_features_in_ == 6
    session = ort.InferenceSession(challenger_to_onnx(pair, forest, 7, [0, 3])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    fresh, _ = data(3000, 1)  # rows the models never saw, with their own NaNs
    for rows in (x, fresh):
        got = session.run(None, {"features": rows})[0]
        s = stacked_input(rows, forest, [0, 3])
        want = (pair.full.predict_proba(s)[:, 1]
                + pair.behaviour.predict_proba(s[:, [0, 1, 2, 3, 4, 7]])[:, 1]) / 2
        assert np.array_equal(pair.predict(s), want)
        assert got.shape == (len(rows),)
        assert np.max(np.abs(got - want)) <= TOLERANCE
    # the two models are not one: the behaviour model cannot see columns 5 and 6
    assert not np.allclose(pair.full.predict_proba(stacked)[:, 1],
                           pair.behaviour.predict_proba(stacked[:, pair.behaviour_columns])[:, 1])


def test_tuning_chooses_the_best_validation_score_and_its_rounds() -> None:
    x, y = data(5000, 2)
    split = time_split(np.arange(5000, dtype=np.float64), np.arange(5000), 5000.0)
    result = tune(x, y, split)
    assert len(result.trials) == np.prod([len(v) for v in GRID.values()])
    best = max(result.trials, key=lambda t: t["validation_average_precision"])
    assert result.params == {k: v for k, v in best.items() if k != "validation_average_precision"}
    assert 1 <= result.params["n_estimators"] <= 400
    assert len({t["validation_average_precision"] for t in result.trials}) > 1


def test_too_few_frauds_to_validate_keeps_the_defaults_and_says_so() -> None:
    x, y = data(2000, 3)
    y[:] = False
    y[:3] = True
    split = time_split(np.arange(2000, dtype=np.float64), np.arange(2000), 2000.0)
    result = tune(x, y, split)
    assert result.chosen_by.startswith("defaults") and not result.trials
