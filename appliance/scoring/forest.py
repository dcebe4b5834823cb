"""Export a fitted :class:`~sklearn.ensemble.IsolationForest` as a compact ONNX model.

skl2onnx's converter emits one tree node plus two LabelEncoders and about two dozen other nodes
*per tree* (2,710 nodes for a 100-tree forest, around a millisecond per single-row call). Every one of those
per-tree quantities is a constant of the leaf the row lands in, so :func:`forest_to_onnx` folds
them into the leaf values of a single ``ai.onnx.ml.TreeEnsembleRegressor`` and appends the final
``2 ** -x`` transform as three plain ONNX nodes::

    features [N, F] float32
      -> TreeEnsembleRegressor (AVERAGE)   normalized_path_length [N, 1] = E[h(x)] / c(max_samples_)
      -> Mul(-ln 2)                        log_anomaly_score      [N, 1]
      -> Exp                               anomaly_score_2d       [N, 1]
      -> Squeeze(axes=[1])                 anomaly_score          [N]

The contract, which ``tests/test_forest.py`` checks against scikit-learn and skl2onnx:

* input ``features``: float32 ``[N, n_features]`` in the column order the forest was fitted on
  (``N`` is dynamic, ``N >= 0``);
* output ``anomaly_score``: float32 ``[N]`` (one dimension, *not* ``[N, 1]``), equal to
  ``-forest.score_samples(X)`` to within 1e-5, i.e. the original paper's score
  ``2 ** (-E[h(x)] / c(max_samples_))``, in ``(0, 1]``; HIGHER means MORE ANOMALOUS;
* tree decisions are bit-for-bit those of scikit-learn for every float32 input, including
  values equal to a threshold, +/-inf and NaN (NaN follows each split's ``missing_go_to_left``);
* opsets ``{"": 17, "ai.onnx.ml": 3}``, IR version 8, runs on onnxruntime's
  ``CPUExecutionProvider``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.ensemble import IsolationForest

from ..errors import ModelError

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "OPSETS", "anomaly_scores", "forest_to_onnx"]

INPUT_NAME = "features"
"""Name of the model's only input: float32 ``[N, n_features]``."""
OUTPUT_NAME = "anomaly_score"
"""Name of the model's only output: float32 ``[N]``, higher = more anomalous."""
OPSETS: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
"""Operator-set versions the exported model imports."""
IR_VERSION = 8
"""Lowest IR version that carries opset 17, so older onnxruntime builds still load the model."""

_TREE_LEAF = -1  # sklearn.tree._tree.TREE_LEAF


def anomaly_scores(forest: IsolationForest, X: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Reference scores straight from scikit-learn: ``-forest.score_samples(X)`` as float64 ``[N]``.

    Same orientation and range as the ONNX model's ``anomaly_score`` (in ``(0, 1]``, higher = more
    anomalous). scikit-learn casts ``X`` to float32 before walking the trees, so pass the float32
    array you feed the model to compare like with like.
    """
    return np.asarray(-forest.score_samples(X), dtype=np.float64)


def forest_to_onnx(forest: IsolationForest, n_features: int) -> onnx.ModelProto:
    """Convert a fitted ``IsolationForest`` into a single-tree-node ONNX model.

    Input ``'features'``: float32 ``[N, n_features]``. Output ``'anomaly_score'``: float32 ``[N]``
    (flat, not ``[N, 1]``) equal to ``-forest.score_samples(X)``, i.e.
    ``2 ** (-E[h(x)] / c(max_samples_))``, in ``(0, 1]``; HIGHER = MORE ANOMALOUS. (When
    ``max_samples_ == 1``, ``c`` is 0 and, like scikit-learn, every row scores 0.5.)
    ``forest.predict`` flags a row as an outlier exactly when ``anomaly_score > -forest.offset_``.

    The graph is ``TreeEnsembleRegressor -> Mul -> Exp -> Squeeze`` (4 nodes, 2 initializers)
    with opsets ``{"": 17, "ai.onnx.ml": 3}``; see the module docstring for the full contract.

    Raises :class:`~appliance.errors.ModelError` if the forest is not fitted or was fitted on a
    different number of features than ``n_features``.
    """
    estimators = getattr(forest, "estimators_", None)
    if not estimators:
        raise ModelError("the IsolationForest is not fitted", hint="call forest.fit(X) first")
    n_in = int(forest.n_features_in_)
    if n_features != n_in:
        raise ModelError(
            f"the forest was fitted on {n_in} features, not {n_features}",
            field="n_features", value=n_features,
            hint="export with the feature count the forest was trained on",
        )

    c_max = float(_average_path_length(np.array([forest.max_samples_]))[0])
    parts: dict[str, list[npt.NDArray[Any]]] = {}
    for tree_id, (estimator, subset) in enumerate(zip(estimators, forest.estimators_features_)):
        subset = np.asarray(subset, dtype=np.int64)
        # scikit-learn slices X[:, subset] only when a tree saw fewer columns than the forest
        # (`_max_features != n_features_in_`, both in fit and in score_samples); otherwise the
        # tree was trained on, and is scored with, all columns in their original order.
        # IsolationForest never bootstraps features, so len(subset) == _max_features.
        global_ids = subset if subset.size != n_in else np.arange(n_in, dtype=np.int64)
        for key, array in _tree_arrays(estimator.tree_, tree_id, global_ids, c_max).items():
            parts.setdefault(key, []).append(array)
    col = {key: np.concatenate(arrays) for key, arrays in parts.items()}
    leaves = col["is_leaf"]

    ensemble = helper.make_node(
        "TreeEnsembleRegressor",
        inputs=[INPUT_NAME],
        outputs=["normalized_path_length"],
        name="isolation_trees",
        domain="ai.onnx.ml",
        n_targets=1,
        aggregate_function="AVERAGE",
        post_transform="NONE",
        nodes_treeids=col["tree_ids"].tolist(),
        nodes_nodeids=col["node_ids"].tolist(),
        nodes_featureids=col["feature_ids"].tolist(),
        nodes_modes=["LEAF" if leaf else "BRANCH_LEQ" for leaf in leaves.tolist()],
        nodes_values=col["thresholds"].tolist(),
        nodes_truenodeids=col["true_ids"].tolist(),
        nodes_falsenodeids=col["false_ids"].tolist(),
        nodes_missing_value_tracks_true=col["missing_left"].tolist(),
        target_treeids=col["tree_ids"][leaves].tolist(),
        target_nodeids=col["node_ids"][leaves].tolist(),
        target_ids=[0] * int(leaves.sum()),
        target_weights=col["leaf_values"][leaves].tolist(),
    )
    # 2 ** -x == exp(-ln 2 * x)
    scale = helper.make_node("Mul", ["normalized_path_length", "minus_ln2"], ["log_anomaly_score"],
                             name="times_minus_ln2")
    exp = helper.make_node("Exp", ["log_anomaly_score"], ["anomaly_score_2d"], name="exp")
    flat = helper.make_node("Squeeze", ["anomaly_score_2d", "squeeze_axes"], [OUTPUT_NAME],
                            name="flatten")
    initializers = [
        numpy_helper.from_array(np.array(-math.log(2.0), dtype=np.float32), "minus_ln2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "squeeze_axes"),
    ]
    graph = helper.make_graph(
        [ensemble, scale, exp, flat],
        "isolation_forest",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n_features])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])],
        initializer=initializers,
        doc_string="anomaly_score = -IsolationForest.score_samples(features); higher = more "
                   "anomalous, in (0, 1]",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in OPSETS.items()],
        producer_name="branchguard.appliance.scoring.forest",
        ir_version=IR_VERSION,
    )
    helper.set_model_props(model, {
        "n_estimators": str(len(estimators)),
        "max_samples": str(forest.max_samples_),
        "n_features": str(n_features),
    })
    return model


def _tree_arrays(tree: Any, tree_id: int, global_ids: npt.NDArray[np.int64],
                 c_max: float) -> dict[str, npt.NDArray[Any]]:
    """One ``sklearn.tree._tree.Tree`` as the per-node arrays TreeEnsembleRegressor wants."""
    left = np.asarray(tree.children_left, dtype=np.int64)
    right = np.asarray(tree.children_right, dtype=np.int64)
    feature = np.asarray(tree.feature, dtype=np.int64)
    threshold = np.asarray(tree.threshold, dtype=np.float64)
    n_samples = np.asarray(tree.n_node_samples, dtype=np.float64)
    # Where a NaN goes at each split (scikit-learn >= 1.3); ONNX calls it "tracks true".
    missing_left = np.asarray(tree.missing_go_to_left, dtype=np.int64)
    is_leaf = left == _TREE_LEAF

    # Path length of a row that ends in a leaf: the leaf's depth (edges from the root) plus
    # c(n_node_samples), the expected depth of the unbuilt subtree below it. scikit-learn adds
    # the same two per-tree constants (compute_node_depths() - 1 + _average_path_length(...)).
    # Dividing by c(max_samples_) here makes the AVERAGE of the trees the normalized path length;
    # for c == 0 (max_samples_ == 1) scikit-learn defines that ratio as 1, so every leaf gets 1.
    path_length = _node_depths(left, right) + _average_path_length(n_samples)
    leaf_values = path_length / c_max if c_max != 0.0 else np.ones_like(path_length)

    return {
        "tree_ids": np.full(left.size, tree_id, dtype=np.int64),
        "node_ids": np.arange(left.size, dtype=np.int64),
        "is_leaf": is_leaf,
        "feature_ids": np.where(is_leaf, 0, global_ids[np.where(is_leaf, 0, feature)]),
        "thresholds": np.where(is_leaf, np.float32(0.0), _float32_floor(threshold)),
        "true_ids": np.where(is_leaf, 0, left),
        "false_ids": np.where(is_leaf, 0, right),
        "missing_left": np.where(is_leaf, 0, missing_left),
        "leaf_values": np.where(is_leaf, leaf_values, 0.0),
    }


def _float32_floor(threshold: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """The largest float32 ``<=`` each float64 threshold.

    scikit-learn routes a row left when ``float32(x) <= float64(thr)`` (C promotes the float to
    double, which is exact). onnxruntime compares in the input's type, ``float32(x) <=
    float32(t)``, so ``t`` must satisfy ``x <= thr  <=>  x <= t`` for *every* float32 ``x``.
    ``t = max{f in float32 : f <= thr}`` does: if ``x <= t`` then ``x <= t <= thr``; if
    ``x <= thr`` then ``x`` is one of the float32s below ``thr``, so ``x <= t`` by maximality.
    Plain rounding is not enough: when ``float32(thr)`` rounds *up*, an ``x`` equal to it lies
    above ``thr`` in scikit-learn but would go left in ONNX. The same ``t`` keeps +/-inf
    correct (a finite ``thr`` above FLT_MAX would floor to FLT_MAX, so +inf still goes right),
    and NaN thresholds (drawn when a node's training values include +/-inf) stay NaN: every
    non-NaN ``x`` goes right in both. skl2onnx's ``sklearn_threshold`` makes the same choice.
    """
    with np.errstate(over="ignore"):  # |thr| > FLT_MAX rounds to +/-inf, then steps back below
        rounded = threshold.astype(np.float32)
    too_high = rounded.astype(np.float64) > threshold
    rounded[too_high] = np.nextafter(rounded[too_high], np.float32(-np.inf))
    return rounded


def _node_depths(left: npt.NDArray[np.int64], right: npt.NDArray[np.int64]
                 ) -> npt.NDArray[np.float64]:
    """Depth of every node, root = 0, one tree level per step."""
    depth = np.zeros(left.size, dtype=np.float64)
    level = np.array([0], dtype=np.int64)
    d = 0
    while level.size:
        depth[level] = d
        inner = level[left[level] != _TREE_LEAF]
        level = np.concatenate([left[inner], right[inner]])
        d += 1
    return depth


def _average_path_length(n_samples: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``c(n)``: average depth of an unsuccessful search in a random BST of ``n`` keys.

    Same piecewise definition as ``sklearn.ensemble._iforest._average_path_length`` (re-stated
    here because that function is private): 0 for ``n <= 1``, 1 for ``n == 2``, else
    ``2 * (ln(n - 1) + euler_gamma) - 2 * (n - 1) / n``.
    """
    n = np.asarray(n_samples, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out
