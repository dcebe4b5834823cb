"""Rules plus model risk -> one Verdict per transaction.

Risk is in [0, 1], higher is riskier: the model's calibrated risk and each fired rule's risk are
combined by noisy-OR, ``1 - (1 - model) * prod(1 - rule)``, so that independent signals add up
and no single signal can exceed 1. Severity and decision follow from risk (and, for HIGH, the
amount): CRITICAL >= critical_risk -> decline; HIGH >= high_risk or amount >= high_value_amount
-> review; WARNING >= warning_risk -> review; otherwise INFO -> approve. Anything not approved
raises an alert.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..settings import Settings
from ..transaction import Transaction
from ..verdict import DECISIONS, Severity, Verdict
from .rules import Hit, evaluate


def severity_of(risk: float, amount: float, s: Settings) -> Severity:
    if risk >= s.critical_risk:
        return "CRITICAL"
    if risk >= s.high_risk or amount >= s.high_value_amount:
        return "HIGH"
    if risk >= s.warning_risk:
        return "WARNING"
    return "INFO"


def judge(tx: Transaction, features: Sequence[float], model_risk: float, model_version: str,
          rules_version: str, settings: Settings, typology: Sequence[Hit] = ()) -> Verdict:
    """The verdict for one transaction, given its features, the model's risk and the
    typology rules' hits (their risk counts like any rule's)."""
    hits = evaluate(tx, features, model_risk, settings, typology)
    keep = 1.0 - model_risk
    for hit in hits:
        if hit.reason != "ml_anomaly":  # the model's risk is already in `keep`
            keep *= 1.0 - hit.risk
    risk = round(1.0 - keep, 6)
    severity = severity_of(risk, tx.amount, settings)
    return Verdict(tx.transaction_id, risk, severity, DECISIONS[severity],
                   [h.reason for h in hits], [h.detail for h in hits], round(model_risk, 6),
                   model_version, rules_version)
