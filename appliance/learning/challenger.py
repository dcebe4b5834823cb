"""The supervised challenger: two random forest classifiers, one on the node's features, the
label features and the Isolation Forest's score, one on the same without the label features,
averaged, and exported as one ONNX model.

Why two: a label feature means something different when the model learns from it than when it
serves. Labels arrive a week late, and the training rows' labels are re-timed to a day (see
retrain.py), so when fitted a terminal's known frauds are a day old and almost always mean it is
still compromised; when serving they are one to three weeks old, and many of those compromises
have ended. A forest that sees them leans on them and ranks a stolen card's large amounts
(which no label yet names) below every terminal with an old compromise. The behaviour forest
cannot lean on them; the mean of the two keeps what each knows. On the handbook protocol it
moved the compromised cards' frauds above the 200th genuine transaction from 103 of 188 to 144
(docs/models.md).

Both are scikit-learn ``RandomForestClassifier``, converted with skl2onnx
(``TreeEnsembleClassifier``). The Isolation Forest they stack on is exported with
:func:`forest.forest_to_onnx`, and all three are joined into one graph, so the scorer still makes
one ONNX Runtime call per batch::

    features [N, F] float32 (the card's feature list)
      -> Gather(if_columns)  -> isolation forest -> anomaly_score [N] -> Unsqueeze [N, 1]
      -> Concat(features, anomaly_score)  [N, F + 1] -> full forest -> p_full [N]
      -> Gather(behaviour_columns + [F])  [N, B + 1]  -> behaviour forest -> p_behaviour [N]
      -> (p_full + p_behaviour) / 2 -> fraud_score [N]

Output ``fraud_score``: in [0, 1], higher = riskier; equal to :meth:`Challenger.predict` to
within 1e-5 (tests/test_retrain.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, compose, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import IsolationForest, RandomForestClassifier

from ..scoring.forest import INPUT_NAME, IR_VERSION, OPSETS, forest_to_onnx

OUTPUT_NAME = "fraud_score"


TREES = 300
"""The challenger's trees. With five labelled days to fit on, a 100-tree forest's detection
varied with its seed by more than the gains being measured (handbook protocol, seeds 7 and 8:
AUC 0.867 / 0.857, AP 0.499 / 0.514); 300 trees, each on a half-size bootstrap sample, cut that
spread (AUC 0.869 / 0.879, AP 0.509 / 0.520). Each of the two forests has this many. ONNX
Runtime time per batch of the two-forest graph: 39 ms per 1,000 rows, 5.1 ms per 100
(docs/models.md)."""
BOOTSTRAP_SHARE = 0.5
"""Share of the training rows each tree draws (with replacement): smaller trees, faster fits."""


def fit_classifier(x: npt.NDArray[np.float32], y: npt.NDArray[np.bool_], *, seed: int = 7,
                   n_estimators: int = TREES, min_samples_leaf: int = 3,
                   max_samples: float = BOOTSTRAP_SHARE) -> RandomForestClassifier:
    """A balanced random forest, with out-of-bag scores kept for calibration."""
    clf = RandomForestClassifier(n_estimators=n_estimators, min_samples_leaf=min_samples_leaf,
                                 max_features="sqrt", max_samples=max_samples,
                                 class_weight="balanced_subsample",
                                 oob_score=True, n_jobs=1, random_state=seed)
    clf.fit(x, y)
    return clf


def stacked_input(x: npt.NDArray[np.float32], forest: IsolationForest,
                  if_columns: list[int]) -> npt.NDArray[np.float32]:
    """The classifiers' input in scikit-learn: the features plus the forest's anomaly score."""
    score = -forest.score_samples(x[:, if_columns])
    return np.column_stack([x, score]).astype(np.float32)


@dataclass(frozen=True)
class Challenger:
    """The two forests (see the module docstring), on the stacked input of :func:`stacked_input`."""

    full: RandomForestClassifier
    behaviour: RandomForestClassifier
    behaviour_columns: list[int]
    """The stacked input's columns the behaviour forest reads: the features without the label
    features, then the anomaly score (the last column)."""

    @classmethod
    def fit(cls, stacked: npt.NDArray[np.float32], y: npt.NDArray[np.bool_],
            behaviour_features: int, *, seed: int = 7, n_estimators: int = TREES) -> Challenger:
        """Fit both; the first ``behaviour_features`` columns are the behavioural ones."""
        columns = [*range(behaviour_features), stacked.shape[1] - 1]
        return cls(fit_classifier(stacked, y, seed=seed, n_estimators=n_estimators),
                   fit_classifier(stacked[:, columns], y, seed=seed + 1,
                                  n_estimators=n_estimators), columns)

    def predict(self, stacked: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The probability of fraud: the mean of the two forests'."""
        full = self.full.predict_proba(stacked)[:, 1]
        behaviour = self.behaviour.predict_proba(stacked[:, self.behaviour_columns])[:, 1]
        out: npt.NDArray[np.float64] = (full + behaviour) / 2.0
        return out

    def out_of_bag(self) -> npt.NDArray[np.float64]:
        """Each training row's mean out-of-bag probability (NaN where a forest has none)."""
        out: npt.NDArray[np.float64] = (self.full.oob_decision_function_[:, 1]
                                        + self.behaviour.oob_decision_function_[:, 1]) / 2.0
        return out


def _converted(clf: RandomForestClassifier, width: int, prefix: str
               ) -> tuple[onnx.ModelProto, str]:
    """``clf`` as an ONNX graph with every name prefixed, and its probabilities' name."""
    model = compose.add_prefix(convert_sklearn(
        clf, initial_types=[("x", FloatTensorType([None, width]))],
        target_opset=dict(OPSETS), options={id(clf): {"zipmap": False}}), prefix)
    return model, next(o.name for o in model.graph.output if "probabilities" in o.name)


def challenger_to_onnx(challenger: Challenger, forest: IsolationForest,
                       n_features: int, if_columns: list[int]) -> onnx.ModelProto:
    """One ONNX model: input ``features`` [N, n_features], output ``fraud_score`` [N]."""
    iso = compose.add_prefix(forest_to_onnx(forest, len(if_columns)), "if_")
    full, full_p = _converted(challenger.full, n_features + 1, "rf_")
    behaviour, behaviour_p = _converted(challenger.behaviour,
                                        len(challenger.behaviour_columns), "rb_")
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
        doc_string="fraud_score = mean of two random forests' probability of fraud, on the "
                   "features plus the Isolation Forest anomaly score, one without the label "
                   "features; higher = riskier, in [0, 1]")
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS.items()],
        producer_name="branchguard.appliance.learning.challenger", ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model
