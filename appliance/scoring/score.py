"""Rules plus model risk -> one Verdict per transaction.

Risk is in [0, 1], higher is riskier: the model's calibrated risk and each fired rule's risk are
combined by noisy-OR, ``1 - (1 - model) * prod(1 - rule)``, so that independent signals add up
and no single signal can exceed 1.

What raises an alert (docs/scoring.md):

- **Hard rule hits** always alert, whatever the budget: every rule of ``rules-v1`` but the
  model's own ``ml_anomaly`` (``high_value``, ``suspicious_combo``, ``high_deviation``: rules
  with thresholds a fraud team chose and can read), and any hit that says ``hard``. Their
  severity follows the fixed thresholds: CRITICAL >= critical_risk -> decline; HIGH >=
  high_risk or amount >= high_value_amount -> review; otherwise at least WARNING -> review.
  The deny list (lists.py, after the verdict) declines whatever the verdict says.
- **The model** (with any soft rule hit) alerts only through the alert budget (budget.py):
  when the transaction's risk is in the top of the recent distribution that fits the
  budget, at the severity of the tier it reaches, and only for an account with at least
  ``alert_budget_min_history`` earlier transactions.

Without a budget (``alert_budget = false``, and the backtests, which replay history through
fixed rules) severity follows the fixed thresholds from the combined risk, as before
issue 18: CRITICAL >= critical_risk, HIGH >= high_risk or a high amount, WARNING >=
warning_risk, otherwise INFO. Anything not approved raises an alert.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..settings import Settings
from ..transaction import Transaction
from ..verdict import DECISIONS, Severity, Verdict
from .budget import Budget
from .features import INDEX
from .rules import Hit, evaluate

_PRIOR = INDEX["account_prior_count"]


def severity_of(risk: float, amount: float, s: Settings) -> Severity:
    if risk >= s.critical_risk:
        return "CRITICAL"
    if risk >= s.high_risk or amount >= s.high_value_amount:
        return "HIGH"
    if risk >= s.warning_risk:
        return "WARNING"
    return "INFO"


def _round6(x: float) -> float:
    """``round(x, 6)`` for x in [0, 1] at half its cost (judge runs per transaction)."""
    return int(x * 1e6 + 0.5) / 1e6




def judge(tx: Transaction, features: Sequence[float], model_risk: float, model_version: str,
          rules_version: str, settings: Settings, budget: Budget | None = None,
          typology: Sequence[Hit] = ()) -> Verdict:
    """The verdict for one transaction, given its features, the model's risk and the
    typology rules' hits (typologies.py; their risk counts like any rule's).

    With ``budget``, the transaction is also counted in it (call once per transaction, in
    stream order): the budget decides model-driven alerts, see the module docstring."""
    hits = evaluate(tx, features, model_risk, settings, typology)
    if budget is None:
        keep = 1.0 - model_risk
        for hit in hits:
            if hit.reason != "ml_anomaly":  # the model's risk is already in `keep`
                keep *= 1.0 - hit.risk
        risk = _round6(1.0 - keep)
        severity = severity_of(risk, tx.amount, settings)
        return Verdict(tx.transaction_id, risk, severity, DECISIONS[severity],
                       [h.reason for h in hits], [h.detail for h in hits], _round6(model_risk),
                       model_version, rules_version)

    if not hits or (len(hits) == 1 and hits[0].reason == "ml_anomaly"):  # most of them
        ranked = int(model_risk * 1e6 + 0.5) / 1e6
        severity = budget.judge(tx.timestamp.timestamp(), ranked, False,
                                features[_PRIOR] >= budget.min_history)
        if severity == "INFO":
            return Verdict(tx.transaction_id, ranked, "INFO", "approve", [], [], ranked,
                           model_version, rules_version)
        return Verdict(tx.transaction_id, ranked, severity, DECISIONS[severity],
                       ["ml_anomaly"], [_model_detail(model_risk, budget)], ranked,
                       model_version, rules_version)

    soft = 1.0 - model_risk
    hard = 1.0
    is_hard = False
    kept: list[Hit] = []
    for hit in hits:
        if hit.reason == "ml_anomaly":  # the budget says whether the model's risk alerts
            continue
        kept.append(hit)
        if hit.hard:
            is_hard = True
            hard *= 1.0 - hit.risk
        else:
            soft *= 1.0 - hit.risk
    ranked = _round6(1.0 - soft)
    risk = _round6(1.0 - soft * hard) if is_hard else ranked
    eligible = not is_hard and budget.eligible(features[_PRIOR])
    severity = budget.judge(tx.timestamp.timestamp(), ranked, is_hard, eligible)
    if is_hard:
        fixed = severity_of(risk, tx.amount, settings)
        severity = "WARNING" if fixed == "INFO" else fixed
    if severity != "INFO" and model_risk >= budget.threshold():
        kept.append(Hit("ml_anomaly", _model_detail(model_risk, budget), model_risk))
    return Verdict(tx.transaction_id, risk, severity, DECISIONS[severity],
                   [h.reason for h in kept], [h.detail for h in kept], _round6(model_risk),
                   model_version, rules_version)


def _model_detail(model_risk: float, budget: Budget) -> str:
    days = budget.hours / 24
    return (f"model risk {model_risk:.2f} is in the top of the last {days:g} days' traffic: "
            f"at or above {budget.threshold():.4f}, the threshold that keeps model alerts "
            f"near {budget.per_day:g} a day")
