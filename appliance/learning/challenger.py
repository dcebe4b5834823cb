"""The supervised challenger: two gradient-boosted tree models (LightGBM), one on the node's
features, the label features and the Isolation Forest's score ("full"), one on the same without
the label features ("behaviour"); the full model, the behaviour model or their mean serves, as
validation chooses, exported as one ONNX model.

Why two: a label feature can mean something different when the model learns from it than
when it serves. Labels arrive late; a model fitted where a terminal's known frauds are recent
leans on them and, serving with labels one to three weeks old, ranks every old compromise
above a stolen card's large amounts (which no label yet names); the behaviour model cannot
lean on them. Since issue 18 (part D2) every fold's label features are as served
(validation.as_served: each label counts from its own known_at), so the validation fold shows
that difference as deployment would, and :func:`choose_combination` chooses between the full
model, the behaviour model and their mean by the validation fold's average precision.

Every hyperparameter is chosen by :func:`tune` on a time-ordered split of the training rows
(validation.py): for each of the two models, each configuration of :data:`GRID` is fitted on the
earlier part with early stopping on the later part's average precision; the configuration with
the best validation average precision wins, with its number of rounds; what serves is refitted
on all the training rows. Nothing after the training window is read.

Export: each served model is converted by onnxmltools (``TreeEnsembleClassifier``); the
Isolation Forest they stack on by :func:`forest.forest_to_onnx`; all are joined into one graph,
so the scorer still makes one ONNX Runtime call per batch::

    features [N, F] float32 (the card's feature list)
      -> Gather(if_columns)  -> isolation forest -> anomaly_score [N] -> Unsqueeze [N, 1]
      -> Concat(features, anomaly_score) = stacked [N, F + 1]
      -> full model on stacked                               -> p_full [N]       (if served)
      -> Gather(behaviour_columns + [F]) -> behaviour model  -> p_behaviour [N]  (if served)
      -> w_full * p_full + w_behaviour * p_behaviour -> fraud_score [N]

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
    validation_scores: npt.NDArray[np.float64] | None = None
    """The chosen configuration's probabilities on the validation fold (None untuned)."""

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
    scores: list[npt.NDArray[np.float64]] = []
    for values in itertools.product(*GRID.values()):
        params = dict(zip(GRID, values))
        model = classifier(params, seed).fit(
            x[split.fit], y_fit, eval_X=(x[split.validation],), eval_y=(y_val,),
            callbacks=[early_stopping(PATIENCE, verbose=False)])
        rounds = int(model.best_iteration_ or MAX_ROUNDS)
        ap = float(model.best_score_["valid_0"]["average_precision"])
        trials.append({**params, "n_estimators": rounds,
                       "validation_average_precision": round(ap, 4)})
        # predict_proba stops at the early-stopping round, as the refit will
        scores.append(np.asarray(model.predict_proba(x[split.validation]),
                                 dtype=np.float64)[:, 1])
    at = max(range(len(trials)), key=lambda i: trials[i]["validation_average_precision"])
    params = {k: v for k, v in trials[at].items() if k != "validation_average_precision"}
    return Tuning(params, "grid search with early stopping, by the validation fold's average "
                          "precision (time-ordered split)", trials, scores[at])


COMBINATIONS: dict[str, tuple[float, float]] = {
    "behaviour": (0.0, 1.0), "full": (1.0, 0.0), "mean": (0.5, 0.5)}
"""What the challenger serves, as (weight of the full model, weight of the behaviour model);
the order breaks exact ties (the simpler first)."""


@dataclass(frozen=True)
class Combination:
    """Which of the two models (or their mean) serves, and how that was chosen."""

    chosen: str
    chosen_by: str
    validation_average_precision: dict[str, float] = field(default_factory=dict)

    @property
    def weights(self) -> tuple[float, float]:
        return COMBINATIONS[self.chosen]

    def describe(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "chosen_by": self.chosen_by,
                "validation_average_precision": self.validation_average_precision}


def choose_combination(y_val: npt.NDArray[np.bool_], full: npt.NDArray[np.float64] | None,
                       behaviour: npt.NDArray[np.float64] | None) -> Combination:
    """The full model, the behaviour model or their mean, by average precision on the
    validation fold (the tuned models' probabilities there, fitted on the fit fold). The
    fold's label features are as served (validation.as_served), so this judges the
    difference between the label features a model learns from and those it serves with.
    Without validation scores: the mean (issue 14's design), and the card says so."""
    if full is None or behaviour is None:
        return Combination("mean", "not validated (no tuned validation scores): the mean of "
                                   "the two, issue 14's design")
    from sklearn.metrics import average_precision_score

    aps = {name: round(float(average_precision_score(y_val, wf * full + wb * behaviour)), 4)
           for name, (wf, wb) in COMBINATIONS.items()}
    chosen = max(COMBINATIONS, key=lambda n: (aps[n], -list(COMBINATIONS).index(n)))
    return Combination(chosen, "the best average precision on the validation fold "
                               "(time-ordered split, label features as served)", aps)


def stacked_input(x: npt.NDArray[np.float32], forest: IsolationForest,
                  if_columns: list[int]) -> npt.NDArray[np.float32]:
    """The models' input: the features plus the forest's anomaly score (last column)."""
    score = -forest.score_samples(x[:, if_columns])
    return np.column_stack([x, score]).astype(np.float32)


@dataclass(frozen=True)
class Challenger:
    """The served model(s) (see the module docstring), on the stacked input of
    :func:`stacked_input`: the full model, the behaviour model, or both averaged, as
    :attr:`combination` chose. A model that does not serve is not fitted (None)."""

    full: LGBMClassifier | None
    behaviour: LGBMClassifier | None
    behaviour_features: int
    """The stacked input's first columns that are behavioural (the behaviour model reads
    them and the anomaly score, the last column)."""
    tuning: dict[str, Tuning]
    combination: Combination

    @staticmethod
    def behaviour_columns_of(width: int, behaviour_features: int) -> list[int]:
        return [*range(behaviour_features), width - 1]

    @property
    def uses_label_features(self) -> bool:
        """Whether the served output reads the label features (only the full model does)."""
        return self.combination.weights[0] > 0

    @classmethod
    def fit(cls, stacked: npt.NDArray[np.float32], y: npt.NDArray[np.bool_],
            behaviour_features: int, split: TimeSplit | None, *, seed: int = 7,
            params: dict[str, Any] | None = None) -> Challenger:
        """Tune each model on ``split`` (rows of ``stacked``), choose what serves
        (:func:`choose_combination`), then refit what serves on every row. ``params`` instead
        fixes both models' configuration (no tuning, the mean serves); the first
        ``behaviour_features`` columns are the behavioural ones."""
        columns = cls.behaviour_columns_of(stacked.shape[1], behaviour_features)
        tuning: dict[str, Tuning] = {}
        inputs = {"full": (stacked, seed), "behaviour": (stacked[:, columns], seed + 1)}
        for role, (x, s) in inputs.items():
            if params is not None:
                tuning[role] = Tuning(dict(params), "given")
            elif split is None:
                tuning[role] = Tuning(dict(DEFAULT), "defaults: no validation split")
            else:
                tuning[role] = tune(x, y, split, seed=s)
        combination = choose_combination(
            y[split.validation] if split is not None else np.zeros(0, dtype=bool),
            tuning["full"].validation_scores, tuning["behaviour"].validation_scores)
        fitted: dict[str, LGBMClassifier | None] = {}
        for (role, (x, s)), weight in zip(inputs.items(), combination.weights):
            fitted[role] = (classifier(tuning[role].params, s).fit(x, y.astype(np.int64))
                            if weight > 0 else None)
        return cls(fitted["full"], fitted["behaviour"], behaviour_features, tuning,
                   combination)

    def predict(self, stacked: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The probability of fraud: the chosen weighting of the two models'. ``stacked`` is
        the input they were fitted on, or (behaviour model alone) its behavioural columns
        and the anomaly score."""
        out = np.zeros(len(stacked), dtype=np.float64)
        for clf, weight, x in (
                (self.full, self.combination.weights[0], stacked),
                (self.behaviour, self.combination.weights[1],
                 stacked[:, self.behaviour_columns_of(stacked.shape[1],
                                                      self.behaviour_features)])):
            if clf is not None and weight > 0:
                out += weight * np.asarray(clf.predict_proba(x), dtype=np.float64)[:, 1]
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
    """One ONNX model: input ``features`` [N, n_features], output ``fraud_score`` [N]: the
    chosen weighting of the served models' probabilities of fraud. With the behaviour model
    alone, ``n_features`` may be just the behavioural features."""
    iso = compose.add_prefix(forest_to_onnx(forest, len(if_columns)), "if_")
    stacked = "stacked"
    nodes = [
        helper.make_node("Gather", [INPUT_NAME, "if_columns"], [iso.graph.input[0].name],
                         axis=1, name="select_if_columns"),
        *iso.graph.node,
        helper.make_node("Unsqueeze", [iso.graph.output[0].name, "unsqueeze_axes"],
                         ["if_score_2d"], name="if_score_column"),
        helper.make_node("Concat", [INPUT_NAME, "if_score_2d"], [stacked], axis=1,
                         name="append_if_score"),
    ]
    initializers = [
        *iso.graph.initializer,
        numpy_helper.from_array(np.array(if_columns, dtype=np.int64), "if_columns"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "unsqueeze_axes"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "fraud_class"),
    ]
    width = n_features + 1
    members = [(name, clf, columns, weight) for name, clf, columns, weight in (
        ("full", challenger.full, list(range(width)), challenger.combination.weights[0]),
        ("behaviour", challenger.behaviour,
         Challenger.behaviour_columns_of(width, challenger.behaviour_features),
         challenger.combination.weights[1])) if clf is not None and weight > 0]
    terms = []
    for name, clf, columns, weight in members:
        model, probabilities = _converted(clf, len(columns), f"g{name[0]}_")
        nodes += [
            helper.make_node("Gather", [stacked, f"{name}_columns"], [model.graph.input[0].name],
                             axis=1, name=f"select_{name}"),
            *model.graph.node,
            helper.make_node("Gather", [probabilities, "fraud_class"], [f"p_{name}"], axis=1,
                             name=f"{name}_fraud_probability"),
            helper.make_node("Mul", [f"p_{name}", f"{name}_weight"], [f"w_{name}"],
                             name=f"{name}_weighted"),
        ]
        initializers += [
            *model.graph.initializer,
            numpy_helper.from_array(np.array(columns, dtype=np.int64), f"{name}_columns"),
            numpy_helper.from_array(np.array(weight, dtype=np.float32), f"{name}_weight")]
        terms.append(f"w_{name}")
    nodes.append(helper.make_node("Sum", terms, [OUTPUT_NAME], name="combine"))
    graph = helper.make_graph(
        nodes, "supervised_challenger",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n_features])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])],
        initializer=initializers,
        doc_string=f"fraud_score = {challenger.combination.chosen} of LightGBM models' "
                   "probability of fraud on the features plus the Isolation Forest anomaly "
                   "score (the behaviour model without the label features); higher = riskier, "
                   "in [0, 1]")
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS.items()],
        producer_name="branchguard.appliance.learning.challenger", ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model
