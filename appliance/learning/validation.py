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
only choose which columns it reads. Its folds roll forward (:func:`rolling_splits`): several
consecutive validation slices, each after every row its forest is fitted on, so one short
slice's own mix of frauds does not decide alone.

:func:`as_served` is the rule for label features in every fold and in the final fit: a label
counts from its own ``known_at``, never earlier, so a validation row sees the labels a served
transaction at that moment would have seen, with the delays this node's labels really have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ModelError
from ..scoring.labels import LabelState

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
FOREST_FOLDS = 3
"""Consecutive validation slices of the forest's selection (rolling origin)."""
FOREST_VALIDATION_SHARE = 0.6
"""The later share of the labelled rows' time span that the forest's folds cover, together;
each fold is an equal slice of it (on the handbook protocol: three folds of a day each, where
one fold of 30 % was a day and a half)."""
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


def _window(ts: npt.NDArray[np.float64], rows: npt.NDArray[np.intp], end: float
            ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """``rows`` and their times, refused when empty or when a row is after ``end``: a split
    that read past the window would choose with what the window cannot know."""
    rows = np.asarray(rows, dtype=np.intp)
    if not rows.size:
        raise ModelError("nothing to split", field="rows", value=0)
    times = ts[rows]
    if float(times.max()) > end:
        raise ModelError("a validation split was given rows after its window's end",
                         field="end", value=end, hint="pass only the training window's rows")
    return rows, times


def time_split(ts: npt.NDArray[np.float64], rows: npt.NDArray[np.intp], end: float,
               share: float = VALIDATION_SHARE) -> TimeSplit:
    """Split ``rows`` (indices into ``ts``, epoch seconds) of a window that ends at ``end``:
    validation = rows at or after ``start + (1 - share) * (end - start)``, fit = the rest.
    Raises :class:`ModelError` if a row is after ``end``: a split that read past the window
    would choose with what the window cannot know."""
    rows, times = _window(ts, rows, end)
    start = float(times.min())
    cut = start + (1.0 - share) * (end - start)
    return TimeSplit(rows[times < cut], rows[times >= cut], cut, end)


def rolling_splits(ts: npt.NDArray[np.float64], rows: npt.NDArray[np.intp], end: float,
                   folds: int = FOREST_FOLDS, share: float = FOREST_VALIDATION_SHARE
                   ) -> list[TimeSplit]:
    """Rolling-origin folds of ``rows`` (window ending at ``end``): the later ``share`` of their
    time span cut into ``folds`` equal consecutive slices; fold k validates on slice k and fits
    on every row of ``rows`` before it (the origin rolls forward). Refuses rows after ``end``
    like :func:`time_split`."""
    rows, times = _window(ts, rows, end)
    start = float(times.min())
    edges = [start + (1.0 - share + share * k / folds) * (end - start) for k in range(folds + 1)]
    out = []
    for k in range(folds):
        lo, hi = edges[k], edges[k + 1]
        inside = (times >= lo) & ((times < hi) if k < folds - 1 else (times <= end))
        out.append(TimeSplit(rows[times < lo], rows[inside], lo, hi if k < folds - 1 else end))
    return out


def as_served(labels: Iterable[tuple[str, str, float, float, int]], end: float,
              retime_seconds: float | None = None) -> LabelState:
    """The label state that fit and validation rows read their label features from, as a
    served transaction would have: ``labels`` are (account, terminal, transaction time,
    known_at, label), and each counts from its own ``known_at`` (lookups at time t see those
    known by t, labels.py), never earlier. ``retime_seconds`` can only make a label later
    (``max(known_at, time + retime)``): a re-timing that made labels younger than they arrive
    would teach the model, and show its validation, label features it never gets when serving.
    A label known after ``end`` (the window's end) is refused: the window cannot know it."""
    state = LabelState()
    for account, terminal, t, known_at, label in labels:
        if known_at > end:
            raise ModelError("a label known after the window's end was given to a fit or "
                             "validation fold", field="known_at", value=known_at,
                             hint="pass only the labels known by the window's end")
        known = known_at if retime_seconds is None else max(known_at, t + retime_seconds)
        state.add(account, terminal, known, label)
    return state


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
                           fallback: Sequence[str], *, seed: int = 7,
                           folds: int = FOREST_FOLDS) -> FeatureChoice:
    """The Isolation Forest's features, by greedy forward selection on rolling-origin folds.

    ``x``: the window's behavioural features (columns ``names``), one row per stored
    transaction, ``ts`` their times; ``known``: row -> fraud, the labels known by the window's
    end ``end``. The labelled rows' folds are :func:`rolling_splits`; for each fold and each
    candidate set a forest is fitted on every row before the fold (labelled or not, never
    after ``end``; the forest never sees a label) and scores the fold's labelled rows. A set's
    score is the mean of its folds' average precision; the feature whose addition gives the
    highest joins while it gains at least :data:`MIN_GAIN`. Folds with fewer than
    :data:`MIN_VALIDATION_FRAUDS` known frauds are left out; with none left, ``fallback`` is
    kept and the reason recorded."""
    from sklearn.ensemble import IsolationForest

    labelled = np.array(sorted(known), dtype=np.intp)
    if not labelled.size:
        return FeatureChoice(list(fallback), "no label known by the window's end: kept "
                                             "the production forest's features")
    splits = rolling_splits(ts, labelled, end, folds)
    described = {"method": f"rolling origin: the last {FOREST_VALIDATION_SHARE:.0%} of the "
                           f"labelled rows' time span in {folds} consecutive folds; each "
                           "fold's forest fitted on every window row before it; score = mean "
                           "of the folds' average precision",
                 "window_end": end}
    fold_records: list[dict[str, Any]] = []
    usable: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32],
                       npt.NDArray[np.bool_]]] = []
    for split in splits:
        y_val = np.array([known[int(i)] for i in split.validation], dtype=bool)
        fit_rows = np.flatnonzero((ts < split.validation_start) & (ts <= end))
        fold = {**split.describe(), "method": "rolling-origin fold",
                "validation_frauds": int(y_val.sum()), "forest_fit_rows": int(fit_rows.size)}
        if (y_val.sum() < MIN_VALIDATION_FRAUDS or y_val.all()
                or fit_rows.size < SELECTION_SAMPLES):
            fold["used"] = False
        else:
            fold["used"] = True
            if fit_rows.size > SELECTION_FIT_ROWS:
                fit_rows = fit_rows[np.linspace(0, fit_rows.size - 1,
                                                SELECTION_FIT_ROWS).astype(np.intp)]
            usable.append((x[fit_rows].astype(np.float32),
                           x[split.validation].astype(np.float32), y_val))
        fold_records.append(fold)
    described["folds"] = fold_records
    if not usable:
        return FeatureChoice(list(fallback), "too few known frauds (or earlier rows) in every "
                                             "validation fold: kept the production forest's "
                                             "features", split=described)

    def score(columns: list[int]) -> float:
        aps = []
        for x_fit, x_val, y_val in usable:
            forest = IsolationForest(n_estimators=SELECTION_TREES,
                                     max_samples=SELECTION_SAMPLES,
                                     random_state=seed).fit(x_fit[:, columns])
            aps.append(_ap(y_val, -forest.score_samples(x_val[:, columns])))
        return float(np.mean(aps))

    chosen: list[int] = []
    best = float(np.mean([y.mean() for _, _, y in usable]))  # forests that rank at random
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
                                             "validation folds: kept the production forest's "
                                             "features", steps, described)
    return FeatureChoice([names[j] for j in chosen],
                         "greedy forward selection by the mean average precision of "
                         f"{len(usable)} rolling-origin validation folds (labels known by the "
                         "window's end)", steps, described)
