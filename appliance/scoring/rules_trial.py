"""``branchguard rules test``: a candidate rules file replayed over the stored transactions,
beside the rules in force.

Every stored transaction is replayed in event order (ties in the order they were stored)
through fresh feature and typology state, exactly as the scorer builds it, once for each
rules file. A transaction *alerts* under a rules file when at least one typology matches
it (typology hits always alert). Declines, which ``card_testing`` counts, are the stored
verdicts' (the node's own, with the rules then in force): the model is not run again. The
terminal places are the directory's now.

Precision and recall are given when the node has labels: label 1 is fraud and, as in
``branchguard evaluate``, a transaction without a label counts as genuine (labels arrive
for the frauds, as chargebacks do), so precision is the share of alerts on known frauds
and recall the share of known frauds alerted; recall is also given for each fraud type
the labels name (their typology, set when an analyst closes a case as fraud).

A period (``since``, ``until``) counts only the transactions whose event time is in it, but
the replay still starts at the first stored transaction, so the state on entering the
period is what the scorer had. That is how a parameter is chosen honestly: try candidates
on an earlier period, pick one by a criterion fixed beforehand, and only then look at the
period it is judged on (docs/rules.md).
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..settings import Settings
from ..store import require_db
from ..transaction import MILLI, Transaction
from .features import FeatureState
from .rulebook import Rulebook, load, rules_path
from .typologies import Places, TypologyState

_ROWS = ("SELECT transaction_id, account_id, terminal_id, amount, currency, ts, utc_offset, "
         "channel, merchant_category, location, decision FROM transactions ORDER BY ts, rowid")


@dataclass
class Figures:
    """What one rules file would have alerted on the stored transactions."""

    version: str
    path: str
    alerts: int = 0
    per_day: Counter[str] = field(default_factory=Counter)
    """UTC date (YYYY-MM-DD) of the event -> alerts."""
    by_typology: Counter[str] = field(default_factory=Counter)
    """Reason code -> transactions it matched (one transaction may match several)."""
    frauds_alerted: int = 0
    frauds_alerted_by_type: Counter[str] = field(default_factory=Counter)
    """Fraud type (the label's typology, or ``not said``) -> those frauds alerted."""
    precision: float | None = None
    recall: float | None = None


@dataclass
class Trial:
    transactions: int
    days: list[str]
    """Every UTC date with stored transactions, in order."""
    frauds: int
    labelled: bool
    candidate: Figures
    in_force: Figures
    frauds_by_type: Counter[str] = field(default_factory=Counter)
    """Fraud type -> labelled frauds of that type in the period."""
    since: float | None = None
    until: float | None = None

    def to_json(self) -> dict[str, Any]:
        def one(f: Figures) -> dict[str, Any]:
            return {"version": f.version, "path": f.path, "alerts": f.alerts,
                    "alerts_per_day": {d: f.per_day[d] for d in self.days},
                    "by_typology": dict(f.by_typology), "frauds_alerted": f.frauds_alerted,
                    "precision": f.precision, "recall": f.recall,
                    "recall_by_fraud_type": {
                        k: f.frauds_alerted_by_type[k] / n
                        for k, n in sorted(self.frauds_by_type.items())}}
        return {"transactions": self.transactions, "days": len(self.days),
                "since": self.since, "until": self.until,
                "frauds": self.frauds, "frauds_by_type": dict(self.frauds_by_type),
                "labelled": self.labelled,
                "candidate": one(self.candidate), "in_force": one(self.in_force)}


def _transactions(conn: sqlite3.Connection) -> Iterator[tuple[Transaction, str]]:
    cursor = conn.execute(_ROWS)
    cursor.arraysize = 10000
    zones: dict[int, timezone] = {}
    for tid, account, terminal, amount, currency, ts, offset, channel, cat, loc, decision \
            in cursor:
        zone = zones.get(offset)
        if zone is None:
            zone = zones[offset] = timezone(timedelta(seconds=offset))
        yield (Transaction(transaction_id=tid, account_id=account, amount=amount,
                           currency=currency, timestamp=datetime.fromtimestamp(ts, zone),
                           terminal_id=terminal, channel=channel, merchant_category=cat,
                           location=loc), decision)


NOT_SAID = "not said"
"""The fraud type of a fraud label that names no typology."""


def replay(conn: sqlite3.Connection, books: Sequence[tuple[Rulebook, str]], currency: str,
           since: float | None = None, until: float | None = None
           ) -> tuple[int, list[str], Counter[str], bool, list[Figures]]:
    """(transactions, days, frauds by type, labelled, figures per rules file) of replaying
    every stored transaction through each of ``books`` ((rulebook, where it came from)),
    counting those with an event time in [``since``, ``until``)."""
    fraud_type = {tid: typology or NOT_SAID for tid, label, typology in conn.execute(
        "SELECT transaction_id, label, typology FROM labels") if label == 1}
    labelled = conn.execute("SELECT 1 FROM labels LIMIT 1").fetchone() is not None
    places = Places(conn, 1.0)
    places.refresh_if_due()
    where = places.places
    features = FeatureState()
    states = [TypologyState(book, where, currency) for book, _ in books]
    figures = [Figures(book.version, source) for book, source in books]
    first = -math.inf if since is None else since
    end = math.inf if until is None else until
    frauds: Counter[str] = Counter()
    days: list[str] = []
    count = 0
    for tx, decision in _transactions(conn):
        f = features.observe(tx)
        t = tx.timestamp.timestamp()
        milli = round(tx.amount * MILLI)
        counted = first <= t < end
        kind = fraud_type.get(tx.transaction_id) if counted else None
        if counted:
            count += 1
            day = tx.timestamp.astimezone(timezone.utc).date().isoformat()
            if not days or days[-1] != day:
                days.append(day)
            if kind is not None:
                frauds[kind] += 1
        for state, fig in zip(states, figures):
            hits = state.check(tx, f)
            if hits and counted:
                fig.alerts += 1
                fig.per_day[day] += 1
                fig.by_typology.update({h.reason for h in hits})
                if kind is not None:
                    fig.frauds_alerted += 1
                    fig.frauds_alerted_by_type[kind] += 1
            state.add(tx.account_id, tx.terminal_id, t, milli, tx.channel, decision)
    total = sum(frauds.values())
    if labelled:
        for fig in figures:
            fig.precision = fig.frauds_alerted / fig.alerts if fig.alerts else None
            fig.recall = fig.frauds_alerted / total if total else None
    return count, sorted(set(days)), frauds, labelled, figures


def trial(settings: Settings, path: Path, since: float | None = None,
          until: float | None = None) -> Trial:
    """``branchguard rules test FILE``: the rules file at ``path`` (checked first) and the
    rules in force, replayed over the node's stored transactions; the figures count the
    period [``since``, ``until``) of event time (default: everything)."""
    candidate = load(path)
    in_force_path = rules_path(settings)
    in_force = load(in_force_path)
    require_db(settings.db_path)
    conn = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
    try:
        count, days, frauds, labelled, (cand, force) = replay(
            conn, [(candidate, str(path)), (in_force, str(in_force_path))], settings.currency,
            since, until)
    finally:
        conn.close()
    return Trial(count, days, sum(frauds.values()), labelled, cand, force, frauds, since, until)


def report(result: Trial) -> str:
    """The trial as the command prints it."""
    c, f = result.candidate, result.in_force
    n = max(1, len(result.days))

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f} %"

    span = f"{result.days[0]} .. {result.days[-1]}" if result.days else "none"
    lines = [f"{result.transactions:,} stored transactions, {span} ({len(result.days)} "
             f"days); " + (f"{result.frauds:,} labelled frauds" if result.labelled
                           else "no labels: precision and recall not known"),
             "",
             f"{'':<24}{'candidate':>16}{'in force':>16}",
             f"{'rules version':<24}{c.version:>16}{f.version:>16}",
             f"{'alerts':<24}{c.alerts:>16,}{f.alerts:>16,}",
             f"{'alerts per day':<24}{c.alerts / n:>16,.1f}{f.alerts / n:>16,.1f}",
             f"{'frauds alerted':<24}{c.frauds_alerted:>16,}{f.frauds_alerted:>16,}",
             f"{'precision':<24}{pct(c.precision):>16}{pct(f.precision):>16}",
             f"{'recall':<24}{pct(c.recall):>16}{pct(f.recall):>16}",
             "", "alerts by typology (a transaction may match several):"]
    for code in sorted(set(c.by_typology) | set(f.by_typology)):
        lines.append(f"  {code:<22}{c.by_typology[code]:>16,}{f.by_typology[code]:>16,}")
    if result.frauds_by_type:
        lines += ["", "recall by fraud type (the labels' typology; frauds alerted / frauds):"]
        for kind, n in sorted(result.frauds_by_type.items()):
            a, b = c.frauds_alerted_by_type[kind], f.frauds_alerted_by_type[kind]
            lines.append(f"  {kind:<22}{f'{a}/{n} {100 * a / n:.0f} %':>16}"
                         f"{f'{b}/{n} {100 * b / n:.0f} %':>16}")
    lines += ["", "alerts per day (UTC):"]
    for day in result.days:
        lines.append(f"  {day:<22}{c.per_day[day]:>16,}{f.per_day[day]:>16,}")
    return "\n".join(lines)
