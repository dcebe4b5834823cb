"""A batch of transactions to verdicts: features in order, the model's risk for all at once,
the rules (typologies included), the alert budget and the allow/deny lists.

The one place a transaction becomes a verdict. The scorer calls it for each batch pulled from
``TX`` (pipeline.py, stages 3-5), and a history load for rows written straight to the store
(feed/history.py), so the two decide exactly alike: what a demo's weeks of history hold is
what the scorer would have stored for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..settings import Settings
from ..store import Scored
from ..transaction import Transaction
from .budget import Budget
from .features import FEATURES, FEATURES_VERSION, FeatureState
from .lists import ListFilter
from .model import Model, feature_matrix
from .score import judge
from .typologies import Typologies

LabelLookup = Callable[[str, str, float], tuple[float, ...]]
"""(account, terminal, event time) -> the label features known then (labels.LabelState)."""


@dataclass(slots=True)
class Deciders:
    """What decides a verdict, as the scorer holds it now (each part may be swapped between
    two batches: a new model, a rebuilt state, a re-read rules file)."""

    state: FeatureState
    model: Model
    settings: Settings
    budget: Budget | None
    """The alert budget (None: the fixed thresholds decide, ``alert_budget = false``)."""
    lists: ListFilter
    rules: Typologies
    known: LabelLookup | None
    """Label features for a model that reads them (None: the model reads none)."""


def score_batch(batch: Sequence[tuple[Transaction, str, int, bytes | None]],
                deciders: Deciders, terminals: Sequence[list[int] | None] | None = None
                ) -> tuple[list[Scored], list[tuple[float, ...]]]:
    """Score ``batch`` of (transaction, branch, stream sequence, body digest), in order.

    Returns the scored rows and the model's input rows (features, then label features when
    the model reads them), for a shadow model to score the same inputs. Each transaction is
    observed by the feature state, counted by the budget and added to the typology trails:
    call it once per transaction, in processing order.

    ``terminals``, aligned with ``batch``, are the terminal windows the terminal stage
    computed for each transaction (a partitioned scorer's, terminal_stage.py); a None in it
    leaves that one to the feature state's own terminal windows. Without it (a single
    scorer) nothing changes and nothing is spent.
    """
    state, model = deciders.state, deciders.model
    observe = state.observe
    features = ([observe(tx) for tx, _, _, _ in batch] if terminals is None else
                [observe(tx, w) for (tx, _, _, _), w in zip(batch, terminals, strict=True)])
    rows = features
    known = deciders.known
    if model.uses_labels and known is not None:
        rows = [f + known(tx.account_id, tx.terminal_id, tx.timestamp.timestamp())
                for f, (tx, _, _, _) in zip(features, batch)]
    risks = model.risks(feature_matrix(rows)) if features else ()
    lists, rules = deciders.lists, deciders.rules
    lists.refresh_if_due()
    rules.refresh_if_due()
    version, settings, budget = model.version, deciders.settings, deciders.budget
    listed, now = lists.apply, time.time()
    check, decided, rules_version = rules.check, rules.decided, rules.version
    scored = [Scored(tx, branch, seq, f, FEATURES_VERSION,
                     decided(tx, listed(tx, judge(tx, f, float(r), version, rules_version,
                                                  settings, budget, check(tx, f)), now)), h)
              for (tx, branch, seq, h), f, r in zip(batch, features, risks)]
    if rows is not features:
        width = len(FEATURES)
        for s, row in zip(scored, rows):
            s.label_features = row[width:]
    return scored, rows
