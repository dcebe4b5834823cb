"""Loading weeks of history into a node fast: scored in-process, written through the store,
never published.

Why: a demo (or a new node adopting its accounts' past) needs weeks of transactions behind
its accounts before the first live one, or every payment is "the first of a new account".
Publishing a million rows through JetStream would take most of an hour on a small box and
needs the event-time window off; scoring them here in bulk takes a minute or two.

The scorer's state afterwards is the state it would have had if it had scored these rows
itself, because it is decided by the same function, ``scoring.batch.score_batch`` (features
in time order from the state of the rows already stored, the production model's risk for
each chunk, the typology rules, the alert budget and the allow/deny lists); the label
features (for a model that reads them) from a :class:`LabelState` of the labels known *by
each transaction's own time* (the lookup cuts there), so the labels known later change
nothing. At its next start the scorer rebuilds its feature state from the stored rows, as
after any restart. tests/test_history.py holds the stored features and verdicts to those
the scorer gives the same transactions through NATS.

What differs, on purpose: history raises no alerts and moves no checkpoint
(``Store.save_batch(history=True)``): it was never in the stream, and its alerts are no one's
work now; its verdicts are stored (``evaluate --demo`` counts them). Shadow models do not
score history.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .. import logs
from ..scoring.batch import Deciders, score_batch
from ..scoring.budget import rebuild as budget_from_rows
from ..scoring.features import feature_state
from ..scoring.labels import LabelState
from ..scoring.lists import ListFilter
from ..scoring.model import Model
from ..scoring.typologies import Typologies
from ..settings import Settings
from ..store import Store
from ..transaction import Transaction, digest

log = logs.get("appliance.history")
CHUNK = 5000
"""Transactions scored and committed together."""


@dataclass(frozen=True)
class HistoryLoad:
    """What :func:`load_history` stored."""

    rows: int
    """Transactions stored (ids already stored are skipped by the store)."""
    flagged: int
    """Of which with a verdict other than approve (no alert raised for them)."""
    seconds: float


def load_history(store: Store, model: Model, settings: Settings,
                 transactions: Iterable[Transaction], labels: LabelState | None = None,
                 chunk: int = CHUNK) -> HistoryLoad:
    """Score ``transactions`` (in time order, all later than any stored one) as the scorer
    would and store them as history (see the module docstring). ``labels``: the labels
    known so far, for a model that reads label features (empty without)."""
    started = time.monotonic()
    state = feature_state(store.reader)
    rules = Typologies(store.reader.conn, settings)
    rules.rebuild(store.reader.conn, state)
    deciders = Deciders(state, model, settings,
                        budget_from_rows(store.path, settings) if settings.alert_budget else None,
                        ListFilter(store.reader.conn, settings.lists_refresh_seconds), rules,
                        (labels or LabelState()).features if model.uses_labels else None)
    version = model.version
    rows = flagged = 0
    it = iter(transactions)
    while batch := list(itertools.islice(it, chunk)):
        scored, _ = score_batch([(tx, settings.branch, 0, digest(tx)) for tx in batch],
                                deciders)
        store.save_batch(scored, [], settings.consumer, 0, history=True)
        store.checkpoint_wal()  # the node's WAL is not auto-checkpointed: keep it short
        rows += len(scored)
        flagged += sum(1 for s in scored if s.verdict.decision != "approve")
    result = HistoryLoad(rows, flagged, round(time.monotonic() - started, 3))
    log.info("history.loaded", txn_id=None, rows=rows, flagged=flagged,
             seconds=result.seconds, model_version=version)
    return result
