"""The LightGBM challenger: its one ONNX graph gives LightGBM's own predictions whatever serves,
its tuning picks the grid point with the best validation score, and what serves (the full
model, the behaviour model or their mean) is the best of the three on the validation fold."""

from __future__ import annotations

import numpy as np
import pytest
import onnxruntime as ort
from sklearn.ensemble import IsolationForest

from dataclasses import replace

from sklearn.metrics import average_precision_score

from appliance.learning.challenger import (COMBINATIONS, GRID, Challenger, Combination,
                                           challenger_to_onnx, choose_combination, classifier,
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
    tuned = Challenger.fit(stacked, y, 5, split)
    # both tuned models, fitted as Challenger.fit fits what serves, their mean serving
    full = classifier(tuned.tuning["full"].params, 7).fit(stacked, y.astype(np.int64))
    behaviour = classifier(tuned.tuning["behaviour"].params, 8).fit(
        stacked[:, [0, 1, 2, 3, 4, 7]], y.astype(np.int64))
    pair = Challenger(full, behaviour, 5, tuned.tuning, Combination("mean", "test"))
    assert pair.full is not None and pair.behaviour is not None
    assert pair.full.n_features_in_ == 8 and pair.behaviour.n_features_in_ == 6
    assert Challenger.behaviour_columns_of(8, 5) == [0, 1, 2, 3, 4, 7]
    fresh, _ = data(3000, 1)  # rows the models never saw, with their own NaNs
    p_full = pair.full.predict_proba(stacked)[:, 1]
    p_behaviour = pair.behaviour.predict_proba(stacked[:, [0, 1, 2, 3, 4, 7]])[:, 1]
    # the two models are not one: the behaviour model cannot see columns 5 and 6
    assert not np.allclose(p_full, p_behaviour)
    variants = [(pair, 7, (p_full + p_behaviour) / 2),
                (replace(pair, behaviour=None, combination=Combination("full", "test")), 7,
                 p_full),
                # the behaviour model alone reads no label column: its graph's input can be
                # the behavioural features only
                (replace(pair, full=None, combination=Combination("behaviour", "test")), 5,
                 p_behaviour)]
    for model, width, want_in_sample in variants:
        assert np.allclose(model.predict(stacked), want_in_sample)
        session = ort.InferenceSession(challenger_to_onnx(model, forest, width, [0, 3])
                                       .SerializeToString(), providers=["CPUExecutionProvider"])
        for rows in (x, fresh):
            got = session.run(None, {"features": rows[:, :width]})[0]
            want = model.predict(stacked_input(rows, forest, [0, 3]))
            assert got.shape == (len(rows),)
            assert np.max(np.abs(got - want)) <= TOLERANCE


def test_what_serves_is_the_best_on_the_validation_fold_and_is_recorded() -> None:
    rng = np.random.default_rng(4)
    y = rng.random(4000) < 0.05
    good = y + rng.normal(scale=0.6, size=4000)
    noise = rng.normal(size=4000)
    # the behaviour model ranks well, the full one at random: the behaviour model serves
    choice = choose_combination(y, noise, good)
    assert choice.chosen == "behaviour"
    for name, (wf, wb) in COMBINATIONS.items():
        assert choice.validation_average_precision[name] == pytest.approx(
            average_precision_score(y, wf * noise + wb * good), abs=1e-4)
    assert choose_combination(y, good, noise).chosen == "full"
    # two equally informed, independently noisy models: their mean beats either
    other = y + rng.normal(scale=0.6, size=4000)
    assert choose_combination(y, good, other).chosen == "mean"
    assert choose_combination(y, None, good).chosen == "mean"  # nothing to judge with


def test_a_label_feature_that_does_not_hold_when_served_is_left_out_by_validation() -> None:
    """Columns 5 and 6 play label features: in the fit fold they name the frauds (labels a day
    old, as a re-timing would make them), in the validation fold they name genuine rows
    (labels as served: weeks old, of compromises that have ended). Validation sees it: the
    behaviour model alone serves, and the full model is not even fitted."""
    x, y = data(6000, 5)
    x[:, 5:] = 0.0
    early = np.arange(6000) < 4200
    x[early & y, 5] = 1.0
    x[early & y, 6] = 3.0
    # served, the same columns name old compromises, long over: genuine rows now
    ended = ~early & ~y & (np.random.default_rng(6).random(6000) < 0.05)
    x[ended, 5] = 1.0
    x[ended, 6] = 3.0
    forest = IsolationForest(n_estimators=50, random_state=1).fit(x[:, [0, 3]])
    stacked = stacked_input(x, forest, [0, 3])
    split = time_split(np.arange(6000, dtype=np.float64), np.arange(6000), 6000.0)
    pair = Challenger.fit(stacked, y, 5, split)
    assert pair.combination.chosen == "behaviour", pair.combination
    assert pair.full is None and not pair.uses_label_features
    aps = pair.combination.validation_average_precision
    assert aps["behaviour"] == max(aps.values()) and aps["full"] < aps["behaviour"]


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
