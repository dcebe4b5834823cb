"""The served model: training writes a model and its card; loading checks the card; risks are
calibrated into [0, 1] and never fall as the anomaly score rises."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.errors import ModelError
from appliance.feed.simulate import Labelled
from appliance.learning.train import (CALIBRATION_QUANTILES, MODEL_FEATURES, TrainResult,
                                      calibration, train)
from appliance.scoring.features import FEATURES, compute_all
from appliance.scoring.model import Model, ModelCard, feature_matrix, file_sha256
from appliance.settings import SHIPPED_MODELS_DIR, Settings
from tests.support import make_transactions

VERSION = "test-v1"
N = 3000


@pytest.fixture(scope="module")
def items() -> list[Labelled]:
    return make_transactions(N)


@pytest.fixture(scope="module")
def trained(items: list[Labelled], tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("models")
    return train(items, out, VERSION, source="tests.support.make_transactions(3000)",
                 n_estimators=20)


@pytest.fixture(scope="module")
def rows(items: list[Labelled]) -> np.ndarray:
    return feature_matrix(compute_all(i.tx for i in items))


@pytest.fixture(scope="module")
def model(trained: TrainResult) -> Model:
    return Model.load(trained.onnx_path.parent, VERSION)


def card_json(trained: TrainResult) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(trained.card_path.read_text())
    return data


@pytest.fixture
def copy_of(trained: TrainResult, tmp_path: Path) -> Path:
    """A private copy of the trained model's directory, safe to tamper with."""
    out = tmp_path / "models"
    out.mkdir()
    shutil.copy(trained.onnx_path, out)
    shutil.copy(trained.card_path, out)
    return out


# --- train ------------------------------------------------------------------------------------


def test_train_writes_onnx_and_card(trained: TrainResult) -> None:
    assert trained.onnx_path == trained.onnx_path.parent / f"{VERSION}.onnx"
    assert trained.card_path == trained.onnx_path.parent / f"{VERSION}.json"
    assert trained.onnx_path.stat().st_size > 0
    assert trained.card_path.stat().st_size > 0
    assert isinstance(trained.card, ModelCard)
    assert trained.card.version == VERSION


def test_card_contents(trained: TrainResult) -> None:
    card = card_json(trained)
    for key in ("version", "sha256", "features", "calibration", "training", "metrics"):
        assert key in card, key
    assert card["version"] == VERSION
    assert card["sha256"] == file_sha256(trained.onnx_path)
    assert card["sha256"] == hashlib.sha256(trained.onnx_path.read_bytes()).hexdigest()
    assert card["features"] == list(MODEL_FEATURES)
    assert card["input"]["shape"] == ["N", len(MODEL_FEATURES)]

    cal = card["calibration"]
    assert len(cal["anomaly_score"]) == len(cal["risk"])
    assert cal["quantiles"] == list(CALIBRATION_QUANTILES)

    training = card["training"]
    assert training["rows"] + training["holdout_rows"] == N
    assert training["rows"] == int(N * 0.8)
    assert training["labels_used_for_fitting"] is False
    assert training["source"] == "tests.support.make_transactions(3000)"
    assert training["window"]["from"] < training["window"]["to"]

    metrics = card["metrics"]
    assert metrics["onnx_vs_sklearn_max_abs_diff"] < 1e-5
    assert metrics["training_seconds"] >= 0
    assert card["hyperparameters"]["n_estimators"] == 20


def test_card_object_matches_file(trained: TrainResult) -> None:
    card = card_json(trained)
    assert trained.card.sha256 == card["sha256"]
    assert trained.card.features == tuple(card["features"])
    assert list(trained.card.calibration_scores) == card["calibration"]["anomaly_score"]
    assert list(trained.card.calibration_risks) == card["calibration"]["risk"]


def test_train_refuses_too_few_transactions(items: list[Labelled], tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        train(items[:999], tmp_path, "tiny", source="test", n_estimators=5)
    assert info.value.field == "rows"
    assert not (tmp_path / "tiny.onnx").exists()


# --- calibration ------------------------------------------------------------------------------


def test_calibration_points_strictly_increasing(trained: TrainResult) -> None:
    xs = np.array(trained.card.calibration_scores)
    ys = np.array(trained.card.calibration_risks)
    assert np.all(np.diff(xs) > 0)
    assert np.all(np.diff(ys) >= 0)
    assert ys[0] == 0.0
    assert 0.0 <= ys.min() and ys.max() <= 1.0


@pytest.mark.parametrize("scores", [
    np.full(500, 0.5),                                   # every quantile ties
    np.r_[np.full(999, 0.4), 0.9],                       # all but one tie
    np.linspace(0.3, 0.8, 10_000),
    np.r_[np.full(5000, 0.42), np.linspace(0.5, 1.0, 3)],  # ends at exactly 1.0
])
def test_calibration_function_points_strictly_increasing(scores: np.ndarray) -> None:
    xs, ys = calibration(scores)
    assert len(xs) == len(ys)
    assert all(b > a for a, b in zip(xs, xs[1:]))
    assert all(b >= a for a, b in zip(ys, ys[1:]))
    assert ys[0] == 0.0 and all(0.0 <= y <= 1.0 for y in ys)


def test_calibrate_hits_the_card_points(model: Model) -> None:
    xs = np.array(model.card.calibration_scores)
    assert np.allclose(model.calibrate(xs), model.card.calibration_risks)
    assert model.calibrate(np.array([xs[0] - 1.0]))[0] == model.card.calibration_risks[0]
    assert model.calibrate(np.array([xs[-1] + 1.0]))[0] == model.card.calibration_risks[-1]


def test_calibrate_is_monotone_over_a_sweep(model: Model) -> None:
    risks = model.calibrate(np.linspace(-1.0, 2.0, 3001))
    assert np.all(np.diff(risks) >= 0)
    assert risks.min() >= 0.0 and risks.max() <= 1.0


# --- load and score ---------------------------------------------------------------------------


def test_risks_in_unit_interval_and_monotone_in_anomaly_score(model: Model,
                                                               rows: np.ndarray) -> None:
    scores = model.anomaly_scores(rows)
    risks = model.risks(rows)
    assert scores.shape == risks.shape == (N,)
    assert np.all(np.isfinite(risks))
    assert risks.min() >= 0.0 and risks.max() <= 1.0
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(risks[order]) >= 0)
    # higher anomaly score never gives lower risk, pairwise on a sample
    s, r = scores[:300], risks[:300]
    assert not np.any((s[:, None] > s[None, :]) & (r[:, None] < r[None, :]))


def test_risks_of_extreme_rows_stay_in_unit_interval(model: Model) -> None:
    rng = np.random.default_rng(0)
    extreme = rng.standard_cauchy((200, len(FEATURES))) * 1e6
    risks = model.risks(extreme)
    assert risks.min() >= 0.0 and risks.max() <= 1.0


def test_model_reads_only_its_columns(model: Model, rows: np.ndarray) -> None:
    unused = [i for i, name in enumerate(FEATURES) if name not in MODEL_FEATURES]
    assert unused
    scrambled = rows.copy()
    scrambled[:, unused] = 12345.0
    assert np.array_equal(model.anomaly_scores(rows[:200]), model.anomaly_scores(scrambled[:200]))


def test_empty_batch(model: Model) -> None:
    assert model.risks(feature_matrix([])).shape == (0,)


# --- refusals ---------------------------------------------------------------------------------


def test_tampered_onnx_is_refused(copy_of: Path) -> None:
    path = copy_of / f"{VERSION}.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError) as info:
        Model.load(copy_of, VERSION)
    assert info.value.field == "sha256"


def test_tampered_sha_in_card_is_refused(copy_of: Path) -> None:
    path = copy_of / f"{VERSION}.json"
    card = json.loads(path.read_text())
    card["sha256"] = card["sha256"][:-1] + ("0" if card["sha256"][-1] != "0" else "1")
    path.write_text(json.dumps(card))
    with pytest.raises(ModelError) as info:
        Model.load(copy_of, VERSION)
    assert info.value.field == "sha256"


def test_unknown_feature_in_card_is_refused(copy_of: Path) -> None:
    path = copy_of / f"{VERSION}.json"
    card = json.loads(path.read_text())
    card["features"] = [*card["features"][:-1], "account_shoe_size"]
    path.write_text(json.dumps(card))
    with pytest.raises(ModelError) as info:
        Model.load(copy_of, VERSION)
    assert info.value.field == "features"
    assert info.value.value == ["account_shoe_size"]


def test_card_with_fewer_features_than_the_onnx_input_is_refused(copy_of: Path) -> None:
    """Every name is a known feature and the sha256 matches, but the card lists one column
    fewer than the ONNX graph takes: the model does not match its card and must be refused at
    load, not fail on the first batch it scores."""
    path = copy_of / f"{VERSION}.json"
    card = json.loads(path.read_text())
    card["features"] = card["features"][:-1]
    path.write_text(json.dumps(card))
    with pytest.raises(ModelError):
        model = Model.load(copy_of, VERSION)
        model.risks(np.zeros((2, len(FEATURES))))  # fails here with onnxruntime's own error


@pytest.mark.parametrize("drop", ["calibration", "sha256", "features", "version"])
def test_incomplete_card_is_refused(copy_of: Path, drop: str) -> None:
    path = copy_of / f"{VERSION}.json"
    card = json.loads(path.read_text())
    del card[drop]
    path.write_text(json.dumps(card))
    with pytest.raises(ModelError) as info:
        Model.load(copy_of, VERSION)
    assert info.value.field == "model_card"


def test_card_that_is_not_json_is_refused(copy_of: Path) -> None:
    (copy_of / f"{VERSION}.json").write_text("{not json")
    with pytest.raises(ModelError) as info:
        Model.load(copy_of, VERSION)
    assert info.value.field == "model_card"


@pytest.mark.parametrize("missing", ["onnx", "json"])
def test_missing_file_is_refused(copy_of: Path, missing: str) -> None:
    (copy_of / f"{VERSION}.{missing}").unlink()
    with pytest.raises(ModelError) as info:
        Model.load(copy_of, VERSION)
    assert info.value.field == "model_version"


def test_unknown_version_is_refused(trained: TrainResult) -> None:
    with pytest.raises(ModelError):
        Model.load(trained.onnx_path.parent, "no-such-version")


# --- the shipped model ------------------------------------------------------------------------


def test_shipped_model_loads(rows: np.ndarray) -> None:
    settings = Settings()
    shipped = Model.load(settings.models_dir, settings.model_version)
    assert settings.models_dir == SHIPPED_MODELS_DIR
    assert shipped.version == "if-v1"
    assert set(shipped.card.features) <= set(FEATURES)
    assert len(shipped.card.features) == len(set(shipped.card.features))
    risks = shipped.risks(rows[:500])
    assert risks.min() >= 0.0 and risks.max() <= 1.0
    xs = np.array(shipped.card.calibration_scores)
    assert np.all(np.diff(xs) > 0)
    assert np.all(np.diff(np.array(shipped.card.calibration_risks)) >= 0)


def test_shipped_card_is_complete() -> None:
    card = json.loads((SHIPPED_MODELS_DIR / "if-v1.json").read_text())
    for key in ("version", "sha256", "features", "calibration", "training", "metrics"):
        assert key in card, key
    assert card["sha256"] == file_sha256(SHIPPED_MODELS_DIR / "if-v1.onnx")
    assert all(name in FEATURES for name in card["features"])
