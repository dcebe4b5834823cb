"""The verdict: what the node publishes on ``verdict.<branch>.<terminal>`` and stores with
each row, and the severities and decisions it may carry.

The result types live at the ground, apart from the scoring that produces them
(``scoring/score.py``), because the store, the API and the console read them too.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Severity = Literal["CRITICAL", "HIGH", "WARNING", "INFO"]
SEVERITIES: tuple[Severity, ...] = ("CRITICAL", "HIGH", "WARNING", "INFO")
Decision = Literal["approve", "review", "decline"]


class Verdict(msgspec.Struct, frozen=True):
    """What the node publishes on ``verdict.<branch>.<terminal>`` and stores with the row."""

    transaction_id: str
    risk: float
    severity: Severity
    decision: Decision
    reasons: list[str]
    details: list[str]
    model_risk: float
    model_version: str
    rules_version: str


DECISIONS: dict[Severity, Decision] = {"CRITICAL": "decline", "HIGH": "review",
                                       "WARNING": "review", "INFO": "approve"}
"""The decision each severity carries: anything not approved raises an alert."""
