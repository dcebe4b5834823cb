"""The served model: an ONNX Runtime session plus its model card.

A model is two files in the models directory: ``<version>.onnx`` and ``<version>.json`` (the
card). The card names the features the model reads, in order (a subset of
:data:`INPUT_FEATURES`: ``features.FEATURES`` then ``labels.LABEL_FEATURES``), the sha256 of
the ONNX file (checked at load: a model that does not match its card is refused), and the calibration that maps the model's raw anomaly score (higher = more
anomalous) to a risk in [0, 1] by piecewise-linear interpolation.

Scoring is batched: one ``InferenceSession.run`` per fetched batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from ..errors import ModelError
from .features import FEATURES
from .labels import LABEL_FEATURES

INPUT_FEATURES: tuple[str, ...] = (*FEATURES, *LABEL_FEATURES)
"""Every column a model may read: the behavioural features, then the label features. A row
given to :meth:`Model.risks` holds FEATURES, followed by LABEL_FEATURES when
:attr:`Model.uses_labels`."""
INDEX = {name: i for i, name in enumerate(INPUT_FEATURES)}


@dataclass(frozen=True)
class ModelCard:
    version: str
    sha256: str
    features: tuple[str, ...]
    calibration_scores: tuple[float, ...]
    calibration_risks: tuple[float, ...]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        try:
            cal = data["calibration"]
            return cls(version=str(data["version"]), sha256=str(data["sha256"]),
                       features=tuple(data["features"]),
                       calibration_scores=tuple(float(x) for x in cal["anomaly_score"]),
                       calibration_risks=tuple(float(x) for x in cal["risk"]), raw=data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card is incomplete: {exc!r}", field="model_card") from exc


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Model:
    """Calibrated risk for a batch of feature rows."""

    def __init__(self, onnx_path: Path, card: ModelCard) -> None:
        unknown = [f for f in card.features if f not in INDEX]
        if unknown:
            raise ModelError("model card names features this node does not compute",
                             field="features", value=unknown,
                             hint="train a model with this version of branchguard")
        digest = file_sha256(onnx_path)
        if digest != card.sha256:
            raise ModelError("ONNX file does not match its model card", field="sha256",
                             value=digest, hint=f"expected {card.sha256}; re-export the model")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=["CPUExecutionProvider"])
        model_input = self.session.get_inputs()[0]
        width = model_input.shape[1] if len(model_input.shape) == 2 else None
        if width != len(card.features):
            raise ModelError("model card and ONNX file disagree on the number of features",
                             field="features", value=(len(card.features), width),
                             hint="the card must list exactly the model's input columns")
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.card = card
        self.onnx_path = onnx_path
        self.version = card.version
        self.columns = np.array([INDEX[f] for f in card.features], dtype=np.intp)
        self.uses_labels = bool(self.columns.size) and int(self.columns.max()) >= len(FEATURES)
        """Whether rows must carry the label features after FEATURES."""
        self._xp = np.array(card.calibration_scores, dtype=np.float64)
        self._fp = np.array(card.calibration_risks, dtype=np.float64)

    @classmethod
    def load(cls, models_dir: Path, version: str) -> Model:
        onnx_path = models_dir / f"{version}.onnx"
        card_path = models_dir / f"{version}.json"
        if not onnx_path.exists() or not card_path.exists():
            raise ModelError("model not found", field="model_version", value=version,
                             hint=f"expected {onnx_path} and {card_path}; run "
                                  "'branchguard train' or set models_dir")
        try:
            card = ModelCard.from_json(json.loads(card_path.read_text()))
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card is not JSON: {exc}", field="model_card",
                             value=str(card_path)) from exc
        return cls(onnx_path, card)

    def anomaly_scores(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        """Raw scores for rows of FEATURES (+ LABEL_FEATURES when :attr:`uses_labels`), shape
        [n, width]; higher = riskier."""
        x = np.ascontiguousarray(rows[:, self.columns], dtype=np.float32)
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def risks(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Calibrated risk in [0, 1] (higher = riskier) per row."""
        return self.calibrate(self.anomaly_scores(rows))

    def calibrate(self, scores: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
        return np.interp(scores.astype(np.float64), self._xp, self._fp)


def feature_matrix(rows: list[tuple[float, ...]]) -> npt.NDArray[np.float64]:
    """Stack feature tuples (FEATURES order, label features optionally appended) into an
    [n, width] array."""
    if not rows:
        return np.zeros((0, len(FEATURES)))
    return np.array(rows, dtype=np.float64)
