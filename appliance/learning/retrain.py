"""``branchguard retrain``: a candidate model from the stored window, compared with production
on the same held-back labelled period, promoted only when it is clearly better.

1. The window: stored transactions of the last ``retrain_window_days`` (by event time), with the
   features the scorer stored for them. Labels: those of the ``labels`` table already known
   (``known_at``) at the newest stored transaction's time, so a replay of the past never
   trains on labels that arrived after it.
2. The held-back period: the last ``holdout_days`` of labelled transactions. Nothing in it is
   used for fitting or calibration.
3. The candidate, fitted on the window outside that period:
   - unsupervised (default): an Isolation Forest on ``if_features`` over every stored row of
     the window outside the held-back period; labels are not used for fitting. Without
     ``if_features`` its features are chosen by validation.choose_forest_features: a
     time-ordered split of the labelled rows before the held-back period, with only the
     labels known by the window's end (when too few are known: the production forest's
     features, or train.MODEL_FEATURES);
   - ``supervised``: the challenger of challenger.py (the mean of two LightGBM models, on
     FEATURES, the label features whose window is longer than the labels' delay and that
     forest's score, and on the same without the label features) on the labelled
     transactions before the held-back period, each model's hyperparameters chosen on a
     time-ordered split of those rows (its last 30 % of time validates).
     Every fit, validation and training row's label features are as served
     (validation.as_served): each label counts from its own ``known_at``, never earlier, so
     the validation fold sees label features with the delays serving will see.
     ``training_label_delay_days`` can only make labels later (never younger than they
     arrived); the held-back period and live scoring always use the real ``known_at``. What
     serves, the full model, the behaviour model or their mean, is chosen on the same
     validation fold (challenger.choose_combination).
4. Candidate and production are both scored on the held-back period by backtest.py (the same
   features, rules and thresholds as the live scorer), and the candidate is promoted when and
   only when its F1 at the operating threshold (an alert = a verdict other than approve) is at
   least ``promotion_min_f1_gain`` higher than production's (relative; and above 0), and its
   alerts per day stay within ``alert_budget_per_day``. Otherwise it stays ``candidate``, with
   the reason in its card.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from sklearn.ensemble import IsolationForest

from .. import __version__, logs
from ..errors import ModelError
from ..scoring.features import FEATURES
from ..scoring.forest import OUTPUT_NAME as FOREST_OUTPUT, anomaly_scores, forest_to_onnx
from ..scoring.labels import LABEL_FEATURES, LABEL_WINDOWS, LabelState
from ..scoring.model import INDEX, Model, ModelCard, file_sha256
from ..scoring.registry import Registry
from ..settings import Settings
from ..store import require_db
from .backtest import (StoredRows, backtest, label_delays, label_events, label_state, load_rows,
                       model_rows, truth)
from .challenger import (FIXED, OUTPUT_NAME as CHALLENGER_OUTPUT, Challenger,
                         challenger_to_onnx, stacked_input)
from .drift import reference_of
from .evaluation import DAY, Scored, point_metrics
from .promotion import on_node, promote
from .train import CALIBRATION_QUANTILES, MODEL_FEATURES, calibration
from .validation import as_served, choose_forest_features, time_split

log = logs.get("appliance.retrain")


def challenger_label_features(delay_seconds: float) -> tuple[str, ...]:
    """The label features the challenger reads: those whose window is longer than the labels'
    delay (the median of known_at minus the transaction's time, over the labels known by the
    window's end). With labels a week late, a window of a week or less holds, when serving,
    only labels much older than the re-timed ones it was fitted on, or none; a model that
    learnt from them would lean on what is not there. Chosen from what is known at training
    time, never from the judged period."""
    return tuple(f for f in LABEL_FEATURES for name, seconds in LABEL_WINDOWS
                 if f.endswith(f"_{name}") and seconds > delay_seconds)
MIN_LABELLED = 200


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class RetrainResult:
    version: str
    production: str
    """The production model it was compared with."""
    decision: Decision
    candidate: dict[str, Any]
    """Candidate's metrics on the held-back period."""
    incumbent: dict[str, Any]
    """Production's metrics on the same period."""
    card: dict[str, Any]


NO_LABELS_YET = ("; no label was known yet during the held-back period, so the challenger's "
                 "label features were empty there and it was judged on behaviour alone "
                 "(retrain once labels known before the period's end exist)")
"""Appended to a supervised decision's reason when the held-back period's label features
were all empty: the labels of a new node's first weeks arrive after the days held back."""


def decide(candidate_f1: float, production_f1: float, candidate_alerts_per_day: float,
           settings: Settings) -> Decision:
    """The promotion rule (see the module docstring)."""
    need = production_f1 * (1.0 + settings.promotion_min_f1_gain)
    if candidate_alerts_per_day > settings.alert_budget_per_day:
        return Decision(False, f"alert volume {candidate_alerts_per_day:.1f}/day is over the "
                               f"budget of {settings.alert_budget_per_day:g}/day")
    if candidate_f1 <= production_f1 or candidate_f1 < need:
        return Decision(False, f"F1 {candidate_f1:.4f} is not {settings.promotion_min_f1_gain:.0%}"
                               f" above production's {production_f1:.4f} (needs {need:.4f})")
    return Decision(True, f"F1 {candidate_f1:.4f} >= {need:.4f} (production {production_f1:.4f}"
                          f" + {settings.promotion_min_f1_gain:.0%}); alerts "
                          f"{candidate_alerts_per_day:.1f}/day within "
                          f"{settings.alert_budget_per_day:g}/day")


def _version(registry: Registry, prefix: str) -> str:
    base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    version, n = base, 1
    while version in registry.versions():
        n += 1
        version = f"{base}-{n}"
    return version


def retrain(settings: Settings, *, supervised: bool = False, holdout_days: float = 2.0,
            if_features: Sequence[str] | None = None, version: str | None = None,
            training_label_delay_days: float | None = None, seed: int = 7,
            gbm_params: dict[str, Any] | None = None, allow_promotion: bool = True
            ) -> RetrainResult:
    """Train, compare and (maybe) promote; see the module docstring. Returns the decision.
    ``gbm_params`` fixes the challenger's LightGBM configuration instead of tuning it."""
    started = time.monotonic()
    registry = Registry.of(settings)
    production_version = registry.production()
    production = registry.load(production_version)
    db = settings.db_path
    require_db(db)
    every = load_rows(db)
    if not len(every):
        raise ModelError("no stored transactions to train on", field="rows", value=0)
    all_ts = every.ts
    since = float(all_ts.max()) - settings.retrain_window_days * DAY
    rows = load_rows(db, since=since)
    ts = rows.ts
    as_of = float(all_ts.max())  # what was known when the newest stored transaction happened
    known = truth(db, as_of)
    labelled = np.array([tx.transaction_id in known for tx in rows.txs], dtype=bool)
    if labelled.sum() < MIN_LABELLED:
        raise ModelError("not enough labelled transactions in the window to compare models",
                         field="labels", value=int(labelled.sum()),
                         hint=f"import at least {MIN_LABELLED} labels "
                              "('branchguard labels import')")
    y = np.array([known.get(tx.transaction_id, False) for tx in rows.txs], dtype=bool)
    cut = float(ts[labelled].max()) - holdout_days * DAY
    held = labelled & (ts > cut)
    fit_rows = ts <= cut
    if held.sum() == 0 or not y[held].any() or fit_rows.sum() < 1000:
        raise ModelError("the held-back period needs labelled frauds and 1000 earlier rows",
                         field="holdout_days", value=holdout_days,
                         hint="import more labels or change --holdout-days")

    behaviour = np.array(rows.features, dtype=np.float64)
    if if_features is None:
        fallback = (production.card.features
                    if production.card.raw.get("output", {}).get("name") == FOREST_OUTPUT
                    and not production.uses_labels else MODEL_FEATURES)
        before_held = labelled & fit_rows
        choice = choose_forest_features(
            behaviour, FEATURES, ts, {int(i): bool(y[i]) for i in np.flatnonzero(before_held)},
            float(ts[before_held].max()), fallback, seed=seed)
        if_features = choice.features
        forest_choice = choice.describe()
    else:
        forest_choice = {"features": list(if_features), "chosen_by": "given (--features)"}
    unknown = [f for f in if_features if f not in FEATURES]
    if unknown:
        raise ModelError("unknown forest features", field="if_features", value=unknown,
                         hint="name features of features.FEATURES")
    if_cols = [FEATURES.index(f) for f in if_features]
    x_if = behaviour[:, if_cols].astype(np.float32)
    # The forest never sees labels: it may learn from every row outside the held-back period.
    unheld = ~held
    forest = IsolationForest(n_estimators=200, max_samples=min(2048, int(unheld.sum())),
                             random_state=seed).fit(x_if[unheld])
    labels_now = label_state(db, as_of)
    name = version or _version(registry, "gbm" if supervised else "if")
    training: dict[str, Any] = {
        "source": f"node database {db.name}: stored window of {settings.retrain_window_days:g} "
                  "days", "holdout_days": holdout_days,
        "window": {"from": rows.txs[0].timestamp.isoformat(),
                   "to": rows.txs[-1].timestamp.isoformat()},
        "holdout": {"from": datetime.fromtimestamp(cut, timezone.utc).isoformat(),
                    "from_ts": cut,
                    "rows": int(held.sum()), "frauds": int(y[held].sum())},
    }
    if supervised:
        train_mask = labelled & fit_rows
        if y[train_mask].sum() < 10 or (~y[train_mask]).sum() < 10:
            raise ModelError("the supervised challenger needs labels of both kinds",
                             field="labels", value=int(train_mask.sum()),
                             hint="import labels of genuine transactions as well as frauds")
        # As served: each label counts from its own known_at (or later), in the fit fold, the
        # validation fold and the final fit alike; only labels known by the window's end.
        train_labels = as_served(label_events(db, as_of), as_of,
                                 None if training_label_delay_days is None
                                 else training_label_delay_days * DAY)
        idx = np.flatnonzero(train_mask)
        delay = float(np.median(label_delays(db, as_of)))
        label_features = challenger_label_features(delay)
        features: list[str] = [*FEATURES, *label_features]
        picked = [INDEX[f] for f in features]
        x_all = model_rows(rows, train_labels, True)[idx][:, picked].astype(np.float32)
        stacked = stacked_input(x_all, forest, if_cols)
        x_label = x_all[:, len(FEATURES):]
        # The split is of the training rows (positions in x_all), all at or before the cut.
        split = time_split(ts[idx], np.arange(idx.size), cut)
        pair = Challenger.fit(stacked, y[idx], len(FEATURES), split, seed=seed,
                              params=gbm_params)
        if not pair.uses_label_features:  # the behaviour model alone serves: no label input
            features = list(FEATURES)
            x_all = x_all[:, :len(FEATURES)]
        proto = challenger_to_onnx(pair, forest, len(features), if_cols)
        reference = pair.predict(stacked)
        fit_scores = reference
        fingerprint_of = x_all
        training.update(rows=int(len(idx)), frauds=int(y[idx].sum()),
                        labels_used_for_fitting=True,
                        training_label_delay_days=training_label_delay_days)
        served = pair.combination.chosen
        algorithm = {
            "mean": "mean of two lightgbm.LGBMClassifier (onnxmltools), on FEATURES + label "
                    "features + IsolationForest score and on FEATURES + IsolationForest score, "
                    "one ONNX graph",
            "full": "lightgbm.LGBMClassifier (onnxmltools) on FEATURES + label features + "
                    "IsolationForest score, one ONNX graph",
            "behaviour": "lightgbm.LGBMClassifier (onnxmltools) on FEATURES + IsolationForest "
                         "score, one ONNX graph"}[served]
        full_p = "full.predict_proba(x + [if_score])[:, 1]"
        behaviour_p = "behaviour.predict_proba(x[FEATURES] + [if_score])[:, 1]"
        output = {"name": CHALLENGER_OUTPUT, "range": "[0, 1]", "direction": "higher is riskier",
                  "definition": {"mean": f"({full_p} + {behaviour_p}) / 2", "full": full_p,
                                 "behaviour": behaviour_p}[served]}
        hyper: dict[str, Any] = {
            "served": served,
            "full": pair.tuning["full"].params if pair.full is not None else None,
            "behaviour": pair.tuning["behaviour"].params if pair.behaviour is not None else None,
            "fixed": FIXED, "random_state": seed, "if_features": list(if_features)}
        validation: dict[str, Any] = {
            "split": {**split.describe(),
                      "validation_start": datetime.fromtimestamp(
                          split.validation_start, timezone.utc).isoformat(),
                      "window_end": datetime.fromtimestamp(cut, timezone.utc).isoformat()},
            "metric": "average precision on the validation fold",
            "full": pair.tuning["full"].describe(),
            "behaviour": pair.tuning["behaviour"].describe(),
            "combination": pair.combination.describe(),
            "label_timing": {
                "rule": "as served: in the fit fold, the validation fold and the final fit, "
                        "each label counts from its own known_at, never earlier (a re-timing "
                        "may only make it later); only labels known by the window's end",
                "training_label_delay_days": training_label_delay_days,
                "rows_with_any_label_feature": {
                    "fit": int(np.any(x_label[split.fit] != 0, axis=1).sum()),
                    "validation": int(np.any(x_label[split.validation] != 0, axis=1).sum())}},
            "label_features": {"chosen": list(label_features),
                               "rule": "windows longer than the labels' median delay",
                               "median_label_delay_seconds": round(delay, 1)},
            "forest_features": forest_choice}
        check_rows = x_all
    else:
        proto = forest_to_onnx(forest, len(if_cols))
        fit_scores = anomaly_scores(forest, x_if[unheld])
        features = list(if_features)
        reference = anomaly_scores(forest, x_if)
        fingerprint_of = x_if[unheld]
        training.update(rows=int(unheld.sum()), labels_used_for_fitting=False)
        algorithm = ("sklearn.ensemble.IsolationForest exported as one ONNX "
                     "TreeEnsembleRegressor")
        output = {"name": FOREST_OUTPUT, "range": "(0, 1]",
                  "direction": "higher is more anomalous",
                  "definition": "-IsolationForest.score_samples(x)"}
        hyper = {"n_estimators": 200, "max_samples": int(forest.max_samples_),
                 "random_state": seed}
        validation = {"forest_features": forest_choice}
        check_rows = x_if
    training["data_fingerprint"] = hashlib.sha256(
        np.ascontiguousarray(fingerprint_of).tobytes()).hexdigest()

    cal_x, cal_y = calibration(fit_scores)
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
        onnx_path = Path(tmp) / f"{name}.onnx"
        onnx.save(proto, str(onnx_path))
        card: dict[str, Any] = {
            "version": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stage": "candidate", "parent_version": production_version,
            "producer": f"branchguard {__version__}", "sha256": file_sha256(onnx_path),
            "algorithm": algorithm, "hyperparameters": hyper, "features": features,
            "input": {"name": "features", "dtype": "float32", "shape": ["N", len(features)]},
            "output": output,
            "validation": validation,
            "calibration": {"method": "piecewise linear through training-score quantiles"
                                      + (" (in-sample)" if supervised else ""),
                            "quantiles": list(CALIBRATION_QUANTILES), "anomaly_score": cal_x,
                            "risk": cal_y},
            "training": training,
        }
        candidate = Model(onnx_path, ModelCard.from_json(card))
        parity = float(np.max(np.abs(candidate.session.run(
            None, {"features": check_rows[:5000]})[0] - reference[:5000])))
        held_rows = np.flatnonzero(held)
        period = StoredRows([rows.txs[i] for i in held_rows],
                            [rows.features[i] for i in held_rows],
                            rows.risk[held_rows], rows.alert[held_rows],
                            [rows.model_version[i] for i in held_rows])
        result: dict[str, dict[str, Any]] = {}
        for role, model in (("candidate", candidate), ("production", production)):
            risk, alert = backtest(period, model, labels_now, settings)
            result[role] = point_metrics(
                Scored.of(period.ts, [tx.account_id for tx in period.txs], risk, alert,
                          y[held_rows]), k=100, budget=int(settings.alert_budget_per_day))
        decision = decide(result["candidate"]["f1"], result["production"]["f1"],
                          result["candidate"]["alerts_per_day"], settings)
        if supervised and not truth(db, float(ts[held].max())):
            decision = Decision(decision.promote, decision.reason + NO_LABELS_YET)
        if not allow_promotion and decision.promote:
            decision = Decision(False, decision.reason + "; promotion not allowed (--no-promote)")
        card["metrics"] = {**result["candidate"],
                           "onnx_vs_sklearn_max_abs_diff": parity,
                           "evaluated_on": "held-back labelled period (see training.holdout)",
                           "production_on_same_period": {"version": production_version,
                                                         **result["production"]},
                           "training_seconds": round(time.monotonic() - started, 2)}
        fit_risk = candidate.calibrate(fit_scores)
        basis = behaviour[np.flatnonzero(labelled & fit_rows)] if supervised else \
            behaviour[unheld]
        card["reference"] = reference_of([f for f in features if f in FEATURES], basis,
                                         fit_risk)
        card["promotion"] = {"promoted": decision.promote, "reason": decision.reason,
                             "rule": f"F1 >= production F1 x {1 + settings.promotion_min_f1_gain:g}"
                                     f" and alerts/day <= {settings.alert_budget_per_day:g}"}
        registry.register(onnx_path, card)
    if decision.promote:  # audited like the console's and the command line's promotions
        on_node(settings, lambda conn, registry: promote(conn, registry, name, "retrain",
                                                         decision.reason))
    log.info("model.retrained", txn_id=None, version=name, supervised=supervised,
             promoted=decision.promote, reason=decision.reason,
             candidate_f1=result["candidate"]["f1"], production_f1=result["production"]["f1"])
    return RetrainResult(name, production_version, decision, result["candidate"],
                         result["production"], card)


def summary(result: RetrainResult) -> str:
    """The decision and the two models' held-back metrics as JSON text."""
    return json.dumps({"version": result.version, "compared_with": result.production,
                       "promoted": result.decision.promote, "reason": result.decision.reason,
                       "candidate": result.candidate, "production": result.incumbent},
                      indent=2)
