"""Retraining: the LightGBM challenger is tuned, exported and registered end to end; a
candidate is promoted when, and only when, the promotion rule is met."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.ensemble import IsolationForest

from appliance.store import decode_features
from appliance.errors import ModelError
from appliance.feed.simulate import Labelled
from appliance.learning.backtest import backtest, label_state, load_rows, model_rows
from appliance.learning.retrain import NO_LABELS_YET, decide, retrain
from appliance.scoring.features import FEATURES, FEATURES_VERSION, VERSIONS, FeatureState
from appliance.scoring.labels import import_labels, write_label_file
from appliance.scoring.registry import Registry
from appliance.scoring.rules import RULES_VERSION
from appliance.scoring.score import judge
from appliance.settings import Settings, load
from appliance.store import Scored, Store

from .support import make_transactions, query
from .test_registry import copy_shipped


FAST = {"num_leaves": 15, "min_child_samples": 20, "n_estimators": 60}
"""A fixed LightGBM configuration for the tests that are about the promotion rule, not tuning."""


def test_promotion_rule() -> None:
    s = load(None, env={})
    assert decide(0.51, 0.50, 10, s).promote            # +2 %: promoted
    assert not decide(0.509, 0.50, 10, s).promote       # +1.8 %: not
    assert not decide(0.9, 0.5, s.alert_budget_per_day + 1, s).promote  # over the budget
    assert not decide(0.0, 0.0, 1, s).promote            # nothing detected by either
    assert decide(0.1, 0.0, 1, s).promote                # a first useful model
    assert "budget" in decide(0.9, 0.5, 1e9, s).reason


def stored_node(tmp_path: Path, items: list[Labelled], label_delay: float = 60.0,
                **overrides: object) -> Settings:
    """A node database holding ``items`` scored by the shipped model as the scorer stores them,
    and their labels, known ``label_delay`` seconds (a minute) after each transaction."""
    settings = load(None, env={}, data_dir=tmp_path / "node", **overrides)
    registry = Registry.of(settings)
    model = registry.load(registry.production())
    state = FeatureState()
    features = [state.observe(i.tx) for i in items]
    risks = model.risks(np.array(features))
    store = Store.open(settings.db_path)
    store.save_batch([Scored(i.tx, "BR001", n + 1, f, FEATURES_VERSION,
                             judge(i.tx, f, float(r), model.version, RULES_VERSION, settings))
                      for n, (i, f, r) in enumerate(zip(items, features, risks))], [],
                     "scorer", len(items))
    store.close()
    path = tmp_path / "labels.csv"
    write_label_file(path, [(i.tx.transaction_id, int(i.fraud),
                             i.tx.timestamp.timestamp() + label_delay) for i in items])
    import_labels(settings.db_path, path)
    return settings


@pytest.fixture(scope="module")
def items() -> list[Labelled]:
    return make_transactions(8000, seed=5, rate=5.0)


def test_a_clearly_better_candidate_is_promoted(tmp_path: Path, items: list[Labelled]) -> None:
    settings = stored_node(tmp_path, items)
    registry = Registry.of(settings)
    result = retrain(settings, supervised=True, holdout_days=0.005)
    assert result.decision.promote, result.decision.reason
    assert NO_LABELS_YET not in result.decision.reason
    assert registry.production() == result.version
    card = registry.card(result.version)
    assert card["stage"] == "production" and card["parent_version"] == "if-v1"
    assert card["promotion"]["promoted"] is True
    assert card["metrics"]["f1"] >= 1.02 * card["metrics"]["production_on_same_period"]["f1"]
    assert card["metrics"]["onnx_vs_sklearn_max_abs_diff"] <= 1e-5
    assert card["training"]["labels_used_for_fitting"] is True
    # each model's hyperparameters were chosen on the validation fold: every grid point tried,
    # the winner is the best of them, and the split ended where the held-back period begins
    validation = card["validation"]
    for role in ("full", "behaviour"):
        trials = validation[role]["trials"]
        assert len(trials) == 8 and validation[role]["chosen_by"].startswith("grid search")
        best = max(trials, key=lambda t: t["validation_average_precision"])
        assert validation[role]["params"] == {k: v for k, v in best.items()
                                              if k != "validation_average_precision"}
    # what serves (full, behaviour or their mean) is the best of the three on the validation
    # fold, recorded on the card, and the card's model is that one
    combination = validation["combination"]
    aps = combination["validation_average_precision"]
    assert set(aps) == {"full", "behaviour", "mean"}
    assert aps[combination["chosen"]] == max(aps.values())
    served = combination["chosen"]
    assert card["hyperparameters"]["served"] == served
    for role in ("full", "behaviour"):
        fitted = served in (role, "mean")
        assert (card["hyperparameters"][role] == validation[role]["params"]) if fitted else \
            card["hyperparameters"][role] is None
    assert card["algorithm"].startswith({"mean": "mean of two lightgbm.LGBMClassifier",
                                         "full": "lightgbm.LGBMClassifier (onnxmltools) on "
                                                 "FEATURES + label features",
                                         "behaviour": "lightgbm.LGBMClassifier (onnxmltools) "
                                                      "on FEATURES + IsolationForest"}[served])
    # label features as served: labels known a minute late, so both folds' rows see them
    timing = validation["label_timing"]
    assert timing["rule"].startswith("as served")
    assert timing["rows_with_any_label_feature"]["validation"] > 0
    split = validation["split"]
    assert split["fit_rows"] > 0 and split["validation_rows"] > 0
    assert split["window_end"] <= card["training"]["holdout"]["from"]
    # labels known a minute late: every label window is longer than that delay
    assert validation["label_features"]["median_label_delay_seconds"] == pytest.approx(60,
                                                                                       abs=0.1)
    if served != "behaviour":
        assert card["features"][-2:] == ["account_known_fraud_count_30d",
                                         "account_known_fraud_share_30d"]
        assert "terminal_known_fraud_count_1d" in card["features"]
    else:
        assert not any("known_fraud" in f for f in card["features"])
    assert "risk" in card["reference"] and "amount" in card["reference"]["features"]
    # the card's metrics are what a backtest of the held-back period gives
    rows = load_rows(settings.db_path)
    model = registry.load(result.version)
    risk, _ = backtest(rows, model, label_state(settings.db_path), settings)
    assert risk.shape == (len(items),) and 0 <= risk.min() and risk.max() <= 1
    # and the promotion is in the node's audit trail, by retrain, with the state it changed
    entry = sqlite3.connect(settings.db_path).execute(
        "SELECT actor, action, subject, before, after FROM audit_log "
        "WHERE action = 'model.promote'").fetchall()
    assert [e[:3] for e in entry] == [("retrain", "model.promote", f"model:{result.version}")]
    assert json.loads(entry[0][3])["production"] == "if-v1"
    assert json.loads(entry[0][4])["production"] == result.version


@pytest.mark.parametrize("override, why", [
    ({"promotion_min_f1_gain": 50.0}, "not 5000% above"),   # the gain is never big enough
    ({"alert_budget_per_day": 0.001}, "over the budget"),    # too many alerts for the team
])
def test_a_candidate_that_misses_the_rule_stays_a_candidate(
        tmp_path: Path, items: list[Labelled], override: dict[str, float], why: str) -> None:
    settings = stored_node(tmp_path, items, **override)
    registry = Registry.of(settings)
    result = retrain(settings, supervised=True, holdout_days=0.005, gbm_params=FAST)
    assert not result.decision.promote
    assert why in result.decision.reason
    assert registry.production() == "if-v1"
    card = registry.card(result.version)
    assert card["stage"] == "candidate"
    assert card["promotion"] == {**card["promotion"], "promoted": False,
                                 "reason": result.decision.reason}


def test_a_held_back_period_with_no_label_known_yet_is_named_in_the_reason(
        tmp_path: Path, items: list[Labelled]) -> None:
    # labels known 60 % of the stream's span after their transaction: every one known by
    # the end of the stream came after the last labelled (held-back) transaction
    span = items[-1].tx.timestamp.timestamp() - items[0].tx.timestamp.timestamp()
    settings = stored_node(tmp_path, items, label_delay=0.6 * span)
    result = retrain(settings, supervised=True, holdout_days=0.1 * span / 86400,
                     gbm_params=FAST)
    assert result.decision.reason.endswith(NO_LABELS_YET)
    assert Registry.of(settings).card(result.version)["promotion"]["reason"] == \
        result.decision.reason


def test_unsupervised_retrain_compares_on_the_same_period(tmp_path: Path,
                                                          items: list[Labelled]) -> None:
    settings = stored_node(tmp_path, items)
    copy_shipped(settings.data_dir / "models", "m-a")
    result = retrain(settings, holdout_days=0.005, allow_promotion=False)
    card = Registry.of(settings).card(result.version)
    assert card["training"]["labels_used_for_fitting"] is False
    # its features were chosen on a time-ordered split before the held-back period
    choice = card["validation"]["forest_features"]
    assert card["features"] == choice["features"] and choice["chosen_by"].startswith("greedy")
    assert choice["split"]["window_end"] < card["training"]["holdout"]["from_ts"]
    assert choice["steps"][0]["added"] == card["features"][0]
    held = card["training"]["holdout"]["rows"]
    assert held > 0 and card["metrics"]["production_on_same_period"]["version"] == "if-v1"
    assert not result.decision.promote and Registry.of(settings).production() == "if-v1"
    json.dumps(card)  # the card is plain JSON


def test_retrain_without_labels_says_what_is_missing(tmp_path: Path,
                                                     items: list[Labelled]) -> None:
    settings = stored_node(tmp_path, items[:1500])
    import sqlite3
    conn = sqlite3.connect(settings.db_path)
    conn.execute("DELETE FROM labels")
    conn.commit()
    conn.close()
    with pytest.raises(ModelError) as info:
        retrain(dataclasses.replace(settings), holdout_days=0.005)
    assert info.value.field == "labels"


def test_the_live_scorer_serves_a_label_model_exactly_as_the_backtest_scores_it(
        tmp_path: Path, nats_url: str, node_factory: type) -> None:
    from .support import send, stored_count, wait_until
    import sqlite3

    stream = make_transactions(9000, seed=5, rate=5.0)
    settings = stored_node(tmp_path, stream[:8000])
    result = retrain(settings, supervised=True, holdout_days=0.005, gbm_params=FAST)
    assert result.decision.promote and Registry.of(settings).load(result.version).uses_labels
    conn = sqlite3.connect(settings.db_path)
    conn.execute("DELETE FROM checkpoints")  # a fresh stream: the stored rows came from elsewhere
    conn.commit()
    conn.close()
    node = node_factory(settings.data_dir, nats_url, {}).start()
    assert '"labels":8000' in node.log()  # every label loaded at start
    live = [i.tx for i in stream[8000:]]
    assert send(nats_url, live) == len(live)
    wait_until(lambda: stored_count(settings.db_path) == len(stream), message="all stored")
    assert node.stop() == 0
    rows = load_rows(settings.db_path, since=live[0].timestamp.timestamp())
    assert len(rows) == len(live) and set(rows.model_version) == {result.version}
    model = Registry.of(settings).load(result.version)
    labels = label_state(settings.db_path)
    # the model's own risk, as served: the verdict's risk also holds the typology rules'
    # and the budget's part, which the backtest (today's fixed rules) does not replay
    served = dict(query(settings.db_path, "SELECT transaction_id, model_risk FROM transactions"))
    assert np.allclose(model.risks(model_rows(rows, labels, True)),
                       [served[tx.transaction_id] for tx in rows.txs], atol=1e-6)
    risk, _ = backtest(rows, model, labels, settings)
    plain = np.array([not query(settings.db_path, "SELECT 1 FROM transactions WHERE "
                                "transaction_id = ? AND reasons != '[]'", [tx.transaction_id])
                      for tx in rows.txs])
    assert plain.sum() > len(rows) / 2  # most rows: no rule fired, nothing but the model
    assert np.allclose(risk[plain], rows.risk[plain], atol=1e-6)


def test_rows_stored_under_an_older_feature_version_get_todays_features(
        tmp_path: Path, items: list[Labelled]) -> None:
    """After an upgrade that adds features, the stored history is still usable for
    retraining and backtests: rows of the older version get the features recomputed from the
    stored history, as the scorer would compute them; current rows keep their own."""
    few = items[:3000]
    settings = stored_node(tmp_path, few)
    state = FeatureState()
    live = [state.observe(i.tx) for i in few]
    conn = sqlite3.connect(settings.db_path)
    with conn:
        for (rowid, stored) in conn.execute(
                "SELECT rowid, features FROM transactions WHERE rowid % 3 = 0").fetchall():
            conn.execute("UPDATE transactions SET features = ?, features_version = ? "
                         "WHERE rowid = ?", (json.dumps(decode_features(stored)[:len(
                             VERSIONS["features-v1"])]), "features-v1", rowid))
    conn.close()
    since = few[1000].tx.timestamp.timestamp()
    rows = load_rows(settings.db_path, since=since)
    first = next(n for n, i in enumerate(few) if i.tx.timestamp.timestamp() >= since)
    assert [tx.transaction_id for tx in rows.txs] == [i.tx.transaction_id for i in few[first:]]
    assert all(len(f) == len(FEATURES) for f in rows.features)
    assert rows.features == live[first:]
