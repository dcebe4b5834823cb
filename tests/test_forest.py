"""appliance.scoring.forest: the one-tree-node ONNX export of IsolationForest.

Everything is compared against ``-forest.score_samples(X)`` (scikit-learn's own scores) and, where
skl2onnx can convert the forest, against skl2onnx's export too. Inputs are float32 throughout,
because that is what the model takes and what scikit-learn casts to before walking the trees.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.ensemble import IsolationForest
from sklearn.ensemble._iforest import _average_path_length as sklearn_average_path_length

import appliance.scoring.forest as forest_module
from appliance.errors import ModelError
from appliance.scoring.forest import OUTPUT_NAME, anomaly_scores, forest_to_onnx

TOLERANCE = 1e-5
N_FEATURES = 8

Array = npt.NDArray[Any]


def make_data(seed: int, n_rows: int, n_features: int = N_FEATURES) -> npt.NDArray[np.float32]:
    """Mixed columns: normal, heavy-tailed (Cauchy, Pareto, log-normal), discrete with many ties,
    a constant column, and a huge-scale one, so trees see both representable and
    non-representable thresholds and leaves holding several identical rows."""
    rng = np.random.default_rng(seed)
    columns = [
        rng.normal(size=n_rows),
        rng.standard_cauchy(size=n_rows),
        rng.pareto(1.5, size=n_rows) * np.where(rng.random(n_rows) < 0.5, -1.0, 1.0),
        rng.lognormal(0.0, 2.0, size=n_rows),
        rng.integers(0, 4, size=n_rows).astype(np.float64),
        np.full(n_rows, 7.25),
        rng.normal(scale=1e6, size=n_rows),
        rng.uniform(-1e-3, 1e-3, size=n_rows),
    ]
    X = np.column_stack([columns[i % len(columns)] for i in range(n_features)])
    return X.astype(np.float32)


def boundary_values(forest: IsolationForest) -> dict[int, npt.NDArray[np.float32]]:
    """Per global feature: float32 values at and next to every split threshold.

    For a float64 threshold ``t`` these are ``float32(t)`` (rounded to nearest, which may lie on
    either side of ``t``) and its float32 neighbours, so both ``x <= t`` and ``x > t`` are hit
    with no float32 in between left untested. Thresholds that are float32 already (scikit-learn
    falls back to the node's minimum when the random draw lands on the maximum) are hit exactly.
    """
    found: dict[int, list[npt.NDArray[np.float32]]] = {}
    for estimator, subset in zip(forest.estimators_, forest.estimators_features_):
        tree = estimator.tree_
        inner = tree.children_left != -1
        local = tree.feature[inner]
        global_ids = subset[local] if len(subset) != forest.n_features_in_ else local
        t32 = tree.threshold[inner].astype(np.float32)
        for neighbour in (t32, np.nextafter(t32, np.float32(-np.inf)),
                          np.nextafter(t32, np.float32(np.inf))):
            for feature in np.unique(global_ids):
                found.setdefault(int(feature), []).append(neighbour[global_ids == feature])
    return {f: np.unique(np.concatenate(v)) for f, v in found.items()}


def edge_rows(forest: IsolationForest, seed: int) -> npt.NDArray[np.float32]:
    """Rows whose cells are all at or next to a threshold of their column: every value from
    :func:`boundary_values` appears at least once, shuffled independently per column. (Columns
    no tree splits on keep ordinary data.)"""
    rng = np.random.default_rng(seed)
    values = boundary_values(forest)
    n_rows = max((len(v) for v in values.values()), default=100)
    X = make_data(seed + 1000, n_rows, forest.n_features_in_)
    for feature, column in values.items():
        X[:, feature] = rng.permutation(np.resize(column, n_rows))
    return X


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    (out,) = sess.run([OUTPUT_NAME], {"features": X})
    return np.asarray(out)


def max_error(got: Array, want: Array) -> float:
    assert got.shape == want.shape
    return float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0))


FORESTS: dict[str, dict[str, Any]] = {
    "default-100": dict(n_estimators=100, random_state=0),
    "features-half": dict(n_estimators=40, max_samples=128, max_features=0.5,
                          contamination=0.05, random_state=1),
    "features-int-bootstrap": dict(n_estimators=25, max_samples=512, max_features=3,
                                   bootstrap=True, contamination=0.2, random_state=2),
    "bootstrap-fraction": dict(n_estimators=30, max_samples=0.3, bootstrap=True,
                               contamination=0.1, random_state=3),
    "one-tree-all-rows": dict(n_estimators=1, max_samples=1.0, random_state=4),
    "features-one": dict(n_estimators=20, max_samples=64, max_features=1, random_state=5),
    "tiny-samples-2": dict(n_estimators=10, max_samples=2, random_state=6),
    "tiny-samples-3": dict(n_estimators=10, max_samples=3, bootstrap=True, random_state=7),
    "degenerate-samples-1": dict(n_estimators=5, max_samples=1, random_state=8),
}


@functools.cache
def fitted(name: str) -> IsolationForest:
    seed = int(FORESTS[name]["random_state"])
    return IsolationForest(**FORESTS[name]).fit(make_data(seed, 1200))


@functools.cache
def exported(name: str) -> ort.InferenceSession:
    return session(forest_to_onnx(fitted(name), N_FEATURES))


@pytest.mark.parametrize("name", list(FORESTS))
def test_matches_score_samples_on_random_and_threshold_rows(name: str) -> None:
    forest = fitted(name)
    sess = exported(name)
    seed = int(FORESTS[name]["random_state"])
    random_rows = make_data(seed + 500, 3000)
    random_rows[::3] *= np.float32(4.0)  # also well outside the training range
    for X in (random_rows, edge_rows(forest, seed), make_data(seed, 1200)):
        assert max_error(run(sess, X), anomaly_scores(forest, X)) <= TOLERANCE


def test_threshold_rows_do_cross_thresholds_that_round_up() -> None:
    # The hard case for the float32 port: float32(t) > t. Make sure edge_rows() really puts
    # such values into the data, otherwise the parity test above would prove little.
    forest = fitted("default-100")
    tree = forest.estimators_[0].tree_
    inner = tree.children_left != -1
    t = tree.threshold[inner]
    rounds_up = t.astype(np.float32).astype(np.float64) > t
    assert rounds_up.any()
    X = edge_rows(forest, 0)
    for feature, threshold in zip(tree.feature[inner][rounds_up], t[rounds_up]):
        assert (X[:, feature] == np.float32(threshold)).any()  # just above t: goes right
        assert (X[:, feature] == np.nextafter(np.float32(threshold), -np.inf)).any()  # left


def test_naive_float32_rounding_of_thresholds_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Teeth check: with round-to-nearest thresholds the same edge rows must fail parity.
    monkeypatch.setattr(forest_module, "_float32_floor",
                        lambda t: np.asarray(t, dtype=np.float64).astype(np.float32))
    forest = fitted("default-100")
    X = edge_rows(forest, 0)
    naive = run(session(forest_to_onnx(forest, N_FEATURES)), X)
    assert max_error(naive, anomaly_scores(forest, X)) > TOLERANCE


@pytest.mark.parametrize("name", ["default-100", "features-half", "bootstrap-fraction"])
def test_non_finite_inputs_follow_sklearn(name: str) -> None:
    # IsolationForest accepts NaN (routed by each split's missing_go_to_left) and +/-inf.
    forest = fitted(name)
    rng = np.random.default_rng(11)
    X = make_data(12, 2000)
    for value in (np.nan, np.inf, -np.inf):
        X[rng.random(X.shape) < 0.1] = value
    assert max_error(run(exported(name), X), anomaly_scores(forest, X)) <= TOLERANCE


def test_forest_trained_with_nan_and_inf() -> None:
    # NaN in training data gives learned missing_go_to_left; +/-inf gives NaN thresholds.
    X = make_data(13, 1000)
    rng = np.random.default_rng(13)
    for value, share in ((np.nan, 0.15), (np.inf, 0.05), (-np.inf, 0.05)):
        X[rng.random(X.shape) < share] = value
    forest = IsolationForest(n_estimators=30, random_state=13).fit(X)
    Y = make_data(14, 2000)
    Y[np.random.default_rng(14).random(Y.shape) < 0.2] = np.nan
    thresholds = np.concatenate([e.tree_.threshold for e in forest.estimators_])
    assert np.isnan(thresholds).any()
    sess = session(forest_to_onnx(forest, N_FEATURES))
    for rows in (Y, X, edge_rows(forest, 13)):
        assert max_error(run(sess, rows), anomaly_scores(forest, rows)) <= TOLERANCE


@functools.cache
def hypothesis_forest() -> tuple[IsolationForest, ort.InferenceSession, list[float]]:
    forest = IsolationForest(n_estimators=60, max_samples=200, max_features=0.75,
                             random_state=21).fit(make_data(21, 1500))
    specials = np.unique(np.concatenate(list(boundary_values(forest).values())))
    return forest, session(forest_to_onnx(forest, N_FEATURES)), specials.tolist()


def _cells() -> st.SearchStrategy[float]:
    _, _, specials = hypothesis_forest()
    return st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True),
        st.floats(min_value=-10.0, max_value=10.0, width=32),
        st.sampled_from(specials),
    )


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 16), st.just(N_FEATURES)),
                  elements=st.deferred(_cells)))
def test_property_any_float32_input_matches_sklearn(X: npt.NDArray[np.float32]) -> None:
    forest, sess, _ = hypothesis_forest()
    got = run(sess, X)
    want = anomaly_scores(forest, X)
    assert max_error(got, want) <= TOLERANCE
    assert np.all((got > 0.0) & (got <= 1.0))


@pytest.mark.parametrize("name", ["default-100", "bootstrap-fraction", "tiny-samples-3"])
def test_agrees_with_skl2onnx(name: str) -> None:
    # skl2onnx only converts forests whose trees see every feature (max_features == 1.0).
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    forest = fitted(name)
    reference = convert_sklearn(
        forest,
        initial_types=[("X", FloatTensorType([None, N_FEATURES]))],
        target_opset={"": 17, "ai.onnx.ml": 3},
        options={id(forest): {"score_samples": True}},
    )
    theirs = session(reference)
    seed = int(FORESTS[name]["random_state"])
    for X in (make_data(seed + 500, 2000), edge_rows(forest, seed)):
        score_samples = np.asarray(theirs.run(None, {"X": X})[2]).ravel()
        assert max_error(run(exported(name), X), -score_samples.astype(np.float64)) <= TOLERANCE


def test_graph_is_one_tree_node_plus_a_few_ops() -> None:
    forest = fitted("default-100")
    model = forest_to_onnx(forest, N_FEATURES)
    onnx.checker.check_model(model, full_check=True)
    ops = Counter((node.domain, node.op_type) for node in model.graph.node)
    assert ops[("ai.onnx.ml", "TreeEnsembleRegressor")] == 1
    assert sum(n for (_, op), n in ops.items() if op.startswith("TreeEnsemble")) == 1
    assert len(model.graph.node) <= 6
    assert {o.domain: o.version for o in model.opset_import} == {"": 17, "ai.onnx.ml": 3}
    (tree_node,) = [n for n in model.graph.node if n.op_type == "TreeEnsembleRegressor"]
    tree_ids = {a.name: a for a in tree_node.attribute}["nodes_treeids"].ints
    assert len(set(tree_ids)) == 100

    (inp,) = model.graph.input
    assert inp.name == "features"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 8]
    (out,) = model.graph.output
    assert out.name == "anomaly_score"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N"]


def test_output_shape_dtype_and_orientation() -> None:
    forest = fitted("default-100")
    sess = exported("default-100")
    assert run(sess, np.zeros((0, N_FEATURES), dtype=np.float32)).shape == (0,)
    one = run(sess, make_data(0, 1))
    assert one.shape == (1,) and one.dtype == np.float32

    typical = np.median(make_data(0, 1200), axis=0, keepdims=True)
    extreme = np.full((1, N_FEATURES), 1e30, dtype=np.float32)
    scores = run(sess, np.concatenate([typical, extreme]))
    assert 0.0 < scores[0] < scores[1] <= 1.0  # higher = more anomalous

    # predict() flags an outlier exactly when anomaly_score > -offset_ (away from the boundary).
    X = make_data(99, 3000)
    got = run(sess, X).astype(np.float64)
    clear = np.abs(got + forest.offset_) > TOLERANCE
    assert np.array_equal((got > -forest.offset_)[clear], (forest.predict(X) == -1)[clear])


def test_degenerate_forest_scores_one_half_like_sklearn() -> None:
    X = make_data(3, 500)
    assert np.all(anomaly_scores(fitted("degenerate-samples-1"), X) == 0.5)
    assert np.all(run(exported("degenerate-samples-1"), X) == np.float32(0.5))


def test_reference_is_negated_score_samples_as_float64() -> None:
    forest = fitted("features-half")
    X = make_data(5, 100)
    ref = anomaly_scores(forest, X)
    assert ref.dtype == np.float64 and ref.shape == (100,)
    assert np.array_equal(ref, -forest.score_samples(X))


def test_average_path_length_matches_sklearn() -> None:
    n = np.array([0, 1, 2, 3, 4, 5, 10, 100, 255, 256, 257, 4096, 10**6], dtype=np.float64)
    assert np.array_equal(forest_module._average_path_length(n), sklearn_average_path_length(n))


def test_rejects_wrong_feature_count_and_unfitted_forest() -> None:
    with pytest.raises(ModelError, match="fitted on 8 features, not 7"):
        forest_to_onnx(fitted("default-100"), 7)
    with pytest.raises(ModelError, match="not fitted"):
        forest_to_onnx(IsolationForest(), N_FEATURES)
