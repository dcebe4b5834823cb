"""The supervised challenger: two gradient-boosted tree models (LightGBM), one on the node's
features, the label features and the Isolation Forest's score, one on the same without the
label features, averaged, and exported as one ONNX model.

Why two: a label feature means something different when the model learns from it than when it
serves. Labels arrive a week late, and the training rows' labels are re-timed to a day (see
retrain.py), so when fitted a terminal's known frauds are a day old and almost always mean it is
still compromised; when serving they are one to three weeks old, and many of those compromises
have ended. A model that sees them leans on them and ranks a stolen card's large amounts
(which no label yet names) below every terminal with an old compromise; the behaviour model
cannot lean on them, and the mean of the two keeps what each knows. A validation fold cannot
judge this (its labels are re-timed like the training rows'), so it is a design decision, not
a tuned one: it was made in issue 14 on the handbook protocol's test week (docs/models.md says
so) and is kept as the structure within which everything else is chosen by validation.

Every hyperparameter is chosen by :func:`tune` on a time-ordered split of the training rows
(validation.py): for each of the two models, each configuration of :data:`GRID` is fitted on the
earlier part with early stopping on the later part's average precision; the configuration with
the best validation average precision wins, with its number of rounds, and is refitted on all
the training rows. Nothing after the training window is read.

Export: each model is converted by onnxmltools (``TreeEnsembleClassifier``); the Isolation
Forest they stack on by :func:`forest.forest_to_onnx`; all three are joined into one graph, so
the scorer still makes one ONNX Runtime call per batch::

    features [N, F] float32 (the card's feature list)
      -> Gather(if_columns)  -> isolation forest -> anomaly_score [N] -> Unsqueeze [N, 1]
      -> Concat(features, anomaly_score)  [N, F + 1] -> full model -> p_full [N]
      -> Gather(behaviour_columns + [F])  [N, B + 1]  -> behaviour model -> p_behaviour [N]
      -> (p_full + p_behaviour) / 2 -> fraud_score [N]

Output ``fraud_score``: in [0, 1], higher = riskier; equal to :meth:`Challenger.predict` to
within 1e-5 (tests/test_challenger.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from lightgbm import LGBMClassifier, early_stopping
from onnx import TensorProto, compose, helper, numpy_helper
from sklearn.ensemble import IsolationForest

from ..scoring.forest import INPUT_NAME, IR_VERSION, OPSETS, forest_to_onnx
from .validation import MIN_VALIDATION_FRAUDS, TimeSplit

OUTPUT_NAME = "fraud_score"

GRID: dict[str, tuple[Any, ...]] = {
    "num_leaves": (7, 31),
    "min_child_samples": (20, 200),
    "scale_pos_weight": (1.0, 10.0),
}
"""The configurations :func:`tune` tries (every combination, 8 per model): small or larger
trees, leaves that need few or many rows, frauds weighted as they come or ten times."""
FIXED: dict[str, Any] = {"learning_rate": 0.05, "subsample": 0.8, "subsample_freq": 1,
                         "colsample_bytree": 0.8, "reg_lambda": 1.0}
"""Hyperparameters not tuned: a moderate learning rate (early stopping picks the rounds),
row and column subsampling as LightGBM's documentation suggests against over-fitting."""
MAX_ROUNDS = 400
"""The most boosting rounds; early stopping usually ends far sooner."""
PATIENCE = 30
"""Early stopping: rounds without a better validation average precision before stopping."""
DEFAULT = {"num_leaves": 15, "min_child_samples": 50, "scale_pos_weight": 1.0,
           "n_estimators": 150}
"""Used when the validation fold holds too few frauds to choose (the card says so)."""


def classifier(params: dict[str, Any], seed: int) -> LGBMClassifier:
    """A LightGBM classifier: ``params`` over :data:`FIXED`, one thread, deterministic."""
    return LGBMClassifier(**{**FIXED, "n_estimators": MAX_ROUNDS, **params},
                          random_state=seed, n_jobs=1, deterministic=True,
                          force_col_wise=True, metric="average_precision", verbose=-1)


@dataclass
class Tuning:
    """The chosen configuration of one model and how it was chosen."""

    params: dict[str, Any]
    chosen_by: str
    trials: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"params": self.params, "chosen_by": self.chosen_by, "trials": self.trials}


def tune(x: npt.NDArray[np.float32], y: npt.NDArray[np.bool_], split: TimeSplit,
         *, seed: int = 7) -> Tuning:
    """The configuration of :data:`GRID` (and its rounds) with the best validation average
    precision: each fitted on ``split.fit`` with early stopping on ``split.validation``.
    ``x``, ``y`` are indexed by the split's row indices."""
    y = y.astype(np.int64)  # onnxmltools names the classes 0 and 1, never True and False
    y_fit, y_val = y[split.fit], y[split.validation]
    if min(y_fit.sum(), y_val.sum()) < MIN_VALIDATION_FRAUDS or y_val.all() or y_fit.all():
        return Tuning(dict(DEFAULT), f"defaults: {int(y_fit.sum())} / {int(y_val.sum())} "
                                     "frauds in the fit / validation folds are too few to "
                                     "choose")
    trials: list[dict[str, Any]] = []
    for values in itertools.product(*GRID.values()):
        params = dict(zip(GRID, values))
        model = classifier(params, seed).fit(
            x[split.fit], y_fit, eval_X=(x[split.validation],), eval_y=(y_val,),
            callbacks=[early_stopping(PATIENCE, verbose=False)])
        rounds = int(model.best_iteration_ or MAX_ROUNDS)
        ap = float(model.best_score_["valid_0"]["average_precision"])
        trials.append({**params, "n_estimators": rounds,
                       "validation_average_precision": round(ap, 4)})
    best = max(trials, key=lambda t: t["validation_average_precision"])
    params = {k: v for k, v in best.items() if k != "validation_average_precision"}
    return Tuning(params, "grid search with early stopping, by the validation fold's average "
                          "precision (time-ordered split)", trials)


def stacked_input(x: npt.NDArray[np.float32], forest: IsolationForest,
                  if_columns: list[int]) -> npt.NDArray[np.float32]:
    """The models' input: the features plus the forest's anomaly score (last column)."""
    score = -forest.score_samples(x[:, if_columns])
    return np.column_stack([x, score]).astype(np.float32)


@dataclass(frozen=True)
class Challenger:
    """The two models (see the module docstring), on the stacked input of
    :func:`stacked_input`."""

    full: LGBMClassifier
    behaviour: LGBMClassifier
    behaviour_columns: list[int]
    """The stacked input's columns the behaviour model reads: the features without the label
    features, then the anomaly score (the last column)."""
    tuning: dict[str, Tuning]

    @staticmethod
    def behaviour_columns_of(width: int, behaviour_features: int) -> list[int]:
        return [*range(behaviour_features), width - 1]

    @classmethod
    def fit(cls, stacked: npt.NDArray[np.float32], y: npt.NDArray[np.bool_],
            behaviour_features: int, split: TimeSplit | None, *, seed: int = 7,
            params: dict[str, Any] | None = None) -> Challenger:
        """Tune each model on ``split`` (rows of ``stacked``), then refit it on every row.
        ``params`` instead fixes both models' configuration (no tuning); the first
        ``behaviour_features`` columns are the behavioural ones."""
        columns = cls.behaviour_columns_of(stacked.shape[1], behaviour_features)
        fitted: list[LGBMClassifier] = []
        tuning: dict[str, Tuning] = {}
        for role, x, s in (("full", stacked, seed), ("behaviour", stacked[:, columns], seed + 1)):
            if params is not None:
                chosen = Tuning(dict(params), "given")
            elif split is None:
                chosen = Tuning(dict(DEFAULT), "defaults: no validation split")
            else:
                chosen = tune(x, y, split, seed=s)
            tuning[role] = chosen
            fitted.append(classifier(chosen.params, s).fit(x, y.astype(np.int64)))
        return cls(fitted[0], fitted[1], columns, tuning)

    def predict(self, stacked: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The probability of fraud: the mean of the two models'."""
        full = np.asarray(self.full.predict_proba(stacked), dtype=np.float64)[:, 1]
        behaviour = np.asarray(self.behaviour.predict_proba(
            stacked[:, self.behaviour_columns]), dtype=np.float64)[:, 1]
        out: npt.NDArray[np.float64] = (full + behaviour) / 2.0
        return out


CONVERTER_OPSET = 15
"""onnxmltools 1.16 converts LightGBM for opsets up to 15 (``ai.onnx.ml`` 1); the nodes it
emits (TreeEnsembleClassifier, Identity, Cast, Mul) mean the same under the graph's opsets
(forest.OPSETS), into which they are joined."""


def _converted(clf: LGBMClassifier, width: int, prefix: str) -> tuple[onnx.ModelProto, str]:
    """``clf`` as an ONNX graph with every name prefixed, and its probabilities' name."""
    from onnxmltools.convert import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = compose.add_prefix(convert_lightgbm(
        clf, initial_types=[("x", FloatTensorType([None, width]))],
        target_opset=CONVERTER_OPSET, zipmap=False), prefix)
    return model, next(o.name for o in model.graph.output if "probabilities" in o.name)


def challenger_to_onnx(challenger: Challenger, forest: IsolationForest,
                       n_features: int, if_columns: list[int]) -> onnx.ModelProto:
    """One ONNX model: input ``features`` [N, n_features], output ``fraud_score`` [N]."""
    iso = compose.add_prefix(forest_to_onnx(forest, len(if_columns)), "if_")
    full, full_p = _converted(challenger.full, n_features + 1, "gf_")
    behaviour, behaviour_p = _converted(challenger.behaviour,
                                        len(challenger.behaviour_columns), "gb_")
    nodes = [
        helper.make_node("Gather", [INPUT_NAME, "if_columns"], [iso.graph.input[0].name],
                         axis=1, name="select_if_columns"),
        *iso.graph.node,
        helper.make_node("Unsqueeze", [iso.graph.output[0].name, "unsqueeze_axes"],
                         ["if_score_2d"], name="if_score_column"),
        helper.make_node("Concat", [INPUT_NAME, "if_score_2d"], [full.graph.input[0].name],
                         axis=1, name="append_if_score"),
        *full.graph.node,
        helper.make_node("Gather", [full.graph.input[0].name, "behaviour_columns"],
                         [behaviour.graph.input[0].name], axis=1, name="select_behaviour"),
        *behaviour.graph.node,
        helper.make_node("Gather", [full_p, "fraud_class"], ["p_full"], axis=1,
                         name="full_fraud_probability"),
        helper.make_node("Gather", [behaviour_p, "fraud_class"], ["p_behaviour"], axis=1,
                         name="behaviour_fraud_probability"),
        helper.make_node("Add", ["p_full", "p_behaviour"], ["p_sum"], name="add"),
        helper.make_node("Mul", ["p_sum", "half"], [OUTPUT_NAME], name="mean"),
    ]
    initializers = [
        *iso.graph.initializer, *full.graph.initializer, *behaviour.graph.initializer,
        numpy_helper.from_array(np.array(if_columns, dtype=np.int64), "if_columns"),
        numpy_helper.from_array(np.array(challenger.behaviour_columns, dtype=np.int64),
                                "behaviour_columns"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "unsqueeze_axes"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "fraud_class"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes, "supervised_challenger",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n_features])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])],
        initializer=initializers,
        doc_string="fraud_score = mean of two LightGBM models' probability of fraud, on the "
                   "features plus the Isolation Forest anomaly score, one without the label "
                   "features; higher = riskier, in [0, 1]")
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS.items()],
        producer_name="branchguard.appliance.learning.challenger", ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model
