"""Scoring stored transactions again with any registered model, exactly as the scorer would have.

The behavioural features come from the stored row (they were computed live, from the history
before the transaction; a row stored under an older ``FEATURES_VERSION`` has them recomputed
from the stored history, since a current model reads features it lacks); the label features
are recomputed from the ``labels`` table as of the transaction's own time (a label known later
is never seen, see labels.py); the verdict comes from the same ``score.judge``. So a backtest
of the model that was in production reproduces the stored verdicts, and any other model is
judged on the very same transactions.

One ONNX call per chunk of rows, never per transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt
from sqlite_utils import Database

from .. import logs
from ..errors import BranchguardError
from ..scoring.features import FEATURES_VERSION, feature_state
from ..store import decode_features
from ..scoring.labels import LabelState, parse_time, rfc3339
from ..scoring.model import Model, feature_matrix
from ..scoring.rules import RULES_VERSION
from ..scoring.score import judge
from ..settings import Settings
from ..store import open_db, require_db
from ..transaction import CALENDAR, Transaction
from .evaluation import Metric, Scored, compare, evaluate

log = logs.get("appliance.backtest")
CHUNK = 20_000


@dataclass(frozen=True)
class StoredRows:
    """Stored transactions in event-time order, with their features and stored verdicts."""

    txs: list[Transaction]
    features: list[tuple[float, ...]]
    risk: npt.NDArray[np.float64]
    alert: npt.NDArray[np.bool_]
    model_version: list[str]

    @property
    def ts(self) -> npt.NDArray[np.float64]:
        return np.array([tx.timestamp.timestamp() for tx in self.txs], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.txs)


def load_rows(db_path: Path, since: float | None = None, until: float | None = None
              ) -> StoredRows:
    """Stored transactions with ``since <= ts < until`` (epoch seconds), by (ts, rowid).
    Rows dated beyond what a datetime holds (stored before the event-time window existed:
    year 0 or 10000 UTC) are left out: no Transaction can hold them."""
    first, last = CALENDAR
    db = open_db(db_path)
    try:
        cursor = db.execute(
            "SELECT transaction_id, account_id, terminal_id, amount, currency, ts, utc_offset, "
            "channel, merchant_category, location, features, risk, decision, model_version, "
            "features_version FROM transactions WHERE ts >= ? AND ts < ? ORDER BY ts, rowid",
            [max(since, first) if since is not None else first,
             min(until, last) if until is not None else last])
        txs: list[Transaction] = []
        feats: list[tuple[float, ...]] = []
        risks, alerts, versions, older = [], [], [], []
        for (tid, account, terminal, amount, currency, ts, offset, channel, category, location,
             features, risk, decision, version, features_version) in cursor:
            if features_version != FEATURES_VERSION:
                older.append(len(txs))
            zone = timezone(timedelta(seconds=offset))
            txs.append(Transaction(transaction_id=tid, account_id=account, amount=amount,
                                   currency=currency,
                                   timestamp=datetime.fromtimestamp(ts, zone),
                                   terminal_id=terminal, channel=channel,
                                   merchant_category=category, location=location))
            feats.append(tuple(decode_features(features)))
            risks.append(risk)
            alerts.append(decision != "approve")
            versions.append(version)
        if older:
            _recompute(db, txs, feats, older)
    finally:
        db.close()
    return StoredRows(txs, feats, np.array(risks, dtype=np.float64),
                      np.array(alerts, dtype=bool), versions)


def _recompute(db: Database, txs: list[Transaction], feats: list[tuple[float, ...]],
               older: list[int]) -> None:
    """Give the rows stored under an older FEATURES_VERSION (indices ``older``) the current
    features, computed as the scorer computes them: from the state of every stored
    transaction before the first loaded one, then each loaded one in order. Rows stored
    under the current version keep what was computed live."""
    state = feature_state(db, before=txs[0].timestamp.timestamp())
    again = [state.observe(tx) for tx in txs]
    for i in older:
        feats[i] = again[i]
    log.info("backtest.features_recomputed", txn_id=None, rows=len(older),
             features_version=FEATURES_VERSION)


def _known_by(as_of: float | None) -> str:
    return rfc3339(as_of) if as_of is not None else "9999"


def label_state(db_path: Path, as_of: float | None = None) -> LabelState:
    """Every stored label known by ``as_of`` (all without it), keyed by its transaction's
    account and terminal."""
    db = open_db(db_path)
    try:
        state = LabelState()
        for account, terminal, known_at, label in db.execute(
                "SELECT t.account_id, t.terminal_id, l.known_at, l.label FROM labels l "
                "JOIN transactions t USING (transaction_id) WHERE l.known_at <= ?",
                [_known_by(as_of)]):
            state.add(account, terminal, parse_time(known_at), int(label))
        return state
    finally:
        db.close()


def label_events(db_path: Path, as_of: float | None = None
                 ) -> list[tuple[str, str, float, float, int]]:
    """Every stored label known by ``as_of`` (all without it) as (account, terminal,
    transaction time, known_at, label), for validation.as_served."""
    db = open_db(db_path)
    try:
        return [(account, terminal, float(ts), parse_time(known_at), int(label))
                for account, terminal, ts, known_at, label in db.execute(
                    "SELECT t.account_id, t.terminal_id, t.ts, l.known_at, l.label FROM labels l "
                    "JOIN transactions t USING (transaction_id) WHERE l.known_at <= ?",
                    [_known_by(as_of)])]
    finally:
        db.close()


def truth(db_path: Path, as_of: float | None = None) -> dict[str, bool]:
    """transaction_id -> fraud, from the stored labels known by ``as_of`` (every label
    without it: the ground truth as known now)."""
    db = open_db(db_path)
    try:
        return {tid: bool(label) for tid, label in
                db.execute("SELECT transaction_id, label FROM labels WHERE known_at <= ?",
                           [_known_by(as_of)])}
    finally:
        db.close()


def label_delays(db_path: Path, as_of: float | None = None) -> npt.NDArray[np.float64]:
    """Seconds from each labelled transaction to its label's ``known_at``, for the labels known
    by ``as_of`` (all without it): how late labels arrive on this node."""
    db = open_db(db_path)
    try:
        out = [parse_time(known_at) - ts for ts, known_at in db.execute(
            "SELECT t.ts, l.known_at FROM labels l JOIN transactions t USING (transaction_id) "
            "WHERE l.known_at <= ?", [_known_by(as_of)])]
    finally:
        db.close()
    return np.array(out or [0.0], dtype=np.float64)


def model_rows(rows: StoredRows, labels: LabelState, with_labels: bool,
               start: int = 0, stop: int | None = None) -> npt.NDArray[np.float64]:
    """The model input rows (FEATURES, then LABEL_FEATURES if ``with_labels``) of a slice."""
    txs = rows.txs[start:stop]
    feats = rows.features[start:stop]
    if not with_labels:
        return feature_matrix(feats)
    known = labels.features
    return feature_matrix([f + known(tx.account_id, tx.terminal_id, tx.timestamp.timestamp())
                           for f, tx in zip(feats, txs)])


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


def backtest(rows: StoredRows, model: Model, labels: LabelState, settings: Settings
             ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """(risk, alerted) of every row as ``model`` with today's rules would have decided."""
    risk = np.zeros(len(rows), dtype=np.float64)
    alert = np.zeros(len(rows), dtype=bool)
    for start, stop in _chunks(len(rows)):
        model_risk = model.risks(model_rows(rows, labels, model.uses_labels, start, stop))
        for i, (tx, f, r) in enumerate(zip(rows.txs[start:stop], rows.features[start:stop],
                                           model_risk), start):
            v = judge(tx, f, float(r), model.version, RULES_VERSION, settings)
            risk[i] = v.risk
            alert[i] = v.decision != "approve"
    return risk, alert


def evaluate_stored(settings: Settings, versions: Sequence[str] = (), *,
                    since: float | None = None, until: float | None = None, k: int = 100,
                    resamples: int = 200) -> list[tuple[str, dict[str, Metric]]]:
    """Stored transactions against the labels table (unlabelled ones count as genuine): the
    stored live verdicts, then a backtest of each of ``versions`` on the same transactions."""
    from ..scoring.registry import Registry

    db = settings.db_path
    require_db(db)
    rows = load_rows(db, since, until)
    if not len(rows):
        raise BranchguardError("no stored transactions in that period", field="since")
    known = truth(db)
    y = [known.get(tx.transaction_id, False) for tx in rows.txs]
    ts, accounts = rows.ts, [tx.account_id for tx in rows.txs]
    budget = int(settings.alert_budget_per_day)
    live = ", ".join(sorted(set(rows.model_version)))
    out = [(f"live verdicts ({live})", evaluate(Scored.of(ts, accounts, rows.risk, rows.alert, y),
                                                k=k, budget=budget, resamples=resamples))]
    registry = Registry.of(settings)
    labels = label_state(db)
    for version in versions:
        risk, alert = backtest(rows, registry.load(version), labels, settings)
        out.append((f"{version} ({registry.stage(version)})",
                    evaluate(Scored.of(ts, accounts, risk, alert, y), k=k, budget=budget,
                             resamples=resamples)))
    return out


def compare_shadow(settings: Settings, *, since: float | None = None,
                   until: float | None = None, k: int = 100, resamples: int = 200
                   ) -> list[tuple[str, dict[str, Metric]]]:
    """Live verdicts and stored shadow scores side by side, per shadow model, on exactly the
    transactions that model shadowed (against the labels table; unlabelled = genuine), then
    the shadow's difference from live with its paired interval (evaluation.compare)."""
    db = open_db(settings.db_path)
    try:
        rows = db.execute(
            "SELECT s.model_version, t.transaction_id, t.ts, t.account_id, t.risk, t.decision, "
            "t.model_version, s.risk, s.decision FROM shadow_scores s JOIN transactions t "
            "USING (transaction_id) WHERE t.ts >= ? AND t.ts < ? ORDER BY s.model_version, "
            "t.ts", [since if since is not None else -1e18,
                     until if until is not None else 1e18]).fetchall()
    finally:
        db.close()
    if not rows:
        raise BranchguardError("no shadow scores stored in that period", field="stage",
                               hint="set a shadow model (branchguard models stage VERSION "
                                    "shadow) on a running node, then evaluate again")
    known = truth(settings.db_path)
    budget = int(settings.alert_budget_per_day)
    out: list[tuple[str, dict[str, Metric]]] = []
    for version in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == version]
        ts = [r[2] for r in mine]
        accounts = [r[3] for r in mine]
        y = [known.get(r[1], False) for r in mine]
        live = ", ".join(sorted({r[6] for r in mine}))
        served, shadowed = (Scored.of(ts, accounts, [r[risk] for r in mine],
                                      [r[decision] != "approve" for r in mine], y)
                            for risk, decision in ((4, 5), (7, 8)))
        of_live, of_shadow, gain = compare(served, shadowed, k=k, budget=budget,
                                           resamples=resamples)
        out += [(f"live ({live}) on the {len(mine)} shadowed by {version}", of_live),
                (f"shadow {version} (stored scores)", of_shadow),
                (f"shadow {version} − live (paired)", gain)]
    return out
