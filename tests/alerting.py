"""What the alert tests share: alerts stored the way the scorer stores them, and the
dispatcher (``branchguard alerts run``) as a real child process."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from appliance.alerts.outbox import UNROUTED
from appliance.scoring.features import FEATURES_VERSION
from appliance.store import Scored, Store
from appliance.transaction import Transaction
from appliance.verdict import DECISIONS, Verdict

from .conftest import NodeProcess
from .support import query

NOW = datetime.now(timezone.utc)
REASONS = {"CRITICAL": (["high_value", "ml_anomaly"],
                        ["amount 9000.00 >= 5000.00", "model risk 0.95 >= 0.70"]),
           "HIGH": (["high_deviation"], ["amount 400.00 is 17.0x the account mean 23.50 "
                                         "(>= 5x, 8 prior)"]),
           "WARNING": (["suspicious_combo"], ["Gambling at Tallinn, outside the account's "
                                              "usual locations"])}


@dataclass
class Spec:
    tid: str
    severity: str
    account: str = "A-1"
    terminal: str = "T0001"
    amount: float = 120.0


def scored_batch(specs: list[Spec], first_seq: int = 1) -> list[Scored]:
    """Transactions scored as ``specs`` say, ready for ``Store.save_batch``."""
    scored = []
    for i, s in enumerate(specs):
        tx = Transaction(transaction_id=s.tid, account_id=s.account, amount=s.amount,
                         currency="EUR", timestamp=NOW - timedelta(seconds=len(specs) - i),
                         terminal_id=s.terminal, channel="POS", merchant_category="Grocery",
                         location="Espoo")
        reasons, details = REASONS.get(s.severity, ([], []))
        risk = {"CRITICAL": 0.95, "HIGH": 0.85, "WARNING": 0.65}.get(s.severity, 0.1)
        verdict = Verdict(s.tid, risk, s.severity, DECISIONS[s.severity],  # type: ignore[index]
                          list(reasons), list(details), risk, "m-test", "rules-test")
        scored.append(Scored(tx, "BR001", first_seq + i, (0.0,), FEATURES_VERSION, verdict))
    return scored


def store_alerts(db: Path, specs: list[Spec], first_seq: int = 1) -> None:
    """Save one batch, as the scorer would: rows, alerts and their outbox rows."""
    store = Store.open(db)
    try:
        store.save_batch(scored_batch(specs, first_seq), [], "scorer",
                         first_seq + len(specs) - 1)
    finally:
        store.close()


class Dispatcher(NodeProcess):
    """``branchguard alerts run`` as a child process (``nats_url`` unused: it needs none)."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        super().__init__(data_dir, "", {"BRANCHGUARD_ALERTS_POLL_SECONDS": "0.05", **env})

    def start(self, timeout: float = 60.0) -> NodeProcess:
        return self.spawn(["alerts", "run", "--data-dir", str(self.data_dir)],
                          '"alerts.dispatcher_started"', timeout)


def unrouted(db: Path) -> int:
    """Outbox rows the dispatcher has not routed yet."""
    return int(query(db, UNROUTED)[0][0])
