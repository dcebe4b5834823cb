"""The rules: plain functions over a transaction and its features, and the RULES list.

Each rule returns a :class:`Hit` (its reason code, a sentence with the values and thresholds
that made it fire, and the risk it adds) or None. Every matching rule is kept, not just the
first. Thresholds come from :class:`~appliance.settings.Settings`. These are the reference
system's four rules; ``ml_anomaly`` is the model's, expressed as a rule so that it explains
itself the same way. The typology rules (typologies.py, parameters in the versioned rules
file, rulebook.py) need per-account state, so the scorer runs them and hands their hits to
:func:`evaluate` as ``typology``.

A hit is *hard* (``Hit.hard``; the codes in :data:`HARD_REASONS`) when it must raise an alert
whatever the alert budget: ``high_value`` and every typology. The others (and the model) are
soft: they add risk, and the budget decides what of it is worth an analyst's time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..settings import Settings
from ..transaction import Transaction
from .features import INDEX
from .rulebook import SHIPPED_RULES, TYPOLOGIES, load

RULES_VERSION = load(SHIPPED_RULES).version
"""The shipped rules file's version; a node runs the version of the file it reads
(rulebook.rules_path), which every verdict names."""
HARD_REASONS: frozenset[str] = frozenset(("high_value", *TYPOLOGIES))
"""Reason codes of the hard rules (their hits have ``hard=True``)."""

_AMOUNT = INDEX["amount"]
_MEAN = INDEX["account_mean_amount"]
_PRIOR = INDEX["account_prior_count"]
_NEW_LOCATION = INDEX["first_time_location"]


@dataclass(slots=True)  # not frozen: a frozen init costs 5x, and this is per message
class Hit:
    reason: str
    detail: str
    risk: float
    """Risk this rule alone implies, combined with the others by noisy-OR in score.py."""
    hard: bool = False
    """A hard rule's hit: it alerts whatever the alert budget (see the module docstring)."""


Rule = Callable[[Transaction, Sequence[float], float, Settings], "Hit | None"]


def high_value(tx: Transaction, f: Sequence[float], model_risk: float, s: Settings) -> Hit | None:
    if tx.amount >= s.high_value_amount:
        return Hit("high_value", f"amount {tx.amount:.2f} >= {s.high_value_amount:.2f}", 0.5,
                   True)
    return None


def suspicious_combo(tx: Transaction, f: Sequence[float], model_risk: float,
                     s: Settings) -> Hit | None:
    if tx.merchant_category in s.risky_categories and f[_NEW_LOCATION] == 1.0:
        return Hit("suspicious_combo",
                   f"{tx.merchant_category} at {tx.location}, outside the account's usual "
                   "locations", 0.6)
    return None


def high_deviation(tx: Transaction, f: Sequence[float], model_risk: float,
                   s: Settings) -> Hit | None:
    mean, prior = f[_MEAN], f[_PRIOR]
    # mean is 0 only for sub-milli amounts, where a ratio means nothing
    if (prior > s.deviation_min_history and mean > 0
            and tx.amount >= s.deviation_multiple * mean):
        return Hit("high_deviation",
                   f"amount {tx.amount:.2f} is {tx.amount / mean:.1f}x the account mean "
                   f"{mean:.2f} (>= {s.deviation_multiple:g}x, {int(prior)} prior)", 0.6)
    return None


def ml_anomaly(tx: Transaction, f: Sequence[float], model_risk: float, s: Settings) -> Hit | None:
    if model_risk >= s.ml_risk_threshold:
        return Hit("ml_anomaly", f"model risk {model_risk:.2f} >= {s.ml_risk_threshold:.2f}",
                   model_risk)
    return None


RULES: tuple[Rule, ...] = (high_value, suspicious_combo, high_deviation, ml_anomaly)


def evaluate(tx: Transaction, features: Sequence[float], model_risk: float,
             settings: Settings, typology: Sequence[Hit] = ()) -> list[Hit]:
    """Every rule that fires, in RULES order, then the ``typology`` hits the scorer found
    for this transaction (typologies.Typologies.check)."""
    hits = []
    for rule in RULES:
        hit = rule(tx, features, model_risk, settings)
        if hit is not None:
            hits.append(hit)
    if typology:
        hits += typology
    return hits
