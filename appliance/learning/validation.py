"""Time-ordered validation inside a training window: how every choice a retrain makes is made.

A model is judged on days after its training window. Any choice (features, hyperparameters,
the number of boosting rounds) made by looking at those days would flatter it, so every choice
is made here instead, on the training window alone, the way it will be used: fitted on the
window's earlier part, validated on its later part (:func:`time_split`), with only the labels
known by the window's end. Nothing after ``end`` is ever read: :func:`time_split` refuses rows
past it, and tests/test_validation.py checks the split on every row.

:func:`choose_forest_features` is the before-labels Isolation Forest's choice: a greedy forward
selection of its features by the average precision of its anomaly score on the validation
fold's labelled rows. The forest itself still never sees a label; the labels already known
only choose which columns it reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ModelError

VALIDATION_SHARE = 0.3
"""The later share of the window's time span that validates (the earlier part fits)."""
MIN_VALIDATION_FRAUDS = 5
"""Fewer known frauds than this in either fold and a validation would measure noise: the
caller keeps its defaults and says so in the card."""
SELECTION_TREES = 100
"""Trees of each forest fitted while choosing features (the final forest has more)."""
SELECTION_SAMPLES = 256
"""Rows each of those trees draws (the Isolation Forest paper's default)."""
SELECTION_FIT_ROWS = 50_000
"""At most this many fit-fold rows (evenly spaced in time) per forest fitted while choosing."""
MAX_FOREST_FEATURES = 4
"""The most features the greedy selection gives the forest."""
MIN_GAIN = 0.005
"""A feature joins only if it raises the validation average precision by at least this."""


@dataclass(frozen=True)
class TimeSplit:
    """Row indices of the two folds of a window, both before ``end``; every fit row is earlier
    than ``validation_start`` and every validation row at or after it."""

    fit: npt.NDArray[np.intp]
    validation: npt.NDArray[np.intp]
    validation_start: float
    end: float

    def describe(self) -> dict[str, Any]:
        """The split as a model card records it (epoch seconds and row counts)."""
        return {"method": f"time-ordered: the last {VALIDATION_SHARE:.0%} of the window's "
                          "time span validates, the earlier part fits",
                "validation_start": self.validation_start, "window_end": self.end,
                "fit_rows": int(self.fit.size), "validation_rows": int(self.validation.size)}


def time_split(ts: npt.NDArray[np.float64], rows: npt.NDArray[np.intp], end: float,
               share: float = VALIDATION_SHARE) -> TimeSplit:
    """Split ``rows`` (indices into ``ts``, epoch seconds) of a window that ends at ``end``:
    validation = rows at or after ``start + (1 - share) * (end - start)``, fit = the rest.
    Raises :class:`ModelError` if a row is after ``end``: a split that read past the window
    would choose with what the window cannot know."""
    rows = np.asarray(rows, dtype=np.intp)
    if not rows.size:
        raise ModelError("nothing to split", field="rows", value=0)
    times = ts[rows]
    if float(times.max()) > end:
        raise ModelError("a validation split was given rows after its window's end",
                         field="end", value=end, hint="pass only the training window's rows")
    start = float(times.min())
    cut = start + (1.0 - share) * (end - start)
    return TimeSplit(rows[times < cut], rows[times >= cut], cut, end)


@dataclass
class FeatureChoice:
    """What :func:`choose_forest_features` chose and what it measured on the way."""

    features: list[str]
    chosen_by: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"features": self.features, "chosen_by": self.chosen_by, "steps": self.steps,
                "split": self.split}


def _ap(y: npt.NDArray[np.bool_], score: npt.NDArray[np.float64]) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, score))


def choose_forest_features(x: npt.NDArray[np.float64], names: Sequence[str],
                           ts: npt.NDArray[np.float64], known: dict[int, bool], end: float,
                           fallback: Sequence[str], *, seed: int = 7) -> FeatureChoice:
    """The Isolation Forest's features, by greedy forward selection on a time-ordered split.

    ``x``: the window's behavioural features (columns ``names``), one row per stored
    transaction, ``ts`` their times; ``known``: row -> fraud, the labels known by the window's
    end ``end``. Each step fits a forest on the fit fold (every row before the validation
    start, labelled or not; the forest never sees a label) for each candidate set and scores
    the validation fold's labelled rows; the feature whose addition gives the highest average
    precision joins while it gains at least :data:`MIN_GAIN`. With too few known frauds in
    the validation fold, ``fallback`` is kept and the reason recorded."""
    from sklearn.ensemble import IsolationForest

    labelled = np.array(sorted(known), dtype=np.intp)
    if not labelled.size:
        return FeatureChoice(list(fallback), "no label known by the window's end: kept "
                                             "the production forest's features")
    split = time_split(ts, labelled, end)
    y_val = np.array([known[int(i)] for i in split.validation], dtype=bool)
    if y_val.sum() < MIN_VALIDATION_FRAUDS or y_val.all():
        return FeatureChoice(list(fallback), f"{int(y_val.sum())} known frauds in the "
                                             "validation fold: kept the production forest's "
                                             "features", split=split.describe())
    fit_rows = np.flatnonzero(ts < split.validation_start)
    if fit_rows.size < SELECTION_SAMPLES:
        return FeatureChoice(list(fallback), "too few rows before the validation fold: kept "
                                             "the production forest's features",
                             split=split.describe())
    if fit_rows.size > SELECTION_FIT_ROWS:
        fit_rows = fit_rows[np.linspace(0, fit_rows.size - 1, SELECTION_FIT_ROWS).astype(np.intp)]
    x_fit = x[fit_rows].astype(np.float32)
    x_val = x[split.validation].astype(np.float32)

    def score(columns: list[int]) -> float:
        forest = IsolationForest(n_estimators=SELECTION_TREES, max_samples=SELECTION_SAMPLES,
                                 random_state=seed).fit(x_fit[:, columns])
        return _ap(y_val, -forest.score_samples(x_val[:, columns]))

    chosen: list[int] = []
    best = float(y_val.mean())  # a forest that ranks at random
    steps: list[dict[str, Any]] = []
    while len(chosen) < MAX_FOREST_FEATURES:
        trials = {j: score([*chosen, j]) for j in range(len(names)) if j not in chosen}
        j, ap = max(trials.items(), key=lambda kv: (kv[1], -kv[0]))
        if ap < best + MIN_GAIN:
            steps.append({"stopped": f"best addition {names[j]} gave {ap:.4f}, not "
                                     f"{MIN_GAIN} above {best:.4f}"})
            break
        chosen.append(j)
        best = ap
        steps.append({"added": names[j], "validation_average_precision": round(ap, 4),
                      "runner_up": sorted(((round(v, 4), names[k]) for k, v in trials.items()
                                           if k != j), reverse=True)[:3]})
    if not chosen:
        return FeatureChoice(list(fallback), "no feature set beat random ranking on the "
                                             "validation fold: kept the production forest's "
                                             "features", steps, split.describe())
    return FeatureChoice([names[j] for j in chosen],
                         "greedy forward selection by the validation fold's average "
                         "precision (labels known by the window's end)", steps,
                         split.describe())
