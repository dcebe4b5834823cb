"""The supervised challenger: a random forest classifier on the node's features, the label
features and the Isolation Forest's score, exported as one ONNX model.

The classifier is scikit-learn's ``RandomForestClassifier``, converted with skl2onnx
(``TreeEnsembleClassifier``). The Isolation Forest it stacks on is exported with
:func:`forest.forest_to_onnx`, and both are joined into one graph, so the scorer still makes one
ONNX Runtime call per batch::

    features [N, F] float32 (the card's feature list)
      -> Gather(if_columns)  -> isolation forest -> anomaly_score [N] -> Unsqueeze [N, 1]
      -> Concat(features, anomaly_score)  [N, F + 1]
      -> TreeEnsembleClassifier -> probabilities [N, 2] -> Gather(1) -> fraud_score [N]

Output ``fraud_score``: the forest's probability of fraud, in [0, 1], higher = riskier; equal to
``clf.predict_proba(hstack([x, -forest.score_samples(x[:, if_columns])]))[:, 1]`` to within
1e-5 (tests/test_challenger.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, compose, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import IsolationForest, RandomForestClassifier

from .forest import INPUT_NAME, IR_VERSION, OPSETS, forest_to_onnx

OUTPUT_NAME = "fraud_score"


TREES = 300
"""The challenger's trees. With five labelled days to fit on, a 100-tree forest's detection
varied with its seed by more than the gains being measured (handbook protocol, seeds 7 and 8:
AUC 0.867 / 0.857, AP 0.499 / 0.514); 300 trees, each on a half-size bootstrap sample, cut that
spread (AUC 0.869 / 0.879, AP 0.509 / 0.520). ONNX Runtime time per batch, against 100
full-size trees: 35 against 25 ms per 1,000 rows, 5.9 against 2.9 ms per 100 (docs/models.md)."""
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
    """The classifier's input in scikit-learn: the features plus the forest's anomaly score."""
    score = -forest.score_samples(x[:, if_columns])
    return np.column_stack([x, score]).astype(np.float32)


def challenger_to_onnx(clf: RandomForestClassifier, forest: IsolationForest,
                       n_features: int, if_columns: list[int]) -> onnx.ModelProto:
    """One ONNX model: input ``features`` [N, n_features], output ``fraud_score`` [N]."""
    iso = compose.add_prefix(forest_to_onnx(forest, len(if_columns)), "if_")
    rf = convert_sklearn(clf, initial_types=[("x", FloatTensorType([None, n_features + 1]))],
                         target_opset=dict(OPSETS), options={id(clf): {"zipmap": False}})
    rf = compose.add_prefix(rf, "rf_")
    rf_probabilities = next(o.name for o in rf.graph.output if "probabilities" in o.name)
    nodes = [
        helper.make_node("Gather", [INPUT_NAME, "if_columns"], [iso.graph.input[0].name],
                         axis=1, name="select_if_columns"),
        *iso.graph.node,
        helper.make_node("Unsqueeze", [iso.graph.output[0].name, "unsqueeze_axes"],
                         ["if_score_2d"], name="if_score_column"),
        helper.make_node("Concat", [INPUT_NAME, "if_score_2d"], [rf.graph.input[0].name],
                         axis=1, name="append_if_score"),
        *rf.graph.node,
        helper.make_node("Gather", [rf_probabilities, "fraud_class"], [OUTPUT_NAME], axis=1,
                         name="fraud_probability"),
    ]
    initializers = [
        *iso.graph.initializer, *rf.graph.initializer,
        numpy_helper.from_array(np.array(if_columns, dtype=np.int64), "if_columns"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "unsqueeze_axes"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "fraud_class"),
    ]
    graph = helper.make_graph(
        nodes, "supervised_challenger",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n_features])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])],
        initializer=initializers,
        doc_string="fraud_score = RandomForest probability of fraud on the features plus the "
                   "Isolation Forest anomaly score; higher = riskier, in [0, 1]")
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS.items()],
        producer_name="branchguard.appliance.challenger", ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model
