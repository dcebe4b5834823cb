"""What an alert message says: title and body for one alert, a burst, a WARNING digest, and
the test message.

A title carries severity, amount, account, terminal and branch; a body the reasons in plain
words with the values that made each rule fire, and a link to the case in the console
(``<console_url>/console/alerts/<alert_id>``). Account identifiers longer than
``ACCOUNT_VISIBLE`` characters are masked to their last four (a card number is often the
account id), and nothing else secret is ever in an alert row, so it cannot leak here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..transaction import event_time_text

ACCOUNT_VISIBLE = 8
"""Account ids up to this long are shown whole; longer ones as ``****`` plus the last four."""
LISTED = 10
"""Alerts listed one per line in a grouped message or digest; the rest are counted."""

PLAIN_REASONS = {
    "high_value": "High amount",
    "suspicious_combo": "Risky merchant category away from the account's usual places",
    "high_deviation": "Far above what this account usually spends",
    "ml_anomaly": "Unusual for this account and terminal (anomaly model)",
    # the typology rules (docs/rules.md); their details carry the counts and thresholds
    "velocity_burst": "Burst of transactions",
    "card_testing": "Card testing",
    "amount_spike": "Far above the largest this account ever paid",
    "impossible_travel": "Impossible travel between terminals",
    "atm_cashout": "Cash-out across several ATMs",
    "new_terminal_large": "Large amount at a terminal this account never used",
}
_RANK = {"CRITICAL": 0, "HIGH": 1, "WARNING": 2, "INFO": 3}


@dataclass(frozen=True, slots=True)
class AlertView:
    """One alert with what its message needs (read from ``alerts`` and ``transactions``)."""

    alert_id: int
    severity: str
    risk: float
    created_at: float
    ts: float
    account_id: str
    terminal_id: str
    branch: str
    amount: float
    currency: str
    reasons: list[str]
    details: list[str]
    decision: str
    channel: str
    location: str | None
    merchant_category: str | None
    unusual: list[str] = field(default_factory=list)
    """The stored explanation's plain-words sentences ("first use of this terminal")."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message to one destination, carrying ``alert_ids``; ``severity`` is the worst."""

    title: str
    body: str
    severity: str
    alert_ids: tuple[int, ...]


def mask_account(account_id: str) -> str:
    """``****1234`` for an id longer than ACCOUNT_VISIBLE characters, else the id."""
    if len(account_id) > ACCOUNT_VISIBLE:
        return "****" + account_id[-4:]
    return account_id


def case_link(console_url: str, alert_id: int) -> str:
    return f"{console_url.rstrip('/')}/console/alerts/{alert_id}"


def plain_reason(reason: str, detail: str | None) -> str:
    """A reason code in plain words, with the rule's sentence of values when there is one."""
    words = PLAIN_REASONS.get(reason, reason.replace("_", " ").capitalize())
    return f"{words}: {detail}" if detail else words


def _money(amount: float, currency: str) -> str:
    return f"{amount:,.2f} {currency}"


def _when(ts: float) -> str:
    return f"{event_time_text(ts)} UTC"  # any stored time, even beyond a datetime's range


def _worst(alerts: Sequence[AlertView]) -> str:
    return min((a.severity for a in alerts), key=lambda s: _RANK.get(s, 9))


def single(alert: AlertView, console_url: str) -> Message:
    """The message for one alert on its own."""
    a = alert
    title = (f"[{a.severity}] {_money(a.amount, a.currency)} · account "
             f"{mask_account(a.account_id)} · terminal {a.terminal_id} · branch {a.branch}")
    where = ", ".join(x for x in (a.channel, a.merchant_category, a.location) if x)
    lines = [f"Risk {a.risk:.2f}, decision: {a.decision}.",
             f"Transaction at {_when(a.ts)} ({where}).", "", "Why:"]
    details = list(a.details) + [""] * (len(a.reasons) - len(a.details))
    lines += [f"- {plain_reason(r, d)}" for r, d in zip(a.reasons, details)]
    if not a.reasons:
        lines.append("- Overall risk above the alert threshold")
    if a.unusual:
        lines += ["", "What was unusual:"] + [f"- {u}" for u in a.unusual]
    lines += ["", f"Case: {case_link(console_url, a.alert_id)}"]
    return Message(title, "\n".join(lines), a.severity, (a.alert_id,))


def _subject(alerts: Sequence[AlertView]) -> str:
    terminals = {(a.branch, a.terminal_id) for a in alerts}
    accounts = {a.account_id for a in alerts}
    if len(terminals) == 1:
        branch, terminal = next(iter(terminals))
        return f"terminal {terminal} · branch {branch}"
    if len(accounts) == 1:
        branches = ", ".join(sorted({a.branch for a in alerts}))
        return f"account {mask_account(next(iter(accounts)))} · branch {branches}"
    branches = ", ".join(sorted({a.branch for a in alerts}))
    return f"{len(terminals)} terminals, {len(accounts)} accounts · branch {branches}"


def _listing(alerts: Sequence[AlertView], console_url: str) -> list[str]:
    lines = [f"- [{a.severity}] {_money(a.amount, a.currency)}, account "
             f"{mask_account(a.account_id)}, terminal {a.terminal_id}, "
             f"{', '.join(PLAIN_REASONS.get(r, r) for r in a.reasons) or 'risk'}: "
             f"{case_link(console_url, a.alert_id)}" for a in alerts[:LISTED]]
    if len(alerts) > LISTED:
        lines.append(f"- ... and {len(alerts) - LISTED} more")
    return lines


def _summary(alerts: Sequence[AlertView]) -> list[str]:
    severities = Counter(a.severity for a in alerts)
    reasons = Counter(r for a in alerts for r in a.reasons)
    first, last = min(a.ts for a in alerts), max(a.ts for a in alerts)
    totals: dict[str, float] = {}
    for a in alerts:
        totals[a.currency] = totals.get(a.currency, 0.0) + a.amount
    lines = [", ".join(f"{n} {s}" for s, n in sorted(severities.items(),
                                                      key=lambda i: _RANK.get(i[0], 9))),
             f"Between {_when(first)} and {_when(last)}; total "
             + ", ".join(_money(v, c) for c, v in sorted(totals.items())) + ".",
             f"Accounts: {len({a.account_id for a in alerts})}, terminals: "
             f"{len({(a.branch, a.terminal_id) for a in alerts})}.", "", "Why:"]
    lines += [f"- {PLAIN_REASONS.get(r, r)}: {n}" for r, n in reasons.most_common()]
    return lines


def grouped(alerts: Sequence[AlertView], console_url: str) -> Message:
    """One message for a burst of alerts on the same account or terminal, with the count."""
    if len(alerts) == 1:
        return single(alerts[0], console_url)
    total = sum(a.amount for a in alerts)
    currency = alerts[0].currency if len({a.currency for a in alerts}) == 1 else ""
    amount = f" · {_money(total, currency)}" if currency else ""
    title = f"[{_worst(alerts)}] {len(alerts)} alerts on {_subject(alerts)}{amount}"
    body = _summary(alerts) + ["", "Alerts:"] + _listing(alerts, console_url)
    return Message(title, "\n".join(body), _worst(alerts), tuple(a.alert_id for a in alerts))


def digest(alerts: Sequence[AlertView], console_url: str) -> Message:
    """The periodic WARNING digest: counts, the reasons, and the first alerts listed."""
    branches = ", ".join(sorted({a.branch for a in alerts}))
    title = (f"[{_worst(alerts)}] digest: {len(alerts)} alert{'s' if len(alerts) > 1 else ''}"
             f" · branch {branches}")
    terminals = Counter((a.branch, a.terminal_id) for a in alerts).most_common(5)
    body = _summary(alerts) + ["", "Busiest terminals:"]
    body += [f"- {t} (branch {b}): {n}" for (b, t), n in terminals]
    body += ["", "Alerts:"] + _listing(alerts, console_url)
    return Message(title, "\n".join(body), _worst(alerts), tuple(a.alert_id for a in alerts))


def probe_message(branch: str, console_url: str) -> Message:
    """``branchguard alerts test``: proves a destination is reachable; carries no alert."""
    return Message(f"[TEST] Branchguard alert test · branch {branch}",
                   "A test message from branchguard alerts test. Alerts from this node will "
                   f"arrive here. Console: {console_url.rstrip('/')}/console/alerts",
                   "INFO", ())
