"""Explanations: the constructed outlier's explanation names the feature that makes it one;
plain words say what is unlike the account's baseline."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from sklearn.ensemble import IsolationForest

from appliance.scoring.explain import ForestPaths, explain, unusual
from appliance.scoring.features import FEATURES, INDEX
from appliance.scoring.forest import forest_to_onnx
from appliance.scoring.model import Model, ModelCard, file_sha256
from appliance.scoring.registry import Registry
from appliance.settings import SHIPPED_MODELS_DIR
from appliance.transaction import Transaction
from appliance.verdict import Verdict

NAMES = ["amount", "amount_to_mean_ratio", "account_count_1h"]


def tx(amount: float = 50.0, location: str | None = "Espoo") -> Transaction:
    return Transaction(transaction_id="t1", account_id="A1", amount=amount, currency="EUR",
                       timestamp=datetime(2026, 3, 2, 9, tzinfo=timezone.utc),
                       terminal_id="T1", channel="POS", location=location)


def forest_model(tmp_path: Path) -> Model:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 3)).astype(np.float32)
    forest = IsolationForest(n_estimators=100, random_state=0).fit(x)
    path = tmp_path / "x.onnx"
    onnx.save(forest_to_onnx(forest, 3), str(path))
    card = {"version": "x", "sha256": file_sha256(path), "features": NAMES,
            "calibration": {"anomaly_score": [0.0, 1.0], "risk": [0.0, 1.0]}}
    return Model(path, ModelCard.from_json(card))


def full_row(values: dict[str, float]) -> np.ndarray:
    row = np.zeros(len(FEATURES))
    for name, value in values.items():
        row[INDEX[name]] = value
    return row


def test_the_explanation_of_an_outlier_names_the_feature_that_makes_it_one(
        tmp_path: Path) -> None:
    model = forest_model(tmp_path)
    paths = ForestPaths.of(model)
    assert paths is not None
    for j, name in enumerate(NAMES):
        values = {n: 0.0 for n in NAMES}
        values[name] = 9.0  # far outside the training cloud in this one feature only
        rows = np.array([full_row(values)])
        verdict = Verdict("t1", 0.9, "CRITICAL", "decline", ["ml_anomaly"],
                          ["model risk 0.90 >= 0.70"], 0.9, "x", "rules-v1")
        (e,) = explain(model, paths, [tx()], rows, [verdict])
        assert e["contributions"][0]["feature"] == name, e["contributions"]
        assert e["contributions"][0]["value"] == 9.0
        assert sum(c["share"] for c in e["contributions"]) <= 1.0 + 1e-6
        assert e["rules"] == [{"reason": "ml_anomaly", "detail": "model risk 0.90 >= 0.70"}]
        json.dumps(e)


def test_the_shipped_and_challenger_graphs_have_readable_forests() -> None:
    model = Registry(Path("/nonexistent"), SHIPPED_MODELS_DIR, "if-v1").load("if-v1")
    paths = ForestPaths.of(model)
    assert paths is not None and len(paths.roots) == 100
    shares = paths.attributions(np.zeros((2, len(model.card.features)), dtype=np.float32))
    assert shares.shape == (2, 8) and np.allclose(shares.sum(axis=1), 1.0)


def test_plain_words_for_what_is_unlike_the_accounts_baseline() -> None:
    f = full_row({"amount": 102.0, "account_mean_amount": 21.25, "amount_to_mean_ratio": 4.8,
                  "account_prior_count": 30, "first_time_terminal": 1.0,
                  "seconds_since_previous": 3600.0})
    words = unusual(tx(102.0), list(f))
    assert "first use of this terminal" in words
    assert "amount 102.00 is 4.8x the account's average 21.25" in words
    calm = full_row({"amount": 20.0, "account_mean_amount": 21.0, "amount_to_mean_ratio": 0.95,
                     "account_prior_count": 30, "seconds_since_previous": 3600.0})
    assert unusual(tx(20.0), list(calm)) == []


def test_plain_words_use_the_median_when_fraud_has_pulled_the_mean() -> None:
    # a stolen card: earlier large purchases have raised the mean, not the median
    f = full_row({"amount": 100.0, "account_mean_amount": 40.0, "amount_to_mean_ratio": 2.5,
                  "amount_to_median_ratio": 5.0, "account_large_count_7d": 3.0,
                  "account_prior_count": 30, "seconds_since_previous": 3600.0})
    words = unusual(tx(100.0), list(f))
    assert words[0] == "amount 100.00 is 5.0x the account's usual amount 20.00 (its median)"
    assert "3 earlier transactions of 3x the usual amount or more in the last 7 days" in words
    assert not any("average" in w for w in words)
