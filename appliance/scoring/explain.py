"""Explanations for alerts: why this transaction, in words an analyst can check.

Each alert gets one JSON object (stored in ``alert_explanations`` with the alert):

- ``rules``: every rule that fired, with the values and thresholds that made it fire (the
  verdict's reasons and details);
- ``unusual``: up to three sentences on what is most unlike the account's own baseline
  ("amount 4.8x the account's average 21.30", "first use of this terminal"), strongest first;
- ``contributions``: each model feature's share of the isolation, largest first: a
  path-length attribution on the model's Isolation Forest (in the spirit of DIFFI, Carletti et
  al. 2023): walking the row down every tree, each split on feature ``f`` adds ``1 / h`` to
  ``f``, where ``h`` is the length of that tree's path; short paths (quickly isolated rows)
  weigh most, and shares sum to 1. It is read from the ONNX graph itself
  (``TreeEnsembleRegressor``), so it explains exactly the served forest (for the supervised
  challenger, the forest it stacks on).

Explanations are made when someone reads an alert (the case page, the API, an alert
message), never on the scorer's hot path (issue 16): :class:`Explainer` rebuilds one from
what the scorer stored with the row: the features, the label features the model read, the
verdict and the model version, whose ONNX file the registry keeps. Alerts stored before
then have their explanation in ``alert_explanations``, and that one is returned as stored.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from .. import logs
from ..errors import BranchguardError
from ..store import decode_features
from ..verdict import Verdict
from .features import FEATURES, FEATURES_VERSION, INDEX as FEATURE_INDEX, LARGE_MULTIPLE
from .labels import LABEL_FEATURES
from .model import INPUT_FEATURES, Model
from .registry import Registry

log = logs.get("appliance.explain")

METHOD = "path-length attribution on the isolation forest (1/h per split, DIFFI-style)"
_F = FEATURE_INDEX
_L = {name: len(INPUT_FEATURES) - len(LABEL_FEATURES) + i for i, name in
      enumerate(LABEL_FEATURES)}


@dataclass(frozen=True)
class ForestPaths:
    """An ONNX TreeEnsembleRegressor's trees as flat arrays (global node index)."""

    feature: npt.NDArray[np.int64]
    """The card-feature index each split reads (already mapped through any Gather)."""
    threshold: npt.NDArray[np.float32]
    children: npt.NDArray[np.int64]
    """[node, 0] the child when the split is false, [node, 1] when true; a leaf is its own
    child, so rows that reached a leaf stay there."""
    is_leaf: npt.NDArray[np.bool_]
    roots: npt.NDArray[np.int64]

    @classmethod
    def of(cls, model: Model) -> ForestPaths | None:
        """The forest inside ``model``'s ONNX graph, or None when it has none."""
        import onnx  # here, not at the top: the API imports this module and needs no onnx
        from onnx import numpy_helper

        proto = onnx.load(str(model.onnx_path))
        node = next((n for n in proto.graph.node if n.op_type == "TreeEnsembleRegressor"), None)
        if node is None:
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        columns = np.arange(len(model.card.features), dtype=np.int64)
        for init in proto.graph.initializer:  # the challenger gathers the forest's columns
            if init.name == "if_columns":
                columns = numpy_helper.to_array(init).astype(np.int64)
        trees = np.asarray(attrs["nodes_treeids"], dtype=np.int64)
        ids = np.asarray(attrs["nodes_nodeids"], dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, trees[1:] != trees[:-1]])
        offset = np.repeat(starts, np.diff(np.r_[starts, len(trees)]))
        if not np.array_equal(ids, np.arange(len(ids)) - offset):
            return None  # not the node layout forest.py writes
        modes = [m.decode() if isinstance(m, bytes) else m for m in attrs["nodes_modes"]]
        is_leaf = np.array([m == "LEAF" for m in modes])
        here = np.arange(len(ids), dtype=np.int64)
        true_child = np.where(is_leaf, here,
                              np.asarray(attrs["nodes_truenodeids"], dtype=np.int64) + offset)
        false_child = np.where(is_leaf, here,
                               np.asarray(attrs["nodes_falsenodeids"], dtype=np.int64) + offset)
        return cls(feature=columns[np.asarray(attrs["nodes_featureids"], dtype=np.int64)],
                   threshold=np.asarray(attrs["nodes_values"], dtype=np.float32),
                   children=np.stack([false_child, true_child], axis=1), is_leaf=is_leaf,
                   roots=starts)

    def attributions(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Per row of ``x`` ([n, card features]), each feature's share of isolation."""
        n, width = x.shape
        trees = len(self.roots)
        node = np.broadcast_to(self.roots, (n, trees)).copy()
        row_base = (np.arange(n) * width)[:, None]
        xs = x.ravel()
        flat_children = self.children.ravel()
        steps: list[npt.NDArray[np.int64]] = []   # flat (row, feature) cell of each split
        masks: list[npt.NDArray[np.bool_]] = []
        depth = np.zeros((n, trees), dtype=np.float64)
        while True:
            inner = ~self.is_leaf[node]
            if not inner.any():
                break
            cell = row_base + self.feature[node]
            steps.append(cell)
            masks.append(inner)
            depth += inner
            node = flat_children[2 * node + (xs[cell] <= self.threshold[node])]
        weight = np.broadcast_to(1.0 / np.maximum(depth, 1.0), (len(steps), n, trees))
        mask = np.array(masks)
        out = np.bincount(np.array(steps)[mask], weights=weight[mask],
                          minlength=n * width).reshape(n, width)
        total = out.sum(axis=1, keepdims=True)
        shares: npt.NDArray[np.float64] = np.divide(out, total, out=np.zeros_like(out),
                                                    where=total > 0)
        return shares


class Described(Protocol):
    """What the sentences quote of a transaction (a Transaction, or a stored row's)."""

    @property
    def amount(self) -> float: ...
    @property
    def location(self) -> str | None: ...
    @property
    def merchant_category(self) -> str | None: ...


class StoredTransaction(NamedTuple):
    amount: float
    location: str | None
    merchant_category: str | None


def unusual(tx: Described, f: Sequence[float], top: int = 3) -> list[str]:
    """Plain sentences on what is least like the account's baseline, strongest first."""
    said: list[tuple[float, str]] = []
    prior, mean, ratio, z = f[_F["account_prior_count"]], f[_F["account_mean_amount"]], \
        f[_F["amount_to_mean_ratio"]], f[_F["amount_zscore"]]
    if prior == 0:
        said.append((2.0, "first transaction of this account"))
    else:
        typical = f[_F["amount_to_median_ratio"]]
        if typical >= 2:  # the median says it better: a fraud's amounts pull the mean up
            said.append((typical, f"amount {tx.amount:.2f} is {typical:.1f}x the account's "
                                  f"usual amount {tx.amount / typical:.2f} (its median)"))
        elif ratio >= 2:
            said.append((ratio, f"amount {tx.amount:.2f} is {ratio:.1f}x the account's "
                                f"average {mean:.2f}"))
        large = f[_F["account_large_count_7d"]]
        if large >= 2:
            said.append((2.0 + large / 2, f"{int(large)} earlier transactions of "
                                          f"{LARGE_MULTIPLE}x the usual amount or more in "
                                          "the last 7 days"))
        if z >= 3:
            said.append((z / 1.5, f"amount {z:.1f} standard deviations above the account's "
                                  "usual"))
        if f[_F["first_time_terminal"]] == 1:
            said.append((2.5, "first use of this terminal"))
        if f[_F["first_time_location"]] == 1 and tx.location:
            said.append((2.4, f"first transaction in {tx.location}"))
        if f[_F["first_time_category"]] == 1 and tx.merchant_category:
            said.append((2.2, f"first {tx.merchant_category} purchase"))
        gap = f[_F["seconds_since_previous"]]
        if gap < 120:
            said.append((3.0 - gap / 60, f"{gap:.0f} s after the account's previous "
                                         "transaction"))
    burst = f[_F["account_count_1h"]]
    if burst >= 3:
        said.append((1.0 + burst / 3, f"{int(burst)} earlier transactions from this account "
                                      "in the last hour"))
    if len(f) > _L["terminal_known_fraud_count_30d"]:
        for who, key in (("this terminal", "terminal"), ("this account", "account")):
            count = f[_L[f"{key}_known_fraud_count_30d"]]
            share = f[_L[f"{key}_known_fraud_share_30d"]]
            if count > 0:
                said.append((3.0 + math.log1p(count), f"{int(count)} known frauds at {who} in "
                                                      f"the last 30 days ({share:.0%} of its "
                                                      "labelled transactions)"))
    said.sort(key=lambda s: -s[0])
    return [text for _, text in said[:top]]


def explain(model: Model, paths: ForestPaths | None, txs: Sequence[Described],
            rows: npt.NDArray[np.float64], verdicts: Sequence[Verdict], top: int = 5
            ) -> list[dict[str, Any]]:
    """Explanations for alerted transactions; ``rows`` are their model input rows
    (FEATURES, plus LABEL_FEATURES when the model uses them)."""
    shares = (paths.attributions(np.ascontiguousarray(rows[:, model.columns], dtype=np.float32))
              if paths is not None and len(rows) else None)
    names, columns = model.card.features, model.columns.tolist()
    share_rows = shares.tolist() if shares is not None else None
    out = []
    for i, (tx, v, row) in enumerate(zip(txs, verdicts, rows.tolist())):
        contributions: list[dict[str, Any]] = []
        if share_rows is not None:
            mine = share_rows[i]
            order = sorted(range(len(mine)), key=mine.__getitem__, reverse=True)[:top]
            contributions = [{"feature": names[j], "value": row[columns[j]],
                              "share": round(mine[j], 4)} for j in order if mine[j] > 0]
        out.append({
            "model_version": v.model_version, "rules_version": v.rules_version,
            "risk": v.risk, "model_risk": v.model_risk, "severity": v.severity,
            "rules": [{"reason": r, "detail": d} for r, d in zip(v.reasons, v.details)],
            "unusual": unusual(tx, row),
            "contributions": contributions,
            "method": METHOD if shares is not None else None,
        })
    return out


def stored_explanation(conn: sqlite3.Connection, transaction_id: str) -> dict[str, Any] | None:
    """The explanation the scorer stored with the alert on ``transaction_id`` (the object
    :func:`explain` made), or None for an alert scored before explanations existed."""
    row = conn.execute("SELECT explanation FROM alert_explanations WHERE transaction_id = ?",
                       (transaction_id,)).fetchone()
    return dict(json.loads(row[0])) if row else None


_ROW = ("SELECT amount, location, merchant_category, features, features_version, "
        "label_features, transaction_id, risk, severity, decision, reasons, details, model_risk, "
        "model_version, rules_version FROM transactions WHERE transaction_id = ?")
_strings = msgspec.json.Decoder(list[str])


class Explainer:
    """Explanations of stored alerts, made on demand (see the module docstring).

    Keeps each model it has read (and its forest's paths), so explaining many alerts of one
    model reads its ONNX file once. Without a registry, or for a model version the registry
    no longer has, the explanation still gives the rules and the plain-words sentences,
    without the model's contributions.
    """

    def __init__(self, registry: Registry | None) -> None:
        self.registry = registry
        self._models: dict[str, tuple[Model, ForestPaths | None] | None] = {}

    def model(self, version: str) -> tuple[Model, ForestPaths | None] | None:
        if version not in self._models:
            loaded = None
            if self.registry is not None:
                try:
                    model = self.registry.load(version)
                    loaded = (model, ForestPaths.of(model))
                except (BranchguardError, OSError) as exc:
                    log.warning("explain.model_unavailable", txn_id=None, version=version,
                                error=str(exc))
            self._models[version] = loaded
        return self._models[version]

    def of(self, conn: sqlite3.Connection, transaction_id: str) -> dict[str, Any] | None:
        """The explanation of the alert on ``transaction_id``; None when the row is gone or
        its features are of a version this code cannot read."""
        stored = stored_explanation(conn, transaction_id)
        if stored is not None:
            return stored
        row = conn.execute(_ROW, (transaction_id,)).fetchone()
        if row is None or row[4] != FEATURES_VERSION:
            return None
        tx = StoredTransaction(row[0], row[1], row[2])
        values = decode_features(row[3])
        if len(values) != len(FEATURES):
            return None
        if row[5] is not None:
            values += decode_features(row[5])
        verdict = Verdict(transaction_id=row[6], risk=row[7], severity=row[8], decision=row[9],
                          reasons=_strings.decode(row[10]), details=_strings.decode(row[11]),
                          model_risk=row[12], model_version=row[13], rules_version=row[14])
        loaded = self.model(verdict.model_version)
        if loaded is None or len(values) <= int(loaded[0].columns.max(initial=-1)):
            return _without_model(tx, values, verdict)  # e.g. label features not stored
        model, paths = loaded
        (out,) = explain(model, paths, [tx], np.asarray([values], dtype=np.float64), [verdict])
        return out


def _without_model(tx: Described, values: Sequence[float], v: Verdict) -> dict[str, Any]:
    return {"model_version": v.model_version, "rules_version": v.rules_version,
            "risk": v.risk, "model_risk": v.model_risk, "severity": v.severity,
            "rules": [{"reason": r, "detail": d} for r, d in zip(v.reasons, v.details)],
            "unusual": unusual(tx, values), "contributions": [], "method": None}
