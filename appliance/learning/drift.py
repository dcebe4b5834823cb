"""Drift: how far recent traffic has moved from what the production model was trained on.

For each of the model's behavioural features, and for its risk score, the population stability
index between a reference and the recent window:

    PSI = sum over bins of (recent% - reference%) * ln(recent% / reference%)

with ten bins at the reference's deciles (ties merged; shares floored at 1e-4 so an empty bin
is finite). By the usual reading PSI < 0.1 is stable, 0.1-0.2 a shift worth watching, and above
``drift_psi_threshold`` (0.2) a WARNING ``drift.detected`` event is logged.

The reference is the model card's ``reference`` (written by ``retrain`` from its training rows);
a model without one (the shipped model) is compared against the stored days before the window
instead, which still shows change over time. Every run is stored in ``drift_reports``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import logs
from ..errors import BranchguardError
from ..scoring.features import FEATURES
from ..scoring.registry import Registry
from ..settings import Settings
from ..store import open_db, require_db
from .backtest import load_rows
from .evaluation import DAY

log = logs.get("appliance.drift")
BINS = 10
FLOOR = 1e-4


def reference_bins(values: npt.ArrayLike) -> dict[str, list[float]]:
    """Decile edges of ``values`` and the share of values in each bin."""
    v = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(v, np.linspace(0, 1, BINS + 1)[1:-1]))
    return {"edges": edges.tolist(), "shares": shares(v, edges).tolist()}


def shares(values: npt.NDArray[np.float64], edges: npt.ArrayLike) -> npt.NDArray[np.float64]:
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="right"),
                         minlength=len(np.asarray(edges)) + 1)
    return counts / max(len(values), 1)


def psi(reference: dict[str, list[float]], values: npt.ArrayLike) -> float:
    """Population stability index of ``values`` against a :func:`reference_bins` reference."""
    expected = np.maximum(np.asarray(reference["shares"], dtype=np.float64), FLOOR)
    actual = np.maximum(shares(np.asarray(values, dtype=np.float64), reference["edges"]), FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def reference_of(features: list[str], rows: npt.NDArray[np.float64],
                 risks: npt.NDArray[np.float64]) -> dict[str, Any]:
    """The card's ``reference``: bins of each behavioural feature and of the risk score."""
    return {"features": {name: reference_bins(rows[:, FEATURES.index(name)])
                         for name in features if name in FEATURES},
            "risk": reference_bins(risks), "rows": int(len(rows))}


@dataclass(frozen=True)
class DriftReport:
    model_version: str
    reference: str
    window: tuple[float, float]
    rows: int
    psi: dict[str, float]
    drifted: list[str]


def run_drift(settings: Settings, days: float = 1.0) -> DriftReport:
    """PSI of the last ``days`` of stored transactions against the production model's
    reference; stored in ``drift_reports``, WARNING above ``drift_psi_threshold``."""
    registry = Registry.of(settings)
    version = registry.production()
    card = registry.card(version)
    require_db(settings.db_path)
    every = load_rows(settings.db_path)
    if not len(every):
        raise BranchguardError("no stored transactions", field="rows", value=0)
    end = float(every.ts.max())
    start = end - days * DAY
    ts = every.ts
    recent = ts > start
    features = np.array(every.features, dtype=np.float64)
    reference: dict[str, Any] | None = card.get("reference")
    source = "model card (training rows)"
    if reference is None:
        earlier = ~recent
        if earlier.sum() < 100:
            raise BranchguardError("no reference to compare with", field="reference",
                                   hint="the model card has none and fewer than 100 stored "
                                        "transactions precede the window")
        reference = reference_of(list(card["features"]), features[earlier], every.risk[earlier])
        source = f"stored transactions before the window ({int(earlier.sum())})"
    values = {name: psi(bins, features[recent, FEATURES.index(name)])
              for name, bins in reference["features"].items()}
    values["risk"] = psi(reference["risk"], every.risk[recent])
    drifted = [name for name, value in values.items() if value > settings.drift_psi_threshold]
    report = DriftReport(version, source, (start, end), int(recent.sum()), values, drifted)
    db = open_db(settings.db_path)
    try:
        now = time.time()
        with db.atomic():
            db.conn.executemany(
                "INSERT INTO drift_reports (run_at, model_version, window_from, window_to, "
                "rows, name, psi, reference) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(now, version, start, end, report.rows, name, value, source)
                 for name, value in values.items()])
    finally:
        db.close()
    for name in drifted:
        log.warning("drift.detected", txn_id=None, model_version=version, name=name,
                    psi=round(values[name], 4), threshold=settings.drift_psi_threshold)
    log.info("drift.checked", txn_id=None, model_version=version, rows=report.rows,
             drifted=len(drifted), max_psi=round(max(values.values()), 4))
    return report
